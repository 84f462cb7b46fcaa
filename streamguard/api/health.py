"""Probes (open: orchestrators probe without credentials), Prometheus metrics, and the operator console page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, JSONResponse

from streamguard import __version__
from streamguard.api.deps import ServiceDep

STATIC = Path(__file__).parent / "static"

probes = APIRouter(tags=["health"])
metrics = APIRouter(tags=["health"])  # behind the token: it names streams' kinds and counts


@probes.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process serves requests."""
    return {"status": "ok"}


@probes.get("/readyz", responses={503: {"description": "not ready"}})
async def readyz(service: ServiceDep) -> JSONResponse:
    """Readiness: model loaded, store open; lists degraded components."""
    ok = service.ready
    body = {"status": "ready" if ok else "starting", "degraded": sorted(service.degraded)}
    return JSONResponse(body, status_code=200 if ok else 503)


@probes.get("/", include_in_schema=False)
async def console() -> Response:
    """The console: a static shell that asks for the token and sends it with every call."""
    index = STATIC / "index.html"
    if not index.exists():
        return JSONResponse({"service": "streamguard", "version": __version__, "docs": "/docs"})
    return FileResponse(index)


@metrics.get("/metrics")
async def prometheus(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
