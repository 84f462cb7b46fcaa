"""The live service: wiring of sources → workers → batcher → events, and its lifecycle."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from streamguard.config import CardThresholds, ServiceConfig, StreamSpec
from streamguard.events.hub import EventHub
from streamguard.events.schema import EventDraft, EventType
from streamguard.events.store import EventStore
from streamguard.evidence import EvidenceMaker
from streamguard.faces.analyzer import FacePool
from streamguard.inference.backends import BackendOptions, select_backend
from streamguard.inference.batcher import Batcher
from streamguard.inference.classifier import Classifier
from streamguard.inference.heatmap import Heatmapper, OcclusionMap, heatmapper_for
from streamguard.inference.models import ModelNotFound, resolve_model
from streamguard.ingest.av_source import redact_url
from streamguard.ingest.egress import EgressProxy
from streamguard.ingest.nvdec import choose_hwdecode
from streamguard.ingest.policy import SourceGuard
from streamguard.ingest.pull import PullSource
from streamguard.ingest.sampler import spread_phase
from streamguard.ingest.source import TERMINAL_STATES, OnFrame, OnState, Source, StateInfo, StreamState
from streamguard.ingest.webrtc import WhipManager, WhipSession, rtc_ice_servers
from streamguard.ingest.whip_source import WhipSource
from streamguard.metrics import Metrics
from streamguard.participants import Roster
from streamguard.scoring.live import ParticipantState
from streamguard.types import SampledFrame
from streamguard.worker import StreamWorker, WorkerDeps

if TYPE_CHECKING:
    from streamguard.cluster.node import ClusterNode

log = logging.getLogger(__name__)


class StreamExists(ValueError):
    pass


class StreamInfo(BaseModel):
    id: str
    kind: str
    url: str | None
    name: str | None
    state: str
    reason: str | None = None
    created_at: float
    frames_sampled: int
    frames_dropped: int
    participants: int
    # The stream's verdict, from its participants' own (hysteresis) verdicts: "alert" while any has an active alert;
    # "pending" while the stream is not live or has no participant, or one without a smoothed score yet;
    # "suspicious" when one's smoothed score is at or over the model's threshold without an alert (between the
    # thresholds, or over the raise threshold for fewer than raise_after samples); else "clear": an operator's
    # per-camera / per-call status.
    verdict: Literal["alert", "suspicious", "clear", "pending"]
    alerts_active: int
    max_smoothed: float | None = Field(description="highest smoothed P(fake) among the stream's participants")
    instance: str | None = Field(None, description="cluster mode: the instance that runs it (null: none yet)")
    last_frame_ts: float | None = Field(description="when the last sampled frame came in, Unix seconds")
    receiving: bool = Field(description="live and a frame came within scoring.stale_after_s: false reads 'no "
                                        "frames', which is not 'no face'")
    decode_mode: str | None = Field(None, description="what is decoded: keyframes (a pull stream whose keyframes "
                                    "come at least every sources.keyframe_max_gop_s; a WHIP publisher that sends "
                                    "the keyframes asked for each sample), nonref (non-reference frames skipped), "
                                    "all (every frame); null until it is known")
    keyframe_interval_s: float | None = Field(None, description="the keyframe interval last measured on a pull "
                                              "stream, seconds: keyframes-only streams are sampled at "
                                              "min(sampling.fps, 1/keyframe_interval_s)")


# A participant's state while their stream delivers no frames (stalled, reconnecting, a silent WHIP peer).
NO_FRAMES = "no_frames"


class ParticipantInfo(BaseModel):
    id: str
    stream_id: str
    label: str | None
    state: str = Field(description="the scorer's state (warming_up, ok, suspicious, alert, low_quality, no_face), or "
                                   "no_frames while the stream delivers none")
    alert_active: bool
    alert_id: str | None
    p_fake: float | None
    smoothed: float | None
    samples: int
    first_seen_ts: float = Field(description="when they joined, Unix seconds (wall clock)")
    last_seen_ts: float = Field(description="when their face was last seen, Unix seconds (wall clock)")
    last_seen_media_s: float | None = Field(description="the same moment in the stream's media time, seconds")
    sparkline: list[tuple[float, float]] = Field(description="the window's scores: (Unix seconds, P(fake)) pairs")
    instance: str | None = Field(None, description="cluster mode: the instance its stream runs on")


class _Stream:
    """A listed stream: its source, the worker its frames go to, and what the API shows. The source is made with
    this stream's `put` and the service's state callback, then `start`ed with the worker."""

    source: Source
    worker: StreamWorker

    def __init__(self, url: str | None, name: str | None) -> None:
        self.url, self.name = url, name
        self.state = StreamState.CONNECTING
        self.reason: str | None = None
        self.created_at = time.time()
        self.task: asyncio.Task[None] | None = None
        self.ending: asyncio.Task[None] | None = None  # its end path (Service._end), once started

    def start(self, source: Source, worker: StreamWorker) -> None:
        self.source, self.worker = source, worker
        self.state, self.reason = source.state or StreamState.CONNECTING, source.reason

    def put(self, frame: SampledFrame) -> None:
        self.worker.put(frame)

    @property
    def id(self) -> str:
        return self.source.id

    @property
    def kind(self) -> str:
        return self.source.kind

    def receiving(self, stale_after_s: float) -> bool:
        """Live, and a frame came in within `stale_after_s` (counted from the start before the first frame)."""
        last = self.worker.last_frame_ts or self.created_at
        return self.state is StreamState.LIVE and time.time() - last < stale_after_s

    def info(self, stale_after_s: float) -> StreamInfo:
        scorers = [p.scorer for p in self.worker.roster.participants.values() if p.confirmed]
        alerts = sum(1 for sc in scorers if sc.alert_active)
        smoothed = [sc.smoothed for sc in scorers if sc.smoothed is not None]
        verdict: Literal["alert", "suspicious", "clear", "pending"]
        if alerts:
            verdict = "alert"
        elif not self.receiving(stale_after_s) or not scorers or len(smoothed) < len(scorers):
            verdict = "pending"  # no verdict on a stream that is down or silent, or on participants warming up
        elif any(sc.state is ParticipantState.SUSPICIOUS for sc in scorers):
            verdict = "suspicious"
        else:
            verdict = "clear"
        return StreamInfo(
            id=self.id, kind=self.kind, url=redact_url(self.url) if self.url else None, name=self.name,
            state=self.state.value, reason=self.reason, created_at=self.created_at,
            frames_sampled=self.worker.slot.put_count, frames_dropped=self.worker.slot.dropped,
            participants=len(scorers), verdict=verdict, alerts_active=alerts, max_smoothed=max(smoothed, default=None),
            last_frame_ts=self.worker.last_frame_ts, receiving=self.receiving(stale_after_s),
            decode_mode=self.source.decoding.mode, keyframe_interval_s=self.source.decoding.gop_s,
        )


class Service:
    def __init__(self, config: ServiceConfig, classifier: Classifier | None = None):
        self.config = config
        self.metrics = Metrics()
        self._classifier = classifier
        self._streams: dict[str, _Stream] = {}
        self._phases: dict[str, float] = {}  # stream id -> sampling phase, see sampling_phase()
        self._decoded_retired: Counter[str] = Counter()
        self._ready = False
        self._degraded: set[str] = set()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()  # state events and end paths in flight
        self.ws_clients = 0
        self.cluster: ClusterNode | None = None  # cluster mode (config.cluster.nats_url): streamguard/cluster/

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        if cfg.cluster.enabled:  # before the model loads: an unreachable NATS fails the start at once
            from streamguard.cluster.node import ClusterNode

            self.cluster = ClusterNode(self)
            await self.cluster.connect()
        degraded_reason = await self._load_classifier()
        try:  # thresholds derived from the card may not fit it (card 0.88 + margin 0.2 > 1): refuse now, not per frame
            cfg.scoring.thresholds(CardThresholds.from_card(self.classifier.card))
        except ValueError as exc:
            raise ValueError(f"scoring: {exc} (model {self.classifier.card.name})") from None
        self.store = EventStore(cfg.data_dir / "events.sqlite3")
        ev = cfg.events
        options: dict[str, Any] = dict(client_queue_size=ev.client_queue_size, max_events=ev.max_events,
                                       slow_consumer_grace_s=ev.slow_consumer_grace_s, retention_days=ev.retention_days)
        self.hub = self.cluster.make_hub(self.store, **options) if self.cluster else EventHub(self.store, **options)
        if degraded_reason:
            self._degraded.add("inference")
            await self.hub.publish(EventDraft(EventType.SERVICE_DEGRADED, None, None,
                                   {"component": "inference", "reason": degraded_reason, "active": True}))
        self._watch_inference()
        if self.cluster is None:  # in a cluster, a gone instance's alerts are cleared by another one, and this
            # store holds every instance's presence
            await self._close_dangling_alerts()
            await self._close_dangling_presence()
        await self._choose_decoding()
        decode = "nvdec" if self.hwdecode.hwaccel is not None else "cpu"
        self.metrics.set_info(self.classifier.card.name, self.classifier.backend, decode)
        self.batcher = Batcher(self.classifier, max_batch=cfg.batcher.max_batch, max_wait_ms=cfg.batcher.max_wait_ms,
                               workers=cfg.batcher.workers, on_batch=self.metrics.on_batch)
        await self.batcher.start()
        card = self.classifier.card
        self.faces = FacePool(card, cfg.faces, threads=min(2, os.cpu_count() or 1))
        heatmapper = await asyncio.to_thread(self.alert_heatmapper)
        log.info("alert heatmaps: %s", "the model's own artefact map" if heatmapper.method == "model" else "occlusion")
        self.deps = WorkerDeps(
            faces=self.faces, batcher=self.batcher, hub=self.hub, metrics=self.metrics,
            make_evidence=EvidenceMaker(heatmapper, self.store, self.cluster.evidence if self.cluster else None),
            window_s=cfg.scoring.window_s,
            publish_scores=cfg.events.publish_scores,
        )
        self.whip = WhipManager(
            fps=cfg.sampling.fps, max_sessions=cfg.whip.max_sessions, max_sdp_bytes=cfg.whip.max_sdp_bytes,
            no_frame_timeout_s=cfg.whip.no_frame_timeout_s, phase_of=self.sampling_phase,
            ice_servers=rtc_ice_servers(cfg.whip.ice_servers), ice_transport_policy=cfg.whip.ice_transport_policy,
            sender_max_fps=cfg.whip.sender_max_fps, sender_max_height=cfg.whip.sender_max_height,
            keyframes_only=cfg.whip.keyframes_only,
        )
        self.metrics.watch(self._snapshot)
        self.guard = SourceGuard(cfg.sources.policy)
        self.egress = EgressProxy(self.guard)
        self.egress_url = self.egress.start()
        if self.cluster is not None:  # config streams are registered cluster-wide and run where they are placed
            await self.cluster.start(cfg.streams)
            self.metrics.watch_cluster(self.cluster)
        for spec in cfg.streams if self.cluster is None else []:
            await self.add_stream(spec)
        self._ready = True
        log.info("streamguard ready: model %s (%s), data in %s", card.name, self.classifier.backend, cfg.data_dir)

    async def _close_dangling_alerts(self) -> None:
        """Alerts still open in the store belong to participants of a process that died without clearing them
        (a graceful stop clears them as participants leave): they are over, so they are cleared, with that reason."""
        while (page := await asyncio.to_thread(self.store.alerts, open_only=True, limit=100)).items:
            for alert in page.items:
                await self.hub.publish(EventDraft(EventType.ALERT_CLEARED, alert.stream_id, alert.participant_id, {
                    "alert_id": alert.alert_id, "reason": "service restarted: the participant's session ended",
                    "duration_s": max(0.0, time.time() - alert.raised_ts),
                }))
                log.warning("cleared alert %s of %s left open by the previous run", alert.alert_id,
                            alert.participant_id)

    async def _close_dangling_presence(self) -> None:
        """Participants still present in the store joined in a process that died before they left (a graceful stop
        has them leave): they are gone, so they leave now, with that reason, before any source can join them again."""
        for gone in await asyncio.to_thread(self.store.present):
            await self.hub.publish(EventDraft(EventType.PARTICIPANT_LEFT, gone.stream_id, gone.participant_id, {
                "reason": "service restarted: the participant's session ended", "samples": 0, "score": None,
            }))
            log.warning("participant %s of stream %s, present when the previous run ended, has left",
                        gone.participant_id, gone.stream_id)

    async def _choose_decoding(self) -> None:
        """NVDEC for pull sources when configured or present (sources.hwdecode); degraded when asked for and absent."""
        self.hwdecode = await asyncio.to_thread(choose_hwdecode, self.config.sources.hwdecode)
        if not self.hwdecode.degraded:
            log.info("pull sources: %s", self.hwdecode.reason)
            return
        log.warning("decoding degraded: %s", self.hwdecode.reason)
        self._degraded.add("ingest")
        await self.hub.publish(EventDraft(EventType.SERVICE_DEGRADED, None, None,
                               {"component": "ingest", "reason": self.hwdecode.reason, "active": True}))

    async def _load_classifier(self) -> str | None:
        """The configured backend, or the next one that loads (TensorRT, CUDA, then ONNX Runtime on the CPU);
        returns why the service is degraded when it had to fall back."""
        if self._classifier is not None:
            self.classifier = self._classifier
            return None
        cfg = self.config
        options = BackendOptions(max_batch=cfg.batcher.max_batch, threads=cfg.batcher.cpu_threads,
                                 cpu_call_batch=cfg.batcher.cpu_call_batch, triton=cfg.triton)
        selection = await asyncio.to_thread(select_backend, cfg.model, cfg.backend, options=options)
        self.classifier = selection.classifier
        for note in selection.notes:
            log.info("inference: %s", note)
        for warning in selection.warnings:
            log.warning("inference degraded: %s", warning)
        return "; ".join(selection.warnings) or None

    def alert_heatmapper(self) -> Heatmapper:
        """Alerts' heatmaps: the model's own artefact map from the configured model's ONNX file, when that is the
        model scoring the faces (same card: whatever the backend runs, TensorRT and Triton included), else occlusion
        maps through the classifier."""
        card = self.classifier.card
        try:
            onnx_path, file_card = resolve_model(self.config.model)
        except ModelNotFound:
            onnx_path = None
        same = onnx_path is not None and (file_card.name, file_card.version, file_card.sha256) == (
            card.name, card.version, card.sha256)
        try:
            return heatmapper_for(self.classifier, onnx_path if same else None, self.config.events.heatmap)
        except Exception as exc:  # e.g. the file changed since the classifier loaded it: alerts still get a heatmap
            log.warning("alert heatmaps: cannot read the model's own map from %s (%s); occlusion maps instead",
                        onnx_path, exc)
            return OcclusionMap(self.classifier)

    def _watch_inference(self) -> None:
        """A remote backend (Triton) reports outages and recoveries from its own threads: each change becomes a
        `service.degraded` event (active true, then false) on the loop."""
        watch = getattr(self.classifier, "watch_health", None)
        if watch is None:
            return
        loop = asyncio.get_running_loop()

        def changed(healthy: bool, reason: str) -> None:
            try:
                loop.call_soon_threadsafe(self._inference_health, healthy, reason)
            except RuntimeError:  # the loop is closed: the service is gone
                pass

        watch(changed)

    def _inference_health(self, healthy: bool, reason: str) -> None:
        self.report_health("inference", healthy, reason)

    def report_health(self, component: str, healthy: bool, reason: str) -> None:
        """A component's outage or recovery (on the loop): listed by /readyz and published as `service.degraded`."""
        if self._stopping or healthy != (component in self._degraded):
            return  # stopping, or no change (watch_health first replays the state the start already reported)
        if healthy:
            self._degraded.discard(component)
        else:
            self._degraded.add(component)
        self._spawn(self._publish(EventDraft(EventType.SERVICE_DEGRADED, None, None,
                                             {"component": component, "reason": reason, "active": not healthy})))

    async def stop(self) -> None:
        """Close every stream (participants leave, streams close), then flush events and close the store."""
        self._ready = False
        self._stopping = True
        if self.cluster is not None:
            self.cluster.stop_scheduling()
        await self.whip.close_all()  # no new sessions; live ones end with "server shutdown"
        await self._finish_ended()  # their participants leave with that reason, their streams close
        await self._settle()  # and so do end paths that their own tasks had started
        await asyncio.gather(*(self.remove_stream(sid) for sid in list(self._streams)), return_exceptions=True)
        await self._settle()  # the sources' last state events
        self.egress.close()
        await self.batcher.close()
        self.classifier.close()
        self.faces.close()
        await self.hub.close()
        if self.cluster is not None:  # after the hub flushed its events to the log: leases go, then the connection
            await self.cluster.close()
        self.store.close()

    async def _publish(self, draft: EventDraft) -> None:
        await self.hub.publish(draft)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run coro as a task that stop() waits for (a bare create_task may be collected, or cut off by stop)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _settle(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def degraded(self) -> set[str]:
        return set(self._degraded)

    # --- streams: one path for every source ----------------------------------------------------------------------

    async def add_stream(self, spec: StreamSpec, *, from_api: bool = False) -> StreamInfo:
        """Start pulling an RTSP/RTMP/HLS/file stream; its participants are tracked faces. A stream added over the
        API (`from_api`) must pass the source policy (SourceRefused) and is checked at every connection; one from
        the config file is the operator's own."""
        if spec.id in self._streams:
            raise StreamExists(f"stream {spec.id!r} exists already")
        guard = self.guard if from_api else None
        if guard is not None:
            guard.check_url(spec.url)

        def pull(on_frame: OnFrame, on_state: OnState) -> Source:
            return PullSource(spec.id, spec.url, settings=self.config.sources, fps=self.config.sampling.fps,
                              phase=self.sampling_phase(spec.id), on_frame=on_frame, on_state=on_state,
                              hwaccel=self.hwdecode.hwaccel, guard=guard,
                              proxy_url=self.egress_url if guard is not None else None)

        stream = await self._open(pull, url=spec.url, name=spec.name, mode="tracked")
        return stream.info(self.config.scoring.stale_after_s)

    async def whip_publish(self, body: bytes, content_type: str | None, participant_id: str | None,
                           display_name: str | None) -> WhipSession:
        """A WHIP offer in, a session out; its stream's one participant is the publisher."""
        session = await self.whip.create_session(body, content_type, participant_id, display_name)

        def whip(on_frame: OnFrame, on_state: OnState) -> Source:
            return WhipSource(session, self.whip, on_frame=on_frame, on_state=on_state)

        stream = await self._open(whip, url=None, name=display_name, mode="single",
                                  participant_id=session.participant_id)
        person = stream.worker.roster.start(time.time())
        assert person is not None  # a single-participant roster has its participant from the start
        await self.hub.publish(EventDraft(EventType.PARTICIPANT_JOINED, stream.id, person.id, {"label": display_name}))
        log.info("participant joined: stream %s, participant %s%s (WHIP)", stream.id, person.id,
                 f" ({display_name})" if display_name else "")
        return session

    async def remove_stream(self, stream_id: str) -> None:
        stream = self._streams[stream_id]  # KeyError: unknown stream
        self._unlist(stream)
        # The worker first: it finishes the frame in hand and participants leave before the source's `closed`
        # state is published, so no score ever follows a stream's end in the feed.
        await stream.worker.stop("stream closed")
        await stream.source.close()
        if stream.task is not None:
            await asyncio.gather(stream.task, return_exceptions=True)  # its end path publishes the final state

    def streams(self) -> list[StreamInfo]:
        return [s.info(self.config.scoring.stale_after_s) for s in self._streams.values()]

    def stream(self, stream_id: str) -> StreamInfo:
        return self._streams[stream_id].info(self.config.scoring.stale_after_s)

    async def _open(self, make: Callable[[OnFrame, OnState], Source], *, url: str | None, name: str | None,
                    mode: Literal["single", "tracked"], participant_id: str | None = None) -> _Stream:
        """Make a source with this service's callbacks, list its stream and run it until it ends."""
        # A source that ended but whose stream is still being finished (a WHIP session this one replaced) finishes
        # first, so the feed never shows a participant joined twice, or leaving after they (re)joined.
        await self._finish_ended()
        stream = _Stream(url, name)
        source = make(stream.put, lambda state, info: self._on_state(stream, state, info))
        stream.start(source, StreamWorker(source.id, source.kind, self._roster(source.id, mode, participant_id, name),
                                          self.deps))
        self._streams[source.id] = stream
        try:
            stream.worker.start()
            if source.state is not None:  # born in a state (a WHIP session is live at once): say so first
                await self._publish_state(stream, source.state, source.reason)
            stream.task = asyncio.create_task(self._run(stream), name=f"source:{source.id}")
        except BaseException:
            # Not started: unlist it, or it would stay listed as `connecting` for ever and block its id.
            self._streams.pop(source.id, None)
            await stream.worker.stop("stream not started")
            raise
        return stream

    async def _run(self, stream: _Stream) -> None:
        failure = None
        try:
            await stream.source.run()
        except Exception as exc:  # a source bug must not take the service down
            log.exception("stream %s: source crashed", stream.id)
            failure = f"internal error: {exc}"
        await self._end(stream, failure)

    def _end(self, stream: _Stream, failure: str | None = None) -> asyncio.Task[None]:
        """The one end path, run once per stream (whoever asks first starts it; every caller, and stop(), awaits
        that same run)."""
        if stream.ending is None:
            stream.ending = self._spawn(self._end_once(stream, failure))
        return stream.ending

    async def _end_once(self, stream: _Stream, failure: str | None) -> None:
        """Participants leave, then the final state is published (held back by _on_state), so no participant event
        follows the stream's end; a stream whose source is not `listed_after_end` goes."""
        if not stream.source.listed_after_end:
            self._unlist(stream)
        state = StreamState.FAILED if failure else stream.source.state or StreamState.CLOSED
        reason = failure or stream.source.reason
        stream.state, stream.reason = state, reason
        await stream.worker.stop(f"stream {state.value}" if failure else stream.source.leave_reason)
        await self._publish_state(stream, state, reason)

    async def _finish_ended(self) -> None:
        """Run the end path now for every stream whose source has ended (rather than when its task gets to it)."""
        for stream in [s for s in self._streams.values() if s.source.state in TERMINAL_STATES]:
            await self._end(stream)

    def _unlist(self, stream: _Stream) -> None:
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
            # streamguard_frames_decoded_total is a counter: keep a gone stream's frames in it. In the same step as
            # the unlisting, so no scrape sees them missing.
            self._decoded_retired[stream.kind] += stream.source.counters.decoded

    def _on_state(self, stream: _Stream, state: StreamState, info: StateInfo) -> None:
        if state is StreamState.RECONNECTING:
            self.metrics.reconnects.labels(stream.kind).inc()
        # The state is current at once; the event follows in order: tasks start in creation order and
        # publish_nowait queues synchronously. A final state is published by _end, after the participants left.
        stream.state, stream.reason = state, info.get("reason")
        if state not in TERMINAL_STATES:
            self._spawn(self._publish_state(stream, state, info.get("reason"), info))

    async def _publish_state(self, stream: _Stream, state: StreamState, reason: str | None,
                             info: StateInfo | None = None) -> None:
        data: dict[str, Any] = {"state": state.value, "reason": reason}
        # attempt is 1-based and only meaningful while reconnecting; sources report 0 otherwise. The source calls the
        # wait before the next attempt delay_s; the event schema calls it retry_in_s.
        if info and info.get("attempt"):
            data["attempt"] = info["attempt"]
        if info and info.get("delay_s") is not None:
            data["retry_in_s"] = info["delay_s"]
        await self.hub.publish(EventDraft(EventType.STREAM_STATE, stream.id, None, data))

    # --- shared --------------------------------------------------------------------------------------------------

    def sampling_phase(self, stream_id: str) -> float:
        """The stream's sampling phase: the middle of the widest gap between live streams' (0 without stagger).

        Assigned rather than hashed from the id: N streams are then at least 1/(2N) of a period apart (random
        phases bunch up), and a stream that leaves frees its phase for the next one. WHIP asks before its stream is
        listed, so phases of streams no longer listed are dropped here, not on each of the ways a stream ends.
        """
        if not self.config.sampling.stagger:
            return 0.0
        if stream_id not in self._phases:
            self._phases = {sid: p for sid, p in self._phases.items() if sid in self._streams}
            self._phases[stream_id] = spread_phase(self._phases.values())
        return self._phases[stream_id]

    def _roster(self, stream_id: str, mode: Literal["single", "tracked"], participant_id: str | None,
                label: str | None) -> Roster:
        cfg = self.config
        return Roster(
            stream_id, mode=mode, scoring=cfg.scoring, card_threshold=CardThresholds.from_card(self.classifier.card),
            min_samples=cfg.participants.min_samples, leave_after_s=cfg.participants.leave_after_s,
            crop_margin=self.faces.margin, participant_id=participant_id, label=label,
        )

    def participants(self, stream_id: str | None = None) -> list[ParticipantInfo]:
        out = []
        for stream in self._streams.values():
            if stream_id is not None and stream.id != stream_id:
                continue
            # No frames is the stream's state, not the face's: nobody can be seen, so nobody is "no face".
            receiving = stream.receiving(self.config.scoring.stale_after_s)
            for p in stream.worker.roster.participants.values():
                if not p.confirmed:
                    continue
                s = p.scorer
                state = s.state.value if receiving else NO_FRAMES
                out.append(ParticipantInfo(
                    id=p.id, stream_id=stream.id, label=p.label, state=state, alert_active=s.alert_active,
                    alert_id=p.alert_id, p_fake=p.last_p_fake, smoothed=s.smoothed, samples=len(s.window),
                    first_seen_ts=p.first_seen_ts, last_seen_ts=p.last_seen_ts,
                    last_seen_media_s=p.last_seen_media_s, sparkline=p.sparkline(),
                ))
        return out

    def _snapshot(self) -> dict:
        states: Counter[tuple[str, str]] = Counter((s.kind, s.state.value) for s in self._streams.values())
        decoded = Counter(self._decoded_retired)
        for s in self._streams.values():
            decoded[s.kind] += s.source.counters.decoded
        return {
            "streams": states, "decoded": decoded, "participants": len(self.participants()),
            "ws_clients": self.ws_clients, "degraded": 1 if self._degraded else 0,
            "event_feed": {"written": dict(self.hub.written), "catch_ups": self.hub.catch_ups,
                           "closed_slow": self.hub.dropped_subscribers,
                           "pruned": self.hub.events_pruned, "prune_failures": self.hub.prune_failures},
        }
