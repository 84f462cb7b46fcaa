"""The live semantics alone, without a service: MediaClock, LiveParticipant, Roster, and StreamWorker's order within
one sample, driven directly with a list as the event hub and a batcher that gives every face the same score.

Faces come from the real face stage (mediapipe on real photos) where the worker is driven; the roster's rules are
checked on face crops made here, since what matters to it is only their boxes and quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamguard.config import FaceSettings, ScoringSettings
from streamguard.events.schema import EventDraft, EventType, EvidenceKind
from streamguard.events.store import EventStore
from streamguard.evidence import EvidenceMaker
from streamguard.faces.analyzer import FacePool
from streamguard.inference.heatmap import heatmapper_for
from streamguard.inference.models import load_classifier
from streamguard.ingest.image import read_image
from streamguard.metrics import Metrics
from streamguard.participants import LiveParticipant, Roster
from streamguard.scoring.live import AlertRaised, ParticipantScorer, ParticipantState
from streamguard.types import Box, Detection, FaceCrop, Quality, QualityVerdict, SampledFrame
from streamguard.worker import MediaClock, StreamWorker, WorkerDeps

# Every scored sample counts at once: one sample fills the window, one over the threshold raises, one under clears.
INSTANT = ScoringSettings(window_s=1.0, min_window_samples=1, raise_after=1, clear_after=1, stale_after_s=5.0)


class ListHub(list[EventDraft]):
    """The event hub as a list: what the worker published, in order."""

    async def publish(self, draft: EventDraft) -> None:
        self.append(draft)

    def kinds(self) -> list[str]:
        return [EventType(d.type).value for d in self]


class FixedScores:
    """A batcher whose model says `p_fake` for every face (the one thing the worker asks of it)."""

    def __init__(self, p_fake: float) -> None:
        self.p_fake = p_fake
        self.calls: list[int] = []

    async def score_many(self, crops: np.ndarray) -> np.ndarray:
        self.calls.append(len(crops))
        return np.full(len(crops), self.p_fake, np.float32)


def face(x0: float, side: float, *, ok: bool = True, pts_s: float = 0.0) -> FaceCrop:
    verdict = QualityVerdict.OK if ok else QualityVerdict.BLURRY
    return FaceCrop(
        stream_id="s", pts_s=pts_s, detection=Detection(Box(x0, 10, x0 + side, 10 + side), 0.9),
        quality=Quality(verdict, side, 100.0), crop=np.zeros((8, 8, 3), np.uint8),
    )


# -- MediaClock -------------------------------------------------------------------------------------------------


def test_media_clock_stays_monotonic_across_timestamp_restarts_and_stalls():
    clock = MediaClock()
    assert clock.last is None
    assert [clock(t) for t in (0.0, 1.0, 2.0)] == [0.0, 1.0, 2.0]
    restarted = clock(0.0)  # a reconnect: the source's pts start again
    assert 2.0 < restarted < 2.01
    assert clock(1.0) == pytest.approx(restarted + 1.0)  # and then run on at the source's pace
    clock.advance(10.0)  # no frame for a while (the idle tick)
    assert clock.last == 10.0 and clock(0.5) > 10.0
    clock.advance(5.0)  # never backwards
    assert clock.last > 10.0


# -- LiveParticipant --------------------------------------------------------------------------------------------


def test_an_unconfirmed_participant_holds_its_observations_until_confirmed():
    person = LiveParticipant("s/1", "s", None, ParticipantScorer(INSTANT, card_threshold=0.5), 0.0, 0.0)
    assert person.score(0.0, 0.9, 100.0) == [] and person.low_quality(0.5, "blurry") == [] and person.no_face(0.6) == []
    assert person.scores == [] and person.last_p_fake == 0.9 and person.scorer.smoothed is None
    replay = person.confirm()
    assert person.confirmed and [type(t) for t in replay if isinstance(t, AlertRaised)] == [AlertRaised]
    assert person.scores == [0.9] and person.scorer.smoothed == pytest.approx(0.9)
    assert person.sparkline() == [(100.0, 0.9)]  # wall-clock time, as it was observed
    assert person.confirm() == []  # replayed once


# -- Roster -----------------------------------------------------------------------------------------------------


def test_single_mode_needs_its_participant_and_takes_the_largest_face():
    with pytest.raises(ValueError, match="participant id"):
        Roster("whip:1", mode="single", scoring=INSTANT, card_threshold=0.5)
    roster = Roster("whip:1", mode="single", scoring=INSTANT, card_threshold=0.5, participant_id="alice", label="A")
    alice = roster.start(1_700_000_000.0)
    assert alice is not None and alice.confirmed and alice.label == "A" and list(roster.participants) == ["alice"]
    small, large = face(0, 40), face(100, 90)
    obs = roster.observe(1.0, [small, large], wall_ts=1_700_000_005.0)
    assert obs.faces == [(alice, large)] and obs.ignored == 1 and obs.joined == []
    assert roster.observe(2.0, [], wall_ts=1_700_000_006.0).faces == []
    # One clock per field: *_ts are wall-clock Unix seconds, the media time has its own field.
    assert (alice.first_seen_ts, alice.last_seen_ts, alice.last_seen_media_s) == (1_700_000_000.0, 1_700_000_005.0, 1.0)
    assert roster.expire(1000.0) == []  # a session's participant leaves with the session, never by time
    assert roster.remove_all() == [alice] and roster.participants == {}


def test_tracked_mode_confirms_after_min_samples_and_expires_the_unseen():
    roster = Roster("cam", mode="tracked", scoring=INSTANT, card_threshold=0.5, min_samples=3, leave_after_s=5.0)
    assert roster.start(0.0) is None
    joined = []
    for t in range(3):
        obs = roster.observe(float(t), [face(100, 80, pts_s=t)])
        joined += obs.joined
        assert len(obs.faces) == 1
    (person,) = joined  # on the third consistent sample, once
    assert person.id.startswith("cam/") and not person.confirmed  # the worker confirms it (and replays)
    person.confirm()
    assert roster.unseen([]) == [person] and roster.unseen([person]) == []
    assert roster.expire(6.0) == [] and roster.expire(7.0) == [person] and roster.participants == {}
    roster.observe(8.0, [face(400, 80)])  # a one-off face: tracked, never confirmed
    assert roster.expire(20.0) == []  # and it vanishes silently


# -- StreamWorker: the order within one sample ------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo(shared_data: Path) -> np.ndarray:
    return read_image(shared_data / "real_faces" / "img1.jpg").rgb


@pytest.fixture
def stage(tmp_path: Path):
    classifier = load_classifier(None)  # the shipped model: its card cuts the faces, its map is the heatmap
    faces = FacePool(classifier.card, FaceSettings(), threads=1)
    store = EventStore(tmp_path / "events.sqlite3", synchronous="NORMAL")
    yield classifier, faces, store
    faces.close()
    store.close()


def make_worker(stage, hub: ListHub, p_fake: float, *, mode: str, publish_scores: bool = False) -> StreamWorker:
    classifier, faces, store = stage
    deps = WorkerDeps(faces=faces, batcher=FixedScores(p_fake), hub=hub, metrics=Metrics(),
                      make_evidence=EvidenceMaker(heatmapper_for(classifier, classifier.path), store),
                      window_s=INSTANT.window_s, publish_scores=publish_scores)
    roster = Roster("cam", mode=mode, scoring=INSTANT, card_threshold=0.5, min_samples=3, leave_after_s=30.0,
                    participant_id="alice" if mode == "single" else None)
    return StreamWorker("cam", "rtsp", roster, deps)


@pytest.mark.asyncio
async def test_a_tracked_face_joins_on_its_third_sample_then_alerts_and_leaves_in_order(stage, photo):
    hub = ListHub()
    worker = make_worker(stage, hub, 0.99, mode="tracked", publish_scores=True)
    for t in (0.0, 1.0):
        await worker.process(SampledFrame("cam", t, 0.0, photo))
    assert hub == []  # a track is nobody yet: nothing is published for it
    await worker.process(SampledFrame("cam", 2.0, 0.0, photo))
    # Joined first; the replay of its two waiting samples raises (no crop at hand, so no evidence); then this
    # sample's own score.
    assert hub.kinds() == ["participant.joined", "alert.raised", "participant.score"]
    joined, raised, score = hub
    assert joined.participant_id == raised.participant_id == score.participant_id
    assert raised.data["evidence"] == {} and score.data["p_fake"] == pytest.approx(0.99)
    hub.clear()
    await worker.stop("stream closed")
    assert hub.kinds() == ["alert.cleared", "participant.left"]
    cleared, left = hub
    assert cleared.data["reason"] == "participant left: stream closed"
    assert cleared.data["alert_id"] == raised.data["alert_id"]
    assert left.data == {"reason": "stream closed", "samples": 3, "score": pytest.approx(0.99)}


@pytest.mark.asyncio
async def test_a_publisher_alerts_with_evidence_and_clears_when_the_score_drops(stage, photo):
    classifier, _, store = stage
    hub = ListHub()
    worker = make_worker(stage, hub, 0.99, mode="single")
    alice = worker.roster.start(0.0)
    assert alice is not None
    await worker.process(SampledFrame("cam", 0.0, 0.0, photo))
    (raised,) = hub
    assert raised.type is EventType.ALERT_RAISED and raised.participant_id == "alice"
    evidence = raised.data["evidence"]
    assert set(evidence) == {EvidenceKind.CROP, EvidenceKind.HEATMAP}  # stored before the alert went out
    assert 40 <= raised.data["face_px"] <= max(photo.shape[:2])  # the raising face's size, for the operator
    assert store.get_evidence(raised.data["alert_id"], EvidenceKind.CROP) is not None
    waited = worker.deps.metrics.registry.get_sample_value
    assert waited("streamguard_alert_evidence_seconds_count") == 1  # the time to alert it added
    assert 0 < waited("streamguard_alert_evidence_seconds_sum") < 30
    worker.deps.batcher = FixedScores(0.01)
    await worker.process(SampledFrame("cam", 1.0, 0.0, photo))
    assert hub.kinds() == ["alert.raised", "alert.cleared"]
    assert hub[1].data["reason"] == "score below clear threshold"
    await worker.process(SampledFrame("cam", 2.0, 0.0, np.zeros_like(photo)))  # nobody in the picture
    assert alice.scorer.state is not ParticipantState.NO_FACE  # not for stale_after_s yet
    await worker.process(SampledFrame("cam", 8.0, 0.0, np.zeros_like(photo)))
    assert alice.scorer.state is ParticipantState.NO_FACE and hub.kinds()[-1] == "alert.cleared"
    await worker.stop("deleted by client")
    assert hub.kinds()[-1] == "participant.left" and hub[-1].data["reason"] == "deleted by client"


@pytest.mark.asyncio
async def test_alert_durations_are_wall_seconds_whatever_the_media_clock_says(stage, photo):
    """Media time jumps 100 s between two samples taken a moment apart (a file, a publisher whose clock runs
    ahead): the alert was open for a moment, and that is what alert.cleared says, on both ways it can end."""
    hub = ListHub()
    worker = make_worker(stage, hub, 0.99, mode="single")
    assert worker.roster.start(0.0) is not None
    await worker.process(SampledFrame("cam", 0.0, 0.0, photo))
    worker.deps.batcher = FixedScores(0.01)
    await worker.process(SampledFrame("cam", 100.0, 0.0, photo))
    assert hub.kinds() == ["alert.raised", "alert.cleared"]
    assert hub[1].data["duration_s"] < 10, hub[1].data  # wall seconds, not the 100 s of media time
    hub.clear()
    worker.deps.batcher = FixedScores(0.99)
    await worker.process(SampledFrame("cam", 200.0, 0.0, photo))  # raised again
    await worker.process(SampledFrame("cam", 230.0, 0.0, photo))  # still alerting, 30 media seconds later
    await worker.stop("deleted by client")
    assert hub.kinds() == ["alert.raised", "alert.cleared", "participant.left"]
    assert hub[1].data["reason"] == "participant left: deleted by client"
    assert hub[1].data["duration_s"] < 10, hub[1].data
