"""What the API asks of the cluster: the cluster-wide stream and participant lists, registering and removing a
stream from any instance, and reaching the instance that holds a WHIP session.

Lists: this instance's own streams are read live; every other instance's come from the state it last published
(at most one heartbeat old); a registered stream that no instance runs yet is listed as `connecting`, with the
instance it was placed on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from streamguard.cluster import placement
from streamguard.cluster.link import ClusterUnavailable
from streamguard.cluster.members import MemberState
from streamguard.cluster.registry import Registration
from streamguard.cluster.rpc import Op, Result
from streamguard.config import StreamSpec
from streamguard.events.schema import EventDraft, EventType
from streamguard.ingest.av_source import redact_url
from streamguard.ingest.pull import stream_kind

if TYPE_CHECKING:
    from streamguard.cluster.node import ClusterNode
    from streamguard.service import ParticipantInfo, StreamInfo

STOP_WAIT_S = 15.0  # DELETE waits this long for the running instance to stop the stream


@dataclass(slots=True)
class ClusterStats:
    takeovers: int = 0  # streams this instance took over from another instance
    leases_lost: int = 0  # streams this instance stopped because it lost (or could not renew) their lease


class ClusterViews:
    def __init__(self, node: ClusterNode) -> None:
        self._node = node

    # --- lists ---------------------------------------------------------------------------------------------------

    def local_streams(self) -> list[StreamInfo]:
        return [s.model_copy(update={"instance": self._node.me}) for s in self._node.service.streams()]

    def local_participants(self) -> list[ParticipantInfo]:
        return [p.model_copy(update={"instance": self._node.me}) for p in self._node.service.participants()]

    def _states(self) -> dict[str, MemberState]:
        return {i: s for i, s in self._node.members.live().items() if i != self._node.me}

    def streams(self) -> list[StreamInfo]:
        out: dict[str, StreamInfo] = {s.id: s for s in self.local_streams()}
        for state in self._states().values():
            for info in state.streams:
                if info.id not in out or info.id in state.owned:  # mid-handover: the lease holder's is current
                    out[info.id] = info
        live = self._node.members.live()
        for sid, registration in self._node.registry.entries.items():
            if sid not in out:
                out[sid] = self._not_running(registration, live)
        return sorted(out.values(), key=lambda s: (s.created_at, s.id))

    def stream(self, stream_id: str) -> StreamInfo:
        """KeyError if no instance runs it and it is not registered."""
        for info in self.streams():
            if info.id == stream_id:
                return info
        raise KeyError(stream_id)

    def participants(self, stream_id: str | None = None) -> list[ParticipantInfo]:
        people = self.local_participants() + [p for s in self._states().values() for p in s.participants]
        return [p for p in people if stream_id is None or p.stream_id == stream_id]

    @staticmethod
    def _not_running(registration: Registration, live: Mapping[str, MemberState]) -> StreamInfo:
        from streamguard.service import StreamInfo

        spec, assigned = registration.spec, registration.assigned
        here = assigned if assigned in live else None
        return StreamInfo(
            id=spec.id, kind=stream_kind(spec.url), url=redact_url(spec.url), name=spec.name, state="connecting",
            reason=f"starting on {here}" if here else "waiting for an instance to take it",
            created_at=registration.created_at, frames_sampled=0, frames_dropped=0, participants=0,
            verdict="pending", alerts_active=0, max_smoothed=None, instance=here, last_frame_ts=None, receiving=False,
        )

    # --- registering and removing --------------------------------------------------------------------------------

    async def register(self, spec: StreamSpec, *, exists_ok: bool = False) -> StreamInfo:
        """Register a pull stream cluster-wide, placed on the least loaded live instance. StreamExists if the id
        is taken (by a registered stream or a WHIP session), ClusterUnavailable if NATS is unreachable."""
        from streamguard.service import StreamExists

        node = self._node
        if any(s.id == spec.id for s in self.streams()):
            if exists_ok:
                return self.stream(spec.id)
            raise StreamExists(f"stream {spec.id!r} exists already")
        view = node.view()
        assigned = placement.place(view.live, placement.loads(view, placement.holders(view)))
        registration = Registration(spec=spec, created_at=time.time(), assigned=assigned)
        try:
            created = await node.registry.register(registration)
        except Exception as exc:
            raise ClusterUnavailable(f"cannot register the stream: NATS unreachable ({type(exc).__name__})") from None
        if not created and not exists_ok:
            raise StreamExists(f"stream {spec.id!r} exists already")
        node.wake()
        return self._not_running(registration, dict(view.live))

    async def remove(self, stream_id: str) -> None:
        """Remove a stream wherever it runs: a registered one is unregistered (its runner stops it; this waits
        for that, up to STOP_WAIT_S), a WHIP stream is ended by its instance. KeyError if none has that id."""
        node = self._node
        if stream_id in node.registry.entries:
            try:
                await node.registry.unregister(stream_id)
            except Exception as exc:
                raise ClusterUnavailable(f"cannot remove the stream: NATS unreachable ({type(exc).__name__})") \
                    from None
            node.wake()
            await self._until_stopped(stream_id)
            return
        owner = self.holder_of(stream_id)
        if owner is None:
            raise KeyError(stream_id)
        if owner == node.me:
            await node.service.remove_stream(stream_id)
            return
        result = await node.rpc.call(owner, "stream_remove", stream_id)
        if result.status == 404:
            raise KeyError(stream_id)
        if result.status >= 400:
            raise ClusterUnavailable(result.message or "the instance holding the stream did not remove it")

    async def _until_stopped(self, stream_id: str) -> None:
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline and any(s.id == stream_id for s in self.streams()):
            await asyncio.sleep(0.1)

    def holder_of(self, stream_id: str) -> str | None:
        """The live instance that lists the stream (WHIP streams are listed by the instance holding the session)."""
        if any(s.id == stream_id for s in self._node.service.streams()):
            return self._node.me
        return next((i for i, s in self._states().items() if any(x.id == stream_id for x in s.streams)), None)

    async def whip_call(self, op: Op, session_id: str) -> Result | None:
        """A WHIP session request for a session another instance holds (its answer); None if none holds it."""
        owner = self.holder_of(f"whip:{session_id}")
        if owner is None or owner == self._node.me:
            return None
        return await self._node.rpc.call(owner, op, session_id)

    # --- alerts of a gone instance -------------------------------------------------------------------------------

    async def clear_alerts(self, stream_ids: set[str], through_seq: int, reason: str) -> int:
        """Clear the open alerts of these streams raised at or before `through_seq`; returns how many."""
        store, hub = self._node.hub.store, self._node.hub
        cleared = 0
        for sid in stream_ids:
            page = await asyncio.to_thread(store.alerts, open_only=True, stream_id=sid, limit=1000)
            for alert in page.items:
                if alert.raised_seq > through_seq:
                    continue
                await hub.publish(EventDraft(EventType.ALERT_CLEARED, alert.stream_id, alert.participant_id, {
                    "alert_id": alert.alert_id, "reason": reason, "duration_s": max(0.0, time.time() - alert.raised_ts),
                }))
                cleared += 1
        return cleared
