"""Which image URLs a chat request may carry, decided before any runner sees it.

A runner fetches an http(s) image URL itself, from inside our network: left open, any client could make it request
the cloud metadata service or an internal admin page (SSRF). So `data:` images are always accepted, remote ones
only from the hosts listed in `server.allowed_media_domains` (exact host names, as vLLM's own
`--allowed-media-domains` compares them), and never when the host is, or resolves to, an address that is not
public: loopback, link-local, private, unspecified, multicast or reserved. Every address the name resolves to is
checked. A refused URL is a 400 naming its field.
"""
from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterator

from core.protocol import APIError, ChatCompletionRequest, ImagePart, invalid

RESOLVE_TIMEOUT_S = 5.0
# scheme://host[:port][/rest]: no user info, no backslash, no white space, no IPv6 literal and no percent-encoded
# host, so that the host we check is the host every URL parser (ours, vLLM's urllib3) reads.
_REMOTE_URL = re.compile(r"^https?://(?P<host>[A-Za-z0-9.-]+)(?::(?P<port>\d{1,5}))?(?:[/?#][^\s\\]*)?$")


def image_urls(request: ChatCompletionRequest) -> Iterator[tuple[str, str]]:
    """Every remote (not data:) image URL of the request, with its param name."""
    for i, message in enumerate(request.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart) and not part.image_url.url.startswith("data:"):
                    yield f"messages[{i}].content[{j}].image_url.url", part.image_url.url


async def check_image_urls(request: ChatCompletionRequest, allowed_domains: frozenset[str]) -> None:
    """Raise a 400 for the first remote image URL the server must not let a runner fetch. Each host is resolved
    once per request, so a request's lookups are bounded by the allow-list, not by how many images it carries."""
    resolved: dict[str, list[str]] = {}
    for param, url in image_urls(request):
        await _check(param, url, allowed_domains, resolved)


async def _check(param: str, url: str, allowed_domains: frozenset[str], resolved: dict[str, list[str]]) -> None:
    if not allowed_domains:
        raise _refused(param, "remote image URLs are not accepted by this server; send the image as a "
                              "'data:image/<type>;base64,...' URL")
    match = _REMOTE_URL.match(url)
    if match is None:
        raise _refused(param, "image URL must be http(s)://host[:port]/path with a plain host name (no user "
                              "info, IPv6 literal or escapes)")
    host = match["host"].lower()
    if host not in allowed_domains:
        raise _refused(param, f"image host '{host}' is not in server.allowed_media_domains")
    if host not in resolved:
        resolved[host] = await _addresses(param, host)
    for address in resolved[host]:
        if not _public(address):
            raise _refused(param, f"image host '{host}' is (or resolves to) {address}, which is not a public "
                                  "address")


async def _addresses(param: str, host: str) -> list[str]:
    """Every address the host is or resolves to."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError):
        raise _refused(param, f"image host '{host}' could not be resolved") from None
    return sorted({info[4][0] for info in infos})


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _refused(param: str, message: str) -> APIError:
    return invalid(param, f"Invalid value for '{param}': {message}", "image_url_not_allowed")
