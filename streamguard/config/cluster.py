"""The `cluster:` section: many instances as one service on NATS JetStream (streamguard/cluster/).

Unset `nats_url` (the default) means single mode: one process, its SQLite store, nothing external.
"""

from __future__ import annotations

import re
import socket
from urllib.parse import SplitResult, urlsplit

from pydantic import Field, SecretStr, model_validator

from streamguard.config.stages import ConfigSection

NATS_SCHEMES = ("nats", "tls")
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # JetStream stream and bucket names (no dots, spaces, wildcards)
_INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a host name fits; it is one KV key token


def default_instance_id() -> str:
    """The host name (a pod's name in Kubernetes, a container's id in compose), made a valid instance id."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).strip(".-") or "streamguard"
    return name[:64]


def redact_nats_url(url: str) -> str:
    """Each server of a NATS URL list with its credentials (user:password@ or token@) replaced by ***."""
    return ",".join(_redact_one(part.strip()) for part in url.split(","))


def _redact_one(url: str) -> str:
    if "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if sep else f"***@{url.rpartition('@')[2]}"


def _check_server(url: str) -> SplitResult:
    """One server URL of the list; ValueError says what is wrong without echoing credentials."""
    shown = _redact_one(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"{shown!r} is not a URL with a port in 1-65535") from None
    if parts.scheme not in NATS_SCHEMES:
        raise ValueError(f"{shown!r}: the scheme must be nats:// or tls://")
    if not parts.hostname:
        raise ValueError(f"{shown!r}: no host; use nats://host:4222")
    if port == 0:
        raise ValueError(f"{shown!r}: the port must be in 1-65535")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{shown!r}: a NATS URL has no path or query")
    return parts


class ClusterSettings(ConfigSection):
    nats_url: SecretStr | None = Field(
        None, description="turns cluster mode on: nats://host:4222 or tls://host:4222 (a comma-separated list for a "
        "NATS cluster); credentials may be in it (user:password@ or token@) and are never logged")
    instance_id: str = Field(default_factory=default_instance_id, description="this instance's name in the cluster, "
                             "unique among live instances; default: the host name")
    events_stream: str = Field("STREAMGUARD_EVENTS", description="the JetStream stream that is the event log")
    subject_prefix: str = Field("streamguard", pattern=r"^[A-Za-z0-9_-]{1,64}$",
                                description="NATS subjects: <prefix>.events.<instance>, <prefix>.rpc.<instance>")
    streams_bucket: str = Field("streamguard-streams", description="KV bucket: the registered pull streams")
    leases_bucket: str = Field("streamguard-leases", description="KV bucket: who runs each pull stream (with TTL)")
    instances_bucket: str = Field("streamguard-instances", description="KV bucket: live instances and their state")
    evidence_bucket: str = Field("streamguard-evidence", description="Object Store bucket: alert evidence images")
    replicas: int = Field(1, ge=1, le=5, description="JetStream replicas of the stream and buckets (3 on a NATS "
                          "cluster of 3 servers)")
    lease_ttl_s: float = Field(8.0, ge=1.0, le=300.0, description="a dead instance's streams move after this "
                               "(its leases and heartbeat expire), then start elsewhere within a few seconds")
    heartbeat_s: float = Field(1.0, gt=0.0, le=60.0, description="how often an instance renews its leases and "
                               "publishes its state; at most lease_ttl_s / 4")
    connect_timeout_s: float = Field(10.0, gt=0.0, le=300.0, description="longest the start waits for NATS")
    ack_timeout_s: float = Field(5.0, gt=0.0, le=60.0, description="wait for JetStream's ack before a publish is "
                                 "retried (with the same message id, so never twice in the log)")
    dedupe_window_s: float = Field(600.0, ge=10.0, le=86400.0, description="JetStream's duplicate window: a retry "
                                   "within it is recognised; an outage longer than this may duplicate one event")
    flush_timeout_s: float = Field(10.0, ge=0.0, le=300.0, description="on stop, longest to wait for NATS to take "
                                   "the events still queued (they are lost after it)")

    @model_validator(mode="after")
    def _check(self) -> ClusterSettings:
        # On the model, not the field: a field error would print the URL (and its password) as its input.
        if self.nats_url is not None:
            servers = [s.strip() for s in self.nats_url.get_secret_value().split(",")]
            if not all(servers):
                raise ValueError("nats_url: empty server in the list")
            for server in servers:
                try:
                    _check_server(server)
                except ValueError as exc:
                    raise ValueError(f"nats_url: {exc}") from None
        for name in ("events_stream", "streams_bucket", "leases_bucket", "instances_bucket", "evidence_bucket"):
            if not _NAME_RE.fullmatch(getattr(self, name)):
                raise ValueError(f"{name}: letters, digits, _ and - only (1-64), got {getattr(self, name)!r}")
        if not _INSTANCE_RE.fullmatch(self.instance_id):
            raise ValueError(f"instance_id: letters, digits, _ . - (1-64, starting with a letter or digit), got "
                             f"{self.instance_id[:70]!r}")
        if self.heartbeat_s > self.lease_ttl_s / 4:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s:g}) must be at most lease_ttl_s / 4 "
                             f"({self.lease_ttl_s / 4:g}), so a lease is renewed several times before it expires")
        return self

    @property
    def enabled(self) -> bool:
        return self.nats_url is not None

    @property
    def servers(self) -> list[str]:
        """The NATS server URLs, with their credentials (for the client only)."""
        return [s.strip() for s in self.nats_url.get_secret_value().split(",")] if self.nats_url else []

    @property
    def redacted_url(self) -> str:
        return redact_nats_url(self.nats_url.get_secret_value()) if self.nats_url else ""
