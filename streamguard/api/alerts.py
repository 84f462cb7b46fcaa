"""The alert history (from the event store) and each alert's evidence images."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Response

from streamguard.api.deps import ServiceDep
from streamguard.api.errors import ApiError
from streamguard.events.schema import MAX_SEQ, EvidenceKind
from streamguard.events.store import AlertPage, AlertRecord

router = APIRouter(tags=["alerts"])
# Bounded: a cursor beyond SQLite's INTEGER would overflow in the query (a 500); out of range it is a 400.
Cursor = Annotated[int | None, Query(ge=0, le=MAX_SEQ, description="cursor: next_before of the previous page")]


@router.get("/v1/alerts")
async def list_alerts(
    service: ServiceDep,
    before: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    stream_id: str | None = None,
    participant_id: str | None = None,
    open_only: bool = False,
) -> AlertPage:
    """Alert history, newest first, paged by cursor."""
    return await asyncio.to_thread(service.store.alerts, before=before, limit=limit, stream_id=stream_id,
                                   participant_id=participant_id, open_only=open_only)


@router.get("/v1/alerts/{alert_id}")
async def get_alert(alert_id: str, service: ServiceDep) -> AlertRecord:
    alert = await asyncio.to_thread(service.store.get_alert, alert_id)
    if alert is None:
        raise ApiError(404, "not_found", f"no alert {alert_id!r}")
    return alert


@router.get("/v1/alerts/{alert_id}/evidence/{kind}", responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}})
async def get_evidence(alert_id: str, kind: EvidenceKind, service: ServiceDep) -> Response:
    """The face crop (JPEG) or its artefact heatmap (PNG) that raised the alert."""
    evidence = await asyncio.to_thread(service.store.get_evidence, alert_id, kind)
    if evidence is None:
        raise ApiError(404, "not_found", f"no {kind.value} evidence for alert {alert_id!r}")
    return Response(evidence.data, media_type=evidence.mime, headers={"Cache-Control": "max-age=86400"})
