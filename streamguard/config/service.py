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

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from streamguard.config import stages
from streamguard.config.base import numeric_secret
from streamguard.config.cluster import ClusterSettings
from streamguard.config.streams import StreamSpec
from streamguard.config.triton import TritonSettings
from streamguard.config.whip import WhipSettings


class ServiceConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STREAMGUARD_", env_nested_delimiter="__", extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on; without a token only loopback, unless "
                      "allow_unauthenticated")
    port: int = Field(8080, ge=1, le=65535)
    data_dir: Path = Field(Path("streamguard-data"), description="SQLite event store and evidence")
    token: SecretStr | None = Field(None, description="bearer token for every endpoint, WHIP and the WebSocket")
    allow_unauthenticated: bool = Field(
        False, description="serve a non-loopback host without a token; without this such a start is refused")
    model: str | None = Field(None, description="model name in engines/ or path; default: the shipped model")
    backend: Literal["auto", "onnxruntime", "cuda", "tensorrt", "triton"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    cors_origins: list[str] = Field(
        default_factory=list, description="browser origins allowed to call the API and WHIP from other sites "
        "(CORS), e.g. https://meet.example.com; none by default: the console is same-origin")
    sampling: stages.SamplingSettings = Field(default_factory=stages.SamplingSettings)
    faces: stages.FaceSettings = Field(default_factory=stages.FaceSettings)
    scoring: stages.ScoringSettings = Field(default_factory=stages.ScoringSettings)
    participants: stages.ParticipantSettings = Field(default_factory=stages.ParticipantSettings)
    batcher: stages.BatcherSettings = Field(default_factory=stages.BatcherSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    sources: stages.SourceSettings = Field(default_factory=stages.SourceSettings)
    whip: WhipSettings = Field(default_factory=WhipSettings)
    events: stages.EventSettings = Field(default_factory=stages.EventSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
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

    @field_validator("token", mode="before")
    @classmethod
    def _token_digits(cls, token: Any) -> Any:
        return numeric_secret(token)

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

    def secrets(self) -> list[str]:
        """Every secret in this config (token, TURN credentials, Triton's headers): what logs must never show."""
        values = [self.token, *(s.credential for s in self.whip.ice_servers), *self.triton.headers.values()]
        return [v.get_secret_value() for v in values if v is not None]

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


# Settings whose values are secrets: their values never appear in an error.
SECRET_FIELDS = frozenset({"token", "credential"})


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
    except SettingsError as exc:  # an environment variable holding a section or list that is not JSON
        raise ConfigError(_describe_settings_error(exc)) from None
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
        secret = any(str(p) in SECRET_FIELDS for p in err["loc"])  # a typo'd password is still a password
        shown = not (secret or isinstance(err.get("input"), dict | list))
        value = f" (got {err['input']!r})" if shown else ""
        lines.append(f"{field}: {err['msg']}{value} [file key {field}, env {env}]")
    return "invalid config:\n  " + "\n  ".join(lines)


def _describe_settings_error(exc: SettingsError) -> str:
    """pydantic-settings says 'error parsing value for field "streams" from source "EnvSettingsSource"': name the
    variable, say what it must hold, and why it does not (never the value: it may hold secrets)."""
    match = re.search(r'field "([^"]+)"', str(exc))
    field = match[1] if match else "config"
    env = "STREAMGUARD_" + field.upper()
    why = f": {exc.__cause__}" if isinstance(exc.__cause__, ValueError) else ""
    return (f"invalid config:\n  {field}: {env} must be JSON (a list or an object, e.g. "
            f"{env}='[{{\"id\": \"cam\", \"url\": \"rtsp://cam/stream\"}}]' for streams){why} "
            f"[file key {field}, env {env}]")
