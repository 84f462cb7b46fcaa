"""The instance's one NATS connection: connected at start (or a clear error), reconnected for ever after.

nats-py reconnects by itself and keeps its subscriptions; here its callbacks become one connectivity signal
(`on_change(connected, reason)`: the service reports it as `service.degraded`, component "cluster"), and every error
text that leaves this module is scrubbed of the URL's credentials.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from streamguard.config.cluster import ClusterSettings

log = logging.getLogger(__name__)

RECONNECT_WAIT_S = 0.5  # between reconnect attempts: a restarted NATS is back in about a second


class ClusterUnavailable(RuntimeError):
    """NATS cannot be reached (at start), or did not take what was queued in time (at stop)."""


class Scrubber:
    """Removes the credentials of the configured URLs from any text (nats-py's errors may quote the URL)."""

    def __init__(self, servers: list[str]) -> None:
        secrets: set[str] = set()
        for url in servers:
            userinfo = urlsplit(url).netloc.rpartition("@")[0]
            secrets |= {s for part in userinfo.split(":") for s in (part, unquote(part)) if len(s) >= 3}
        self._secrets = sorted(secrets, key=len, reverse=True)

    def __call__(self, text: object) -> str:
        out = str(text)
        for secret in self._secrets:
            out = out.replace(secret, "***")
        return out


class NatsLink:
    """`connect()`, then `nc` / `js`; `connected` and `on_change` follow the connection."""

    def __init__(self, settings: ClusterSettings, on_change: Callable[[bool, str], None]) -> None:
        self.settings = settings
        self.scrub = Scrubber(settings.servers)
        self._on_change = on_change
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self.connected = False
        self._errors_this_outage = 0
        self._last_error = ""
        self._closing = False  # our own close: its disconnect is no outage

    @property
    def nc(self) -> Client:
        assert self._nc is not None, "connect() first"
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "connect() first"
        return self._js

    async def connect(self) -> None:
        """Connect, or raise ClusterUnavailable naming the (redacted) URL and why."""
        s = self.settings
        try:
            self._nc = await asyncio.wait_for(nats.connect(
                s.servers, name=f"streamguard:{s.instance_id}", connect_timeout=max(1, int(s.connect_timeout_s)),
                allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=RECONNECT_WAIT_S,
                error_cb=self._error, disconnected_cb=self._disconnected, reconnected_cb=self._reconnected,
            ), s.connect_timeout_s)
        except Exception as exc:  # noqa: BLE001 - every way a connect fails is the same answer for the operator
            # nats-py retries the first connect too (reconnects are unlimited): the last attempt's error says why.
            reason = self.scrub(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                reason = f"no connection within {s.connect_timeout_s:g} s ({self._last_error or 'no answer'})"
            raise ClusterUnavailable(f"cluster: cannot reach NATS at {s.redacted_url}: {reason}") from None
        self._js = self._nc.jetstream(timeout=s.ack_timeout_s)
        self.connected = True
        log.info("cluster: connected to NATS at %s as instance %s", s.redacted_url, s.instance_id)

    async def close(self) -> None:
        self._closing = True
        if self._nc is not None and not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._nc.close(), 5.0)
            except Exception as exc:  # noqa: BLE001 - closing: nothing left to do about it
                log.debug("cluster: closing the NATS connection: %s", self.scrub(exc))

    async def _error(self, exc: Exception) -> None:
        # While NATS is down each reconnect attempt fails: say it once per outage, the rest at debug level.
        self._errors_this_outage += 1
        self._last_error = self.scrub(exc) or type(exc).__name__
        if not self.connected and self._js is None:
            return  # the first connect: its caller reports the last error
        level = logging.WARNING if self._errors_this_outage == 1 else logging.DEBUG
        log.log(level, "cluster: NATS: %s", self._last_error)

    async def _disconnected(self) -> None:
        if self.connected and not self._closing:
            self.connected = False
            log.warning("cluster: lost the connection to NATS at %s; reconnecting", self.settings.redacted_url)
            self._on_change(False, f"NATS at {self.settings.redacted_url} unreachable; reconnecting")

    async def _reconnected(self) -> None:
        self.connected = True
        self._errors_this_outage = 0
        log.warning("cluster: reconnected to NATS")
        self._on_change(True, "reconnected to NATS")


async def probe(settings: ClusterSettings) -> None:
    """Connect, check that JetStream answers, disconnect: ClusterUnavailable (saying why) if not."""
    link = NatsLink(settings, lambda _connected, _reason: None)
    await link.connect()
    try:
        await link.js.account_info()
    except Exception as exc:
        raise ClusterUnavailable(f"cluster: NATS at {settings.redacted_url} has no JetStream (start it with -js): "
                                 f"{link.scrub(exc) or type(exc).__name__}") from None
    finally:
        await link.close()
