"""WHIP ingest settings: session limits and the STUN/TURN servers every peer connection gathers with."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from streamguard.config.base import ConfigSection, numeric_secret

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


class IceServerSettings(ConfigSection):
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

    @field_validator("credential", mode="before")
    @classmethod
    def _credential_digits(cls, credential: Any) -> Any:
        return numeric_secret(credential)

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


class WhipSettings(ConfigSection):
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
    sender_max_fps: float | None = Field(
        5.0, gt=0.0, le=60.0, description="asked of publishers in the SDP answer (VP8 max-fr; H.264 max-mbps with "
        "max-fs): frames a second worth sending when 1 FPS is sampled; null: no hint",
    )
    sender_max_height: int | None = Field(
        720, ge=144, le=4320, description="asked of publishers in the SDP answer as max-fs (VP8, H.264): the frame "
        "size of a 16:9 picture this tall, in macroblocks; null: no hint",
    )

    keyframes_only: bool = Field(
        True, description="decode only keyframes, asked of the publisher (RTCP PLI) when a sample is due: one "
        "decode a second instead of every frame sent; a publisher that sends none within 3 s is decoded in full",
    )

    @field_validator("ice_transport_policy")
    @classmethod
    def _relay_needs_turn(cls, policy: str, info: ValidationInfo) -> str:
        servers: list[IceServerSettings] = info.data.get("ice_servers") or []
        if policy == "relay" and not any(url.startswith("turn") for s in servers for url in s.urls):
            raise ValueError("'relay' needs a TURN server in whip.ice_servers")
        return policy
