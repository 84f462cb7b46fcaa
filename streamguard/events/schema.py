"""The event schema: one envelope (`Event`) and one typed `data` model per event type.

Every message on the event feed is one `Event` serialised as JSON:
`{"seq", "ts", "type", "stream_id", "participant_id", "data"}`. `seq` is the store's monotonic sequence number (a
client resumes with `since=seq`), `ts` is unix seconds, `data` is the typed payload of `type`.

The published JSON Schema (draft 2020-12) is generated from the typed models below (`event_json_schema()`) and
committed as `event.schema.json` next to this file; a test asserts the two are equal so it never drifts.
Versioning (`SCHEMA_VERSION`, also in the schema's `$id`): the minor version grows when optional fields or new
event types are added, the major version when a field is removed, renamed or changes meaning. Objects allow
unknown properties in the published schema, so a consumer validating with 1.0 accepts a 1.1 producer's extra
optional fields (consumers must also skip unknown `type`s); the Python models forbid them so a producer's typo
fails loudly here instead.

One type is never stored: `feed.gap`, made by the hub for one subscriber when its `since` is older than what
retention kept (see `FeedGapData`). It is sent whatever the subscription's filters, its seq is the last one that
was deleted, so a client that records it as its resume point does not hear about the same gap again.

Regenerate the file after changing a model: `python -m streamguard.events.schema`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from ..ingest.source import StreamState
from ..types import QualityVerdict

SCHEMA_VERSION = "1.3"  # 1.1: feed.gap; 1.2: alert.raised label; 1.3: face_px of scores and alerts
SCHEMA_ID = f"urn:streamguard:schema:event:{SCHEMA_VERSION}"  # a URN: no fake domain that could later resolve
SCHEMA_FILE = Path(__file__).with_name("event.schema.json")
MAX_SEQ = 2**63 - 1  # the largest seq: SQLite's INTEGER (a cursor past it cannot be bound as a parameter)


class EventType(str, Enum):
    STREAM_STATE = "stream.state"
    PARTICIPANT_JOINED = "participant.joined"
    PARTICIPANT_LEFT = "participant.left"
    PARTICIPANT_SCORE = "participant.score"  # opt-in per subscription, 1 Hz per participant
    ALERT_RAISED = "alert.raised"
    ALERT_CLEARED = "alert.cleared"
    SERVICE_DEGRADED = "service.degraded"
    FEED_GAP = "feed.gap"  # made by the hub for one subscriber; never published or stored


class EvidenceKind(str, Enum):
    CROP = "crop"  # the face crop that raised the alert, image/jpeg
    HEATMAP = "heatmap"  # where the model looked, image/png


EVIDENCE_MIME: dict[EvidenceKind, str] = {EvidenceKind.CROP: "image/jpeg", EvidenceKind.HEATMAP: "image/png"}

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
FacePx = Annotated[float, Field(ge=0.0)]
Id = Annotated[str, Field(min_length=1, max_length=256)]


class _Data(BaseModel):
    # Python side: strict (a producer's typo fails here). Published schema: open, see the module docstring.
    # NaN/inf are refused: JSON cannot carry them and a NaN score must never read as "below threshold".
    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, frozen=True, json_schema_extra={"additionalProperties": True}
    )


class StreamStateData(_Data):
    state: StreamState
    reason: str | None = Field(None, description="why, for people: 'no frame for 20 s', 'connection refused'")
    attempt: int | None = Field(None, ge=1, description="reconnect attempt number (1-based) while reconnecting")
    retry_in_s: NonNegative | None = Field(None, description="seconds until the next reconnect attempt")


class ParticipantJoinedData(_Data):
    label: str | None = Field(None, description="display name when the source knows one (e.g. a LiveKit identity)")
    pts_s: float | None = Field(None, description="media time of the first frame the participant was seen in")


class ParticipantLeftData(_Data):
    reason: str | None = Field(None, description="'not seen for 30 s', 'stream closed', ...")
    samples: int = Field(0, ge=0, description="scored samples over the participant's whole presence")
    score: Probability | None = Field(None, description="final per-person P(fake); null when never scored")


class ParticipantScoreData(_Data):
    p_fake: Probability | None = Field(None, description="this tick's raw P(fake); null when no scorable face")
    smoothed: Probability | None = Field(None, description="the window's smoothed score; null while warming up")
    samples: int = Field(0, ge=0, description="scored samples in the window")
    state: str | None = Field(None, description="the scorer's state: warming_up, ok, suspicious, alert, ...")
    quality: QualityVerdict | None = Field(None, description="quality of this tick's face, when one was seen")
    face_px: FacePx | None = Field(None, description="long side of this tick's face box, frame pixels")


class AlertRaisedData(_Data):
    alert_id: Id
    score: Probability = Field(description="P(fake) of the sample that raised the alert")
    smoothed: Probability = Field(description="the window's smoothed score that crossed the threshold")
    threshold: Probability = Field(description="the raise threshold in force")
    window_s: Annotated[float, Field(gt=0.0)] = Field(description="length of the scoring window, seconds")
    samples: int = Field(ge=1, description="scored samples in the window")
    evidence: dict[EvidenceKind, str] = Field(
        default_factory=dict, description="evidence kind -> URL path of its image, relative to the API root"
    )
    label: str | None = Field(None, description="the participant's display name, when the source knows one (kept "
                              "with the alert: the participant may be long gone when someone reads it)")
    face_px: FacePx | None = Field(None, description="long side of the face box of the sample that raised it, frame "
                                   "pixels; null when that sample's crop was not at hand. Small faces score "
                                   "unreliably (the default model calls 47 % of real 48 px faces fake: README)")


class AlertClearedData(_Data):
    alert_id: Id
    reason: str = Field(description="'score below clear threshold', 'participant left', 'stream closed', ...")
    smoothed: Probability | None = Field(None, description="the smoothed score at clearing; null if not scored")
    threshold: Probability | None = Field(None, description="the clear threshold in force")
    duration_s: NonNegative = Field(description="seconds the alert was raised")


class ServiceDegradedData(_Data):
    component: Id = Field(description="'inference', 'store', 'gpu', 'ingest', ...")
    reason: str
    active: bool = Field(True, description="true: degraded from now on; false: recovered")


class FeedGapData(_Data):
    from_seq: int = Field(ge=1, description="first seq of the range this client asked for that no longer exists")
    to_seq: int = Field(ge=1, description="last seq of that range (this message's own seq); events resume after it")
    reason: str = Field(description="'retention': deleted by the store's retention policy")


DATA_MODELS: dict[EventType, type[_Data]] = {
    EventType.STREAM_STATE: StreamStateData,
    EventType.PARTICIPANT_JOINED: ParticipantJoinedData,
    EventType.PARTICIPANT_LEFT: ParticipantLeftData,
    EventType.PARTICIPANT_SCORE: ParticipantScoreData,
    EventType.ALERT_RAISED: AlertRaisedData,
    EventType.ALERT_CLEARED: AlertClearedData,
    EventType.SERVICE_DEGRADED: ServiceDegradedData,
    EventType.FEED_GAP: FeedGapData,
}


class Event(BaseModel):
    """One event as stored and sent: `event.model_dump_json()` is the wire message.

    Frozen because the hub hands the same instance to every subscriber.
    """

    model_config = ConfigDict(frozen=True)

    seq: int = Field(ge=1)
    ts: float
    type: EventType
    stream_id: str | None = None
    participant_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    def typed(self) -> TypedEvent:
        """This event as its type's model (typed `data`, envelope rules checked)."""
        return TYPED_EVENT.validate_python(self.model_dump())


# -- typed envelopes: the source of the published schema and of the per-type envelope rules --------------------


class _Envelope(BaseModel):
    # Same policy as _Data: strict in Python, open in the published schema (later minor versions may add fields).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"additionalProperties": True})

    seq: int = Field(ge=1, description="monotonic, durable; resume a feed with since=seq")
    ts: float = Field(description="unix seconds")


class StreamStateEvent(_Envelope):
    type: Literal[EventType.STREAM_STATE]
    stream_id: Id
    participant_id: None = None
    data: StreamStateData


class ParticipantJoinedEvent(_Envelope):
    type: Literal[EventType.PARTICIPANT_JOINED]
    stream_id: Id
    participant_id: Id
    data: ParticipantJoinedData


class ParticipantLeftEvent(_Envelope):
    type: Literal[EventType.PARTICIPANT_LEFT]
    stream_id: Id
    participant_id: Id
    data: ParticipantLeftData


class ParticipantScoreEvent(_Envelope):
    type: Literal[EventType.PARTICIPANT_SCORE]
    stream_id: Id
    participant_id: Id
    data: ParticipantScoreData


class AlertRaisedEvent(_Envelope):
    type: Literal[EventType.ALERT_RAISED]
    stream_id: Id
    participant_id: Id | None = Field(None, description="null for a stream-level alert")
    data: AlertRaisedData


class AlertClearedEvent(_Envelope):
    type: Literal[EventType.ALERT_CLEARED]
    stream_id: Id
    participant_id: Id | None = None
    data: AlertClearedData


class ServiceDegradedEvent(_Envelope):
    type: Literal[EventType.SERVICE_DEGRADED]
    stream_id: Id | None = Field(None, description="set when only one stream is affected")
    participant_id: None = None
    data: ServiceDegradedData


class FeedGapEvent(_Envelope):
    """Events this client asked for (from_seq..to_seq) were deleted before it read them; the ones that matched its
    filters are lost. Rebuild current state from the HTTP API (/v1/alerts, /v1/streams, /v1/participants)."""

    type: Literal[EventType.FEED_GAP]
    stream_id: None = None
    participant_id: None = None
    data: FeedGapData


TypedEvent = Annotated[
    StreamStateEvent | ParticipantJoinedEvent | ParticipantLeftEvent | ParticipantScoreEvent | AlertRaisedEvent
    | AlertClearedEvent | ServiceDegradedEvent | FeedGapEvent,
    Field(discriminator="type"),
]
TYPED_EVENT: TypeAdapter[TypedEvent] = TypeAdapter(TypedEvent)


@dataclass(frozen=True, slots=True)
class EventDraft:
    """An event before the store gives it a seq: what producers publish. `ts` None: stamped when published."""

    type: EventType | str
    stream_id: str | None
    participant_id: str | None
    data: Mapping[str, Any] | BaseModel
    ts: float | None = None


def validate_draft(draft: EventDraft, ts: float) -> tuple[EventType, dict[str, Any]]:
    """Check an event before it gets a seq; returns (type, data as a JSON-ready dict with every field).

    Validated through the typed envelope so the per-type rules (e.g. participant events need both ids) have one
    source; seq=1 stands in for the seq the store has not assigned yet. Raises pydantic.ValidationError (a
    ValueError), or ValueError for `feed.gap`, which only the hub makes.
    """
    data = draft.data
    payload = data.model_dump(mode="json") if isinstance(data, BaseModel) else dict(data)
    typed = TYPED_EVENT.validate_python({
        "seq": 1, "ts": ts, "type": draft.type, "stream_id": draft.stream_id, "participant_id": draft.participant_id,
        "data": payload,
    })
    if typed.type is EventType.FEED_GAP:
        raise ValueError("feed.gap is made by the event hub for one subscriber; it cannot be published")
    return typed.type, typed.data.model_dump(mode="json")


def new_alert_id() -> str:
    """A fresh alert id; made by the producer so evidence can be stored before the alert is published."""
    return uuid.uuid4().hex


def evidence_path(alert_id: str, kind: EvidenceKind | str) -> str:
    """The API path of one evidence image (what goes into `AlertRaisedData.evidence`)."""
    return f"/v1/alerts/{alert_id}/evidence/{EvidenceKind(kind).value}"


def event_json_schema() -> dict[str, Any]:
    """The published JSON Schema (draft 2020-12) of one feed message: a union discriminated by `type`."""
    schema = TYPED_EVENT.json_schema(ref_template="#/$defs/{model}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": f"StreamGuard event v{SCHEMA_VERSION}",
        "description": "One message of the StreamGuard event feed (WebSocket /v1/events). Dispatch on `type`; "
        "ignore unknown `data` properties (added by later minor versions).",
        **schema,
    }


def render_event_json_schema() -> str:
    """The committed file's exact text (stable key order, trailing newline) so the drift test can compare bytes."""
    return json.dumps(event_json_schema(), indent=2, ensure_ascii=False) + "\n"


def write_event_json_schema(path: Path = SCHEMA_FILE) -> Path:
    path.write_text(render_event_json_schema(), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_event_json_schema())
