"""A route that answers itself with a redirect: the `Location` built from the request and the
route's `redirect` parts, and the answer counted as a redirect.

`location` is pure; knows nothing of upstreams, YAML or metrics.
"""

from __future__ import annotations

from aiohttp import web

from proxy import intake, respond
from proxy.config import Redirect
from proxy.exchange import Exchange

DEFAULT_PORTS = {"http": 80, "https": 443}


def split_host(host: str) -> tuple[str, int | None]:
    """A Host header (already `valid_host`) as (host, port or None)."""
    end = host.rfind("]") + 1  # an IPv6 literal, "[::1]:8080": its colons are not the port's
    name, colon, port = host[end:].rpartition(":")
    if not colon:
        return host, None
    return host[:end] + name, int(port) if port else None


def location(redirect: Redirect, scheme: str, host: str | None, target: str) -> str | None:
    """Where to send the client: the request's scheme, host, port and origin-form `target`
    (path and query; rewritten when the route says so), with the redirect's non-null parts
    in their place and the query kept. The request's port is kept only while the scheme is:
    http://h:8080 redirected to https has no port of its own to go to, so it gets the default,
    like nginx's `return 301 https://$host$request_uri`. None when the request named no host
    and the redirect names none either (an HTTP/1.0 request without Host)."""
    if redirect.path is not None:
        _, question, query = target.partition("?")
        target = redirect.path + question + query
    if target.startswith(("//", "/\\")):
        # "//evil.example/x" as a relative Location is another host (a scheme-relative
        # reference), and a browser takes "/\\" for "//" too: one "/" only.
        target = "/" + target.lstrip("/\\")
    if host is None and redirect.host is None:
        # Only a relative reference is left (RFC 9110 §10.2.2): enough if nothing else changes.
        return target if redirect.scheme is None and redirect.port is None else None
    request_host, request_port = split_host(host) if host is not None else ("", None)
    new_scheme = redirect.scheme or scheme
    port = redirect.port
    if port is None and new_scheme == scheme:
        port = request_port
    authority = redirect.host or request_host
    if port is not None and port != DEFAULT_PORTS[new_scheme]:
        authority += f":{port}"
    return f"{new_scheme}://{authority}{target}"


def answer(
    exchange: Exchange, redirect: Redirect, scheme: str, host: str | None, target: str
) -> web.Response:
    """The redirect response (a short text body); Refusal(400) when there is nowhere to go."""
    where = location(redirect, scheme, host, target)
    if where is None:
        raise intake.Refusal(400, "a redirect to another scheme or port needs a Host header")
    response = respond.answer(exchange, redirect.status, "")
    response.headers["Location"] = where
    exchange.redirected = True
    return response
