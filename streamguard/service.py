"""The live service: wiring of sources → workers → batcher → events, and its lifecycle."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from streamguard.config import ServiceConfig, StreamSpec
from streamguard.events.hub import EventHub
from streamguard.events.schema import EVIDENCE_MIME, EventType, EvidenceKind, evidence_path
from streamguard.events.store import EventStore
from streamguard.inference.batcher import Batcher
from streamguard.inference.classifier import Classifier
from streamguard.inference.heatmap import occlusion_map, render_overlay
from streamguard.inference.backends import BackendOptions, select_backend
from streamguard.ingest.nvdec import choose_hwdecode
from streamguard.ingest.pull import PullSource, StreamState, redact_url
from streamguard.ingest.sampler import spread_phase
from streamguard.ingest.webrtc import WhipManager, WhipSession, rtc_ice_servers
from streamguard.metrics import Metrics
from streamguard.participants import Roster
from streamguard.pipeline import FacePool
from streamguard.worker import StreamWorker, WorkerDeps, encode_jpeg

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
    # "suspicious" when one is over the raise threshold but not yet for raise_after samples; else "clear": an
    # operator's per-camera / per-call status.
    verdict: Literal["alert", "suspicious", "clear", "pending"]
    alerts_active: int
    max_smoothed: float | None = Field(description="highest smoothed P(fake) among the stream's participants")


class ParticipantInfo(BaseModel):
    id: str
    stream_id: str
    label: str | None
    state: str
    alert_active: bool
    alert_id: str | None
    p_fake: float | None
    smoothed: float | None
    samples: int
    first_seen_ts: float
    last_seen_ts: float
    sparkline: list[tuple[float, float]]


def stream_kind(url: str) -> str:
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    return {"rtsps": "rtsp", "rtmps": "rtmp", "http": "hls", "https": "hls"}.get(scheme, scheme)


class _Stream:
    def __init__(self, stream_id: str, kind: str, url: str | None, name: str | None, worker: StreamWorker):
        self.id, self.kind, self.url, self.name, self.worker = stream_id, kind, url, name, worker
        self.state = StreamState.CONNECTING.value
        self.reason: str | None = None
        self.created_at = time.time()
        self.source: PullSource | None = None
        self.session: WhipSession | None = None
        self.task: asyncio.Task[None] | None = None
        self.final_state: tuple[str, str | None, dict[str, Any]] | None = None  # closed/failed, once participants left

    def info(self) -> StreamInfo:
        scorers = [p.scorer for p in self.worker.roster.participants.values() if p.confirmed]
        alerts = sum(1 for sc in scorers if sc.alert_active)
        smoothed = [sc.smoothed for sc in scorers if sc.smoothed is not None]
        if alerts:
            verdict = "alert"
        elif self.state != StreamState.LIVE.value or not scorers or len(smoothed) < len(scorers):
            verdict = "pending"  # no verdict on a stream that is down, or on participants still warming up
        elif any(sc.state.value == "suspicious" for sc in scorers):
            verdict = "suspicious"
        else:
            verdict = "clear"
        return StreamInfo(
            id=self.id, kind=self.kind, url=redact_url(self.url) if self.url else None, name=self.name,
            state=self.state, reason=self.reason, created_at=self.created_at, frames_sampled=self.worker.slot.put_count,
            frames_dropped=self.worker.slot.dropped, participants=len(scorers), verdict=verdict, alerts_active=alerts,
            max_smoothed=max(smoothed, default=None),
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
        self._tasks: set[asyncio.Task[None]] = set()  # event publications and WHIP endings in flight
        self.ws_clients = 0

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        degraded_reason = await self._load_classifier()
        try:  # thresholds derived from the card may not fit it (card 0.88 + margin 0.2 > 1): refuse now, not per frame
            cfg.scoring.thresholds(self.classifier.card.threshold)
        except ValueError as exc:
            raise ValueError(f"scoring: {exc} (model {self.classifier.card.name})") from None
        self.store = EventStore(cfg.data_dir / "events.sqlite3")
        ev = cfg.events
        self.hub = EventHub(self.store, client_queue_size=ev.client_queue_size,
                            slow_consumer_grace_s=ev.slow_consumer_grace_s, retention_days=ev.retention_days,
                            max_events=ev.max_events)
        if degraded_reason:
            self._degraded.add("inference")
            await self.hub.publish(EventType.SERVICE_DEGRADED, None, None,
                                   {"component": "inference", "reason": degraded_reason, "active": True})
        self._watch_inference()
        await self._close_dangling_alerts()
        await self._choose_decoding()
        decode = "nvdec" if self.hwdecode.hwaccel is not None else "cpu"
        self.metrics.set_info(self.classifier.card.name, self.classifier.backend, decode)
        self.batcher = Batcher(self.classifier, max_batch=cfg.batcher.max_batch, max_wait_ms=cfg.batcher.max_wait_ms,
                               workers=cfg.batcher.workers, on_batch=self.metrics.on_batch)
        await self.batcher.start()
        card = self.classifier.card
        self.faces = FacePool(cfg.faces, self.classifier.input_size, card.preprocess.crop_margin,
                              threads=min(2, os.cpu_count() or 1))
        self.deps = WorkerDeps(
            faces=self.faces, batcher=self.batcher, classifier=self.classifier, hub=self.hub, metrics=self.metrics,
            make_evidence=self._make_evidence, window_s=cfg.scoring.window_s, publish_scores=cfg.events.publish_scores,
        )
        self.whip = WhipManager(
            fps=cfg.sampling.fps, max_sessions=cfg.whip.max_sessions, max_sdp_bytes=cfg.whip.max_sdp_bytes,
            no_frame_timeout_s=cfg.whip.no_frame_timeout_s, on_frame=self._on_whip_frame,
            on_session_end=self._on_whip_end, phase_of=self.sampling_phase,
            ice_servers=rtc_ice_servers(cfg.whip.ice_servers), ice_transport_policy=cfg.whip.ice_transport_policy,
        )
        self.metrics.watch(self._snapshot)
        for spec in cfg.streams:
            await self.add_stream(spec)
        self._ready = True
        log.info("streamguard ready: model %s (%s), data in %s", card.name, self.classifier.backend, cfg.data_dir)

    async def _close_dangling_alerts(self) -> None:
        """Alerts still open in the store belong to participants of a process that died without clearing them
        (a graceful stop clears them as participants leave): they are over, so they are cleared, with that reason."""
        while (page := await asyncio.to_thread(self.store.alerts, open_only=True, limit=100)).items:
            for alert in page.items:
                await self.hub.publish(EventType.ALERT_CLEARED, alert.stream_id, alert.participant_id, {
                    "alert_id": alert.alert_id, "reason": "service restarted: the participant's session ended",
                    "duration_s": max(0.0, time.time() - alert.raised_ts),
                })
                log.warning("cleared alert %s of %s left open by the previous run", alert.alert_id,
                            alert.participant_id)

    async def _choose_decoding(self) -> None:
        """NVDEC for pull sources when configured or present (sources.hwdecode); degraded when asked for and absent."""
        self.hwdecode = await asyncio.to_thread(choose_hwdecode, self.config.sources.hwdecode)
        if not self.hwdecode.degraded:
            log.info("pull sources: %s", self.hwdecode.reason)
            return
        log.warning("decoding degraded: %s", self.hwdecode.reason)
        self._degraded.add("ingest")
        await self.hub.publish(EventType.SERVICE_DEGRADED, None, None,
                               {"component": "ingest", "reason": self.hwdecode.reason, "active": True})

    async def _load_classifier(self) -> str | None:
        """The configured backend, or the next one that loads (TensorRT, CUDA, then ONNX Runtime on the CPU);
        returns why the service is degraded when it had to fall back."""
        if self._classifier is not None:
            self.classifier = self._classifier
            return None
        cfg = self.config
        selection = await asyncio.to_thread(select_backend, cfg.model, cfg.backend,
                                            options=BackendOptions(max_batch=cfg.batcher.max_batch, triton=cfg.triton))
        self.classifier = selection.classifier
        for note in selection.notes:
            log.info("inference: %s", note)
        for warning in selection.warnings:
            log.warning("inference degraded: %s", warning)
        return "; ".join(selection.warnings) or None

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
        if self._stopping or healthy != ("inference" in self._degraded):
            return  # stopping, or no change (watch_health first replays the state the start already reported)
        if healthy:
            self._degraded.discard("inference")
        else:
            self._degraded.add("inference")
        self._spawn(self.hub.publish(EventType.SERVICE_DEGRADED, None, None,
                                     {"component": "inference", "reason": reason, "active": not healthy}))

    async def stop(self) -> None:
        """Close every stream (participants leave, streams close), then flush events and close the store."""
        self._ready = False
        self._stopping = True
        await self.whip.close_all()
        await self._settle()  # WHIP streams end: their participants leave, their streams close
        await asyncio.gather(*(self.remove_stream(sid) for sid in list(self._streams)), return_exceptions=True)
        await self._settle()  # the sources' last state events
        await self.batcher.close()
        if callable(getattr(self.classifier, "close", None)):
            self.classifier.close()  # TensorRT: device buffers, CUDA graphs
        self.faces.close()
        await self.hub.close()
        self.store.close()

    def _spawn(self, coro: Any) -> None:
        """Run coro as a task that stop() waits for (a bare create_task may be collected, or cut off by stop)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def degraded(self) -> set[str]:
        return set(self._degraded)

    # --- pull streams --------------------------------------------------------------------------------------------

    async def add_stream(self, spec: StreamSpec) -> StreamInfo:
        if spec.id in self._streams:
            raise StreamExists(f"stream {spec.id!r} exists already")
        kind = stream_kind(spec.url)
        stream = self._new_stream(spec.id, kind, spec.url, spec.name, mode="tracked")
        try:
            stream.source = PullSource(
                spec.id, spec.url, settings=self.config.sources, fps=self.config.sampling.fps,
                phase=self.sampling_phase(spec.id), on_frame=stream.worker.put,
                on_state=lambda state, info: self._on_state(stream, state, info), hwaccel=self.hwdecode.hwaccel,
            )
            stream.task = asyncio.create_task(self._run_source(stream), name=f"source:{spec.id}")
        except BaseException:
            # Not started: unlist it, or it would stay listed as `connecting` for ever and block its id.
            self._streams.pop(spec.id, None)
            await stream.worker.stop("stream not started")
            raise
        return stream.info()

    async def remove_stream(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id)  # KeyError: unknown stream
        # The worker first: it finishes the frame in hand and participants leave before the source's `closed`
        # state is published, so no score ever follows a stream's end in the feed.
        await stream.worker.stop("stream closed")
        if stream.session is not None and not stream.session.ended:
            # A WHIP stream removed through the streams API: end its peer connection too, or it would keep
            # sending frames to nobody until the publisher gives up.
            await self.whip.end(stream.session, "stream removed")
        if stream.source is not None:
            await stream.source.close()
            self._decoded_retired[stream.kind] += stream.source.stats.decoded
        elif stream.session is not None:
            self._decoded_retired[stream.kind] += stream.session.video_frames
        if stream.task is not None:
            await asyncio.gather(stream.task, return_exceptions=True)
        if stream.session is not None:
            await self._publish_state(stream, StreamState.CLOSED.value, stream.session.end_reason)

    def streams(self) -> list[StreamInfo]:
        return [s.info() for s in self._streams.values()]

    def stream(self, stream_id: str) -> StreamInfo:
        return self._streams[stream_id].info()

    async def _run_source(self, stream: _Stream) -> None:
        try:
            await stream.source.run()
        except Exception as exc:  # a source bug must not take the service down
            log.exception("stream %s: source crashed", stream.id)
            stream.state, stream.reason = StreamState.FAILED.value, f"internal error: {exc}"
            stream.final_state = (stream.state, stream.reason, {})
        # The source ended (end of file, failed, or closed): its participants leave, then its final state is
        # published (held back by _on_state), so no participant event follows the stream's end. The stream stays
        # listed with that state until it is removed.
        await stream.worker.stop(f"stream {stream.state}")
        if stream.final_state is not None:
            await self._publish_state(stream, *stream.final_state)
            stream.final_state = None

    def _on_state(self, stream: _Stream, state: StreamState, info: dict[str, Any]) -> None:
        if state is StreamState.RECONNECTING:
            self.metrics.reconnects.labels(stream.kind).inc()
        # The state is current at once (the source's end reads it for the participants' leave reason); the event
        # follows in order: tasks start in creation order and publish_nowait queues synchronously.
        stream.state, stream.reason = state.value, info.get("reason")
        if state in (StreamState.CLOSED, StreamState.FAILED):
            stream.final_state = (state.value, info.get("reason"), info)  # published by _run_source, see there
            return
        self._spawn(self._publish_state(stream, state.value, info.get("reason"), info))

    async def _publish_state(self, stream: _Stream, state: str, reason: str | None, info: dict | None = None) -> None:
        stream.state, stream.reason = state, reason
        data = {"state": state, "reason": reason}
        if info:
            # attempt is 1-based and only meaningful while reconnecting; sources report 0 otherwise. The source
            # calls the wait before the next attempt delay_s; the event schema calls it retry_in_s.
            if info.get("attempt"):
                data["attempt"] = info["attempt"]
            if info.get("delay_s") is not None:
                data["retry_in_s"] = info["delay_s"]
        await self.hub.publish(EventType.STREAM_STATE, stream.id, None, data)

    # --- WHIP ----------------------------------------------------------------------------------------------------

    async def whip_publish(self, body: bytes, content_type: str | None, participant_id: str | None,
                           display_name: str | None) -> WhipSession:
        session = await self.whip.create_session(body, content_type, participant_id, display_name)
        # A session of the same participant that this one replaced leaves (and its stream closes) first, so the
        # feed never shows the participant joined twice, or leaving after it (re)joined.
        for old in [st for st in self._streams.values() if st.session is not None and st.session is not session
                    and st.session.participant_id == session.participant_id and st.session.end_reason]:
            await self._end_whip(old.session, old.session.end_reason or "")
        stream = self._new_stream(session.stream_id, "webrtc", None, display_name, mode="single",
                                  participant_id=session.participant_id)
        stream.session = session
        await self._publish_state(stream, StreamState.LIVE.value, None)
        person = stream.worker.roster.start(time.time())
        await self.hub.publish(EventType.PARTICIPANT_JOINED, stream.id, person.id, {"label": display_name})
        return session

    def _on_whip_frame(self, stream_id: str, frame) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.worker.put(frame)

    def _on_whip_end(self, session: WhipSession, reason: str) -> None:
        if session.stream_id in self._streams:
            self._spawn(self._end_whip(session, reason))

    async def _end_whip(self, session: WhipSession, reason: str) -> None:
        stream = self._streams.pop(session.stream_id, None)
        if stream is None:
            return
        # streamguard_frames_decoded_total is a counter: keep an ended session's frames in it
        self._decoded_retired[stream.kind] += session.video_frames
        await stream.worker.stop(reason)
        await self._publish_state(stream, StreamState.CLOSED.value, reason)

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

    def _new_stream(self, stream_id: str, kind: str, url: str | None, name: str | None, *, mode: str,
                    participant_id: str | None = None) -> _Stream:
        cfg = self.config
        roster = Roster(
            stream_id, mode=mode, scoring=cfg.scoring, card_threshold=self.classifier.card.threshold,
            min_samples=cfg.participants.min_samples, leave_after_s=cfg.participants.leave_after_s,
            crop_margin=self.faces.margin, participant_id=participant_id, label=name,
        )
        worker = StreamWorker(stream_id, kind, roster, self.deps)
        stream = _Stream(stream_id, kind, url, name, worker)
        self._streams[stream_id] = stream
        worker.start()
        return stream

    def participants(self, stream_id: str | None = None) -> list[ParticipantInfo]:
        out = []
        for stream in self._streams.values():
            if stream_id is not None and stream.id != stream_id:
                continue
            for p in stream.worker.roster.participants.values():
                if not p.confirmed:
                    continue
                s = p.scorer
                out.append(ParticipantInfo(
                    id=p.id, stream_id=stream.id, label=p.label, state=s.state.value, alert_active=s.alert_active,
                    alert_id=p.alert_id, p_fake=p.last_p_fake, smoothed=s.smoothed, samples=len(s.window),
                    first_seen_ts=p.first_seen_ts, last_seen_ts=p.last_seen_ts, sparkline=s.sparkline(),
                ))
        return out

    async def _make_evidence(self, alert_id: str, crop: np.ndarray, p_fake: float) -> dict[EvidenceKind, str]:
        """Store the face crop and its artefact heatmap; returns their API paths."""

        def build() -> dict[EvidenceKind, bytes]:
            heat = occlusion_map(self.classifier, crop)
            return {EvidenceKind.CROP: encode_jpeg(crop), EvidenceKind.HEATMAP: render_overlay(crop, heat, p_fake)}

        images = await asyncio.to_thread(build)
        for kind, data in images.items():
            await asyncio.to_thread(self.store.put_evidence, alert_id, kind, EVIDENCE_MIME[kind], data)
        return {kind: evidence_path(alert_id, kind) for kind in images}

    def _snapshot(self) -> dict:
        states: Counter[tuple[str, str]] = Counter((s.kind, s.state) for s in self._streams.values())
        decoded = Counter(self._decoded_retired)
        for s in self._streams.values():
            if s.source is not None:
                decoded[s.kind] += s.source.stats.decoded
            elif s.session is not None:
                decoded[s.kind] += s.session.video_frames
        return {
            "streams": states, "decoded": decoded, "participants": len(self.participants()),
            "ws_clients": self.ws_clients, "degraded": 1 if self._degraded else 0,
            "event_feed": {"written": dict(self.hub.written), "catch_ups": self.hub.catch_ups,
                           "closed_slow": self.hub.dropped_subscribers,
                           "pruned": self.hub.events_pruned, "prune_failures": self.hub.prune_failures},
        }
