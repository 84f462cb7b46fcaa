"""Streams (pull sources an operator adds and removes; WHIP sessions are listed too) and their participants."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from streamguard.api.deps import ServiceDep
from streamguard.api.errors import ApiError
from streamguard.config import StreamSpec
from streamguard.ingest.policy import SourceRefused
from streamguard.service import ParticipantInfo, StreamExists, StreamInfo

router = APIRouter()


async def json_body(request: Request) -> None:
    """415 for a body that does not say it is JSON (before it is parsed as such)."""
    content_type = request.headers.get("content-type", "")
    subtype = content_type.split(";", 1)[0].strip().lower()
    if not (subtype == "application/json" or (subtype.startswith("application/") and subtype.endswith("+json"))):
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type must be application/json, got {content_type[:60] or 'none'!r}")


@router.post("/v1/streams", tags=["streams"], status_code=201, dependencies=[Depends(json_body)],
             responses={403: {"description": "the source policy (sources.policy) does not allow this URL"},
                        409: {"description": "the id is taken"}, 415: {"description": "not application/json"}})
async def add_stream(spec: StreamSpec, service: ServiceDep) -> StreamInfo:
    """Start pulling an RTSP/RTMP/HLS/file stream; its state arrives as `stream.state` events. The URL must pass the
    source policy (`sources.policy`: schemes, networks, local files)."""
    try:
        return await service.add_stream(spec, from_api=True)
    except StreamExists as exc:
        raise ApiError(409, "stream_exists", str(exc)) from None
    except SourceRefused as exc:
        raise ApiError(403, "source_not_allowed", f"url: {exc}") from None
    except ValueError as exc:  # the source refused its settings: nothing was started or listed
        raise ApiError(400, "invalid_request", f"stream {spec.id!r}: {exc}") from None


@router.get("/v1/streams", tags=["streams"])
async def list_streams(service: ServiceDep) -> list[StreamInfo]:
    return service.streams()


@router.get("/v1/streams/{stream_id}", tags=["streams"])
async def get_stream(stream_id: str, service: ServiceDep) -> StreamInfo:
    try:
        return service.stream(stream_id)
    except KeyError:
        raise ApiError(404, "not_found", f"no stream {stream_id!r}") from None


@router.delete("/v1/streams/{stream_id}", tags=["streams"], status_code=204)
async def remove_stream(stream_id: str, service: ServiceDep) -> Response:
    try:
        await service.remove_stream(stream_id)
    except KeyError:
        raise ApiError(404, "not_found", f"no stream {stream_id!r}") from None
    return Response(status_code=204)


@router.get("/v1/participants", tags=["participants"])
async def list_participants(service: ServiceDep, stream_id: str | None = None) -> list[ParticipantInfo]:
    """Participants present now, with their current score, state and the window's scores."""
    return service.participants(stream_id)
