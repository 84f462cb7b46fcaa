"""KV keys for stream ids. Stream ids may hold ':' (WHIP streams are `whip:<session>`), which KV keys cannot:
every character outside [A-Za-z0-9_-] is written as =XX (its hex code), so `cam-1` stays `cam-1`."""

from __future__ import annotations

import re

_PLAIN = re.compile(r"[A-Za-z0-9_-]")


def key_of(stream_id: str) -> str:
    return "".join(c if _PLAIN.fullmatch(c) else "".join(f"={b:02X}" for b in c.encode()) for c in stream_id)


def stream_id_of(key: str) -> str:
    return re.sub(r"(?:=[0-9A-F]{2})+", lambda m: bytes.fromhex(m[0].replace("=", "")).decode(), key)
