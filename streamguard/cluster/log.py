"""The cluster's event log: one JetStream stream, whose sequence is the `seq` of every event clients see.

Publishing: events are queued in call order and sent by one task, up to `WINDOW` at a time (JetStream stores one
connection's messages in the order they arrive), each with a message id (`Nats-Msg-Id`: instance, boot, counter).
A send that is not acknowledged within `ack_timeout_s` (NATS restarting, the connection lost) is sent again with the
same id: JetStream's duplicate window recognises a retry of a message it had stored after all and acknowledges it
with the first copy's seq, so a retry never puts an event in the log twice. Queued events wait while NATS is
unreachable and go out when it is back; only a retry after an event failed once can land after a later one.

Reading is streamguard/cluster/hub.py's: it follows this stream into the instance's store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import NotFoundError

from streamguard.cluster.link import NatsLink
from streamguard.config import ClusterSettings
from streamguard.events.schema import Event, EventType

log = logging.getLogger(__name__)

WINDOW = 256  # messages in flight at once
MSG_ID = "Nats-Msg-Id"
DAY_S = 86400.0


@dataclass(slots=True)
class LogCounters:
    submitted: int = 0
    published: int = 0  # acknowledged: in the log, once
    retries: int = 0  # sends that were not acknowledged and were sent again
    duplicates: int = 0  # of those acknowledged, how many were retries JetStream had stored already (not again)


def stream_config(settings: ClusterSettings, retention_days: float, max_events: int) -> api.StreamConfig:
    """The log's JetStream stream: file storage, the service's retention, duplicate window for retries."""
    return api.StreamConfig(
        name=settings.events_stream, subjects=[f"{settings.subject_prefix}.events.>"],
        storage=api.StorageType.FILE, num_replicas=settings.replicas, discard=api.DiscardPolicy.OLD,
        max_age=retention_days * DAY_S if retention_days > 0 else None, max_msgs=max_events or -1,
        duplicate_window=settings.dedupe_window_s,
    )


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def decode(msg: Msg) -> Event:
    """The event a log message holds, with the stream sequence as its seq. ValueError: not an event (of ours)."""
    try:
        body = json.loads(msg.data)
        return Event(seq=msg.metadata.sequence.stream, ts=body["ts"], type=EventType(body["type"]),
                     stream_id=body.get("stream_id"), participant_id=body.get("participant_id"), data=body["data"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"log message {msg.metadata.sequence.stream} is not an event: {exc}") from None


class EventLog:
    """`open()`, then `submit()` events (returns the message id) while `run()` publishes them."""

    def __init__(self, link: NatsLink, settings: ClusterSettings) -> None:
        self._link = link
        self.settings = settings
        self.subject = f"{settings.subject_prefix}.events.{settings.instance_id}"
        self._id_prefix = f"{settings.instance_id}-{uuid.uuid4().hex[:12]}-"
        self._next = 0
        self._queue: dict[str, bytes] = {}  # msg id -> payload, in submission order (dicts keep it)
        self._has_work = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self.counters = LogCounters()

    async def open(self, retention_days: float, max_events: int) -> None:
        """Create the stream if it does not exist (an existing one is used as it is: its retention was set by
        whoever created it)."""
        js = self._link.js
        try:
            await js.stream_info(self.settings.events_stream)
        except NotFoundError:
            await js.add_stream(stream_config(self.settings, retention_days, max_events))
            log.info("cluster: created the event log stream %s", self.settings.events_stream)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def is_queued(self, msg_id: str) -> bool:
        """Still to be sent (or resent): not acknowledged yet."""
        return msg_id in self._queue

    def submit(self, event: dict[str, Any]) -> str:
        """Queue one event (the envelope without seq) for the log; returns its message id."""
        self._next += 1
        msg_id = f"{self._id_prefix}{self._next}"
        self._queue[msg_id] = encode(event)
        self.counters.submitted += 1
        self._empty.clear()
        self._has_work.set()
        return msg_id

    async def drain(self, timeout_s: float) -> int:
        """Wait up to timeout_s for the queue to empty; returns how many events are still queued."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), timeout_s)
        return len(self._queue)

    async def last_seq(self) -> int | None:
        """The log's last seq now (None: NATS unreachable)."""
        try:
            return int((await self._link.js.stream_info(self.settings.events_stream)).state.last_seq)
        except Exception:  # noqa: BLE001 - unreachable or timed out: the caller decides without it
            return None

    async def identity(self) -> dict[str, str]:
        """What tells this log from another of the same name: the stream's name and when it was created."""
        info = await self._link.js.stream_info(self.settings.events_stream)
        return {"events_stream": self.settings.events_stream, "created": str(info.created)}

    async def first_seq(self) -> int | None:
        try:
            return int((await self._link.js.stream_info(self.settings.events_stream)).state.first_seq)
        except Exception:  # noqa: BLE001 - as last_seq
            return None

    async def run(self) -> None:
        """Publish what is queued, oldest first, for ever (cancel to stop)."""
        delay = 0.05
        while True:
            await self._has_work.wait()
            batch = list(self._queue.items())[:WINDOW]
            failed = await self._send(batch)
            for msg_id, _ in batch:
                if msg_id not in failed:
                    del self._queue[msg_id]
            if not self._queue:
                self._has_work.clear()
                self._empty.set()
            if failed:
                self.counters.retries += len(failed)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            else:
                delay = 0.05

    async def _send(self, batch: list[tuple[str, bytes]]) -> set[str]:
        """Send a batch and wait for the acks; returns the ids of the events not acknowledged."""
        js = self._link.js
        futures: list[tuple[str, asyncio.Future[api.PubAck]]] = []
        failed: set[str] = set()
        for msg_id, payload in batch:
            try:
                futures.append((msg_id, await js.publish_async(self.subject, payload, headers={MSG_ID: msg_id})))
            except Exception as exc:  # noqa: BLE001 - connection closed or buffer full: the rest waits too
                log.debug("cluster: publish: %s", self._link.scrub(exc))
                failed |= {m for m, _ in batch[len(futures):]}
                break
        acks = await asyncio.gather(*(asyncio.wait_for(f, self.settings.ack_timeout_s) for _, f in futures),
                                    return_exceptions=True)
        for (msg_id, _), ack in zip(futures, acks, strict=True):
            if isinstance(ack, BaseException):
                failed.add(msg_id)
                if not isinstance(ack, TimeoutError):
                    log.warning("cluster: JetStream refused event %s: %s", msg_id, self._link.scrub(ack))
            else:
                self.counters.published += 1
                self.counters.duplicates += bool(ack.duplicate)
        return failed
