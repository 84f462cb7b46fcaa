"""One stream's live loop: newest sampled frame → faces → participants → batched scores → scorer → events."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from streamguard.events.schema import EventDraft, EventType, EvidenceKind, new_alert_id
from streamguard.inference.classifier import InferenceUnavailable
from streamguard.ingest.slot import FrameSlot
from streamguard.metrics import Metrics
from streamguard.participants import LiveParticipant, Roster
from streamguard.scoring.live import AlertCleared, AlertRaised, Transition
from streamguard.scoring.verdicts import id_strategy
from streamguard.types import FaceCrop, SampledFrame

log = logging.getLogger(__name__)

IDLE_AFTER_S = 2.0  # no frame for this long: the stream is idle and its participants' time moves on by the clock
IDLE_TICK_S = 1.0


class FaceStage(Protocol):
    """Frame → face crops off the loop (`FacePool`)."""

    async def analyze(self, frame: SampledFrame) -> list[FaceCrop]: ...


class ScoreStage(Protocol):
    """Face crops → P(fake), batched across streams (`Batcher`)."""

    async def score_many(self, crops: np.ndarray) -> np.ndarray: ...


class EventSink(Protocol):
    """Where events go (`EventHub`: durably, then to subscribers)."""

    async def publish(self, draft: EventDraft) -> object: ...


MakeEvidence = Callable[[str, np.ndarray, float], Awaitable[Mapping[EvidenceKind, str]]]


@dataclass
class WorkerDeps:
    """What every stream worker shares: the service's stages."""

    faces: FaceStage
    batcher: ScoreStage
    hub: EventSink
    metrics: Metrics
    make_evidence: MakeEvidence  # (alert id, crop, P(fake)) -> evidence URLs (`EvidenceMaker`)
    window_s: float
    publish_scores: bool = False


class MediaClock:
    """Monotonic media time for a stream whose timestamps restart (reconnects, new sessions)."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._last: float | None = None

    def __call__(self, pts_s: float) -> float:
        ts = pts_s + self._offset
        if self._last is not None and ts <= self._last:
            self._offset += self._last - ts + 1e-3
            ts = pts_s + self._offset
        self._last = ts
        return ts

    @property
    def last(self) -> float | None:
        return self._last

    def advance(self, ts: float) -> None:
        """Time passed without a frame (a stalled source): later frames are stamped after `ts`."""
        self._last = ts if self._last is None else max(self._last, ts)


class StreamWorker:
    """Takes the newest sampled frame of one stream at a time; see `_process_locked` for the order of one sample."""

    def __init__(self, stream_id: str, kind: str, roster: Roster, deps: WorkerDeps) -> None:
        self.stream_id = stream_id
        self.kind = kind
        self.roster = roster
        self.deps = deps
        self.slot = FrameSlot()
        self.clock = MediaClock()
        self.frames = 0
        self._task: asyncio.Task[None] | None = None
        self._idle_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # frames and idle ticks take turns on the roster
        self._last_frame_mono: float | None = None
        self.last_frame_ts: float | None = None  # wall clock of the last sampled frame handed in

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"worker:{self.stream_id}")
        self._idle_task = asyncio.create_task(self._idle(), name=f"worker-idle:{self.stream_id}")

    def put(self, frame: SampledFrame) -> None:
        dropped = self.slot.dropped
        self.last_frame_ts = time.time()
        self.slot.put(frame)
        self.deps.metrics.frames_sampled.labels(self.kind).inc()
        if self.slot.dropped > dropped:
            self.deps.metrics.frames_dropped.labels("worker_busy").inc()

    async def stop(self, reason: str) -> None:
        """Finish the frame in hand, then every participant leaves with `reason`."""
        self.slot.close()
        if self._idle_task:
            self._idle_task.cancel()
            await asyncio.gather(self._idle_task, return_exceptions=True)
        if self._task:
            await self._task
        for person in self.roster.remove_all():
            await self._leave(person, reason)

    async def _idle(self) -> None:
        """While no frame comes (a stalled or reconnecting source), media time follows the wall clock, so
        participants go no_face after `stale_after_s` and tracked ones leave after `leave_after_s`, as they would
        if frames without them came. Without this, a dead camera would freeze its participants' last verdict."""
        while True:
            await asyncio.sleep(IDLE_TICK_S)
            last = self._last_frame_mono
            if last is None or self.clock.last is None or time.monotonic() - last < IDLE_AFTER_S:
                continue
            async with self._lock:
                now = time.monotonic()
                ts = self.clock.last + (now - last)
                self.clock.advance(ts)
                self._last_frame_mono = now
                for person in list(self.roster.participants.values()):
                    if person.confirmed:
                        await self._apply(person, person.scorer.tick(ts), None)
                for person in self.roster.expire(ts):
                    await self._leave(person, f"not seen for {self.roster.leave_after_s:.0f} s (no frames)")

    async def _run(self) -> None:
        while (frame := await self.slot.get()) is not None:
            try:
                await self.process(frame)
            except Exception:  # one bad frame must not end the stream's processing
                log.exception("stream %s: frame at %.2f s failed", self.stream_id, frame.pts_s)
                self.deps.metrics.frames_dropped.labels("error").inc()

    async def process(self, frame: SampledFrame) -> None:
        """One sample, start to end (what the loop does with each frame it takes; tests call it directly)."""
        async with self._lock:
            await self._process_locked(frame)
            self._last_frame_mono = time.monotonic()

    async def _process_locked(self, frame: SampledFrame) -> None:
        """The order within one sample: faces, then tracks that this frame confirmed join (their waiting
        observations replayed), then scores of gated faces, then low-quality faces, then participants without a face
        here, then tracked ones unseen for leave_after_s leave. Alerts follow the sample that raised them."""
        self.frames += 1
        ts = self.clock(frame.pts_s)
        crops = await self.deps.faces.analyze(frame)
        self.deps.metrics.faces_detected.inc(len(crops))
        obs = self.roster.observe(ts, crops, frame.wall_ts)
        for person in obs.joined:
            await self._publish(EventType.PARTICIPANT_JOINED, person, {"label": person.label, "pts_s": frame.pts_s})
            log.info("participant joined: stream %s, participant %s", self.stream_id, _who(person))
            await self._apply(person, person.confirm(), None)
        scorable = [(p, c) for p, c in obs.faces if c.quality.ok]
        crops_in = np.stack([c.crop for _, c in scorable]) if scorable else None
        try:
            scores = await self.deps.batcher.score_many(crops_in) if crops_in is not None else np.zeros(0, np.float32)
        except InferenceUnavailable:  # the inference server is down and triton.fallback is unscored
            await self._unscored(ts, scorable)
            scorable, scores = [], np.zeros(0, np.float32)
        self.deps.metrics.sample_to_score.observe(max(0.0, time.time() - frame.wall_ts))
        for (person, crop), p in zip(scorable, scores, strict=True):
            await self._apply(person, person.score(ts, float(p), frame.wall_ts), crop)
            await self._publish_score(person, float(p), crop)
        for person, crop in obs.faces:
            if not crop.quality.ok:
                self.deps.metrics.faces_low_quality.labels(crop.quality.verdict.value).inc()
                await self._apply(person, person.low_quality(ts, crop.quality.verdict.value), None)
                await self._publish_score(person, None, crop)
        for person in self.roster.unseen(p for p, _ in obs.faces):
            await self._apply(person, person.no_face(ts), None)
        for person in self.roster.expire(ts):
            await self._leave(person, f"not seen for {self.roster.leave_after_s:.0f} s")

    async def _unscored(self, ts: float, faces: list[tuple[LiveParticipant, FaceCrop]]) -> None:
        """Faces seen but not scored: for the scorer a face without a score, as a low-quality one is, so the
        participant stays present and goes low_quality (not no_face) if the outage lasts."""
        self.deps.metrics.faces_unscored.inc(len(faces))
        for person, crop in faces:
            await self._apply(person, person.low_quality(ts, "unscored"), None)
            await self._publish_score(person, None, crop)

    async def _apply(self, person: LiveParticipant, transitions: list[Transition], crop: FaceCrop | None) -> None:
        for t in transitions:
            if isinstance(t, AlertRaised):
                await self._raise(person, t, crop)
            elif isinstance(t, AlertCleared) and person.alert_id:
                await self._clear(person, "score below clear threshold", t.smoothed, t.threshold)

    async def _raise(self, person: LiveParticipant, t: AlertRaised, crop: FaceCrop | None) -> None:
        alert_id = new_alert_id()
        evidence: Mapping[EvidenceKind, str] = {}
        if crop is not None:
            started = time.perf_counter()
            try:
                evidence = await self.deps.make_evidence(alert_id, crop.crop, t.p_fake)
            except Exception:  # evidence is a courtesy: the alert goes out without it
                log.exception("evidence for alert %s failed", alert_id)
            self.deps.metrics.alert_evidence_seconds.observe(time.perf_counter() - started)
        person.alert_id, person.alert_raised_ts = alert_id, time.time()
        await self._publish(EventType.ALERT_RAISED, person, {
            "alert_id": alert_id, "score": t.p_fake, "smoothed": t.smoothed, "threshold": t.threshold,
            "window_s": self.deps.window_s, "samples": t.samples, "evidence": evidence, "label": person.label,
            "face_px": None if crop is None else round(crop.quality.face_px, 1),
        })
        log.info("alert raised: stream %s, participant %s, smoothed P(fake) %.2f >= %.2f (this sample %.2f), alert %s",
                 self.stream_id, _who(person), t.smoothed, t.threshold, t.p_fake, alert_id)
        self.deps.metrics.alerts_raised.inc()

    async def _clear(self, person: LiveParticipant, reason: str, smoothed: float | None,
                     threshold: float | None) -> None:
        # Wall seconds since it was raised, whatever way it ends (the scorer's own clock is media time).
        raised = person.alert_raised_ts
        duration = max(0.0, time.time() - raised) if raised is not None else 0.0
        await self._publish(EventType.ALERT_CLEARED, person, {
            "alert_id": person.alert_id, "reason": reason, "smoothed": smoothed, "threshold": threshold,
            "duration_s": duration,
        })
        log.info("alert cleared: stream %s, participant %s, after %.0f s (%s), smoothed P(fake) %s, alert %s",
                 self.stream_id, _who(person), duration, reason, _score(smoothed), person.alert_id)
        person.alert_id = person.alert_raised_ts = None
        self.deps.metrics.alerts_cleared.inc()

    async def _leave(self, person: LiveParticipant, reason: str) -> None:
        if person.alert_id:
            # Why they left matters to an operator: a camera that failed is not a deepfake that went away.
            await self._clear(person, f"participant left: {reason}", person.scorer.smoothed, None)
        score = id_strategy(person.scores) if person.scores else None
        await self._publish(EventType.PARTICIPANT_LEFT, person,
                            {"reason": reason, "samples": len(person.scores), "score": score})
        log.info("participant left: stream %s, participant %s (%s), P(fake) %s over %d samples", self.stream_id,
                 _who(person), reason, _score(score), len(person.scores))

    async def _publish_score(self, person: LiveParticipant, p: float | None, crop: FaceCrop) -> None:
        if not (self.deps.publish_scores and person.confirmed):
            return
        s = person.scorer
        await self._publish(EventType.PARTICIPANT_SCORE, person, {
            "p_fake": p, "smoothed": s.smoothed, "samples": len(s.window), "state": s.state.value,
            "quality": crop.quality.verdict.value, "face_px": round(crop.quality.face_px, 1),
        })

    async def _publish(self, type: EventType, person: LiveParticipant, data: Mapping[str, Any]) -> None:
        await self.deps.hub.publish(EventDraft(type, self.stream_id, person.id, data))


def _who(person: LiveParticipant) -> str:
    """A participant as log lines name them: the id, and the display name when there is one."""
    return f"{person.id} ({person.label})" if person.label and person.label != person.id else person.id


def _score(p: float | None) -> str:
    return "-" if p is None else f"{p:.2f}"
