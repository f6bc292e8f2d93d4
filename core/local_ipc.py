"""Same-user unix sockets: the private folder they live in, and the peer check at both ends of a connection.

The model host and its runners listen on unix sockets instead of TCP ports, so that only processes of the user
who started them can reach them: the folder is the owner's alone (0700, checked, never trusted as found), and
each end asks the kernel who is on the other side (SO_PEERCRED) and hangs up on any other user.
"""
from __future__ import annotations

import os
import socket
import stat
import struct
import tempfile
from pathlib import Path

import aiohttp
from aiohttp.client_exceptions import UnixClientConnectorError

# sun_path holds 108 bytes with its terminating NUL; vLLM's ZMQ ipc sockets have the same limit.
MAX_SOCKET_PATH = 107
_UCRED = struct.Struct("3i")  # pid, uid, gid


class NotPrivate(OSError):
    """A runtime folder or socket that someone else could read, write or own; the message says what and how."""


def runtime_dir() -> Path:
    """`$XDG_RUNTIME_DIR/capibara6`, or `<tempdir>/capibara6-<uid>` without it: created 0700, refused if not ours."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "capibara6" if base else Path(tempfile.gettempdir()) / f"capibara6-{os.getuid()}"
    return private_dir(path)


def private_dir(path: Path) -> Path:
    """Create `path` 0700 if missing; refuse a folder (or symlink) that is not ours alone."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise NotPrivate(f"the runtime folder {path} is not a directory (a symlink or a file is never trusted); "
                         "remove it")
    if info.st_uid != os.getuid():
        raise NotPrivate(f"the runtime folder {path} belongs to uid {info.st_uid}, not to this user "
                         f"(uid {os.getuid()}); remove it or set XDG_RUNTIME_DIR to a folder of your own")
    if info.st_mode & 0o077:
        raise NotPrivate(f"the runtime folder {path} has mode {stat.S_IMODE(info.st_mode):04o}: group or others "
                         f"may use it; remove it, or `chmod 700 {path}` if it is yours")
    return path


def check_socket_path(path: Path) -> Path:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise NotPrivate(f"the socket path {path} is longer than {MAX_SOCKET_PATH} bytes; use a shorter "
                         "XDG_RUNTIME_DIR")
    return path


def listen_private(path: Path) -> socket.socket:
    """A listening unix socket at `path`, mode 0600, replacing whatever was there (the folder is ours alone)."""
    check_socket_path(path)
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process on the other end of a connected unix socket, as the kernel saw it."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]


def same_user(sock: socket.socket | None) -> bool:
    return sock is not None and sock.family == socket.AF_UNIX and peer_uid(sock) == os.getuid()


class SameUserConnector(aiohttp.UnixConnector):
    """An aiohttp connector to a unix socket that hangs up unless the listener runs as this user."""

    async def _create_connection(self, req, traces, timeout):
        protocol = await super()._create_connection(req, traces, timeout)
        if not same_user(protocol.transport.get_extra_info("socket")):
            protocol.transport.close()
            raise UnixClientConnectorError(self.path, req.connection_key,
                                           PermissionError(f"{self.path} is served by another user"))
        return protocol
