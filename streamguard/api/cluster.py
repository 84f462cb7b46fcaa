"""Cluster mode's routes (app.py uses them when `cluster.nats_url` is set):

- `streams`: the streams and participants resource of the whole cluster, in place of `streams.router`: a stream
  POSTed to any instance is registered cluster-wide and runs on the least loaded one; lists show every instance's
  streams and participants with the instance that runs them; DELETE on any instance stops the stream where it runs.
- `sessions`: WHIP session requests (DELETE, PATCH on the Location `/v1/whip/<id>`), included before `whip.router`:
  a session held by another instance is relayed to it over NATS and its answer returned as is, so a Location works
  through any instance (a load balancer in front of the cluster need not be sticky); a session held here, or by no
  instance, goes to the single-mode handler.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from streamguard.api import whip
from streamguard.api.deps import ServiceDep
from streamguard.api.errors import ApiError
from streamguard.api.streams import json_body
from streamguard.cluster.link import ClusterUnavailable
from streamguard.cluster.node import ClusterNode
from streamguard.cluster.rpc import Result
from streamguard.config import StreamSpec
from streamguard.service import ParticipantInfo, Service, StreamExists, StreamInfo

streams = APIRouter()
sessions = APIRouter(tags=["whip"])


def node_of(service: Service) -> ClusterNode:
    assert service.cluster is not None, "cluster routes in single mode"
    return service.cluster


def unavailable(exc: ClusterUnavailable) -> ApiError:
    return ApiError(503, "cluster_unavailable", str(exc), headers={"Retry-After": "2"})


@streams.post("/v1/streams", tags=["streams"], status_code=201, dependencies=[Depends(json_body)],
             responses={409: {"description": "the id is taken"}, 415: {"description": "not application/json"},
                        503: {"description": "NATS is unreachable"}})
async def register_stream(spec: StreamSpec, service: ServiceDep) -> StreamInfo:
    """Register a pull stream in the cluster; it starts on the least loaded instance (`instance`), and its state
    arrives as `stream.state` events."""
    try:
        return await node_of(service).views.register(spec)
    except StreamExists as exc:
        raise ApiError(409, "stream_exists", str(exc)) from None
    except ClusterUnavailable as exc:
        raise unavailable(exc) from None


@streams.get("/v1/streams", tags=["streams"])
async def list_cluster_streams(service: ServiceDep) -> list[StreamInfo]:
    return node_of(service).views.streams()


@streams.get("/v1/streams/{stream_id}", tags=["streams"])
async def get_cluster_stream(stream_id: str, service: ServiceDep) -> StreamInfo:
    try:
        return node_of(service).views.stream(stream_id)
    except KeyError:
        raise ApiError(404, "not_found", f"no stream {stream_id!r}") from None


@streams.delete("/v1/streams/{stream_id}", tags=["streams"], status_code=204)
async def remove_cluster_stream(stream_id: str, service: ServiceDep) -> Response:
    """Stop the stream on whichever instance runs it (answers once it has stopped)."""
    try:
        await node_of(service).views.remove(stream_id)
    except KeyError:
        raise ApiError(404, "not_found", f"no stream {stream_id!r}") from None
    except ClusterUnavailable as exc:
        raise unavailable(exc) from None
    return Response(status_code=204)


@streams.get("/v1/participants", tags=["participants"])
async def list_cluster_participants(service: ServiceDep, stream_id: str | None = None) -> list[ParticipantInfo]:
    """Participants present now on every instance, with their current score, state and instance."""
    return node_of(service).views.participants(stream_id)


def relayed(result: Result) -> Response:
    if result.status < 400:
        return Response(status_code=result.status, headers=result.headers)
    return JSONResponse({"error": result.error, "message": result.message}, status_code=result.status,
                        headers=result.headers)


@sessions.delete("/v1/whip/{session_id}", status_code=200)
async def whip_delete_anywhere(session_id: str, service: ServiceDep) -> Response:
    result = await node_of(service).views.whip_call("whip_delete", session_id)
    return relayed(result) if result is not None else await whip.whip_delete(session_id, service)


@sessions.patch("/v1/whip/{session_id}")
async def whip_patch_anywhere(session_id: str, service: ServiceDep) -> Response:
    result = await node_of(service).views.whip_call("whip_patch", session_id)
    return relayed(result) if result is not None else await whip.whip_patch(session_id, service)
