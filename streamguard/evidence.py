"""An alert's evidence: the face crop that raised it (JPEG) and where the model sees the artefacts (heatmap, PNG:
the model's own artefact map where it has one, ~0.3 s; an occlusion map otherwise, 1 + n² model calls).

Stored before the alert is published, so a client that fetches the URLs on `alert.raised` always finds them; the
URLs are the API paths `evidence_path` gives.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import cv2
import numpy as np

from streamguard.events.schema import EVIDENCE_MIME, EvidenceKind, evidence_path
from streamguard.events.store import EventStore
from streamguard.inference.heatmap import Heatmapper, render_overlay


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(buf.tobytes())


class EvidenceCopy(Protocol):
    """Where else evidence goes (cluster mode: the JetStream Object Store every instance reads)."""

    async def put(self, alert_id: str, kind: EvidenceKind, data: bytes) -> None: ...


class EvidenceMaker:
    """Makes and stores the evidence of an alert, off the event loop. The alert is published once its evidence is
    stored, and the stream's worker waits for it: the heatmap's cost is time to alert (`heatmapper_for`)."""

    def __init__(self, heatmapper: Heatmapper, store: EventStore, copy: EvidenceCopy | None = None) -> None:
        self._heatmapper = heatmapper
        self._store = store
        self._copy = copy

    async def __call__(self, alert_id: str, crop: np.ndarray, p_fake: float) -> dict[EvidenceKind, str]:
        """Store the face crop and its artefact heatmap; returns their API paths."""

        def build() -> dict[EvidenceKind, bytes]:
            heat = self._heatmapper(crop)
            return {EvidenceKind.CROP: encode_jpeg(crop), EvidenceKind.HEATMAP: render_overlay(crop, heat, p_fake)}

        images = await asyncio.to_thread(build)
        for kind, data in images.items():
            await asyncio.to_thread(self._store.put_evidence, alert_id, kind, EVIDENCE_MIME[kind], data)
            if self._copy is not None:
                await self._copy.put(alert_id, kind, data)
        return {kind: evidence_path(alert_id, kind) for kind in images}
