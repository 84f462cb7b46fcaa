"""The settings of each stage of the frame path, one section of the service config each.

Stages import their settings from here; nothing here imports a stage, so a bad config is refused before mediapipe,
cv2 or ONNX Runtime (seconds of imports) are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import Field, model_validator

from streamguard.config.base import ConfigSection
from streamguard.config.policy import SourcePolicy


class SamplingSettings(ConfigSection):
    fps: float = Field(1.0, gt=0.0, le=30.0, description="samples per second per stream")
    stagger: bool = Field(
        True, description="spread live streams' sampling phases over the period, so streams that share a clock "
                          "(one RTSP server) do not all send a sample to face detection at the same instant",
    )


class BatcherSettings(ConfigSection):
    max_batch: int = Field(16, ge=1, le=256, description="face crops per model call")
    max_wait_ms: float = Field(20.0, ge=0.0, le=1000.0, description="longest a crop waits for a fuller batch")
    workers: int = Field(1, ge=1, le=8, description="model calls in flight at once")
    cpu_threads: int = Field(
        1, ge=1, le=64,
        description="ONNX Runtime threads per model call on the CPU backend. One spends the least CPU per face (a "
                    "160 px model splits poorly across threads) and leaves the other cores to decoding and face "
                    "detection; more cut one call's latency when the machine is otherwise idle",
    )
    cpu_call_batch: int = Field(
        4, ge=1, le=256,
        description="faces per ONNX Runtime call on the CPU backend: a batch of max_batch runs as calls of this many. "
                    "Small calls keep the model's activations in the CPU caches (default model, one thread: 17.9 ms "
                    "of CPU per face in one call of 16, 14.2 ms in calls of 4) and its memory arena small",
    )


class SourceSettings(ConfigSection):
    """Pull sources (PyAV). Frigate restarts a stream after 20 s without frames; so do we by default.

    Reconnects wait 1, 2, 4 s (equal jitter: half to all of it), then at most `backoff_max_s` = 5 s: a camera that
    comes back is live again within that wait plus its connect time and first keyframe (measured over 10 RTSP
    kill/restart cycles: README), while a dead one gets one attempt every 2.5-5 s, a refused connection or one
    connect_timeout_s, never a tight loop. (A 30 s cap left a returned camera unwatched for up to 30 s.)"""

    connect_timeout_s: float = Field(10.0, gt=0.0, le=120.0)
    read_timeout_s: float = Field(10.0, gt=0.0, le=120.0)
    watchdog_s: float = Field(20.0, gt=0.0, le=600.0, description="no frame for this long: the stream is restarted")
    backoff_initial_s: float = Field(1.0, gt=0.0, le=60.0)
    backoff_max_s: float = Field(5.0, gt=0.0, le=600.0, description="the longest wait between reconnect attempts: "
                                 "a source that returns is live within about this long")
    max_attempts: int = Field(0, ge=0, description="reconnects before `failed`; 0: never give up")
    skip_nonref: bool = Field(True, description="skip decoding non-reference frames between samples")
    keyframes_only: bool = Field(
        True, description="decode only the keyframes of streams whose keyframes (measured) come at least every "
                          "keyframe_max_gop_s; streams with a longer GOP decode as skip_nonref says",
    )
    keyframe_max_gop_s: float | None = Field(
        None, gt=0.0, le=60.0, description="the longest keyframe interval decoded keyframes-only; None: the sampling "
        "period (1/sampling.fps), so such a stream is still sampled at sampling.fps. Longer trades samples for CPU: "
        "a stream with a GOP of g s is then sampled at min(sampling.fps, 1/g) samples per second",
    )
    hwdecode: Literal["auto", "nvdec", "off"] = Field(
        "auto", description="decode on NVDEC: auto = when it works here; nvdec = required (degraded without it)"
    )
    policy: SourcePolicy = Field(default_factory=SourcePolicy, description="what streams added over the API may "
                                 "reach (streamguard/config/policy.py)")


class FaceSettings(ConfigSection):
    """How faces are found and gated: mediapipe's full-range detector, the model card's crop margin (deepware's 1.65;
    the default model's 1.15), and faces under `min_face_px` reported as low quality (DuckDuckGoose: below half the
    resolution a classifier guesses; see QualityGate for what the default model does with small faces)."""

    min_confidence: float = Field(0.5, ge=0.0, le=1.0, description="mediapipe full-range detector score to keep a face")
    margin: float | None = Field(
        None, gt=1.0, description="crop side / face box long side; None: the model card's (1.65 for ours)"
    )
    min_face_px: float = Field(40.0, ge=0.0, description="faces whose box long side is smaller are low quality. The "
                               "default model calls 47 % of real faces fake at 48 px, 10 % at 64 px, 2 % at 80 px "
                               "(tools/robustness.py, README): raise it to 64-80 where faces can be that small")
    min_sharpness: float | None = Field(None, ge=0.0, description="Laplacian-variance floor; None: the gate's default")


class _ThresholdsOfACard(Protocol):
    threshold: float
    raise_threshold: float | None
    clear_threshold: float | None


@dataclass(frozen=True, slots=True)
class CardThresholds:
    """What a model card says about thresholds: the face/file `threshold` and, for a model calibrated on real
    calls, explicit live `raise_threshold` / `clear_threshold` (None: derived from `threshold`)."""

    threshold: float = 0.5
    raise_threshold: float | None = None
    clear_threshold: float | None = None

    @classmethod
    def from_card(cls, card: _ThresholdsOfACard) -> CardThresholds:
        """From a `ModelCard` (any object with its three fields: config imports nothing of inference)."""
        return cls(card.threshold, card.raise_threshold, card.clear_threshold)


class ScoringSettings(ConfigSection):
    """Thresholds and window of the live scorer; one block of the service config.

    Thresholds default to the model card's own threshold, so a recalibrated model keeps its meaning:
    `raise_threshold` = card threshold + `raise_margin` × (1 − card threshold): the margin is a share of the room
    left above the card's threshold (0.5 + 0.4 × 0.5 = 0.7, Frigate's median threshold; a card calibrated to 0.88
    for few false positives gets 0.928), so the raise threshold always lies in (card threshold, 1),
    `clear_threshold` = card threshold (0.5). The 0.2 gap is the hysteresis band. Set either to a number to pin it.
    """

    window_s: float = Field(10.0, gt=0, description="sliding window of scored samples, seconds")
    smoothing: Literal["median", "mean"] = Field(
        "median",
        description="median: robust, moves only when half the window does (Frigate); mean: one 0.99 frame in 10 "
        "real 0.2 frames lifts it by 0.08, kept for comparisons",
    )
    raise_threshold: float | None = Field(
        None, gt=0, lt=1, description="smoothed P(fake) at or above which samples count toward an alert; "
        "None: the model card threshold + raise_margin x (1 - card threshold)"
    )
    clear_threshold: float | None = Field(
        None, gt=0, lt=1, description="smoothed P(fake) below which samples count toward clearing; "
        "None: the model card threshold"
    )
    raise_margin: float = Field(
        0.4, gt=0, lt=1, description="share of the room between the card threshold and 1 added for the raise threshold"
    )
    raise_after: int = Field(3, ge=1, description="consecutive scored samples over the raise threshold to raise")
    clear_after: int = Field(5, ge=1, description="consecutive scored samples under the clear threshold to clear")
    min_window_samples: int = Field(
        5, ge=1, description="scored samples the window must hold before any verdict (state warming_up until then); "
        "must fit in window_s at the sampler's rate"
    )
    stale_after_s: float = Field(
        5.0, gt=0, description="no usable face for this long: state no_face (no face) or low_quality (faces all "
        "rejected); the window is kept and ages out by time, the alert stays as it is"
    )

    @model_validator(mode="after")
    def _check(self) -> ScoringSettings:
        if self.raise_threshold is not None and self.clear_threshold is not None:
            if self.clear_threshold >= self.raise_threshold:
                raise ValueError("clear_threshold must be below raise_threshold (the gap is the hysteresis)")
        return self

    def thresholds(self, card: CardThresholds | float = 0.5) -> tuple[float, float]:
        """(raise, clear) for a model whose card says `card` (a bare float: its threshold alone).

        This config's own values come first, then the card's explicit live thresholds, then the derivation."""
        card = card if isinstance(card, CardThresholds) else CardThresholds(float(card))
        t = card.threshold
        raise_at = _first(self.raise_threshold, card.raise_threshold, t + self.raise_margin * (1.0 - t))
        clear_at = _first(self.clear_threshold, card.clear_threshold, t)
        if not 0 < clear_at < raise_at < 1:
            raise ValueError(
                f"need 0 < clear_threshold ({clear_at:.3f}) < raise_threshold ({raise_at:.3f}) < 1; "
                f"set them explicitly for a model card threshold of {t}"
            )
        return raise_at, clear_at


def _first(*values: float | None) -> float:
    return next(v for v in values if v is not None)


class ParticipantSettings(ConfigSection):
    min_samples: int = Field(3, ge=1, le=100, description="consistent samples before a tracked face is a participant")
    leave_after_s: float = Field(30.0, gt=0.0, le=3600.0, description="a tracked participant unseen this long has left")


class EventSettings(ConfigSection):
    """The event feed and its store. See streamguard/events/hub.py for the slow-consumer rule and retention."""

    client_queue_size: int = Field(256, ge=8, le=100000, description="live events buffered per WebSocket client; "
                                   "a client that overflows it catches up from the store")
    slow_consumer_grace_s: float = Field(10.0, ge=0.0, le=3600.0, description="a client that fell behind must have "
                                         "read what was published by then within this long, or is closed with "
                                         "4008; 0: close it as soon as its queue overflows")
    ping_interval_s: float = Field(20.0, gt=0.0, le=300.0)
    publish_scores: bool = Field(False, description="also store and send participant.score at 1 Hz")
    heatmap: Literal["model", "occlusion"] = Field(
        "model", description="an alert's heatmap. model: the model's own artefact map where its ONNX graph has one "
        "(a fake_map output; 16 shifted copies, ~0.3 s on one core), else occlusion; occlusion: the drop in P(fake) "
        "as each patch is hidden (226 model calls: seconds on a CPU, and flat for a face scored near 1)")
    retention_days: float = Field(30.0, ge=0.0, le=36500.0, description="delete events older than this, with "
                                  "the cleared alerts and evidence they refer to; 0: keep for ever")
    max_events: int = Field(0, ge=0, description="keep at most the last this many events (a disk bound when "
                            "publish_scores is on); 0: no limit")
