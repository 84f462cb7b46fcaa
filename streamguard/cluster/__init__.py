"""Cluster mode (`cluster.nats_url`): many instances as one service on NATS JetStream.

- `link`: the NATS connection; `log`: the cluster's event log (a JetStream stream) and its publisher;
  `hub`: the event hub whose seqs come from that log, materialised into the instance's store; `follow`: reading a
  stream in order (the log, the KV buckets);
- `registry` (pull streams), `leases` (who runs each), `members` (live instances and their state), `placement`
  (who should run what), `node` (the loops that tie them to the service), `views` (what the API lists and asks);
- `evidence` (alert images in the Object Store), `rpc` (calls to the instance that holds a WHIP session),
  `metrics` (streamguard_cluster_*), `names` (KV keys).

Nothing here is imported in single mode.
"""
