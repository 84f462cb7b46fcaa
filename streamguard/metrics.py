"""Prometheus metrics: `streamguard_` prefix, base units, `_total` counters, never a participant id as a label.

One `Metrics` per service with its own registry (no global state), served at `/metrics`. Values that already live
in the service (streams by state, active participants, WebSocket clients, decoded frames) are read at scrape time
by a collector instead of being mirrored into gauges that could drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from streamguard import __version__

if TYPE_CHECKING:
    from streamguard.cluster.node import ClusterNode

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
EVIDENCE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # model map ~0.25 s, occlusion 2-20 s (README)


class _LiveCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict]):
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        streams = GaugeMetricFamily("streamguard_streams", "Streams by source kind and state", labels=["kind", "state"])
        for (kind, state), n in snap["streams"].items():
            streams.add_metric([kind, state], n)
        yield streams
        decoded = CounterMetricFamily("streamguard_frames_decoded", "Frames decoded by sources", labels=["kind"])
        for kind, n in snap["decoded"].items():
            decoded.add_metric([kind], n)
        yield decoded
        yield GaugeMetricFamily("streamguard_participants_active", "Participants present now",
                                value=snap["participants"])
        yield GaugeMetricFamily("streamguard_websocket_clients", "Connected event WebSocket clients",
                                value=snap["ws_clients"])
        yield GaugeMetricFamily("streamguard_degraded", "1 while a component is degraded", value=snap["degraded"])
        feed = snap["event_feed"]
        writes = CounterMetricFamily("streamguard_event_store_writes", "Events written to the store", labels=["type"])
        for type_, n in feed["written"].items():
            writes.add_metric([type_], n)
        yield writes
        yield CounterMetricFamily("streamguard_event_subscriber_catchups", "Times a WebSocket subscriber overflowed "
                                  "its queue and caught up from the store", value=feed["catch_ups"])
        yield CounterMetricFamily("streamguard_event_subscribers_closed_slow", "Subscribers closed with 4008 for "
                                  "staying behind past events.slow_consumer_grace_s", value=feed["closed_slow"])
        yield CounterMetricFamily("streamguard_events_pruned", "Events deleted by retention", value=feed["pruned"])
        yield CounterMetricFamily("streamguard_event_prune_failures", "Retention passes that failed",
                                  value=feed["prune_failures"])


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Info("streamguard", "Version, model, inference backend and pull-source decoding (cpu or nvdec)",
                         registry=r)
        self.frames_sampled = Counter("streamguard_frames_sampled_total", "Frames kept by the sampler",
                                      ["kind"], registry=r)
        self.frames_dropped = Counter("streamguard_frames_dropped_total",
                                      "Sampled frames not processed, by reason", ["reason"], registry=r)
        self.faces_detected = Counter("streamguard_faces_detected_total", "Faces found in sampled frames", registry=r)
        self.faces_low_quality = Counter("streamguard_faces_low_quality_total",
                                         "Faces rejected by the quality gate, by reason", ["reason"], registry=r)
        self.inference_batch = Histogram("streamguard_inference_batch_size", "Face crops per model call",
                                         ["backend"], buckets=BATCH_BUCKETS, registry=r)
        self.inference_seconds = Histogram("streamguard_inference_seconds", "Model call duration",
                                           ["backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.faces_unscored = Counter("streamguard_faces_unscored_total", "Scorable faces left unscored: the "
                                      "inference server was unavailable (triton.fallback: unscored)", registry=r)
        self.sample_to_score = Histogram("streamguard_sample_to_score_seconds",
                                         "From a frame's decode to its faces' scores", buckets=LATENCY_BUCKETS,
                                         registry=r)
        self.alerts_raised = Counter("streamguard_alerts_raised_total", "Alerts raised", registry=r)
        # An alert is published once its evidence is stored, and the stream's worker waits for it: time to alert.
        self.alert_evidence_seconds = Histogram("streamguard_alert_evidence_seconds",
                                                "Time an alert waited for its evidence (face crop and heatmap) before "
                                                "it was published", buckets=EVIDENCE_BUCKETS, registry=r)
        self.alerts_cleared = Counter("streamguard_alerts_cleared_total", "Alerts cleared", registry=r)
        self.reconnects = Counter("streamguard_reconnects_total", "Pull-stream reconnect attempts", ["kind"],
                                  registry=r)

    def set_info(self, model: str, backend: str, decode: str = "cpu") -> None:
        self.info.info({"version": __version__, "model": model, "backend": backend, "decode": decode})

    def watch(self, snapshot: Callable[[], dict]) -> None:
        """Register the scrape-time collector of the service's live state."""
        self.registry.register(_LiveCollector(snapshot))

    def watch_cluster(self, node: ClusterNode) -> None:
        """Cluster mode: the streamguard_cluster_* metrics (streamguard/cluster/metrics.py)."""
        from streamguard.cluster.metrics import ClusterCollector

        self.registry.register(ClusterCollector(node))

    def on_batch(self, size: int, seconds: float, backend: str) -> None:
        self.inference_batch.labels(backend).observe(size)
        self.inference_seconds.labels(backend).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
