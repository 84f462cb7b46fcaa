"""Who runs each pull stream: a lease per stream, an entry in a KV bucket whose TTL (`lease_ttl_s`) removes it unless
it is renewed. JetStream's compare-and-set does the deciding, so no two instances can hold one lease:

- acquire = create the entry (refused while it exists: someone holds it, or held it less than the TTL ago);
- renew = update it with the revision it had (refused if it changed hands: the lease was lost);
- release = delete it (the others may acquire it at once).

A holder that cannot renew (NATS unreachable) stops the stream itself once its last renewal is `fence_s` old, which
is less than the TTL: by the time the entry expires and another instance may start the stream, this one has stopped
it. (A short NATS restart, well within the TTL, changes nothing.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from streamguard.cluster.names import key_of

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Lease:
    revision: int
    renewed_at: float  # monotonic, when the last successful renewal was *sent*


class Leases:
    def __init__(self, kv: KeyValue, instance: str, boot: str, fence_s: float) -> None:
        self._kv = kv
        self._value = json.dumps({"instance": instance, "boot": boot}).encode()
        self.fence_s = fence_s
        self.held: dict[str, Lease] = {}

    async def acquire(self, stream_id: str) -> bool:
        """Take the lease; False if another instance holds it. Connection errors raise."""
        sent = time.monotonic()
        try:
            revision = await self._kv.create(key_of(stream_id), self._value)
        except KeyWrongLastSequenceError:
            return False
        self.held[stream_id] = Lease(revision, sent)
        return True

    async def renew(self, reachable: bool) -> list[str]:
        """Renew every lease held, all at once (`reachable` False: NATS is known to be down, only the fence is
        checked); returns the streams to stop now: leases another instance has taken, and leases not renewed for
        `fence_s`."""
        now = time.monotonic()
        sids = list(self.held)
        results = await asyncio.gather(*(self._renew_one(sid) for sid in sids)) if reachable else [None] * len(sids)
        lost = [sid for sid, ok in zip(sids, results, strict=True) if ok is False]
        for sid in lost:
            log.warning("cluster: lost the lease of %s (it expired or another instance holds it)", sid)
        for sid, lease in self.held.items():
            if sid not in lost and now - lease.renewed_at >= self.fence_s:
                log.warning("cluster: stopping %s: its lease could not be renewed for %.1f s", sid,
                            now - lease.renewed_at)
                lost.append(sid)
        for sid in lost:
            self.held.pop(sid, None)
        return lost

    async def _renew_one(self, stream_id: str) -> bool | None:
        """True: renewed; False: lost; None: no answer (the fence decides)."""
        lease = self.held[stream_id]
        sent = time.monotonic()
        try:
            update = self._kv.update(key_of(stream_id), self._value, last=lease.revision)
            lease.revision = await asyncio.wait_for(update, self.fence_s / 4)
        except (KeyWrongLastSequenceError, KeyNotFoundError):
            revision = await self._still_ours(stream_id)
            if revision is None:
                return False
            lease.revision = revision
        except Exception:  # noqa: BLE001 - timed out or disconnected
            return None
        lease.renewed_at = sent
        return True

    async def _still_ours(self, stream_id: str) -> int | None:
        """The revision of a lease whose last renewals a restarted NATS lost (a single server killed loses its last
        writes): the entry still names this instance and boot, or is gone and can be created again. None: lost."""
        key = key_of(stream_id)
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            try:
                return await self._kv.create(key, self._value)
            except Exception:  # noqa: BLE001 - taken meanwhile, or NATS away again
                return None
        except Exception:  # noqa: BLE001 - NATS away again: count it lost, the scheduler takes it again
            return None
        if entry.value != self._value or entry.revision is None:
            return None
        try:
            return await self._kv.update(key, self._value, last=entry.revision)
        except Exception:  # noqa: BLE001 - another instance was faster
            return None

    async def release(self, stream_id: str) -> None:
        """Give the lease up (after the stream stopped), so another instance can take it at once."""
        lease = self.held.pop(stream_id, None)
        if lease is None:
            return
        try:
            await self._kv.delete(key_of(stream_id), last=lease.revision)
        except Exception as exc:  # noqa: BLE001 - it expires by itself after the TTL
            log.debug("cluster: releasing the lease of %s: %s", stream_id, type(exc).__name__)
