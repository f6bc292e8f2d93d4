"""A runner's output, kept to a bounded size: the host copies the runner's stdout and stderr into its log file and
moves the file aside once it passes a size, so a chatty or long-lived engine never fills the disk."""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

MAX_BYTES = 20 * 2**20
BACKUPS = 1


class RotatingLog:
    """`path`, moved to `path.1` (and `.1` to `.2`, up to `backups`) once it holds `max_bytes`."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS):
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._file = open(path, "ab")

    def write(self, data: bytes) -> None:
        if self._file.tell() + len(data) > self.max_bytes and self._file.tell() > 0:
            self._rotate()
        self._file.write(data)
        self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        for index in range(self.backups, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            newer = self.path.with_name(f"{self.path.name}.{index - 1}") if index > 1 else self.path
            if newer.exists():
                newer.replace(older)
        self._file = open(self.path, "wb")

    def close(self) -> None:
        self._file.close()


class OutputCopy:
    """The read end of a pipe copied into a log (and to `watch` as it arrives) until every writer closed it (the
    runner and its children exited). `switch` sends what follows to another log: a standby runner's output goes to
    the log of the runner it becomes.
    A bare pipe, not asyncio's subprocess pipe: that one would hold the runner's exit back until its children,
    which share the pipe, are gone too."""

    def __init__(self, pipe: int, log: RotatingLog, watch: Callable[[bytes], None] | None = None):
        self.log = log
        self.watch = watch
        self.task = asyncio.create_task(self._copy(pipe))

    def switch(self, log: RotatingLog, watch: Callable[[bytes], None] | None = None) -> None:
        previous, self.log, self.watch = self.log, log, watch
        previous.close()

    async def _copy(self, pipe: int) -> None:
        reader = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(pipe, "rb", buffering=0))
        try:
            while chunk := await reader.read(1 << 16):
                self.log.write(chunk)
                if self.watch is not None:
                    self.watch(chunk)
        finally:
            transport.close()
            self.log.close()
