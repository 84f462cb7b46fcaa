"""The bearer token: checked for every HTTP route but the open ones by `Gate`, before anything reads the request.

Open: the probes (orchestrators probe without credentials), the console page (a static shell that asks for the token
and sends it on every call) and the API's documentation and schemas (/docs, /openapi.json, /v1/schema/event: what
the README and the repository publish anyway). None carries data. The WebSocket checks the token itself, after the
handshake (see events.py). `documented` only shows the lock and "Authorize" in /docs.
"""

from __future__ import annotations

from typing import Any

from fastapi import Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from streamguard.api.deps import ApiState, bearer

PROBES = ("/healthz", "/readyz")


def documented(token: str | None) -> list[Any]:
    """The OpenAPI security marker for guarded routers (the check itself is Gate's)."""
    return [Security(HTTPBearer(auto_error=False, description="`token` / STREAMGUARD_TOKEN"))] if token else []


class Gate:
    """ASGI middleware in front of every HTTP route: the bearer token (all routes but `open_routes`), checked before a
    route reads the request, so a caller without it learns nothing from body or route errors; and 503 for all but the
    probes once the service is stopping. WebSockets pass: /v1/events checks the token after the handshake, so
    browsers, which cannot read a refused handshake's status, get close code 4401."""

    def __init__(self, app: ASGIApp, *, api: ApiState, open_routes: frozenset[str]) -> None:
        self.app = app
        self.api = api
        self.open_routes = open_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        refusal: Response | None = None
        if path not in self.open_routes:
            if not self.api.authorized(bearer(Headers(scope=scope).get("authorization"))):
                refusal = JSONResponse({"error": "unauthorized", "message": "a valid bearer token is required"},
                                       status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if refusal is None and self.api.stopping is not None and path not in PROBES:
            refusal = JSONResponse({"error": "shutting_down", "message": "the server is shutting down"},
                                   status_code=503, headers={"Retry-After": "5", "Connection": "close"})
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope, receive, send)
