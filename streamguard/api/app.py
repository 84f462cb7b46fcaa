"""The HTTP API: WHIP ingest, streams, participants, alerts with evidence, the event WebSocket, health, metrics.

Every error is JSON: {"error": <code>, "message": <for people>}. A configured bearer token guards every route but
the liveness and readiness probes (they reveal nothing and orchestrators probe without credentials).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, TypeVar

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.websockets import WebSocketDisconnect

from streamguard import __version__
from streamguard.config import StreamSpec
from streamguard.events.hub import SubscriptionEnded
from streamguard.events.schema import EventType, EvidenceKind, event_json_schema
from streamguard.events.store import AlertPage, AlertRecord
from streamguard.ingest.webrtc import WhipError, ice_server_links, participant_from_request, rtc_ice_servers
from streamguard.service import ParticipantInfo, Service, StreamExists, StreamInfo

STATIC = Path(__file__).parent / "static"
CLOSE_UNAUTHORIZED = 4401
T = TypeVar("T")


class ApiError(HTTPException):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail={"error": code, "message": message}, headers=headers)


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="StreamGuard", version=__version__, lifespan=lifespan,
                  description="Live deepfake and impostor-face detection for video calls and camera streams.")
    app.state.service = service
    token = service.config.token.get_secret_value() if service.config.token else None

    def authorized(value: str | None) -> bool:
        return token is None or (value is not None and secrets.compare_digest(value.encode(), token.encode()))

    async def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        given = authorization[7:] if authorization and authorization.lower().startswith("bearer ") else None
        if not authorized(given):
            raise ApiError(401, "unauthorized", "a valid bearer token is required",
                           headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(require_token)]
    _install_error_handlers(app)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        """Liveness: the process serves requests."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "not ready"}})
    async def readyz() -> JSONResponse:
        """Readiness: model loaded, store open; lists degraded components."""
        ok = service.ready
        body = {"status": "ready" if ok else "starting", "degraded": sorted(service.degraded)}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["health"], dependencies=guarded)
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/streams", tags=["streams"], status_code=201, dependencies=guarded)
    async def add_stream(spec: StreamSpec) -> StreamInfo:
        """Start pulling an RTSP/RTMP/HLS/file stream; its state arrives as `stream.state` events."""
        try:
            return await service.add_stream(spec)
        except StreamExists as exc:
            raise ApiError(409, "stream_exists", str(exc)) from None

    @app.get("/v1/streams", tags=["streams"], dependencies=guarded)
    async def list_streams() -> list[StreamInfo]:
        return service.streams()

    @app.get("/v1/streams/{stream_id}", tags=["streams"], dependencies=guarded)
    async def get_stream(stream_id: str) -> StreamInfo:
        try:
            return service.stream(stream_id)
        except KeyError:
            raise ApiError(404, "not_found", f"no stream {stream_id!r}") from None

    @app.delete("/v1/streams/{stream_id}", tags=["streams"], status_code=204, dependencies=guarded)
    async def remove_stream(stream_id: str) -> Response:
        try:
            await service.remove_stream(stream_id)
        except KeyError:
            raise ApiError(404, "not_found", f"no stream {stream_id!r}") from None
        return Response(status_code=204)

    @app.get("/v1/participants", tags=["participants"], dependencies=guarded)
    async def list_participants(stream_id: str | None = None) -> list[ParticipantInfo]:
        """Participants present now, with their current score, state and the window's scores."""
        return service.participants(stream_id)

    @app.get("/v1/alerts", tags=["alerts"], dependencies=guarded)
    async def list_alerts(
        before: Annotated[int | None, Query(description="cursor: next_before of the previous page")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        stream_id: str | None = None,
        participant_id: str | None = None,
        open_only: bool = False,
    ) -> AlertPage:
        """Alert history, newest first, paged by cursor."""
        return await asyncio.to_thread(service.store.alerts, before=before, limit=limit, stream_id=stream_id,
                                       participant_id=participant_id, open_only=open_only)

    @app.get("/v1/alerts/{alert_id}", tags=["alerts"], dependencies=guarded)
    async def get_alert(alert_id: str) -> AlertRecord:
        alert = await asyncio.to_thread(service.store.get_alert, alert_id)
        if alert is None:
            raise ApiError(404, "not_found", f"no alert {alert_id!r}")
        return alert

    @app.get("/v1/alerts/{alert_id}/evidence/{kind}", tags=["alerts"], dependencies=guarded,
             responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}})
    async def get_evidence(alert_id: str, kind: EvidenceKind) -> Response:
        """The face crop (JPEG) or its artefact heatmap (PNG) that raised the alert."""
        evidence = await asyncio.to_thread(service.store.get_evidence, alert_id, kind)
        if evidence is None:
            raise ApiError(404, "not_found", f"no {kind.value} evidence for alert {alert_id!r}")
        return Response(evidence.data, media_type=evidence.mime, headers={"Cache-Control": "max-age=86400"})

    @app.get("/v1/schema/event", tags=["events"])
    async def event_schema() -> JSONResponse:
        """The versioned JSON Schema of one `/v1/events` message."""
        return JSONResponse(event_json_schema(), media_type="application/schema+json")

    # RFC 9725 §4.6: STUN/TURN servers (with TURN credentials, hence behind the token) as Link headers.
    ice_links = ice_server_links(rtc_ice_servers(service.config.whip.ice_servers))

    def with_ice_links(response: Response) -> Response:
        for link in ice_links:
            response.headers.append("Link", link)
        return response

    @app.options("/v1/whip", tags=["whip"], status_code=204, dependencies=guarded)
    async def whip_options(request: Request) -> Response:
        """The STUN/TURN servers to gather with, for clients that need them before making their offer. A CORS
        preflight gets none (RFC 9725 §4.6: it must stay cheap)."""
        response = Response(status_code=204, headers={"Allow": "OPTIONS, POST"})
        preflight = "access-control-request-method" in request.headers
        return response if preflight else with_ice_links(response)

    @app.post("/v1/whip", tags=["whip"], status_code=201, dependencies=guarded,
              openapi_extra={"requestBody": {"content": {"application/sdp": {"schema": {"type": "string"}}},
                                             "required": True}},
              responses={201: {"content": {"application/sdp": {}}, "description": "SDP answer; Location: session"}})
    async def whip_publish(request: Request) -> Response:
        """WHIP (RFC 9725): an SDP offer in, the answer out. Participant id and display name come from the
        `X-Participant-Id` / `X-Participant-Name` headers or the `participant_id` / `name` query parameters."""
        limit = service.config.whip.max_sdp_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise ApiError(413, "sdp_too_large", f"the offer is {length} bytes; at most {limit} are accepted")
        body = await request.body()
        pid, name = participant_from_request(request.headers, request.query_params)
        try:
            session = await service.whip_publish(body, request.headers.get("content-type"), pid, name)
        except WhipError as exc:
            return JSONResponse(exc.as_dict(), status_code=exc.status, headers=exc.headers)
        return with_ice_links(Response(session.answer_sdp, status_code=201, media_type="application/sdp", headers={
            "Location": f"/v1/whip/{session.id}", "ETag": session.etag,
            "X-Participant-Id": session.participant_id,
        }))

    @app.delete("/v1/whip/{session_id}", tags=["whip"], status_code=200, dependencies=guarded)
    async def whip_delete(session_id: str) -> Response:
        try:
            await service.whip.delete(session_id)
        except WhipError as exc:
            return JSONResponse(exc.as_dict(), status_code=exc.status, headers=exc.headers)
        return Response(status_code=200)

    @app.patch("/v1/whip/{session_id}", tags=["whip"], dependencies=guarded)
    async def whip_patch(session_id: str) -> Response:
        """Trickle ICE and ICE restarts are not supported."""
        raise ApiError(405, "method_not_allowed", "trickle ICE and ICE restarts are not supported",
                       headers={"Allow": "DELETE"})

    @app.websocket("/v1/events")
    async def events(
        ws: WebSocket,
        since: Annotated[int | None, Query(ge=0)] = None,
        stream_id: str | None = None,
        participant_id: str | None = None,
        type: Annotated[list[str] | None, Query()] = None,  # noqa: A002 - the query parameter's public name
        types: str | None = None,
        access_token: str | None = None,
    ) -> None:
        """Events with seq > since from the store, then live. Browsers pass the token as `access_token`.
        Type filter: repeated `type=` parameters and/or one comma-separated `types=` (what streamguard.client sends)."""
        header = ws.headers.get("authorization")
        given = header[7:] if header and header.lower().startswith("bearer ") else access_token
        await ws.accept()
        if not authorized(given):
            await ws.close(code=CLOSE_UNAUTHORIZED, reason="a valid bearer token is required")
            return
        names = [*(type or []), *(t.strip() for t in (types or "").split(",") if t.strip())]
        try:
            wanted = [EventType(t) for t in names] if names else None
        except ValueError as exc:
            await ws.close(code=1008, reason=f"bad type filter: {exc}")
            return
        await _stream_events(ws, service, since, stream_id, participant_id, wanted)

    @app.get("/", include_in_schema=False)
    async def console() -> Response:
        index = STATIC / "index.html"
        if not index.exists():
            return JSONResponse({"service": "streamguard", "version": __version__, "docs": "/docs"})
        return FileResponse(index)

    return app


async def _stream_events(ws: WebSocket, service: Service, since: int | None, stream_id: str | None,
                         participant_id: str | None, types: list[EventType] | None) -> None:
    sub = service.hub.subscribe(since, stream_id=stream_id, participant_id=participant_id, types=types)
    service.ws_clients += 1

    async def watch_disconnect() -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                if (await ws.receive())["type"] == "websocket.disconnect":
                    return

    reader = asyncio.create_task(watch_disconnect())
    ping_s = service.config.events.ping_interval_s
    try:
        while True:
            # Wait for the next event *or* the client leaving: an idle feed must not keep a gone client's handler
            # (and uvicorn's graceful shutdown) waiting for the next event or ping tick.
            got = await _until_gone(sub.get(timeout=ping_s), reader)
            if got is _GONE:
                return
            if got is None:  # idle; uvicorn sends protocol-level pings meanwhile
                continue
            # A send blocks while a client does not read (its TCP window is full). The hub ends such a
            # subscriber once it stays behind past events.slow_consumer_grace_s; notice that during the send and
            # close with 4008 rather than wait for a client that may never read again.
            sent = await _until_gone(ws.send_text(got.model_dump_json()), reader, lambda: sub.ended is not None)
            if sent is _GONE:
                if sub.ended is None:
                    return
                raise sub.ended
    except SubscriptionEnded as end:
        with contextlib.suppress(Exception):
            await ws.close(code=end.close_code, reason=end.reason[:120])
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        reader.cancel()
        sub.close()
        service.ws_clients -= 1


_GONE = object()


async def _until_gone(aw: Awaitable[T], reader: asyncio.Task[None], give_up: Callable[[], bool] | None = None,
                      poll_s: float = 0.25) -> T | object:
    """aw's result, or _GONE (aw cancelled) once the client disconnected or give_up() says so."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task, reader}, timeout=poll_s if give_up else None,
                                         return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            if reader.done() or (give_up is not None and give_up()):
                return _GONE
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let it unwind; its CancelledError stays with it


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        body = exc.detail if isinstance(exc.detail, dict) else {"error": _code(exc.status_code), "message": str(exc.detail)}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_request"
        details = [{"field": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg")} for e in errors]
        return JSONResponse({"error": code, "message": f"{where or 'body'}: {first.get('msg', 'invalid')}",
                             "details": json.loads(json.dumps(details, default=str))}, status_code=400)


def _code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(status, f"http_{status}")
