"""The HTTP API: WHIP ingest, streams, participants, alerts with evidence, the event WebSocket, health, metrics.

Every error is JSON: {"error": <code>, "message": <for people>} (validation errors add "details"), unknown routes,
wrong methods and server errors included. A configured bearer token guards every route but OPEN_ROUTES, checked
before a request body is read: the probes (orchestrators probe without credentials), the console page (a static
shell that asks for the token and sends it on every call) and the API's documentation and schemas (/docs,
/openapi.json, /v1/schema/event: what the README and the repository publish anyway). None carries data.

Shutdown: uvicorn closes every WebSocket with 1012 *before* the lifespan shutdown, i.e. before the service stops and
publishes its last events. So on SIGINT/SIGTERM the service is stopped first (streams close, participants leave,
events are flushed to the store and to the sockets, which the hub then closes with 1001 and a `since=` hint), and
only then is the signal passed on to uvicorn; see _drain_on_signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.security import HTTPBearer
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from streamguard import __version__
from streamguard.config import StreamSpec
from streamguard.events.hub import CLOSE_GOING_AWAY, SubscriptionEnded
from streamguard.events.schema import EventType, EvidenceKind, event_json_schema
from streamguard.events.store import AlertPage, AlertRecord
from streamguard.ingest.webrtc import WhipError, ice_server_links, participant_from_request, rtc_ice_servers
from streamguard.service import ParticipantInfo, Service, StreamExists, StreamInfo

STATIC = Path(__file__).parent / "static"
# WebSocket close codes of /v1/events (the hub's: 4008 slow consumer, 4409 since ahead, 1001 shutdown).
CLOSE_UNAUTHORIZED = 4401
CLOSE_BAD_REQUEST = 1008  # a query the server cannot serve (bad `since`, unknown `type`): do not retry it as is
PROBES = ("/healthz", "/readyz")
MAX_SEQ = 2**63 - 1  # SQLite's INTEGER
DRAIN_TIMEOUT_S = 15.0  # longest a signal waits for the service to stop before uvicorn is told to exit anyway
log = logging.getLogger(__name__)
T = TypeVar("T")


class ApiError(HTTPException):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail={"error": code, "message": message}, headers=headers)


def create_app(service: Service) -> FastAPI:
    stopping: asyncio.Task[None] | None = None

    def stop_once() -> asyncio.Task[None]:
        """service.stop(), run once: by the first shutdown signal (see _drain_on_signal) or the lifespan's end."""
        nonlocal stopping
        if stopping is None:
            stopping = asyncio.get_running_loop().create_task(service.stop(), name="streamguard-stop")
        return stopping

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        unhook = _drain_on_signal(stop_once)
        try:
            yield
        finally:
            unhook()
            await asyncio.shield(stop_once())

    app = FastAPI(title="StreamGuard", version=__version__, lifespan=lifespan,
                  description="Live deepfake and impostor-face detection for video calls and camera streams.")
    app.state.service = service
    token = service.config.token.get_secret_value() if service.config.token else None

    def authorized(value: str | None) -> bool:
        return token is None or (value is not None and secrets.compare_digest(value.encode(), token.encode()))

    # The token is checked by _Gate, for every route but these, before anything reads the request. `guarded` only
    # documents it in the OpenAPI schema (the lock and "Authorize" in /docs).
    docs = (app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url)
    open_routes = {*PROBES, "/", "/v1/schema/event", *(u for u in docs if u)}
    app.add_middleware(_Gate, open_routes=frozenset(open_routes), authorized=authorized,
                       stopping=lambda: stopping is not None)
    if service.config.cors_origins:
        # Added last, so outermost: it answers browsers' preflights (which carry no token) before _Gate, and marks
        # the real responses. WHIP clients read Location, Link (ICE servers) and ETag across origins (RFC 9725).
        app.add_middleware(
            CORSMiddleware, allow_origins=service.config.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "If-Match", "X-Participant-Id", "X-Participant-Name"],
            expose_headers=["Location", "Link", "ETag", "Retry-After"], max_age=600,
        )
    guarded = [Security(HTTPBearer(auto_error=False, description="`token` / STREAMGUARD_TOKEN"))] if token else []
    _install_error_handlers(app)

    async def json_body(request: Request) -> None:
        content_type = request.headers.get("content-type", "")
        subtype = content_type.split(";", 1)[0].strip().lower()
        if not (subtype == "application/json" or (subtype.startswith("application/") and subtype.endswith("+json"))):
            raise ApiError(415, "unsupported_media_type",
                           f"Content-Type must be application/json, got {content_type[:60] or 'none'!r}")

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

    @app.post("/v1/streams", tags=["streams"], status_code=201, dependencies=[*guarded, Depends(json_body)],
              responses={409: {"description": "the id is taken"}, 415: {"description": "not application/json"}})
    async def add_stream(spec: StreamSpec) -> StreamInfo:
        """Start pulling an RTSP/RTMP/HLS/file stream; its state arrives as `stream.state` events."""
        try:
            return await service.add_stream(spec)
        except StreamExists as exc:
            raise ApiError(409, "stream_exists", str(exc)) from None
        except ValueError as exc:  # the source refused its settings: nothing was started or listed
            raise ApiError(400, "invalid_request", f"stream {spec.id!r}: {exc}") from None

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
        """The versioned JSON Schema of one `/v1/events` message (open, as /openapi.json: it holds no data)."""
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
            raise ApiError(413, "sdp_too_large", f"the offer is {length} bytes; the limit is {limit}")
        body = await request.body()
        pid, name = participant_from_request(request.headers, request.query_params)
        try:
            session = await service.whip_publish(body, request.headers.get("content-type"), pid, name)
        except WhipError as exc:
            return _whip_error(exc)
        return with_ice_links(Response(session.answer_sdp, status_code=201, media_type="application/sdp", headers={
            "Location": f"/v1/whip/{session.id}", "ETag": session.etag,
            "X-Participant-Id": session.participant_id,
        }))

    @app.delete("/v1/whip/{session_id}", tags=["whip"], status_code=200, dependencies=guarded)
    async def whip_delete(session_id: str) -> Response:
        try:
            await service.whip.delete(session_id)
        except WhipError as exc:
            return _whip_error(exc)
        return Response(status_code=200)

    @app.patch("/v1/whip/{session_id}", tags=["whip"], dependencies=guarded)
    async def whip_patch(session_id: str) -> Response:
        """Trickle ICE and ICE restarts are not supported: 404 for an unknown session, else 405 (Allow: DELETE)."""
        try:
            await service.whip.patch(session_id)
        except WhipError as exc:
            return _whip_error(exc)
        raise AssertionError("WhipManager.patch always refuses")  # pragma: no cover

    # The session path without an id. Unrouted, Starlette would answer it with a 307 to /v1/whip (empty body), and a
    # client that follows it gets a 405 for POST/OPTIONS: say what is wrong instead.
    @app.api_route("/v1/whip/", methods=["DELETE", "PATCH"], dependencies=guarded, include_in_schema=False)
    async def whip_no_session(request: Request) -> Response:
        return _whip_error(WhipError(
            404, "unknown_session",
            f"{request.method} needs a session: use the Location that POST /v1/whip answered (/v1/whip/<id>)",
        ))

    @app.websocket("/v1/events")
    async def events(
        ws: WebSocket,
        since: str | None = None,  # parsed here, after the handshake: a bad one gets 1008 and a reason, not a 403
        stream_id: str | None = None,
        participant_id: str | None = None,
        type: Annotated[list[str] | None, Query()] = None,  # noqa: A002 - the query parameter's public name
        types: str | None = None,
        access_token: str | None = None,
    ) -> None:
        """Events with seq > since from the store, then live. Browsers pass the token as `access_token`.
        Type filter: repeated `type=` parameters and/or one comma-separated `types=` (what streamguard.client sends).
        Refusals come after the handshake, as close codes: 4401 bad token, 1008 bad query, 1001 shutting down."""
        header = ws.headers.get("authorization")
        given = header[7:] if header and header.lower().startswith("bearer ") else access_token
        await ws.accept()
        if not authorized(given):
            await _close(ws, CLOSE_UNAUTHORIZED, "a valid bearer token is required")
            return
        if stopping is not None:
            await _close(ws, CLOSE_GOING_AWAY, "server shutting down; reconnect later with the same since")
            return
        cursor: int | None = None
        if since is not None:
            if not (since.isascii() and since.isdigit() and int(since) <= MAX_SEQ):
                await _close(ws, CLOSE_BAD_REQUEST,
                             f"bad since: {since[:24]!r} is not a seq (an integer >= 0; 0: every stored event)")
                return
            cursor = int(since)
        names = [*(type or []), *(t.strip() for t in (types or "").split(",") if t.strip())]
        unknown = [n for n in names if n not in _EVENT_TYPES]
        if unknown:
            await _close(ws, CLOSE_BAD_REQUEST,
                         f"bad type filter: {unknown[0][:40]!r} is not an event type (see /v1/schema/event)")
            return
        wanted = [EventType(t) for t in names] if names else None
        await _stream_events(ws, service, cursor, stream_id, participant_id, wanted)

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
        await _close(ws, end.close_code, end.reason)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        reader.cancel()
        sub.close()
        service.ws_clients -= 1


_GONE = object()
_EVENT_TYPES = frozenset(t.value for t in EventType)


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    """Close with code and reason, the reason cut to the 123 bytes a close frame holds (RFC 6455 §5.5)."""
    cut = reason.encode()[:123].decode(errors="ignore")
    with contextlib.suppress(Exception):  # the client may be gone already
        await ws.close(code=code, reason=cut)


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


def _whip_error(exc: WhipError) -> JSONResponse:
    # The API's error body: the same keys as every other error (WhipError.as_dict() adds the status, which the
    # response already carries).
    return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status, headers=exc.headers)


class _Gate:
    """ASGI middleware in front of every HTTP route: the bearer token (all routes but `open_routes`), checked before a
    route reads the request, so a caller without it learns nothing from body or route errors; and 503 for all but the
    probes once the service is stopping. WebSockets pass: /v1/events checks the token after the handshake, so
    browsers, which cannot read a refused handshake's status, get close code 4401."""

    def __init__(self, app: ASGIApp, *, open_routes: frozenset[str], authorized: Callable[[str | None], bool],
                 stopping: Callable[[], bool]) -> None:
        self.app = app
        self.open_routes = open_routes
        self.authorized = authorized
        self.stopping = stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        refusal: Response | None = None
        if path not in self.open_routes:
            header = Headers(scope=scope).get("authorization")
            given = header[7:] if header and header.lower().startswith("bearer ") else None
            if not self.authorized(given):
                refusal = JSONResponse({"error": "unauthorized", "message": "a valid bearer token is required"},
                                       status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if refusal is None and self.stopping() and path not in PROBES:
            refusal = JSONResponse({"error": "shutting_down", "message": "the server is shutting down"},
                                   status_code=503, headers={"Retry-After": "5", "Connection": "close"})
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope, receive, send)


def _drain_on_signal(stop: Callable[[], asyncio.Task[None]]) -> Callable[[], None]:
    """Make SIGINT/SIGTERM stop the service *before* uvicorn shuts down; returns the function that undoes it.

    uvicorn's shutdown closes every WebSocket with 1012 and only then runs the lifespan shutdown, so subscribers
    would miss the last events (participants leaving, streams closing) and the hub's 1001. uvicorn installs its
    signal handlers before the lifespan starts (they restore the previous ones when it exits); here they are wrapped:
    the first signal runs stop() (which flushes the events and closes the feeds with 1001) and hands the signal to
    uvicorn when it is done, or after DRAIN_TIMEOUT_S; a second Ctrl+C still forces the exit at once. Signal
    handlers belong to the main thread: elsewhere (a server in a thread, as in the tests) nothing is hooked and
    uvicorn closes WebSockets with 1012 (a close code clients retry, as 1001).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}
    tasks: set[asyncio.Task[None]] = set()  # holds the drain task (the loop only keeps weak references)
    signalled = False  # the drain has begun
    told = False  # uvicorn has had a signal

    def tell(signum: int, frame: Any = None) -> None:
        nonlocal told
        told = True
        previous[signum](signum, frame)

    async def drain(signum: int) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(stop()), DRAIN_TIMEOUT_S)
        except TimeoutError:
            log.warning("the service did not stop within %g s; shutting the server down anyway", DRAIN_TIMEOUT_S)
        except Exception:  # logged here; the lifespan's end awaits the same task and raises it again
            log.exception("stopping the service failed")
        finally:
            if not told:
                tell(signum)

    def start_drain(signum: int) -> None:
        tasks.add(loop.create_task(drain(signum), name="streamguard-drain"))

    def handler(signum: int, frame: Any) -> None:
        nonlocal signalled
        if not signalled:
            signalled = True
            loop.call_soon_threadsafe(start_drain, signum)  # a signal handler may run mid-loop: schedule, do not run
            return
        # Another signal while draining. A second Ctrl+C forces the exit, as it does in uvicorn (which takes two
        # calls when it had none yet); a repeated SIGTERM changes nothing, as in uvicorn: the drain goes on.
        if signum == signal.SIGINT:
            if not told:
                tell(signum, frame)
            tell(signum, frame)

    for sig in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(sig)
        if callable(current):  # uvicorn's handler; SIG_DFL/SIG_IGN: nobody to hand the signal to
            previous[sig] = current
            signal.signal(sig, handler)

    def unhook() -> None:
        for sig, original in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, original)

    return unhook


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException (ApiError) and Starlette's 404/405
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.detail, dict):
            body = exc.detail
        elif exc.status_code == 404:
            body = {"error": "not_found", "message": f"no route {request.url.path}"}
        elif exc.status_code == 405:
            # Starlette's Allow names the methods of the first route with this path only (POST /v1/streams, not
            # GET): every route's count (RFC 9110 §15.5.6).
            methods: set[str] = set()
            for route in request.app.router.routes:
                if route.matches(request.scope)[0] is not Match.NONE:
                    methods |= getattr(route, "methods", None) or set()
            allowed = ", ".join(sorted(methods)) or (exc.headers or {}).get("Allow", "")
            headers = {**(exc.headers or {}), "Allow": allowed}
            body = {"error": "method_not_allowed",
                    "message": f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}"}
            return JSONResponse(body, status_code=405, headers=headers)
        else:
            body = {"error": _code(exc.status_code), "message": str(exc.detail)}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            pos = first.get("loc", ("body", 0))[-1]
            doc = exc.body if isinstance(exc.body, str) else ""
            reason = str(json.JSONDecodeError(str(first.get("ctx", {}).get("error", "invalid")), doc,
                                              pos if isinstance(pos, int) else 0))
            message = f"request body is not valid JSON: {reason}"
            return JSONResponse({"error": "invalid_json", "message": message,
                                 "details": [{"field": "body", "message": message}]}, status_code=400)
        details = [{"field": ".".join(str(p) for p in e.get("loc", ())), "message": _msg(e)} for e in errors]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
            message = "a JSON request body is required"
        else:
            message = f"{where or 'body'}: {_msg(first) if first else 'invalid'}"
        return JSONResponse({"error": "invalid_request", "message": message,
                             "details": json.loads(json.dumps(details, default=str))}, status_code=400)

    @app.exception_handler(Exception)  # Starlette's ServerErrorMiddleware: answers, then logs the traceback
    async def server_error(_request: Request, _exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "internal_error", "message": "internal server error; the server log says why"},
                            status_code=500)


def _msg(error: Any) -> str:
    """pydantic's message, without the "Value error, " it puts before a validator's own words."""
    return str(error.get("msg", "invalid")).removeprefix("Value error, ")


def _code(status: int) -> str:
    return {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
            413: "too_large", 415: "unsupported_media_type", 503: "unavailable"}.get(status, f"http_{status}")
