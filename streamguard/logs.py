"""Logging an SRE can read: one format, secrets redacted everywhere, libraries quiet unless asked.

- Redaction: every line goes through `RedactingFormatter`, which removes the configured secrets (the bearer token,
  TURN credentials) wherever they appear, and anything shaped like a credential: `access_token=` (the console's
  WebSocket URL, which uvicorn logs), `token=`, `password=`, `credential=` query parameters, `Bearer`/`Basic`
  authorisation values and the password of a URL's user-info (`rtsp://user:pass@cam`). Messages, arguments and
  tracebacks alike, since it redacts the formatted text.
- Levels: at `info`, uvicorn's access log keeps failed requests only (status >= 400: the console polls twice a second,
  every second); WebSocket accept lines, aioice's candidate pairs, aiortc and websockets stay at WARNING. At `debug`
  all of it is shown.
- Native stderr: mediapipe's C++ (absl) and TFLite write straight to file descriptor 2 ("Created TensorFlow Lite
  XNNPACK delegate", "All log messages before absl::InitializeLog()", "W0000 ... inference_feedback_manager");
  `filter_native_stderr` drops those lines and passes every other byte on (`--log-level debug` keeps them).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MASK = "***"
# Secrets shorter than this are not replaced as plain text (a one-letter token would mask every such letter); the
# patterns below still catch them where they are used.
MIN_SECRET_LEN = 4
_CREDENTIAL_PATTERNS = (
    # query parameters and key=value pairs that carry credentials
    re.compile(r"(?i)\b((?:access_)?token|password|passwd|pwd|credential|secret|api_?key)=([^&\s\"'<>;,]+)"),
    # Authorization header values
    re.compile(r"(?i)\b(Bearer|Basic)\s+([A-Za-z0-9._~+/=-]+)"),
    # the password in a URL's user-info: scheme://user:password@host
    re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*):([^/\s@]+)@"),
)
# Libraries that are chatty at INFO: shown at debug only.
QUIET_LOGGERS = ("aioice", "aiortc", "websockets")
# What mediapipe and TFLite print on fd 2 at every detector start.
NATIVE_NOISE = re.compile(
    rb"^(INFO: Created TensorFlow Lite|WARNING: All log messages before absl::InitializeLog|[IW]\d{4} \d\d:\d\d:\d\d)"
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with the given secrets and anything shaped like a credential masked."""
    for secret in secrets:
        if len(secret) >= MIN_SECRET_LEN:
            text = text.replace(secret, MASK)
    text = _CREDENTIAL_PATTERNS[0].sub(lambda m: f"{m[1]}={MASK}", text)
    text = _CREDENTIAL_PATTERNS[1].sub(lambda m: f"{m[1]} {MASK}", text)
    return _CREDENTIAL_PATTERNS[2].sub(lambda m: f"{m[1]}:{MASK}@", text)


class RedactingFormatter(logging.Formatter):
    """The house format, with `redact` applied to the whole formatted record (message, arguments, traceback)."""

    def __init__(self, fmt: str = FORMAT, secrets: Iterable[str] = ()) -> None:
        super().__init__(fmt)
        self.secrets = tuple(s for s in secrets if s)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)


class FailedRequestsOnly(logging.Filter):
    """uvicorn's access log at info: only requests that failed (its records carry the status as the 5th arg)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return len(args) < 5 or not isinstance(args[4], int) or args[4] >= 400


class NoWebSocketChatter(logging.Filter):
    """uvicorn.error logs every WebSocket handshake at INFO ('"WebSocket /v1/events?..." [accepted]', "connection
    open", "connection closed"); at info level those go (the console reconnects its feed), errors stay."""

    CHATTER = ('%s - "WebSocket %s"', "connection open", "connection closed")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and str(record.msg).startswith(self.CHATTER))


def log_config(level: str, secrets: Iterable[str] = ()) -> dict[str, Any]:
    """A `logging.config.dictConfig` for the service (also handed to uvicorn as its `log_config`)."""
    debug = level.lower() == "debug"
    quiet = "DEBUG" if debug else "WARNING"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": RedactingFormatter, "secrets": list(secrets)}},
        "filters": {"failed_only": {"()": FailedRequestsOnly}, "no_ws_chatter": {"()": NoWebSocketChatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "default",
                                "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            # uvicorn's loggers carry no handler of their own: they propagate to the root's, redacted and formatted.
            "uvicorn": {"level": level.upper(), "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level.upper(), "filters": [] if debug else ["no_ws_chatter"]},
            "uvicorn.access": {"level": level.upper(), "filters": [] if debug else ["failed_only"]},
            **{name: {"level": quiet} for name in QUIET_LOGGERS},
        },
    }


def configure(level: str, secrets: Iterable[str] = ()) -> dict[str, Any]:
    """Apply `log_config` to this process; returns it (for uvicorn, which applies it again on start)."""
    import logging.config

    config = log_config(level, secrets)
    logging.config.dictConfig(config)
    return config


def filter_native_stderr() -> None:
    """Route file descriptor 2 through a pipe whose reader drops NATIVE_NOISE lines and writes the rest to the real
    stderr. Python's own `sys.stderr` is pointed at the real stderr directly, so tracebacks and progress bars do not
    wait on the reader; only what C/C++ code writes to fd 2 passes through it. Call it once, as a command starts;
    it does nothing where sys.stderr is not fd 2 already (a command run in-process by a test runner)."""
    try:
        if sys.stderr.fileno() != 2:
            return
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation: an in-memory stream
        return
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.stderr = open(real, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace",  # noqa: SIM115
                      closefd=False)
    forwarder = threading.Thread(target=_forward, args=(read_end, real), name="native-stderr", daemon=True)
    forwarder.start()

    def flush_at_exit() -> None:
        # Put the real stderr back on fd 2: that closes the pipe's last write end, so the reader passes on what is
        # left and ends; nothing written just before exit is lost.
        sys.stderr.flush()
        os.dup2(real, 2)
        forwarder.join(timeout=2.0)

    atexit.register(flush_at_exit)


def _forward(read_end: int, real: int) -> None:
    with open(read_end, "rb", buffering=0) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not NATIVE_NOISE.match(line))
            if kept:
                os.write(real, kept)
        if pending and not NATIVE_NOISE.match(pending):
            os.write(real, pending)
