"""Who is in the cluster: each instance publishes its state (streams, participants, leases held) under its id in a
KV bucket every `heartbeat_s`, and follows everyone's. An instance not heard from for `lease_ttl_s` is gone (the
bucket's TTL removes its entry too). Liveness is judged by when this instance *received* an update, not by the
sender's clock, so clock skew between hosts does not matter.

The states are also what `/v1/streams` and `/v1/participants` list for the other instances: they are at most one
heartbeat old.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue
from pydantic import BaseModel, ValidationError

from streamguard.service import ParticipantInfo, StreamInfo


class MemberState(BaseModel):
    instance: str
    boot: str  # a fresh id per process: an instance restarted under the same id is a new member
    started_at: float
    owned: list[str]  # pull streams it holds the lease of
    streams: list[StreamInfo]  # every stream it runs (pull and WHIP)
    participants: list[ParticipantInfo]


@dataclass(slots=True)
class Member:
    state: MemberState
    heard_at: float  # monotonic, when this instance received it


class Members:
    """`members` mirrors the bucket (`apply` is the bucket's follower); `on_gone(state)` is called once for every
    member that leaves: said goodbye, went silent past the TTL, or came back as a new boot."""

    def __init__(self, kv: KeyValue, me: str, ttl_s: float, on_change: Callable[[], None],
                 on_gone: Callable[[MemberState], None]) -> None:
        self._kv = kv
        self.me = me
        self.ttl_s = ttl_s
        self._on_change = on_change
        self._on_gone = on_gone
        self.members: dict[str, Member] = {}

    def live(self, now: float | None = None) -> dict[str, MemberState]:
        """Members heard from within the TTL (this instance always counts as live)."""
        now = time.monotonic() if now is None else now
        return {i: m.state for i, m in self.members.items() if i == self.me or now - m.heard_at <= self.ttl_s}

    def expire(self, now: float | None = None) -> None:
        """Forget members silent past the TTL (an instance killed without a goodbye)."""
        now = time.monotonic() if now is None else now
        for instance, member in list(self.members.items()):
            if instance != self.me and now - member.heard_at > self.ttl_s:
                self._gone(instance)

    def touch_all(self) -> None:
        """Count every member as just heard (after this instance was cut off from NATS: their silence was ours)."""
        now = time.monotonic()
        for member in self.members.values():
            member.heard_at = now

    async def publish(self, state: MemberState) -> None:
        await self._kv.put(state.instance, state.model_dump_json().encode())
        self._heard(state)

    async def leave(self) -> None:
        """Goodbye: the others take over this instance's streams at once instead of after the TTL."""
        await self._kv.delete(self.me)

    async def apply(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            instance = msg.subject.split(".", 2)[2]
            if (msg.headers or {}).get(KV_OP) in (KV_DEL, KV_PURGE):
                if instance != self.me:
                    self._gone(instance)
                continue
            try:
                state = MemberState.model_validate_json(msg.data)
            except ValidationError:
                continue
            if instance != self.me:
                self._heard(state)
        self._on_change()

    def _heard(self, state: MemberState) -> None:
        old = self.members.get(state.instance)
        if old is not None and old.state.boot != state.boot and state.instance != self.me:
            self._on_gone(old.state)  # it restarted: what its previous life ran is over
        self.members[state.instance] = Member(state, time.monotonic())

    def _gone(self, instance: str) -> None:
        member = self.members.pop(instance, None)
        if member is not None:
            self._on_gone(member.state)
            self._on_change()
