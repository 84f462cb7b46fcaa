"""One validated service config: YAML file < STREAMGUARD_* environment < command-line flags.

Nested fields use `__` in the environment: STREAMGUARD_SCORING__WINDOW_S=15. Unknown keys are refused, so a typo
in a config file fails at start with the field named instead of being silently ignored.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from streamguard.pipeline import FaceSettings
from streamguard.scoring.live import ScoringSettings

PULL_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "file")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingSettings(_Section):
    fps: float = Field(1.0, gt=0.0, le=30.0, description="samples per second per stream")
    stagger: bool = Field(
        True, description="spread live streams' sampling phases over the period, so streams that share a clock "
                          "(one RTSP server) do not all send a sample to face detection at the same instant",
    )


class BatcherSettings(_Section):
    max_batch: int = Field(16, ge=1, le=256, description="face crops per model call")
    max_wait_ms: float = Field(20.0, ge=0.0, le=1000.0, description="longest a crop waits for a fuller batch")
    workers: int = Field(1, ge=1, le=8, description="model calls in flight at once")


_GRPC_TARGET_RE = re.compile(r"(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})")
_METADATA_KEY_RE = re.compile(r"[a-z0-9_.-]+")  # gRPC metadata keys: lowercase ASCII


class TritonSettings(_Section):
    """NVIDIA Triton Inference Server, for `backend: triton` (streamguard/inference/triton.py)."""

    url: str = Field("localhost:8001", description="host:port of Triton's gRPC endpoint (no scheme)")
    model_name: str | None = Field(None, max_length=256, description="the model in Triton's repository; default: "
                                   "the local model's name (what `streamguard triton layout` names it)")
    model_version: str = Field("", pattern=r"^[0-9]*$", description="a version number; empty: Triton's policy")
    ssl: bool = Field(False, description="TLS to Triton (or to the gateway in front of it)")
    root_certificates: Path | None = Field(None, description="PEM CA bundle; default: the system's")
    private_key: Path | None = Field(None, description="PEM client key, for mutual TLS")
    certificate_chain: Path | None = Field(None, description="PEM client certificate chain, for mutual TLS")
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="gRPC metadata sent with every request: a gateway's token, or the key of "
        "Triton's --grpc-restricted-protocol (secrets: never logged)")
    timeout_s: float = Field(0.5, gt=0.0, le=60.0, description="one batch's deadline; past it the batch falls back "
                             "and the service is degraded")
    connect_timeout_s: float = Field(10.0, gt=0.0, le=600.0, description="how long the start waits for the model "
                                     "to be ready before it starts on the fallback")
    retry_interval_s: float = Field(2.0, gt=0.0, le=300.0, description="while degraded, how often Triton is probed")
    fallback: Literal["local", "unscored"] = Field(
        "local", description="while Triton is down or slow: local = score on the local model (the same model, on "
        "this machine's CPU); unscored = faces are seen but not scored (participants go low_quality)")

    @field_validator("headers", mode="before")
    @classmethod
    def _header_values_as_text(cls, headers: Any) -> Any:
        # A numeric token in YAML (key: 12345) would fail as "not a string" with the value in the error: make it text.
        if isinstance(headers, dict):
            return {k: v if isinstance(v, str | SecretStr) else str(v) for k, v in headers.items()}
        return headers

    @field_validator("url")
    @classmethod
    def _grpc_target(cls, url: str) -> str:
        if "://" in url:
            raise ValueError("host:port of the gRPC endpoint, without a scheme (set ssl: true for TLS)")
        if "@" in url:
            raise ValueError("no credentials in the address; put them in triton.headers")
        match = _GRPC_TARGET_RE.fullmatch(url)
        if match is None or not 1 <= int(match["port"]) <= 65535:
            raise ValueError("must be host:port with a port in 1-65535, e.g. triton:8001")
        return url

    @model_validator(mode="after")
    def _tls_and_headers(self) -> TritonSettings:
        # On the model, not the fields: a field's error would print a header's secret value as its input.
        for key, value in self.headers.items():
            if not _METADATA_KEY_RE.fullmatch(key) or key.startswith("grpc-"):
                raise ValueError(f"headers: {key[:40]!r} is not a gRPC metadata key (lowercase a-z, 0-9, -_., "
                                 "not grpc-*)")
            if not _HEADER_SAFE_RE.fullmatch(value.get_secret_value()):
                raise ValueError(f"headers: the value of {key!r} must be printable ASCII")
        files = {"root_certificates": self.root_certificates, "private_key": self.private_key,
                 "certificate_chain": self.certificate_chain}
        for name, path in files.items():
            if path is not None and not self.ssl:
                raise ValueError(f"{name}: set ssl: true to use it")
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path}: no such file")
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("private_key, certificate_chain: mutual TLS needs both")
        return self


class SourceSettings(_Section):
    """Pull sources (PyAV). Frigate restarts a stream after 20 s without frames; so do we by default."""

    connect_timeout_s: float = Field(10.0, gt=0.0, le=120.0)
    read_timeout_s: float = Field(10.0, gt=0.0, le=120.0)
    watchdog_s: float = Field(20.0, gt=0.0, le=600.0, description="no frame for this long: the stream is restarted")
    backoff_initial_s: float = Field(1.0, gt=0.0, le=60.0)
    backoff_max_s: float = Field(30.0, gt=0.0, le=600.0)
    max_attempts: int = Field(0, ge=0, description="reconnects before `failed`; 0: never give up")
    skip_nonref: bool = Field(True, description="skip decoding non-reference frames between samples")
    hwdecode: Literal["auto", "nvdec", "off"] = Field(
        "auto", description="decode on NVDEC: auto = when it works here; nvdec = required (degraded without it)"
    )


# What aiortc can use (RFC 7064/7065 URIs): STUN over UDP, TURN over UDP or TCP, TURN over TLS (TCP). No stuns:,
# no IPv6 literals: aiortc's parser would refuse those at every WHIP request, so they are refused here, at start.
_ICE_URL_RE = re.compile(r"(stun|turn|turns):([A-Za-z0-9.-]+)(?::(\d{1,5}))?(?:\?transport=(udp|tcp))?")
_HEADER_SAFE_RE = re.compile(r"[ -~]+")  # printable ASCII: it goes into an HTTP header (quoted)


def _ice_url_ok(url: str) -> bool:
    match = _ICE_URL_RE.fullmatch(url)
    if match is None:
        return False
    scheme, port, transport = match[1], match[3], match[4]
    bad_transport = (scheme == "stun" and transport is not None) or (scheme == "turns" and transport == "udp")
    return not bad_transport and 1 <= int(port or 1) <= 65535


class IceServerSettings(_Section):
    """A STUN or TURN server, as in W3C's RTCIceServer: `urls`, and for TURN `username` and `credential`."""

    urls: list[str] = Field(min_length=1, description="stun:host[:port], turn:host[:port][?transport=udp|tcp], "
                                                      "turns:host[:port]; one URL or a list")
    username: str | None = Field(None, max_length=256, description="TURN username")
    credential: SecretStr | None = Field(None, description="TURN password (long-term)")

    @field_validator("urls", mode="before")
    @classmethod
    def _one_or_many(cls, urls: Any) -> Any:
        return [urls] if isinstance(urls, str) else urls

    @field_validator("urls")
    @classmethod
    def _supported(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not _ice_url_ok(url):
                raise ValueError(f"{url!r} is not a stun:host[:port], turn:host[:port][?transport=udp|tcp] or "
                                 "turns:host[:port] URL")
        return urls

    @field_validator("username")
    @classmethod
    def _header_safe(cls, username: str | None) -> str | None:
        if username is not None and not _HEADER_SAFE_RE.fullmatch(username):
            raise ValueError("printable ASCII only (it is sent in a Link header)")
        return username

    @model_validator(mode="after")
    def _turn_credentials(self) -> IceServerSettings:
        # On the model, not the field: a field's error would print the secret as its input.
        secret = self.credential.get_secret_value() if self.credential is not None else None
        if secret is not None and not _HEADER_SAFE_RE.fullmatch(secret):
            raise ValueError("credential: printable ASCII only (it is sent in a Link header)")
        if any(url.startswith("turn") for url in self.urls) and not (self.username and secret):
            raise ValueError("username, credential: a TURN server needs both")
        return self


class WhipSettings(_Section):
    max_sessions: int = Field(64, ge=1, le=10000)
    max_sdp_bytes: int = Field(64 * 1024, ge=1024, le=1024 * 1024)
    no_frame_timeout_s: float = Field(15.0, gt=0.0, le=600.0, description="a peer silent this long has left")
    ice_servers: list[IceServerSettings] = Field(
        default_factory=list,
        description="STUN/TURN servers for every WHIP peer connection (aiortc uses the first STUN and the first TURN "
                    "URL) and advertised to WHIP clients (RFC 9725 Link rel=ice-server on 201 and OPTIONS)",
    )
    ice_transport_policy: Literal["all", "relay"] = Field(
        "all", description="relay: TURN relay candidates only, so no local address is gathered or revealed"
    )

    @field_validator("ice_transport_policy")
    @classmethod
    def _relay_needs_turn(cls, policy: str, info: ValidationInfo) -> str:
        servers: list[IceServerSettings] = info.data.get("ice_servers") or []
        if policy == "relay" and not any(url.startswith("turn") for s in servers for url in s.urls):
            raise ValueError("'relay' needs a TURN server in whip.ice_servers")
        return policy


class ParticipantSettings(_Section):
    min_samples: int = Field(3, ge=1, le=100, description="consistent samples before a tracked face is a participant")
    leave_after_s: float = Field(30.0, gt=0.0, le=3600.0, description="a tracked participant unseen this long has left")


class EventSettings(_Section):
    """The event feed and its store. See streamguard/events/hub.py for the slow-consumer rule and retention."""

    client_queue_size: int = Field(256, ge=8, le=100000, description="live events buffered per WebSocket client; "
                                   "a client that overflows it catches up from the store")
    slow_consumer_grace_s: float = Field(10.0, ge=0.0, le=3600.0, description="a client that fell behind must have "
                                         "read what was published by then within this long, or is closed with "
                                         "4008; 0: close it as soon as its queue overflows")
    ping_interval_s: float = Field(20.0, gt=0.0, le=300.0)
    publish_scores: bool = Field(False, description="also store and send participant.score at 1 Hz")
    retention_days: float = Field(30.0, ge=0.0, le=36500.0, description="delete events older than this, with "
                                  "the cleared alerts and evidence they refer to; 0: keep for ever")
    max_events: int = Field(0, ge=0, description="keep at most the last this many events (a disk bound when "
                            "publish_scores is on); 0: no limit")


class StreamSpec(_Section):
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    url: str = Field(min_length=1, max_length=2048, description="rtsp(s)://, rtmp(s)://, http(s):// (HLS) URL, or a "
                     "file: a path or a file:///path URL")
    name: str | None = Field(None, max_length=256, description="display name")

    @field_validator("url")
    @classmethod
    def _url_usable(cls, url: str) -> str:
        """Refuse here, with the reason, what the source could never open: an unknown scheme, a malformed authority
        (`rtsp://[::1`), no host, a port outside 1-65535, an empty path. Stream URLs go to FFmpeg and into events."""
        from urllib.parse import unquote, urlsplit

        if not url.strip():
            raise ValueError("must not be empty")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
            raise ValueError("control characters are not allowed")
        scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
        if scheme not in PULL_SCHEMES:
            raise ValueError(f"unsupported scheme {scheme[:20]!r}; use one of {', '.join(PULL_SCHEMES)}")
        if scheme == "file" and "://" not in url:
            prefix = url.split(":", 1)[0].lower()
            if prefix in PULL_SCHEMES and prefix != "file":  # "rtsp:/cam": a URL missing a slash, not a file name
                raise ValueError(f"{prefix}: URLs start with {prefix}://host")
            if prefix == "file" and not url[5:]:
                raise ValueError("file: URL without a path; use file:///path/to/video or the path itself")
            return url
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # "rtsp://[::1": a bracket left open, not an IPv6 address in it
            raise ValueError(f"not a valid URL: {exc}") from None
        try:
            port = parts.port
        except ValueError:  # not digits, or above 65535
            hostport = parts.netloc.rpartition("@")[2]
            raw = hostport.rpartition("]")[2] if hostport.startswith("[") else hostport
            raise ValueError(f"port must be a number in 1-65535, got {raw.partition(':')[2][:20]!r}") from None
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise ValueError(f"file URLs are local (file:///path), got host {parts.netloc[:64]!r}")
            if not unquote(parts.path):
                raise ValueError("file URL without a path; use file:///path/to/video")
            return url
        if any(c.isspace() for c in url):
            raise ValueError("spaces must be percent-encoded (%20)")
        if not parts.hostname:
            raise ValueError(f"no host; use {scheme}://host[:port]/path")
        if port == 0:
            raise ValueError("port must be a number in 1-65535, got '0'")
        return url

    @field_validator("name")
    @classmethod
    def _printable(cls, name: str | None) -> str | None:
        if name is not None and any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
            raise ValueError("control characters are not allowed")
        return name


class ServiceConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STREAMGUARD_", env_nested_delimiter="__", extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on; without a token only loopback is allowed")
    port: int = Field(8080, ge=1, le=65535)
    data_dir: Path = Field(Path("streamguard-data"), description="SQLite event store and evidence")
    token: SecretStr | None = Field(None, description="bearer token for every endpoint, WHIP and the WebSocket")
    model: str | None = Field(None, description="model name in engines/ or path; default: the shipped model")
    backend: Literal["auto", "onnxruntime", "cuda", "tensorrt", "triton"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    cors_origins: list[str] = Field(
        default_factory=list, description="browser origins allowed to call the API and WHIP from other sites "
        "(CORS), e.g. https://meet.example.com; none by default: the console is same-origin")
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    faces: FaceSettings = Field(default_factory=FaceSettings)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)
    participants: ParticipantSettings = Field(default_factory=ParticipantSettings)
    batcher: BatcherSettings = Field(default_factory=BatcherSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    sources: SourceSettings = Field(default_factory=SourceSettings)
    whip: WhipSettings = Field(default_factory=WhipSettings)
    events: EventSettings = Field(default_factory=EventSettings)
    streams: list[StreamSpec] = Field(default_factory=list, description="pull streams started with the service")

    @field_validator("streams")
    @classmethod
    def _stream_ids_unique(cls, streams: list[StreamSpec]) -> list[StreamSpec]:
        seen: set[str] = set()
        for spec in streams:
            if spec.id in seen:
                raise ValueError(f"stream id {spec.id!r} appears more than once")
            seen.add(spec.id)
        return streams

    @field_validator("token")
    @classmethod
    def _token_not_blank(cls, token: SecretStr | None) -> SecretStr | None:
        # An empty token (STREAMGUARD_TOKEN= set but blank) would count as "a token is configured": the service
        # would listen publicly and accept "Authorization: Bearer " as valid.
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("must not be empty; leave it unset to run without one (loopback only)")
        return token

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (init) beat the environment, which beats the YAML file.
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class ConfigError(ValueError):
    """A bad config value, with every offending field named."""


# STREAMGUARD_* variables that are not settings: read by the model finder, the engine cache, tools and tests.
OTHER_VARIABLES = frozenset({
    "STREAMGUARD_ENGINES", "STREAMGUARD_ENGINE_CACHE", "STREAMGUARD_PARITY_CROPS", "STREAMGUARD_TEST_MODEL",
    "STREAMGUARD_SLOW_TESTS", "STREAMGUARD_UPDATE_SCREENSHOT", "STREAMGUARD_CONSOLE_TEST_ICE",
    "STREAMGUARD_CONSOLE_TEST_MODEL", "STREAMGUARD_CHROMIUM",
})


def load_config(config_file: Path | None = None, **flags: Any) -> ServiceConfig:
    """Merge the YAML file, the environment and the flags given (None flags are left out) and validate.

    pydantic-settings ignores environment variables that name no setting, so a typo (STREAMGUARD_SCORNG__WINDOW_S)
    would silently leave the default: they are refused here, like unknown keys in the file.
    """
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"--config: {config_file}: no such file")
    unknown = _unknown_variables(os.environ)
    if unknown:
        raise ConfigError("invalid config:\n  " + "\n  ".join(unknown))

    class FromFile(ServiceConfig):
        model_config = SettingsConfigDict(**{**ServiceConfig.model_config, "yaml_file": config_file})

    try:
        return FromFile(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except Exception as exc:  # malformed YAML
        raise ConfigError(f"{config_file}: {exc}") from None


def _unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per STREAMGUARD_* variable that names no setting (nested sections with `__`)."""
    lines = []
    for var in sorted(environ):
        if not var.upper().startswith("STREAMGUARD_") or var.upper() in OTHER_VARIABLES:
            continue
        model: type[BaseModel] = ServiceConfig
        path = var[len("STREAMGUARD_"):].lower().split("__")
        for depth, part in enumerate(path):
            if part not in model.model_fields:
                where = ".".join(path[:depth]) or "the config"
                close = difflib.get_close_matches(part, model.model_fields, n=1)
                hint = f"; did you mean {'.'.join([*path[:depth], close[0]])}?" if close else ""
                lines.append(f"{var}: {where} has no setting {part!r}{hint}")
                break
            annotation = model.model_fields[part].annotation
            if depth + 1 < len(path):
                if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                    lines.append(f"{var}: {'.'.join(path[: depth + 1])} is a value, not a section")
                    break
                model = annotation
    return lines


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        env = "STREAMGUARD_" + "__".join(str(p) for p in err["loc"] if not isinstance(p, int)).upper()
        value = f" (got {err['input']!r})" if not isinstance(err.get("input"), dict | list) else ""
        lines.append(f"{field}: {err['msg']}{value} [file key {field}, env {env}]")
    return "invalid config:\n  " + "\n  ".join(lines)
