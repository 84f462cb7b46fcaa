"""Who is who in one stream: faces → participants, with join and leave.

Two modes: a WebRTC track *is* a participant (mode "single": the largest face in the frame is
theirs, everyone else in their camera is ignored), while a camera or gallery view is tracked (mode "tracked":
faces are tracked into participants by `ParticipantTracker`, and a track only becomes a participant once it has
`min_samples` consistent samples; one-off detections are noise and never reach a scorer or an event).
"""

from __future__ import annotations

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
    id: str
    stream_id: str
    label: str | None
    scorer: ParticipantScorer
    first_seen_ts: float
    last_seen_ts: float
    confirmed: bool = False
    alert_id: str | None = None
    scores: list[float] = field(default_factory=list)
    last_p_fake: float | None = None
    # Before confirmation, observations wait here and are replayed into the scorer when the track is confirmed.
    _pending: list[tuple[str, float, float | str]] = field(default_factory=list, repr=False)

    def score(self, ts: float, p_fake: float) -> list[Transition]:
        self.last_p_fake = p_fake
        if not self.confirmed:
            self._pending.append(("score", ts, p_fake))
            return []
        self.scores.append(p_fake)
        del self.scores[:-MAX_KEPT_SCORES]
        return self.scorer.add_score(ts, p_fake)

    def low_quality(self, ts: float, reason: str) -> list[Transition]:
        if not self.confirmed:
            self._pending.append(("low_quality", ts, reason))
            return []
        return self.scorer.add_low_quality(ts, reason)

    def no_face(self, ts: float) -> list[Transition]:
        return self.scorer.add_no_face(ts) if self.confirmed else []

    def confirm(self) -> list[Transition]:
        """Mark as a real participant and replay what was seen before; returns the replay's transitions."""
        self.confirmed = True
        out: list[Transition] = []
        for kind, ts, value in self._pending:
            out += self.score(ts, value) if kind == "score" else self.low_quality(ts, value)  # type: ignore[arg-type]
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

    def start(self, ts: float) -> LiveParticipant | None:
        """A single-participant stream's participant exists from the start (the publisher said who it is)."""
        return self._start_single(ts) if self.mode == "single" else None

    def _start_single(self, ts: float) -> LiveParticipant:
        person = self._new(self._participant_id, self._label, ts)
        person.confirmed = True
        return person

    def observe(self, ts: float, crops: list[FaceCrop]) -> Observation:
        if self.mode == "single":
            return self._observe_single(ts, crops)
        return self._observe_tracked(ts, crops)

    def unseen(self, seen: Iterable[LiveParticipant]) -> list[LiveParticipant]:
        ids = {p.id for p in seen}
        return [p for p in self.participants.values() if p.id not in ids]

    def expire(self, ts: float) -> list[LiveParticipant]:
        """Tracked participants not seen for `leave_after_s` leave (unconfirmed ones vanish silently)."""
        if self.mode == "single":
            return []
        gone = [p for p in self.participants.values() if ts - p.last_seen_ts >= self.leave_after_s]
        for p in gone:
            del self.participants[p.id]
        return [p for p in gone if p.confirmed]

    def remove_all(self) -> list[LiveParticipant]:
        gone = [p for p in self.participants.values() if p.confirmed]
        self.participants.clear()
        return gone

    def _observe_single(self, ts: float, crops: list[FaceCrop]) -> Observation:
        person = self.participants.get(self._participant_id) or self._start_single(ts)
        if not crops:
            return Observation([], [])
        main = max(crops, key=lambda c: c.box.width * c.box.height)
        person.last_seen_ts = ts
        return Observation([(person, main)], [], ignored=len(crops) - 1)

    def _observe_tracked(self, ts: float, crops: list[FaceCrop]) -> Observation:
        assert self._tracker is not None
        track_ids = self._tracker.update(ts, [(c.detection, c.crop) for c in crops])
        faces: list[tuple[LiveParticipant, FaceCrop]] = []
        joined: list[LiveParticipant] = []
        for track_id, crop in zip(track_ids, crops, strict=True):
            pid = f"{self.stream_id}/{track_id}"
            person = self.participants.get(pid) or self._new(pid, None, ts)
            person.last_seen_ts = ts
            faces.append((person, crop))
            if not person.confirmed and self._tracker.is_confirmed(track_id):
                joined.append(person)
        return Observation(faces, joined)

    def _new(self, pid: str, label: str | None, ts: float) -> LiveParticipant:
        scorer = ParticipantScorer(self.scoring, card_threshold=self.card_threshold)
        person = LiveParticipant(pid, self.stream_id, label, scorer, first_seen_ts=ts, last_seen_ts=ts)
        self.participants[pid] = person
        return person
