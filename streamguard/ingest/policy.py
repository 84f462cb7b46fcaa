"""The source policy applied to streams added over the API (`sources.policy`, see streamguard/config/policy.py).

Three checks, each where it can be made:
- when the stream is added: the URL's kind (a scheme the policy lists; a local file only with `allow_files`) and a
  host written as an address (or `localhost`); a refusal is a 400 naming `url`;
- for RTSP and RTMP, before every connection attempt: the host is resolved and every address it resolves to must be
  allowed; a refusal fails the stream (no retry: the configuration, not the network, would have to change);
- for HTTP(S) (HLS), on every request FFmpeg makes, the playlist's own and every segment, key, variant and redirect
  host: FFmpeg goes through `EgressProxy` (ingest/egress.py), which resolves, checks and connects to the checked
  address itself, so a host named inside a playlist, or one whose DNS answer changes after the check, gets nowhere.
  RTSP/RTMP have no such hook: between the check and FFmpeg's own resolution a name could change (DNS rebinding),
  and FFmpeg follows an RTSP server's redirect; allow_networks narrowed to the cameras' network bounds both.

What a refused or failing stream is told does not help map a network: any failure to open a stream added over the
API reads the same ("cannot open a stream from this source: ..."), whether the port was closed, filtered or open
with something else behind it, the file missing or no video; the server log has the detail.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from streamguard.config.policy import SourcePolicy
from streamguard.ingest.av_source import _is_url

# What a stream added over the API is told when it cannot be opened, whatever the cause.
OPAQUE_OPEN_FAILURE = ("cannot open a stream from this source: refused, unreachable, timed out or not a video "
                       "(the server log says which)")
DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "rtmp": 1935, "rtmps": 443, "http": 80, "https": 443}


class SourceRefused(ValueError):
    """A source the policy does not allow; the message says why and names the setting."""


@dataclass(frozen=True, slots=True)
class SourceGuard:
    policy: SourcePolicy

    def check_url(self, url: str) -> None:
        """When a stream is added: its kind, and a host given as an address. Raises SourceRefused."""
        if not _is_url(url):
            if not self.policy.allow_files:
                raise SourceRefused("local files are not allowed for streams added over the API "
                                    "(sources.policy.allow_files)")
            return
        scheme = url.split("://", 1)[0].lower()
        if scheme not in self.policy.schemes:
            raise SourceRefused(f"{scheme}:// is not allowed for streams added over the API (sources.policy.schemes: "
                                f"{', '.join(self.policy.schemes)})")
        host = urlsplit(url).hostname or ""
        if host == "localhost" or host.endswith(".localhost"):
            raise SourceRefused(f"{host} is this machine, which sources.policy.deny_networks denies")
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return  # a name: resolved and checked at every connection (see the module docstring)
        reason = self.policy.refusal(address)
        if reason is not None:
            raise SourceRefused(f"{host} is in {reason}")

    def resolve(self, host: str, port: int) -> list[str]:
        """The addresses `host` resolves to, every one allowed; SourceRefused if any is not (a name that resolves
        to a LAN camera *and* to 127.0.0.1 is refused), OSError if it does not resolve."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for address in addresses:
            reason = self.policy.refusal(ipaddress.ip_address(address.split("%", 1)[0]))
            if reason is not None:
                raise SourceRefused(f"{host} resolves to an address in {reason}")
        return addresses

    def check_connect(self, url: str) -> None:
        """Before a connection attempt to an RTSP/RTMP URL: its host's addresses. Raises SourceRefused or OSError."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        self.resolve(parts.hostname or "", parts.port or DEFAULT_PORTS.get(scheme, 0))
