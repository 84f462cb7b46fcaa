"""An alert's evidence: the face crop that raised it (JPEG) and where the model looked (occlusion heatmap, PNG).

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
from streamguard.inference.classifier import Classifier
from streamguard.inference.heatmap import occlusion_map, render_overlay


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(buf.tobytes())


class EvidenceCopy(Protocol):
    """Where else evidence goes (cluster mode: the JetStream Object Store every instance reads)."""

    async def put(self, alert_id: str, kind: EvidenceKind, data: bytes) -> None: ...


class EvidenceMaker:
    """Makes and stores the evidence of an alert, off the event loop (the heatmap is ~50 model calls)."""

    def __init__(self, classifier: Classifier, store: EventStore, copy: EvidenceCopy | None = None) -> None:
        self._classifier = classifier
        self._store = store
        self._copy = copy

    async def __call__(self, alert_id: str, crop: np.ndarray, p_fake: float) -> dict[EvidenceKind, str]:
        """Store the face crop and its artefact heatmap; returns their API paths."""

        def build() -> dict[EvidenceKind, bytes]:
            heat = occlusion_map(self._classifier, crop)
            return {EvidenceKind.CROP: encode_jpeg(crop), EvidenceKind.HEATMAP: render_overlay(crop, heat, p_fake)}

        images = await asyncio.to_thread(build)
        for kind, data in images.items():
            await asyncio.to_thread(self._store.put_evidence, alert_id, kind, EVIDENCE_MIME[kind], data)
            if self._copy is not None:
                await self._copy.put(alert_id, kind, data)
        return {kind: evidence_path(alert_id, kind) for kind in images}
