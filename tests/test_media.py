"""Image URLs: data: images are accepted; remote ones only from server.allowed_media_domains, and never when the
host is or resolves to an address that is not public. A refused URL is a 400 naming its field, and nothing fetches
it: a local HTTP listener the URLs point at sees no request, and the upstream sees none of them.

Real fronts on the fake upstream, with one vision expert (the fake does not fetch images; what it receives is
what a runner would have fetched).
"""
from __future__ import annotations

import base64
import http.server
import socket
import threading

import pytest
import requests

from tests.conftest import make_config, write_config

CHAT = "/v1/chat/completions"
VISION = "gemma3_multimodal"
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(16)).decode()
PUBLIC = "8.8.8.8"  # a public address, allowed by literal: no resolver needed, and nothing fetches it here
PARAM = "messages[0].content[1].image_url.url"


class Listener:
    """A local HTTP server that counts the requests it gets: a refused image URL must never reach it."""

    def __init__(self) -> None:
        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                seen.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                self.wfile.write(base64.b64decode(PNG.partition(",")[2]))

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener():
    local = Listener()
    yield local
    local.close()


def media_config(tmp_path, fake_upstream, allowed: list[str]):
    path, config = make_config(tmp_path, engine="fake", upstream=fake_upstream.url, allowed_media_domains=allowed)
    expert = next(e for e in config["experts"] if e["id"] == VISION)
    expert["vision"] = True
    return write_config(path, config)


def ask(server, url: str, model: str | None = VISION, **extra) -> requests.Response:
    content = [{"type": "text", "text": "What is in this picture?"}, {"type": "image_url", "image_url": {"url": url}}]
    body = {"messages": [{"role": "user", "content": content}], **extra}
    if model:
        body["model"] = model
    return requests.post(server.url + CHAT, json=body, timeout=30)


def assert_refused(response: requests.Response, mentions: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == PARAM and error["code"] == "image_url_not_allowed", error
    assert error["type"] == "invalid_request_error" and PARAM in error["message"] and mentions in error["message"], \
        error


def this_hosts_name() -> str | None:
    """This machine's name, if it resolves (to its own, not public, addresses)."""
    name = socket.gethostname().lower()
    try:
        socket.getaddrinfo(name, None)
    except OSError:
        return None
    return name if name.replace("-", "").replace(".", "").isalnum() else None


def test_by_default_only_data_images_are_accepted(tmp_path, start_server, fake_upstream, listener):
    server = start_server("standard", media_config(tmp_path, fake_upstream, []))
    for url in (f"http://127.0.0.1:{listener.port}/cat.png", "https://example.com/cat.png", f"http://{PUBLIC}/x.png"):
        assert_refused(ask(server, url), "not accepted by this server")
    assert_refused(ask(server, f"http://127.0.0.1:{listener.port}/cat.png", model=None, stream=True),
                   "not accepted by this server")
    assert ask(server, PNG).status_code == 200
    assert listener.seen == []


@pytest.mark.parametrize("kind", ["standard", "consensus"])
def test_addresses_that_are_not_public_are_refused_even_when_allowed(kind, tmp_path, start_server, fake_upstream,
                                                                     listener):
    """Listed hosts that are, or resolve to, loopback, link-local, private or unspecified addresses; and URLs
    whose host two parsers could read differently."""
    name = this_hosts_name()
    allowed = ["localhost", "127.0.0.1", "127.1", "169.254.169.254", "0.0.0.0", "10.1.2.3", "192.168.0.1",
               "2130706433", PUBLIC, *([name] if name else [])]
    server = start_server(kind, media_config(tmp_path, fake_upstream, allowed))
    seen = len(fake_upstream.requests())
    port = listener.port
    refused = {
        f"http://localhost:{port}/cat.png": "resolves to",
        f"http://127.0.0.1:{port}/cat.png": "127.0.0.1",
        f"http://127.1:{port}/cat.png": "127.0.0.1",  # a short form of 127.0.0.1
        f"http://2130706433:{port}/cat.png": "127.0.0.1",  # 127.0.0.1 as one number
        "http://169.254.169.254/latest/meta-data/": "169.254.169.254",  # the cloud metadata service
        f"http://0.0.0.0:{port}/cat.png": "0.0.0.0",
        "http://10.1.2.3/cat.png": "10.1.2.3",
        "https://192.168.0.1/cat.png": "192.168.0.1",
        f"http://{PUBLIC}@127.0.0.1:{port}/cat.png": "plain host name",  # user info: the host is 127.0.0.1
        f"http://{PUBLIC}\\@127.0.0.1:{port}/cat.png": "plain host name",
        f"http://[::1]:{port}/cat.png": "plain host name",
        f"http://%31%32%37.0.0.1:{port}/cat.png": "plain host name",
        f"http://example.org:{port}/cat.png": "not in server.allowed_media_domains",
        **({f"http://{name}:{port}/cat.png": "not a public address"} if name else {}),
    }
    model = VISION if kind == "standard" else None
    for url, mentions in refused.items():
        assert_refused(ask(server, url, model=model), mentions)
    assert listener.seen == []
    assert len(fake_upstream.requests()) == seen


def test_an_allowed_public_host_reaches_the_expert(tmp_path, start_server, fake_upstream):
    server = start_server("standard", media_config(tmp_path, fake_upstream, [PUBLIC]))
    url = f"http://{PUBLIC}/cat.png?size=small"
    response = ask(server, url)
    assert response.status_code == 200, response.text
    sent = [r["body"] for r in fake_upstream.requests() if url in str(r["body"])]
    assert len(sent) == 1 and sent[0]["messages"][-1]["content"][1]["image_url"]["url"] == url
