"""A pull stream's spec (`streams:` in the config, `POST /v1/streams`): its id, URL and display name."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from streamguard.config.stages import ConfigSection

PULL_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "file")
# An RFC 3986 scheme of 2+ characters (one letter before a colon is a Windows drive).
_SCHEME_RE = re.compile(r"[a-z][a-z0-9+.-]+")


class StreamSpec(ConfigSection):
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    url: str = Field(min_length=1, max_length=2048, description="rtsp(s)://, rtmp(s)://, http(s):// (HLS) URL, or a "
                     "file: a path or a file:///path URL")
    name: str | None = Field(None, max_length=256, description="display name")

    @field_validator("id")
    @classmethod
    def _addressable(cls, stream_id: str) -> str:
        # Clients normalise "." and ".." out of URL paths (RFC 3986 §5.2.4): /v1/streams/.. could never be deleted.
        if stream_id in (".", ".."):
            raise ValueError(f"{stream_id!r} is not a usable id (it vanishes from URL paths)")
        return stream_id

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
            if ":" in url and prefix != "file" and _SCHEME_RE.fullmatch(prefix):
                # pipe:0, concat:a|b, subfile:, crypto:, data:, javascript:... FFmpeg would read them as protocols.
                raise ValueError(f"unsupported scheme {prefix[:20]!r}; use one of {', '.join(PULL_SCHEMES)}, "
                                 "or ./ before a file name with a colon")
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
