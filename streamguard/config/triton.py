"""The `triton:` section: NVIDIA Triton Inference Server, for `backend: triton` (streamguard/inference/triton.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from streamguard.config.stages import ConfigSection
from streamguard.config.whip import _HEADER_SAFE_RE

_GRPC_TARGET_RE = re.compile(r"(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})")
_METADATA_KEY_RE = re.compile(r"[a-z0-9_.-]+")  # gRPC metadata keys: lowercase ASCII


class TritonSettings(ConfigSection):
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
