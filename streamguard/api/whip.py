"""WHIP (RFC 9725): offers in, answers out, sessions ended by DELETE. The rules are WhipManager's (ingest/webrtc.py);
here they become responses."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from streamguard.api.deps import ServiceDep
from streamguard.api.errors import ApiError, whip_error
from streamguard.ingest.webrtc import WhipError, ice_server_links, participant_from_request
from streamguard.service import Service

router = APIRouter(tags=["whip"])


def with_ice_links(response: Response, service: Service) -> Response:
    """RFC 9725 §4.6: the STUN/TURN servers as Link headers (with TURN credentials: the router is behind the token)."""
    for link in ice_server_links(service.whip.ice_servers):
        response.headers.append("Link", link)
    return response


async def read_offer(request: Request, limit: int) -> bytes:
    """The request body, read no further than `limit` bytes: a declared or chunked body over it gets 413 as soon as
    it is known to be over (a 300 MB chunked offer is never held in memory)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ApiError(413, "sdp_too_large", f"the offer is {length} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "sdp_too_large", f"the offer is over the limit of {limit} bytes")
    return bytes(body)


@router.options("/v1/whip", status_code=204)
async def whip_options(request: Request, service: ServiceDep) -> Response:
    """The STUN/TURN servers to gather with, for clients that need them before making their offer. A CORS
    preflight gets none (RFC 9725 §4.6: it must stay cheap)."""
    response = Response(status_code=204, headers={"Allow": "OPTIONS, POST"})
    preflight = "access-control-request-method" in request.headers
    return response if preflight else with_ice_links(response, service)


@router.post("/v1/whip", status_code=201,
             openapi_extra={"requestBody": {"content": {"application/sdp": {"schema": {"type": "string"}}},
                                            "required": True}},
             responses={201: {"content": {"application/sdp": {}}, "description": "SDP answer; Location: session"}})
async def whip_publish(request: Request, service: ServiceDep) -> Response:
    """WHIP (RFC 9725): an SDP offer in, the answer out. Participant id and display name come from the
    `X-Participant-Id` / `X-Participant-Name` headers or the `participant_id` / `name` query parameters."""
    body = await read_offer(request, service.config.whip.max_sdp_bytes)
    pid, name = participant_from_request(request.headers, request.query_params)
    try:
        session = await service.whip_publish(body, request.headers.get("content-type"), pid, name)
    except WhipError as exc:
        return whip_error(exc)
    return with_ice_links(Response(session.answer_sdp, status_code=201, media_type="application/sdp", headers={
        "Location": f"/v1/whip/{session.id}", "ETag": session.etag, "X-Participant-Id": session.participant_id,
    }), service)


@router.delete("/v1/whip/{session_id}", status_code=200)
async def whip_delete(session_id: str, service: ServiceDep) -> Response:
    try:
        await service.whip.delete(session_id)
    except WhipError as exc:
        return whip_error(exc)
    return Response(status_code=200)


@router.patch("/v1/whip/{session_id}")
async def whip_patch(session_id: str, service: ServiceDep) -> Response:
    """Trickle ICE and ICE restarts are not supported: 404 for an unknown session, else 405 (Allow: DELETE)."""
    try:
        await service.whip.patch(session_id)
    except WhipError as exc:
        return whip_error(exc)
    raise AssertionError("WhipManager.patch always refuses")  # pragma: no cover


# The session path without an id. Unrouted, Starlette would answer it with a 307 to /v1/whip (empty body), and a
# client that follows it gets a 405 for POST/OPTIONS: say what is wrong instead.
@router.api_route("/v1/whip/", methods=["DELETE", "PATCH"], include_in_schema=False)
async def whip_no_session(request: Request) -> Response:
    return whip_error(WhipError(
        404, "unknown_session",
        f"{request.method} needs a session: use the Location that POST /v1/whip answered (/v1/whip/<id>)",
    ))
