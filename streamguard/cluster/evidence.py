"""Alert evidence in a JetStream Object Store bucket, so that every instance can serve every alert's images.

The instance that raises an alert stores its images here (and in its own store) before the alert is published; every
instance, as it reads the alert from the log, copies them into its own store (streamguard/cluster/hub.py), so
`GET /v1/alerts` lists them and the evidence URLs answer on any instance exactly as in single mode.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.js import api
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from streamguard.cluster.link import NatsLink
from streamguard.config import ClusterSettings
from streamguard.events.schema import EVIDENCE_MIME, EvidenceKind
from streamguard.events.store import EventStore

log = logging.getLogger(__name__)

DAY_S = 86400.0
PUT_DEADLINE_S = 30.0  # an alert waits this long at most for NATS to take its evidence


def object_name(alert_id: str, kind: EvidenceKind) -> str:
    return f"{alert_id}/{kind.value}"


class EvidenceBucket:
    """`open()`, then `put` (the producer) and `copy_into` (every instance, as alerts reach its store)."""

    def __init__(self, link: NatsLink, settings: ClusterSettings) -> None:
        self._link = link
        self._settings = settings
        self._bucket: ObjectStore | None = None

    async def open(self, retention_days: float) -> None:
        js, name = self._link.js, self._settings.evidence_bucket
        try:
            self._bucket = await js.object_store(name)
        except (BucketNotFoundError, NotFoundError):
            ttl = retention_days * DAY_S if retention_days > 0 else None
            self._bucket = await js.create_object_store(name, config=api.ObjectStoreConfig(
                ttl=ttl, storage=api.StorageType.FILE, replicas=self._settings.replicas))

    @property
    def bucket(self) -> ObjectStore:
        assert self._bucket is not None, "open() first"
        return self._bucket

    async def put(self, alert_id: str, kind: EvidenceKind, data: bytes) -> None:
        """Store one image, retrying while NATS is unreachable (up to PUT_DEADLINE_S, then raise)."""
        deadline = time.monotonic() + PUT_DEADLINE_S
        delay = 0.2
        while True:
            try:
                await self.bucket.put(object_name(alert_id, kind), data)
                return
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    raise RuntimeError(f"evidence {alert_id}/{kind.value} not stored in the cluster: "
                                       f"{self._link.scrub(exc)}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def copy_into(self, store: EventStore, alert_id: str, kinds: list[EvidenceKind]) -> None:
        """Fetch the alert's images that `store` lacks. An image the bucket does not have (its put failed, so
        the producer's alert names it only because its own store has it) is skipped; an unreachable NATS raises,
        and the log follower retries."""
        for kind in kinds:
            if await asyncio.to_thread(store.get_evidence, alert_id, kind) is not None:
                continue
            try:
                result = await self.bucket.get(object_name(alert_id, kind))
            except ObjectNotFoundError:
                log.warning("cluster: evidence %s/%s is not in the bucket", alert_id, kind.value)
                continue
            if result.data:
                await asyncio.to_thread(store.put_evidence, alert_id, kind, EVIDENCE_MIME[kind], bytes(result.data))
