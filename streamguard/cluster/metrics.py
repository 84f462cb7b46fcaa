"""`streamguard_cluster_*` metrics, read from the node at scrape time (registered only in cluster mode, so a single
instance exports none of them). Per instance, like every StreamGuard metric: Prometheus adds the instance label."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from streamguard.cluster.node import ClusterNode


class ClusterCollector(Collector):
    def __init__(self, node: ClusterNode) -> None:
        self._node = node

    def collect(self) -> Iterable[Metric]:
        node = self._node
        hub, counters = node.hub, node.log.counters
        yield GaugeMetricFamily("streamguard_cluster_connected", "1 while connected to NATS",
                                value=int(node.link.connected))
        yield GaugeMetricFamily("streamguard_cluster_instances", "Live instances this instance sees (itself "
                                "included)", value=len(node.members.live()))
        yield GaugeMetricFamily("streamguard_cluster_streams_registered", "Pull streams registered in the cluster",
                                value=len(node.registry.entries))
        yield GaugeMetricFamily("streamguard_cluster_streams_owned", "Pull streams whose lease this instance holds",
                                value=len(node.leases.held))
        yield CounterMetricFamily("streamguard_cluster_lease_takeovers", "Streams this instance took over from "
                                  "another instance (gone, or that did not start them)", value=node.stats.takeovers)
        yield CounterMetricFamily("streamguard_cluster_leases_lost", "Streams stopped here because their lease was "
                                  "lost or could not be renewed", value=node.stats.leases_lost)
        yield GaugeMetricFamily("streamguard_cluster_log_lag_events", "Events in the cluster's log not yet in this "
                                "instance's store", value=max(0, hub.log_last_seq - hub.materialised_seq))
        yield GaugeMetricFamily("streamguard_cluster_events_queued", "Events waiting for JetStream to take them",
                                value=node.log.queued)
        yield CounterMetricFamily("streamguard_cluster_events_published", "Events JetStream acknowledged (each is "
                                  "in the log once)", value=counters.published)
        yield CounterMetricFamily("streamguard_cluster_publish_duplicates", "Acknowledged retries of events "
                                  "JetStream had stored already (known by message id: not stored twice)",
                                  value=counters.duplicates)
        yield CounterMetricFamily("streamguard_cluster_publish_retries", "Event sends not acknowledged in time and "
                                  "sent again (with the same message id)", value=counters.retries)
