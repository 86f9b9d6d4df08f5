"""The ingress's front door, as one ASGI middleware: the API key is checked before a single body byte
is read (401 first, then 413/415/422), bodies are capped while they stream (chunked or not), and
every response carries the security headers.

Pure ASGI rather than Starlette's BaseHTTPMiddleware: that one reads nothing itself, but it cannot
stop a handler's body read midway, and the cap must hold for chunked bodies with no Content-Length."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable

from fastapi import HTTPException

from serve_app.keys import Principal

Authenticate = Callable[[str], Awaitable[Principal | None]]

# Routes anyone may call. Token routes check the meeting token in the handler, before reading a body.
_PUBLIC = re.compile(r"^/(?:|c/[^/]+|static/.*|healthz|metrics|docs(?:/.*)?|openapi\.json)$")
_TOKEN = {("POST", re.compile(r"^/v2/conversations/[^/]+/webrtc/?$")),
          ("GET", re.compile(r"^/v2/replicas/[^/]+/head/?$"))}

_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
# The web client loads only its own scripts; WebGL heads and camera previews use blob: and data: URLs.
_CSP = (b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
        b"media-src 'self' blob: mediastream:; connect-src 'self'; worker-src 'self' blob:; "
        b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
# Swagger UI (served from the local swagger-ui-bundle package) starts itself from one inline script.
_CSP_DOCS = _CSP.replace(b"script-src 'self'", b"script-src 'self' 'unsafe-inline'")

_authenticate: Authenticate | None = None


def set_authenticator(fn: Authenticate) -> None:
    """The ingress registers how a key becomes a Principal (its KeyRing), once per replica."""
    global _authenticate
    _authenticate = fn


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"body larger than {limit} bytes")


def route_kind(method: str, path: str) -> str:
    """`public`, `token` (meeting token or API key, checked by the handler) or `key`."""
    if method in ("GET", "HEAD") and _PUBLIC.match(path):
        return "public"
    if any(method == m and rx.match(path) for m, rx in _TOKEN):
        return "token"
    return "key"


class RequestGuard:
    """`body_limit(method, path)`: the cap in bytes."""

    def __init__(self, app, body_limit: Callable[[str, str], int]) -> None:
        self.app = app
        self.body_limit = body_limit

    @staticmethod
    def allowed(routes: list, path: str) -> set[str]:
        """Every method some route serves at `path` (Starlette's own 405 names only the first route's)."""
        methods: set[str] = set()
        for route in routes:
            inner = getattr(route, "original_router", None)  # FastAPI >= 0.137 keeps included routers as nodes
            if inner is not None:
                prefix = getattr(getattr(route, "include_context", None), "prefix", "") or ""
                if path.startswith(prefix):
                    methods |= RequestGuard.allowed(inner.routes, path[len(prefix):] or "/")
                continue
            rx, ms = getattr(route, "path_regex", None), getattr(route, "methods", None)
            if rx is not None and ms and rx.match(path):
                methods |= set(ms)
        return methods

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        csp = _CSP_DOCS if path.startswith("/docs") else _CSP

        async def send_secured(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_SECURITY_HEADERS,
                                      (b"content-security-policy", csp)]
            await send(message)

        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        kind = route_kind(method, path)
        key = headers.get(b"x-api-key")
        if kind == "key" or (kind == "token" and key is not None):
            principal = await _authenticate(key.decode("latin-1")) if key is not None and _authenticate else None
            if principal is None:
                return await _reply(send_secured, 401, "missing or invalid x-api-key",
                                    [(b"www-authenticate", b'ApiKey header="x-api-key"')])
            scope.setdefault("state", {})["principal"] = principal
        allowed = self.allowed(getattr(scope.get("app"), "routes", []), path)  # the app Serve actually runs
        if allowed and method not in allowed:
            return await _reply(send_secured, 405, "method not allowed",
                                [(b"allow", ", ".join(sorted(allowed)).encode())])
        limit = self.body_limit(method, path)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _reply(send_secured, 413, f"body larger than {limit} bytes")
        seen = 0

        async def capped_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        started = False

        async def send_tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send_secured(message)

        try:
            await self.app(scope, capped_receive, send_tracked)
        except BodyTooLarge as exc:  # raised outside a handler's own error handling
            if started:
                raise
            await _reply(send_secured, 413, exc.detail)


async def _reply(send, status: int, detail: str, extra: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": body})
