"""The HTTP surface shared by the three servers: routes, errors, auth, request ids, SSE, and the process entrypoint.

Handlers only decode, call core, and encode: parsing lives in core.protocol, the media policy in core.media, expert
choice and generation in core.front.service (or core.front.consensus on 8084), engines in the model host
(core.host). Every response carries `X-Request-Id` and every request leaves one access log line.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import logging
import os
import socket
import sys
import time
from contextlib import aclosing
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from core.config import EMBEDDED_CONFIG, AppConfig, ConfigError, load_config
from core.host.protocol import HostAddress
from core.front.host_client import HostClient, HostRefused, HostUnavailable
from core.front.request_log import RequestRecord, recording, request_id
from core.local_ipc import NotPrivate
from core.media import check_image_urls
from core.protocol import (SSE_DONE, APIError, decode_body, openai_fields, parse_chat_request,
                           parse_completion_request, sse_event, unavailable)
from core.router import Router
from core.front.service import CompletionService
from core.front.stats import Stats

log = logging.getLogger("capibara6")
access_log = logging.getLogger("capibara6.access")
SERVER_KINDS = ("standard", "streaming", "consensus")
AFTER_DRAIN_S = 1.0  # once the drain ends, time left to write the last answers; what still runs is cancelled
REQUEST_RECORD = web.RequestKey("request_record", RequestRecord)
CLIENT_GONE = 499  # the access log's status for a request whose client left before its answer (nginx's)


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, headers=headers,
                        content_type="application/json")


def error_response(error: APIError) -> web.Response:
    headers = {"Retry-After": str(max(1, round(error.retry_after)))} if error.retry_after else None
    return json_response(error.body(), error.status, headers)


_HTTP_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                     413: "invalid_request_error"}


class Api:
    """Route handlers for one server process."""

    def __init__(self, kind: str, config: AppConfig, config_path: str):
        self.kind = kind
        self.config = config
        self.stats = Stats(kind)
        self.host = HostClient(config_path, HostAddress.for_config(config_path, config))
        self.service = CompletionService(kind, config, self.host, Router.from_config(config), self.stats)
        if kind == "consensus":
            from core.front.consensus import ConsensusService
            self.chat_jobs = ConsensusService(self.service).chat
        else:
            self.chat_jobs = self.service.chat
        self.api_key = api_key(config)
        self.requests_in_flight = 0

    # ------------------------------------------------------------ middleware

    @web.middleware
    async def request_ids(self, request: web.Request, handler) -> web.StreamResponse:
        """The outermost layer: the request's id and record for everything below, and its access log line."""
        record = RequestRecord(request_id(request.headers.get("X-Request-Id")))
        request[REQUEST_RECORD] = record
        started = time.monotonic()
        status = CLIENT_GONE
        try:
            with recording(record):
                response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as error:  # a redirect: the errors layer answers every error itself
            status = error.status
            raise
        finally:
            access_log.info("%s %s %d expert=%s tokens=%d+%d %.3fs id=%s", request.method, request.rel_url.raw_path,
                            status, ",".join(record.experts) or "-", record.prompt_tokens, record.completion_tokens,
                            time.monotonic() - started, record.id)

    async def tag_response(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every response, streamed or not, error or not, names its request (set before its headers go out)."""
        record = request.get(REQUEST_RECORD)
        response.headers["X-Request-Id"] = record.id if record else request_id(request.headers.get("X-Request-Id"))

    @web.middleware
    async def errors(self, request: web.Request, handler) -> web.StreamResponse:
        self.requests_in_flight += 1
        try:
            return await handler(request)
        except APIError as error:
            self.stats.record_http_error(error.status)
            return error_response(error)
        except HostRefused as error:
            self.stats.record_http_error(error.status)
            return error_response(APIError(error.status, str(error), type=error.fields.get("type", "server_error"),
                                           code=error.fields.get("code"), retry_after=error.retry_after))
        except HostUnavailable as error:
            self.stats.record_http_error(503)
            return error_response(unavailable(str(error), code="host_unavailable"))
        except web.HTTPException as error:
            if error.status < 400:
                raise
            self.stats.record_http_error(error.status)
            message = "request body is too large" if error.status == 413 else error.reason
            if error.status == 404:
                message = f"no route for {request.method} {request.path}"
            return error_response(APIError(error.status, message, type=_HTTP_ERROR_TYPES.get(error.status,
                                                                                             "invalid_request_error")))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:  # noqa: BLE001 - a bug of ours: log it, tell the client nothing internal
            log.exception("unhandled error on %s %s", request.method, request.path)
            self.stats.record_http_error(500)
            return error_response(APIError(500, "internal server error", type="server_error"))
        finally:
            self.requests_in_flight -= 1

    @web.middleware
    async def auth(self, request: web.Request, handler) -> web.StreamResponse:
        if self.api_key and request.path != "/health":
            header = request.headers.get("Authorization", "")
            token = header[7:] if header.startswith("Bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                raise APIError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                               type="authentication_error", code="invalid_api_key")
        return await handler(request)

    # ------------------------------------------------------------ handlers

    async def _states(self) -> dict[str, dict[str, Any]] | None:
        """Every expert's state from the model host, or None while it cannot be reached."""
        try:
            return await self.host.states()
        except HostUnavailable:
            return None

    async def health(self, request: web.Request) -> web.Response:
        states = await self._states()
        if states is None:
            return json_response({"status": "degraded", "server": self.kind, "host": "unreachable",
                                  "experts": {e.id: {"state": "unknown", "error": "the model host is unreachable"}
                                              for e in self.config.experts}})
        return json_response({"status": "ok", "server": self.kind,
                              "experts": {k: {"state": v["state"], "error": v["error"],
                                                  "precision": (v["runner"].get("effective") or {}).get("precision")}
                                              for k, v in states.items()}})

    async def models(self, request: web.Request) -> web.Response:
        states = await self._states() or {}
        data = [{"id": e.id, "object": "model", "created": 0, "owned_by": "capibara6", "domain": e.domain,
                 "description": e.description, "vision": e.vision,
                 "state": states.get(e.id, {}).get("state", "unknown"),
                 "engine": {"kind": e.engine.kind, **(states.get(e.id, {}).get("runner") or {})}}
                for e in self.config.experts]
        return json_response({"object": "list", "data": data})

    async def stats_view(self, request: web.Request) -> web.Response:
        return json_response(self.stats.render(await self._states() or {}))

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.stats.render_metrics(await self._states() or {}),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_chat_request(decode_body(await request.read()), self.config.server.max_tokens)
        await check_image_urls(parsed, self.config.server.allowed_media_domains)
        return await self._respond(request, self.chat_jobs(parsed), parsed.engine_fields)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_completion_request(decode_body(await request.read()), self.config.server.max_tokens)
        return await self._respond(request, self.service.completion(parsed), parsed.engine_fields)

    async def route(self, request: web.Request) -> web.Response:
        body = decode_body(await request.read())
        if "messages" in body:
            decision = self.service.route_chat(parse_chat_request(body, self.config.server.max_tokens))
        else:
            decision = self.service.route_prompt(parse_completion_request(body, self.config.server.max_tokens))
        return json_response({"expert": decision.expert, "reason": decision.reason, "stage": decision.stage,
                              "confidence": decision.confidence, "scores": decision.scores,
                              "ranking": list(decision.ranking()), "elapsed_ms": decision.elapsed_ms})

    async def admin(self, request: web.Request) -> web.Response:
        """Load or unload an expert: with an API key set, its holders (the auth layer checked); without one, only
        clients on this machine, since anyone else could then stop the experts."""
        if not self.api_key and not is_loopback(request.remote):
            raise APIError(403, "admin routes answer only clients on this machine while no API key is set; set "
                                f"{self.config.server.api_key_env} to manage experts from elsewhere",
                           type="permission_error", code="admin_forbidden")
        expert_id, action = request.match_info["expert"], request.match_info["action"]
        if self.config.expert(expert_id) is None:
            raise APIError(404, f"The model '{expert_id}' does not exist", param="expert", code="model_not_found")
        return json_response({"id": expert_id, **await self.host.admin(expert_id, action)})

    async def _respond(self, request: web.Request, job, engine_fields: bool) -> web.StreamResponse:
        shape = (lambda payload: payload) if engine_fields else openai_fields
        if not job.streaming:
            return json_response(shape(await job.complete()), headers=job.headers())
        async with aclosing(job.stream()) as events:
            first = await anext(events, None)  # errors before the first chunk are ordinary JSON errors
            response = web.StreamResponse(headers={**job.headers(), "Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            await response.prepare(request)
            try:
                if first is not None:
                    await response.write(sse_event(shape(first)))
                async for event in events:
                    await response.write(sse_event(shape(event)))
            except APIError as error:
                self.stats.record_http_error(error.status)  # an error event after the 200: counted all the same
                await response.write(sse_event(error.body()))
            except ConnectionResetError:
                return response
            await response.write(SSE_DONE)
        return response

    # ------------------------------------------------------------ application

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self.request_ids, self.errors, self.auth],
                              client_max_size=self.config.server.max_body_bytes)
        app.on_response_prepare.append(self.tag_response)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.stats_view)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/route", self.route)
        app.router.add_post(r"/admin/experts/{expert}/{action:load|unload}", self.admin)
        app.on_startup.append(lambda _: self.host.start())
        app.on_shutdown.append(lambda _: self._drain())
        app.on_cleanup.append(lambda _: self._close())
        return app

    async def _close(self) -> None:
        await self.service.close()
        await self.host.close()

    async def _drain(self) -> None:
        """On SIGTERM, let in-flight requests finish (up to the grace period) before engines stop."""
        deadline = asyncio.get_running_loop().time() + self.config.server.shutdown_grace_s
        while self.requests_in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)


def api_key(config: AppConfig) -> str | None:
    return os.environ.get(config.server.api_key_env) or None


def is_loopback(address: str | None) -> bool:
    """Whether a peer or bind address is on this machine only (a unix socket's peer, None, is not counted)."""
    try:
        ip = ipaddress.ip_address((address or "").partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def binds_loopback_only(host: str) -> bool:
    """Whether every address a bind to `host` listens on is loopback ("localhost" is; "0.0.0.0" is not)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return False
    return bool(addresses) and all(is_loopback(address) for address in addresses)


def main(kind: str, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"capibara6-{kind}", description=f"Capibara6 {kind} server")
    parser.add_argument("--config", default=os.environ.get("CAPIBARA_CONFIG", str(EMBEDDED_CONFIG)))
    parser.add_argument("--host", default=None, help="default: server.host from the config")
    parser.add_argument("--port", type=int, default=None, help="default: server.ports.<kind> from the config")
    parser.add_argument("--log-file", default=None, help="default: server.log_file from the config, else stderr")
    parser.add_argument("--log-level", default=os.environ.get("CAPIBARA_LOG_LEVEL", "INFO"))
    parser.add_argument("--insecure", action="store_true",
                        help="serve without an API key on an address other than loopback (also server.insecure or "
                             "CAPIBARA_INSECURE=1)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"capibara6-{kind}: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    log_file = args.log_file or config.server.log_file
    logging.basicConfig(level=args.log_level.upper(), filename=log_file,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = args.host or config.server.host
    port = args.port or config.server.ports[kind]
    if not api_key(config) and not binds_loopback_only(host):
        if not (args.insecure or config.server.insecure or os.environ.get("CAPIBARA_INSECURE") == "1"):
            print(f"capibara6-{kind}: refusing to serve {host} without an API key: anyone who reaches it could use "
                  f"and unload the experts. Set {config.server.api_key_env}, bind 127.0.0.1 (--host), or pass "
                  "--insecure (server.insecure, CAPIBARA_INSECURE=1) to serve it open.", file=sys.stderr)
            raise SystemExit(2)
        log.warning("serving %s without an API key (insecure): anyone who reaches port %d may use it", host, port)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    try:
        app = Api(kind, config, args.config).application()
    except NotPrivate as error:  # the runtime folder is not ours alone: nothing is started in it
        print(f"capibara6-{kind}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info("capibara6 %s server on %s:%d with %s", kind, host, port, args.config)
    web.run_app(app, host=host, port=port, handler_cancellation=True, access_log=None,
                shutdown_timeout=AFTER_DRAIN_S,
                print=lambda _: print(f"capibara6 {kind} server listening on http://{host}:{port}", flush=True))
