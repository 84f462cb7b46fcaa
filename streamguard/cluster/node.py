"""One instance's part in the cluster: it connects, keeps the log, the registry and the members in view, runs the
pull streams whose leases it holds, and answers for its WHIP sessions.

Two loops, every `heartbeat_s` (and at once when something changes):
- heartbeat: renew the leases held (stopping the streams of those lost), forget silent members, publish this
  instance's state (the others list its streams and participants from it, and see it live);
- schedule: stop streams whose registration was deleted, and take the leases `placement.to_acquire` names,
  starting each stream here once its lease is ours.

After the start and after every reconnect to NATS nothing is acquired for two heartbeats: the others' states must
be heard first, or this instance would see them all as gone and take everything.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from nats.js import api
from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from streamguard.cluster import placement
from streamguard.cluster.evidence import EvidenceBucket
from streamguard.cluster.follow import Follower
from streamguard.cluster.hub import ClusterHub
from streamguard.cluster.leases import Leases
from streamguard.cluster.link import ClusterUnavailable, NatsLink
from streamguard.cluster.log import EventLog
from streamguard.cluster.members import Members, MemberState
from streamguard.cluster.names import key_of
from streamguard.cluster.registry import Registry
from streamguard.cluster.rpc import Call, Result, Rpc
from streamguard.cluster.views import ClusterStats, ClusterViews
from streamguard.config import StreamSpec
from streamguard.events.store import EventStore
from streamguard.ingest.webrtc import WhipError

if TYPE_CHECKING:
    from streamguard.service import Service

log = logging.getLogger(__name__)


class ClusterNode:
    """`connect()` (before the service loads its model: an unreachable NATS fails the start at once), `make_hub()`,
    `start()` once the service is ready to run streams, `stop_scheduling()` when it starts stopping, `close()` last."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = s = service.config.cluster
        self.me = s.instance_id
        self.boot = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        self.link = NatsLink(s, self._connectivity)
        self.log = EventLog(self.link, s)
        self.evidence = EvidenceBucket(self.link, s)
        self.stats = ClusterStats()
        self._wake = asyncio.Event()  # something changed: schedule now
        self._beat = asyncio.Event()  # this instance's state changed: publish it now
        self._settle_until = 0.0
        self._scheduling = False
        self._unowned_since: dict[str, float] = {}
        self._stopping: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._followers: list[Follower] = []
        self._started = False  # start() ran: there are leases, a state and a subscription to give back at close

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and make sure the log, the buckets and the evidence store exist; ClusterUnavailable if not."""
        await self.link.connect()
        s, events = self.settings, self.service.config.events
        try:
            await self.log.open(events.retention_days, events.max_events)
            await self.evidence.open(events.retention_days)
            registry_kv = await self._bucket(s.streams_bucket, None)
            self._leases_kv = await self._bucket(s.leases_bucket, s.lease_ttl_s)
            members_kv = await self._bucket(s.instances_bucket, s.lease_ttl_s)
        except Exception as exc:
            await self.link.close()
            raise ClusterUnavailable(f"cluster: NATS at {s.redacted_url} has no usable JetStream (is it started "
                                     f"with -js?): {self.link.scrub(exc) or type(exc).__name__}") from None
        self.registry = Registry(registry_kv, self._wake.set)
        self.members = Members(members_kv, self.me, s.lease_ttl_s, self._wake.set, self._on_gone)
        self.leases = Leases(self._leases_kv, self.me, self.boot, fence_s=s.lease_ttl_s - 2 * s.heartbeat_s)
        self.views = ClusterViews(self)
        self.rpc = Rpc(self.link, s.subject_prefix, self.me)

    async def _bucket(self, name: str, ttl_s: float | None) -> KeyValue:
        js = self.link.js
        try:
            return await js.key_value(name)
        except (BucketNotFoundError, NotFoundError):
            return await js.create_key_value(config=api.KeyValueConfig(
                bucket=name, ttl=ttl_s, history=1, storage=api.StorageType.FILE, replicas=self.settings.replicas))

    def make_hub(self, store: EventStore, **options: Any) -> ClusterHub:
        self.hub = ClusterHub(store, log=self.log, link=self.link, evidence=self.evidence,
                              flush_timeout_s=self.settings.flush_timeout_s, **options)
        return self.hub

    async def start(self, streams: list[StreamSpec]) -> None:
        """Read the log up to now (so this instance's replays and lists are whole from its first request), join,
        register the config's streams (if not registered yet) and start scheduling."""
        s = self.settings
        self._loops.append(asyncio.create_task(self.log.run(), name="cluster-publish"))
        await self.hub.follow()
        self._started = True
        for bucket, apply in ((s.streams_bucket, self.registry.apply), (s.instances_bucket, self.members.apply)):
            follower = Follower(self.link.js, f"KV_{bucket}", f"$KV.{bucket}.>", apply, last_per_subject=True,
                                name=bucket)
            await follower.start()
            self._followers.append(follower)
        await asyncio.gather(*(f.ready.wait() for f in self._followers))
        await self.rpc.serve(self._answer)
        await self._publish_state()
        for spec in streams:
            await self.views.register(spec, exists_ok=True)
        self._settle_until = time.monotonic() + 2 * s.heartbeat_s
        self._scheduling = True
        self._loops += [
            asyncio.create_task(self._every_heartbeat(self._heartbeat, self._beat, "heartbeat"),
                                name="cluster-heartbeat"),
            asyncio.create_task(self._every_heartbeat(self._schedule, self._wake, "scheduling"),
                                name="cluster-schedule"),
        ]

    def wake(self) -> None:
        """Schedule now (a stream was registered or removed here)."""
        self._wake.set()

    def stop_scheduling(self) -> None:
        """The service is stopping: take no more streams (the leases held are renewed until close), and give NATS
        `flush_timeout_s` to take the last events."""
        self._scheduling = False
        self.hub.stopping()

    async def close(self) -> None:
        """After the service stopped its streams and closed the hub: give the leases up, say goodbye, disconnect."""
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        if self._started:
            for sid in list(self.leases.held):
                await self.leases.release(sid)
            try:
                await asyncio.wait_for(self.members.leave(), 2.0)
            except Exception as exc:  # noqa: BLE001 - NATS gone: the others see this instance expire instead
                log.debug("cluster: goodbye not sent: %s", type(exc).__name__)
            await self.rpc.close()
        for follower in self._followers:
            await follower.close()
        await self.link.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _connectivity(self, connected: bool, reason: str) -> None:
        self.service.report_health("cluster", connected, reason)
        if connected and self._started:
            self.members.touch_all()  # silent while this one was cut off, not gone: hear from them first
            self._settle_until = time.monotonic() + 2 * self.settings.heartbeat_s
            self._wake.set()
            self._beat.set()

    async def _every_heartbeat(self, step: Callable[[], Awaitable[None]], wake: asyncio.Event, what: str) -> None:
        """Run `step` every heartbeat_s, and at once when `wake` is set; a failed step is logged, the loop goes on."""
        while True:
            try:
                async with asyncio.timeout(self.settings.heartbeat_s):
                    await wake.wait()
            except TimeoutError:
                pass
            wake.clear()
            try:
                await step()
            except Exception:
                log.exception("cluster: %s failed", what)

    # --- heartbeat -----------------------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        for sid in await self.leases.renew(self.link.connected):
            self.stats.leases_lost += 1
            self._spawn(self._stop_here(sid, release=False))
        if self.link.connected:
            self.members.expire()
            await self._publish_state()
            await self.hub.check_log()

    async def _publish_state(self) -> None:
        state = MemberState(instance=self.me, boot=self.boot, started_at=self.started_at,
                            owned=sorted(self.leases.held), streams=self.views.local_streams(),
                            participants=self.views.local_participants())
        try:
            await self.members.publish(state)
        except Exception as exc:  # noqa: BLE001 - NATS down: the next heartbeat tries again
            log.debug("cluster: state not published: %s", type(exc).__name__)

    # --- scheduling ----------------------------------------------------------------------------------------------

    async def _schedule(self) -> None:
        for sid in list(self.leases.held):
            if sid not in self.registry.entries and sid not in self._stopping:  # DELETEd on some instance
                self._spawn(self._stop_here(sid, release=True))
        view = self.view()
        now = view.now
        orphans = placement.orphans(view)
        self._unowned_since = {sid: self._unowned_since.get(sid, now) for sid in orphans}
        if not self._scheduling or not self.link.connected or now < self._settle_until:
            return
        for sid in placement.to_acquire(view):
            await self._take(sid)

    def view(self) -> placement.View:
        return placement.View(
            me=self.me, live=self.members.live(), registry=dict(self.registry.entries),
            mine=frozenset(self.leases.held), unowned_since=self._unowned_since, now=time.monotonic(),
            grace_s=self.settings.lease_ttl_s,
        )

    async def _take(self, sid: str) -> None:
        """Acquire the lease, then start the stream here."""
        from streamguard.service import StreamExists

        registration = self.registry.entries.get(sid)
        if registration is None or sid in self._stopping or not await self.leases.acquire(sid):
            return
        if registration.assigned != self.me:
            self.stats.takeovers += 1
            log.info("cluster: taking over stream %s (placed on %s)", sid, registration.assigned)
        try:
            await self.service.add_stream(registration.spec)
        except (StreamExists, ValueError) as exc:  # still stopping here, or its settings refused: let it go
            log.warning("cluster: stream %s not started here: %s", sid, exc)
            await self.leases.release(sid)
        self._beat.set()

    async def _stop_here(self, sid: str, *, release: bool) -> None:
        """Stop a stream this instance runs; `release` the lease after (not when it was lost)."""
        self._stopping.add(sid)
        try:
            await self.service.remove_stream(sid)
        except KeyError:
            pass
        finally:
            self._stopping.discard(sid)
        if release:
            await self.leases.release(sid)
        self._beat.set()
        self._wake.set()

    # --- members gone --------------------------------------------------------------------------------------------

    def _on_gone(self, state: MemberState) -> None:
        log.info("cluster: instance %s (boot %s) is gone", state.instance, state.boot)
        self._wake.set()
        if state.streams:
            self._spawn(self._close_alerts_of(state))

    async def _close_alerts_of(self, state: MemberState) -> None:
        """The alerts a gone instance left open are over (their participants' sessions ended with it): one live
        instance (whoever creates the reap key first) clears them, as a restarted single instance does its own.
        Only alerts in the log before it was seen gone: a stream's new runner raises its alerts after that."""
        try:
            await self._leases_kv.create(f"reap.{key_of(state.instance)}.{state.boot}", self.me.encode())
        except KeyWrongLastSequenceError:
            return  # another instance does it
        except Exception as exc:  # noqa: BLE001 - NATS down: the alerts stay open (listed as such)
            log.warning("cluster: open alerts of %s not cleared: %s", state.instance, type(exc).__name__)
            return
        bound = await self.log.last_seq()
        if bound is None or not await self.hub.caught_up():
            return
        await self.views.clear_alerts({s.id for s in state.streams}, bound,
                                      f"instance {state.instance} stopped: the participant's session ended")

    # --- calls from other instances ------------------------------------------------------------------------------

    async def _answer(self, call: Call) -> Result:
        try:
            if call.op == "whip_delete":
                await self.service.whip.delete(call.id)
                return Result(status=200)
            if call.op == "whip_patch":
                await self.service.whip.patch(call.id)  # always refuses (404 or 405), as on this instance
            if call.op == "stream_remove" and call.id not in self.registry.entries:
                await self.service.remove_stream(call.id)
                return Result(status=204)
        except WhipError as exc:
            return Result(status=exc.status, error=exc.code, message=exc.message, headers=dict(exc.headers or {}))
        except KeyError:
            pass
        return Result(status=404, error="not_found", message=f"no stream {call.id!r} on {self.me}")
