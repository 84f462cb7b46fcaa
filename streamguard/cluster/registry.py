"""The cluster's pull streams: one entry per stream in a JetStream KV bucket, followed by every instance.

An entry is the stream's spec, when it was registered and the instance it was placed on then (the least loaded).
Who runs it now is the lease's business (streamguard/cluster/leases.py); the entry only says the stream exists, so
`POST /v1/streams` on any instance creates it (refused if the id is taken) and `DELETE` on any instance removes it,
upon which whichever instance runs it stops it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue
from pydantic import BaseModel, ValidationError

from streamguard.cluster.names import key_of, stream_id_of
from streamguard.config import StreamSpec


class Registration(BaseModel):
    spec: StreamSpec
    created_at: float
    assigned: str  # the instance it was placed on when registered


class Registry:
    """`entries` mirrors the bucket (via `apply`, the bucket's follower); `seen_at` is when this instance first saw
    each entry (monotonic: for the grace the assigned instance gets before others step in)."""

    def __init__(self, kv: KeyValue, on_change: Callable[[], None]) -> None:
        self._kv = kv
        self._on_change = on_change
        self.entries: dict[str, Registration] = {}
        self.seen_at: dict[str, float] = {}

    async def register(self, registration: Registration) -> bool:
        """Create the entry; False if the id is registered already."""
        sid = registration.spec.id
        try:
            await self._kv.create(key_of(sid), registration.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            return False
        self._set(sid, registration)  # at once: placing the next stream must count this one
        return True

    async def unregister(self, stream_id: str) -> bool:
        """Delete the entry; False if there was none."""
        if stream_id not in self.entries:
            return False
        await self._kv.delete(key_of(stream_id))
        self._drop(stream_id)
        return True

    async def apply(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            sid = stream_id_of(msg.subject.split(".", 2)[2])  # $KV.<bucket>.<key>
            if (msg.headers or {}).get(KV_OP) in (KV_DEL, KV_PURGE):
                self._drop(sid)
                continue
            try:
                self._set(sid, Registration.model_validate_json(msg.data))
            except ValidationError:  # not written by us (or by another version): not a stream we can run
                continue
        self._on_change()

    def _set(self, sid: str, registration: Registration) -> None:
        self.entries[sid] = registration
        self.seen_at.setdefault(sid, time.monotonic())

    def _drop(self, sid: str) -> None:
        self.entries.pop(sid, None)
        self.seen_at.pop(sid, None)
