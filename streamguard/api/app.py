"""The HTTP API, assembled: one router per resource, the token gate, CORS, error handlers and the lifespan.

Routers: `streams` (streams and participants), `alerts` (alerts and evidence), `whip`, `events` (the WebSocket feed
and its schema), `health` (probes, metrics, console); `errors` makes every error JSON; `auth` holds the token gate;
handlers get the service through `deps`. Shutdown runs in the order `lifecycle` explains: the service stops before
uvicorn closes the WebSockets. In cluster mode `cluster.streams` replaces `streams`, and `cluster.sessions` (WHIP
sessions held by other instances) comes before `whip`: see api/cluster.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from streamguard import __version__
from streamguard.api import alerts, events, health, streams, whip
from streamguard.api.auth import PROBES, Gate, documented
from streamguard.api.deps import ApiState
from streamguard.api.errors import install_error_handlers
from streamguard.api.lifecycle import drain_on_signal
from streamguard.service import Service


def create_app(service: Service) -> FastAPI:
    api = ApiState(service, service.config.token.get_secret_value() if service.config.token else None)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        unhook = drain_on_signal(api.stop_once)
        try:
            yield
        finally:
            unhook()
            await asyncio.shield(api.stop_once())

    app = FastAPI(title="StreamGuard", version=__version__, lifespan=lifespan,
                  description="Live deepfake and impostor-face detection for video calls and camera streams.")
    app.state.api = api  # what deps.get_api hands the routes

    # The order that matters, once: middleware added last runs first. CORS is outermost, so it answers browsers'
    # preflights (which carry no token) before the Gate and marks the real responses; the Gate then refuses, before
    # any route reads the request, callers without the token and everything but the probes while stopping.
    docs = (app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url)
    open_routes = frozenset({*PROBES, "/", "/v1/schema/event", *(u for u in docs if u)})
    app.add_middleware(Gate, api=api, open_routes=open_routes)
    if service.config.cors_origins:
        # WHIP clients read Location, Link (ICE servers) and ETag across origins (RFC 9725).
        app.add_middleware(
            CORSMiddleware, allow_origins=service.config.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "If-Match", "X-Participant-Id", "X-Participant-Name"],
            expose_headers=["Location", "Link", "ETag", "Retry-After"], max_age=600,
        )

    guarded = documented(api.token)  # the lock in /docs; the Gate does the checking
    routers = [(health.probes, []), (health.metrics, guarded), (streams.router, guarded), (alerts.router, guarded),
               (whip.router, guarded), (events.router, [])]  # events: the WebSocket checks the token itself
    if service.config.cluster.enabled:
        from streamguard.api import cluster  # imports nats: only in cluster mode

        swapped = [(cluster.streams if r is streams.router else r, guards) for r, guards in routers]
        routers = [(cluster.sessions, guarded), *swapped]
    for router, dependencies in routers:
        app.include_router(router, dependencies=dependencies)
    install_error_handlers(app, [*app.router.routes, *(route for router, _ in routers for route in router.routes)])
    return app
