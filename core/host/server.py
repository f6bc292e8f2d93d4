"""The model host's process: its HTTP API on a unix socket, for the fronts only, and its entry point.

The API's messages are `core.host.protocol`'s; a refusal (`HostError`) becomes an OpenAI-shaped error here, with
the status this layer picks. The socket is 0600 in the user's private runtime folder, and a connection from any
other user is refused (SO_PEERCRED). The host exits, stopping its runners, once no front has been attached for
`server.host_linger_s`, or on SIGTERM, within seconds either way.
"""
from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import shutil
import signal
import sys
import time

import orjson
from aiohttp import web

from core.config import AppConfig, ConfigError, load_config
from core.host.model_host import ModelHost
from core.host.protocol import HostAddress
from core.host.lifecycle import HostError
from core.local_ipc import NotPrivate, listen_private, private_dir, same_user

log = logging.getLogger("capibara6.host")
_STATUS = {"queue_full": 429, "expert_busy": 409, "unknown_expert": 404}
SHUTDOWN_S = 0.5  # open leases and attach connections are cut after this on the way out


class HostApi:
    """Leases, states and admin actions for the fronts; tracks attached fronts to know when to exit."""

    def __init__(self, host: ModelHost, linger_s: float):
        self.host = host
        self.linger_s = linger_s
        self.attached = 0
        self.last_detach = time.monotonic()
        self.stopped = asyncio.Event()

    @web.middleware
    async def same_user_only(self, request: web.Request, handler) -> web.StreamResponse:
        """Belt and braces behind the folder's mode: only this user's processes are served."""
        if not same_user(request.transport.get_extra_info("socket") if request.transport else None):
            log.warning("refused a connection from another user")
            raise web.HTTPForbidden()
        return await handler(request)

    @web.middleware
    async def errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except HostError as error:
            headers = {"Retry-After": str(max(1, round(error.retry_after)))} if error.retry_after else None
            body = {"error": {"message": error.message, "type": _error_type(error.code), "param": None,
                              "code": error.code}}
            return web.Response(body=orjson.dumps(body), status=_STATUS.get(error.code, 503), headers=headers,
                                content_type="application/json")

    def _expert(self, request: web.Request) -> str:
        expert_id = request.match_info["expert"]
        if expert_id not in self.host.experts:
            raise HostError("unknown_expert", f"no expert '{expert_id}'")
        return expert_id

    async def lease(self, request: web.Request) -> web.StreamResponse:
        """The grant as the first line, then the connection stays open: the lease ends when the front closes it."""
        try:
            priority = int(request.query.get("priority", 0))
        except ValueError:
            priority = 0
        async with self.host.lease(self._expert(request), priority) as grant:
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            await response.write(grant.render() + b"\n")
            await asyncio.Event().wait()  # cancelled when the front closes the connection
        return response

    async def attach(self, request: web.Request) -> web.StreamResponse:
        """A front's lifeline: the host lingers while at least one is open."""
        self.attached += 1
        try:
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(orjson.dumps({"pid": os.getpid()}) + b"\n")
            await asyncio.Event().wait()
        finally:
            self.attached -= 1
            self.last_detach = time.monotonic()
        return response

    async def states(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"pid": os.getpid(), "experts": self.host.states(),
                                               "standby": self.host.standby()}),
                            content_type="application/json")

    async def admin(self, request: web.Request) -> web.Response:
        expert_id = self._expert(request)
        if request.match_info["action"] == "load":
            await self.host.load(expert_id)
        else:
            await self.host.unload(expert_id)
        return web.Response(body=orjson.dumps(self.host.states()[expert_id]), content_type="application/json")

    async def report(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.host.report(self._expert(request), body.get("error"))
        return web.Response(status=204)

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self.same_user_only, self.errors])
        app.router.add_post("/lease/{expert}", self.lease)
        app.router.add_get("/attach", self.attach)
        app.router.add_get("/states", self.states)
        app.router.add_post(r"/experts/{expert}/{action:load|unload}", self.admin)
        app.router.add_post("/report/{expert}", self.report)
        return app

    async def linger(self) -> None:
        """Stop once no front has been attached for linger_s."""
        while True:
            await asyncio.sleep(0.5)
            if self.attached == 0 and time.monotonic() - self.last_detach >= self.linger_s:
                log.info("no server attached for %.0f s; stopping", self.linger_s)
                self.stopped.set()
                return


def _error_type(code: str) -> str:
    return {"queue_full": "rate_limit_error", "expert_busy": "invalid_request_error",
            "unknown_expert": "not_found_error"}.get(code, "service_unavailable_error")



async def serve(config: AppConfig, address: HostAddress) -> None:
    host = ModelHost(config, address)
    api = HostApi(host, config.server.host_linger_s)
    runner = web.AppRunner(api.application(), handler_cancellation=True, access_log=None,
                           shutdown_timeout=SHUTDOWN_S)
    await runner.setup()
    site = web.SockSite(runner, listen_private(address.socket))  # whatever was at the path is replaced
    await site.start()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, api.stopped.set)
    host.start()
    lingering = asyncio.create_task(api.linger())
    log.info("model host %d serving %s", os.getpid(), address.socket)
    try:
        await api.stopped.wait()
    finally:
        lingering.cancel()
        address.socket.unlink(missing_ok=True)
        started = time.monotonic()
        await asyncio.gather(runner.cleanup(), host.close())  # the runners stop while the connections close
        host.kill_all()
        log.info("model host stopped in %.1f s", time.monotonic() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="capibara6-host", description="Capibara6 model host (started by the servers)")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"capibara6-host: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=os.environ.get("CAPIBARA_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        address = HostAddress.for_config(args.config, config)
    except NotPrivate as error:
        print(f"capibara6-host: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    with open(address.lock, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another model host already serves %s", address.socket)
            return
        # The runners' folder is made and removed under the lock, so the next host of this config never sees it
        # vanish; the lock file itself stays (removing a lock file others may hold open lets two hosts run).
        try:
            private_dir(address.runners)
        except NotPrivate as error:
            print(f"capibara6-host: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        try:
            asyncio.run(serve(config, address))
        finally:
            shutil.rmtree(address.runners, ignore_errors=True)  # only dead runners' sockets are left in it


if __name__ == "__main__":
    main()
