"""Who is who in one stream: faces → participants, with join and leave.

Two modes: a WebRTC track *is* a participant (mode "single": the largest face in the frame is
theirs, everyone else in their camera is ignored), while a camera or gallery view is tracked (mode "tracked":
faces are tracked into participants by `ParticipantTracker`, and a track only becomes a participant once it has
`min_samples` consistent samples; one-off detections are noise and never reach a scorer or an event).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from streamguard.config import CardThresholds, ScoringSettings
from streamguard.faces.tracker import ParticipantTracker
from streamguard.scoring.live import ParticipantScorer, Transition
from streamguard.types import FaceCrop

# Per-participant sample scores kept for the final per-person score (id_strategy): an hour at 1 FPS.
MAX_KEPT_SCORES = 3600


@dataclass
class LiveParticipant:
    """One participant. Two clocks, each in fields named for it: `*_ts` are wall-clock Unix seconds (what the API,
    events and people see); `*_media_s` is the stream's media time, which the scorer runs on (a file or a stream
    that stalls has its own pace)."""

    id: str
    stream_id: str
    label: str | None
    scorer: ParticipantScorer
    first_seen_ts: float
    last_seen_ts: float
    last_seen_media_s: float | None = None  # None: not seen in a frame yet (a WHIP publisher before their first)
    confirmed: bool = False
    alert_id: str | None = None
    alert_raised_ts: float | None = None  # when the open alert was raised (wall clock): its duration is wall time
    scores: list[float] = field(default_factory=list)
    last_p_fake: float | None = None
    # The scored samples as (wall ts, P(fake)), for the API's sparkline; the scorer's window decides how many count.
    points: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=MAX_KEPT_SCORES), repr=False)
    # Before confirmation, observations (kind, media s, wall ts, score or reason) wait here and are replayed into the
    # scorer when the track is confirmed.
    _pending: list[tuple[str, float, float, float | str]] = field(default_factory=list, repr=False)

    def score(self, ts: float, p_fake: float, wall_ts: float) -> list[Transition]:
        self.last_p_fake = p_fake
        if not self.confirmed:
            self._pending.append(("score", ts, wall_ts, p_fake))
            return []
        self.scores.append(p_fake)
        del self.scores[:-MAX_KEPT_SCORES]
        self.points.append((wall_ts, p_fake))
        return self.scorer.add_score(ts, p_fake)

    def low_quality(self, ts: float, reason: str) -> list[Transition]:
        if not self.confirmed:
            self._pending.append(("low_quality", ts, 0.0, reason))
            return []
        return self.scorer.add_low_quality(ts, reason)

    def sparkline(self) -> list[tuple[float, float]]:
        """The scores in the scorer's window as (wall-clock ts, P(fake)), oldest first."""
        n = len(self.scorer.window)
        return list(self.points)[-n:] if n else []

    def no_face(self, ts: float) -> list[Transition]:
        return self.scorer.add_no_face(ts) if self.confirmed else []

    def confirm(self) -> list[Transition]:
        """Mark as a real participant and replay what was seen before; returns the replay's transitions."""
        self.confirmed = True
        out: list[Transition] = []
        for kind, ts, wall_ts, value in self._pending:
            if kind == "score":
                out += self.score(ts, float(value), wall_ts)
            else:
                out += self.low_quality(ts, str(value))
        self._pending.clear()
        return out


@dataclass
class Observation:
    """What one frame did to the roster."""

    faces: list[tuple[LiveParticipant, FaceCrop]]  # each face that belongs to a participant (confirmed or not)
    joined: list[LiveParticipant]  # confirmed by this frame
    ignored: int = 0  # faces that are nobody's (other people in a WebRTC participant's camera)


class Roster:
    """The participants of one stream."""

    def __init__(
        self,
        stream_id: str,
        *,
        mode: Literal["single", "tracked"],
        scoring: ScoringSettings,
        card_threshold: CardThresholds,
        min_samples: int = 3,
        leave_after_s: float = 30.0,
        crop_margin: float = 1.65,
        participant_id: str | None = None,
        label: str | None = None,
    ):
        if mode == "single" and not participant_id:
            raise ValueError("a single-participant stream needs its participant id")
        self.stream_id = stream_id
        self.mode = mode
        self.scoring = scoring
        self.card_threshold = card_threshold
        self.leave_after_s = leave_after_s
        self.participants: dict[str, LiveParticipant] = {}
        tracked = mode == "tracked"
        self._tracker = ParticipantTracker(min_samples=min_samples, crop_margin=crop_margin) if tracked else None
        self._participant_id = participant_id or ""  # single mode: checked above
        self._label = label

    def start(self, wall_ts: float) -> LiveParticipant | None:
        """A single-participant stream's participant exists from the start (the publisher said who it is)."""
        return self._start_single(wall_ts) if self.mode == "single" else None

    def _start_single(self, wall_ts: float, media_s: float | None = None) -> LiveParticipant:
        person = self._new(self._participant_id, self._label, wall_ts, media_s)
        person.confirmed = True
        return person

    def observe(self, ts: float, crops: list[FaceCrop], wall_ts: float | None = None) -> Observation:
        """A sampled frame at media time `ts` (taken at wall-clock `wall_ts`, default now) and its faces."""
        wall = time.time() if wall_ts is None else wall_ts
        if self.mode == "single":
            return self._observe_single(ts, wall, crops)
        return self._observe_tracked(ts, wall, crops)

    def unseen(self, seen: Iterable[LiveParticipant]) -> list[LiveParticipant]:
        ids = {p.id for p in seen}
        return [p for p in self.participants.values() if p.id not in ids]

    def expire(self, ts: float) -> list[LiveParticipant]:
        """Tracked participants not seen for `leave_after_s` leave (unconfirmed ones vanish silently)."""
        if self.mode == "single":
            return []
        gone = [p for p in self.participants.values()
                if p.last_seen_media_s is not None and ts - p.last_seen_media_s >= self.leave_after_s]
        for p in gone:
            del self.participants[p.id]
        return [p for p in gone if p.confirmed]

    def remove_all(self) -> list[LiveParticipant]:
        gone = [p for p in self.participants.values() if p.confirmed]
        self.participants.clear()
        return gone

    def _observe_single(self, ts: float, wall_ts: float, crops: list[FaceCrop]) -> Observation:
        person = self.participants.get(self._participant_id) or self._start_single(wall_ts, ts)
        if not crops:
            return Observation([], [])
        main = max(crops, key=lambda c: c.box.width * c.box.height)
        person.last_seen_ts, person.last_seen_media_s = wall_ts, ts
        return Observation([(person, main)], [], ignored=len(crops) - 1)

    def _observe_tracked(self, ts: float, wall_ts: float, crops: list[FaceCrop]) -> Observation:
        assert self._tracker is not None
        track_ids = self._tracker.update(ts, [(c.detection, c.crop) for c in crops])
        faces: list[tuple[LiveParticipant, FaceCrop]] = []
        joined: list[LiveParticipant] = []
        for track_id, crop in zip(track_ids, crops, strict=True):
            pid = f"{self.stream_id}/{track_id}"
            person = self.participants.get(pid) or self._new(pid, None, wall_ts, ts)
            person.last_seen_ts, person.last_seen_media_s = wall_ts, ts
            faces.append((person, crop))
            if not person.confirmed and self._tracker.is_confirmed(track_id):
                joined.append(person)
        return Observation(faces, joined)

    def _new(self, pid: str, label: str | None, wall_ts: float, media_s: float | None) -> LiveParticipant:
        scorer = ParticipantScorer(self.scoring, card_threshold=self.card_threshold)
        person = LiveParticipant(pid, self.stream_id, label, scorer, first_seen_ts=wall_ts, last_seen_ts=wall_ts,
                                 last_seen_media_s=media_s)
        self.participants[pid] = person
        return person
