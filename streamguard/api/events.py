"""The event feed: `/v1/events` (a WebSocket: replay from the store with `since`, then live) and its JSON Schema.

Refusals come after the handshake, as close codes, since browsers cannot read a refused handshake's status: 4401 bad
token, 1008 bad query, 1001 shutting down; the hub's own are 4008 (slow consumer) and 4409 (since ahead).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Query, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from streamguard.api.deps import Api, bearer
from streamguard.events.hub import CLOSE_GOING_AWAY, SubscriptionEnded
from streamguard.events.schema import MAX_SEQ, EventType, event_json_schema
from streamguard.service import Service

CLOSE_UNAUTHORIZED = 4401
CLOSE_BAD_REQUEST = 1008  # a query the server cannot serve (bad `since`, unknown `type`): do not retry it as is
T = TypeVar("T")

router = APIRouter(tags=["events"])


@router.get("/v1/schema/event")
async def event_schema() -> JSONResponse:
    """The versioned JSON Schema of one `/v1/events` message (open, as /openapi.json: it holds no data)."""
    return JSONResponse(event_json_schema(), media_type="application/schema+json")


@router.websocket("/v1/events")
async def events(
    ws: WebSocket,
    api: Api,
    since: str | None = None,  # parsed here, after the handshake: a bad one gets 1008 and a reason, not a 403
    stream_id: str | None = None,
    participant_id: str | None = None,
    type: Annotated[list[str] | None, Query()] = None,  # noqa: A002 - the query parameter's public name
    types: str | None = None,
    access_token: str | None = None,
) -> None:
    """Events with seq > since from the store, then live. Browsers pass the token as `access_token`.
    Type filter: repeated `type=` parameters and/or one comma-separated `types=` (what streamguard.client sends)."""
    header_token = bearer(ws.headers.get("authorization"))
    await ws.accept()
    if not api.authorized(header_token if header_token is not None else access_token):
        await _close(ws, CLOSE_UNAUTHORIZED, "a valid bearer token is required")
        return
    if api.stopping is not None:
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
    await _stream_events(ws, api.service, cursor, stream_id, participant_id, wanted)


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
            if isinstance(got, _Gone):
                return
            if got is None:  # idle; uvicorn sends protocol-level pings meanwhile
                continue
            # A send blocks while a client does not read (its TCP window is full). The hub ends such a
            # subscriber once it stays behind past events.slow_consumer_grace_s; notice that during the send and
            # close with 4008 rather than wait for a client that may never read again.
            sent = await _until_gone(ws.send_text(got.model_dump_json()), reader, lambda: sub.ended is not None)
            if isinstance(sent, _Gone):
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


class _Gone:
    """What _until_gone returns instead of a result when the client left (or give_up said so)."""


_GONE = _Gone()
_EVENT_TYPES = frozenset(t.value for t in EventType)


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    """Close with code and reason, the reason cut to the 123 bytes a close frame holds (RFC 6455 §5.5)."""
    cut = reason.encode()[:123].decode(errors="ignore")
    with contextlib.suppress(Exception):  # the client may be gone already
        await ws.close(code=code, reason=cut)


async def _until_gone(aw: Awaitable[T], reader: asyncio.Task[None], give_up: Callable[[], bool] | None = None,
                      poll_s: float = 0.25) -> T | _Gone:
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
