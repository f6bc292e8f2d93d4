"""A front's side of the model host: start it if nobody has, stay attached, lease experts, read states.

Every front (8082, 8083, 8084) holds one `HostClient`. The first to need a host spawns it (a lock file makes
sure only one runs per configuration); all keep an attach connection open so that the host knows it is still
wanted. A lease is one connection to the host that stays open while the request runs. Every connection checks
that the host runs as this user (SO_PEERCRED): a socket someone else planted is never talked to.
"""
from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from core.config import REPO_ROOT
from core.host.protocol import Grant, HostAddress
from core.local_ipc import SameUserConnector

log = logging.getLogger(__name__)
START_TIMEOUT_S = 30.0


class HostUnavailable(Exception):
    """The model host cannot be reached or started."""


class HostRefused(Exception):
    """The host refused a lease or an admin action; `status` and `body` are its OpenAI-shaped answer."""

    def __init__(self, status: int, body: dict[str, Any], retry_after: float | None):
        fields = body.get("error") if isinstance(body.get("error"), dict) else {}
        super().__init__(fields.get("message", f"the model host answered HTTP {status}"))
        self.status = status
        self.fields = fields
        self.retry_after = retry_after


class HostClient:
    def __init__(self, config_path: str | Path, address: HostAddress):
        self.config_path = str(Path(config_path).resolve())
        self.address = address
        self._session: aiohttp.ClientSession | None = None
        self._attach_task: asyncio.Task | None = None
        self._spawn_lock = asyncio.Lock()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=SameUserConnector(path=str(self.address.socket), limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        await self.ensure_running()
        self._attach_task = asyncio.create_task(self._stay_attached())

    async def close(self) -> None:
        if self._attach_task:
            self._attach_task.cancel()
            await asyncio.gather(self._attach_task, return_exceptions=True)
        if self._session:
            await self._session.close()

    # ------------------------------------------------------------ the host's life

    async def ensure_running(self) -> None:
        """Spawn the host unless one answers; wait until it does."""
        async with self._spawn_lock:
            if await self._answers():
                return
            self.address.log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(self.address.log, "ab") as log_file:
                # A session of its own: stopping one front must not stop the engines the other fronts use.
                subprocess.Popen([sys.executable, "-m", "core.host", "--config", self.config_path], cwd=REPO_ROOT,
                                 stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            deadline = time.monotonic() + START_TIMEOUT_S
            while not await self._answers():
                if time.monotonic() > deadline:
                    raise HostUnavailable(f"the model host did not start within {START_TIMEOUT_S:g} s "
                                          f"(see {self.address.log})")
                await asyncio.sleep(0.1)
            log.info("model host up on %s", self.address.socket)

    async def _answers(self) -> bool:
        try:
            async with self._session.get("http://host/states", timeout=aiohttp.ClientTimeout(total=5)) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _stay_attached(self) -> None:
        """Hold the attach connection; if the host goes away, start a new one and attach again."""
        while True:
            try:
                async with self._session.get("http://host/attach") as response:
                    async for _ in response.content:
                        pass
            except (aiohttp.ClientError, TimeoutError):
                pass
            log.warning("lost the model host; starting it again")
            await asyncio.sleep(0.5)
            try:
                await self.ensure_running()
            except HostUnavailable as error:
                log.error("%s", error)

    # ------------------------------------------------------------ leases and states

    @asynccontextmanager
    async def lease(self, expert_id: str, priority: int = 0) -> AsyncIterator[Grant]:
        """An expert's runner, held until the block ends; HostRefused or HostUnavailable if it cannot be had.
        Waiting leases are granted by priority (lower first), the order vLLM schedules in."""
        response = await self._post_lease(expert_id, priority)
        try:
            if response.status != 200:
                raise await _refusal(response)
            line = await response.content.readline()
            if not line:
                raise HostUnavailable("the model host closed the lease before granting it")
            yield Grant.parse(line)
        finally:
            response.close()  # closing the connection ends the lease

    async def _post_lease(self, expert_id: str, priority: int) -> aiohttp.ClientResponse:
        for attempt in (1, 2):
            try:
                return await self._session.post(f"http://host/lease/{expert_id}", params={"priority": priority})
            except (aiohttp.ClientConnectionError, TimeoutError) as error:
                if attempt == 2:
                    raise HostUnavailable(f"the model host is unreachable ({error})") from None
                await self.ensure_running()
        raise AssertionError("unreachable")

    async def states(self) -> dict[str, dict[str, Any]]:
        try:
            async with self._session.get("http://host/states", timeout=aiohttp.ClientTimeout(total=5)) as response:
                return orjson.loads(await response.read())["experts"]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as error:
            raise HostUnavailable(f"the model host is unreachable ({error or type(error).__name__})") from None

    async def admin(self, expert_id: str, action: str) -> dict[str, Any]:
        try:
            async with self._session.post(f"http://host/experts/{expert_id}/{action}") as response:
                if response.status != 200:
                    raise await _refusal(response)
                return orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError) as error:
            raise HostUnavailable(f"the model host is unreachable ({error})") from None

    async def report(self, expert_id: str, error: str | None) -> None:
        """Tell the host how a request on a ready expert ended (shown in /health); best effort."""
        try:
            async with self._session.post(f"http://host/report/{expert_id}", data=orjson.dumps({"error": error}),
                                          timeout=aiohttp.ClientTimeout(total=5)):
                pass
        except (aiohttp.ClientError, TimeoutError):
            pass


async def _refusal(response: aiohttp.ClientResponse) -> HostRefused:
    try:
        body = orjson.loads(await response.read())
    except ValueError:
        body = {}
    retry_after = response.headers.get("Retry-After")
    return HostRefused(response.status, body if isinstance(body, dict) else {},
                       float(retry_after) if retry_after else None)
