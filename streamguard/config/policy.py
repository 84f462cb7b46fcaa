"""Where streams added over the API may pull from (`sources.policy`): schemes, networks, local files.

Streams in the config file are the operator's own and are not checked. A stream added with `POST /v1/streams` makes
the server connect somewhere, so by default it may reach any host on the LAN or the internet (a camera at
192.168.1.20, an HLS stream on a CDN), but not the machine itself or what only the machine should reach: loopback
(the service's own API, local databases), link-local (cloud metadata at 169.254.169.254, fe80::), the unspecified,
multicast and broadcast addresses, and the IPv6 metadata addresses of AWS (fd00:ec2::254) and Alibaba
(100.100.100.200); and no local file. `allow_networks` narrows it further (e.g. to the camera VLAN).
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, IPvAnyNetwork

from streamguard.config.base import ConfigSection

NetworkScheme = Literal["rtsp", "rtsps", "rtmp", "rtmps", "http", "https"]
NETWORK_SCHEMES: tuple[NetworkScheme, ...] = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https")

DEFAULT_DENY: tuple[str, ...] = (
    "127.0.0.0/8", "::1/128",  # this machine
    "0.0.0.0/8", "::/128",  # "this network" / unspecified: reaches this machine too
    "169.254.0.0/16", "fe80::/10",  # link-local: cloud metadata services
    "224.0.0.0/4", "ff00::/8", "255.255.255.255/32",  # multicast, broadcast
    "fd00:ec2::254/128", "100.100.100.200/32",  # AWS (IPv6) and Alibaba metadata
)


class SourcePolicy(ConfigSection):
    """What a stream added over the API may be: a URL of these schemes whose host resolves only to allowed addresses
    (not in deny_networks, and in allow_networks when that is given), or, with allow_files, a local file."""

    schemes: list[NetworkScheme] = Field(
        default_factory=lambda: list(NETWORK_SCHEMES),
        description="URL schemes streams added over the API may use")
    allow_files: bool = Field(False, description="let streams added over the API read local files (a path or "
                              "file: URL); files named in the config file are always allowed")
    allow_networks: list[IPvAnyNetwork] = Field(
        default_factory=list, description="CIDR networks the host must resolve into (every address it resolves to); "
        "empty: any address that deny_networks does not name")
    deny_networks: list[IPvAnyNetwork] = Field(
        default_factory=lambda: [ipaddress.ip_network(n) for n in DEFAULT_DENY],
        description="CIDR networks a host must not resolve into; checked first")

    def refusal(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        """Why `address` may not be connected to (None: it may)."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        if any(address in net for net in self.deny_networks if net.version == address.version):
            return "a network sources.policy.deny_networks denies"
        if self.allow_networks and not any(address in net for net in self.allow_networks
                                           if net.version == address.version):
            return "outside sources.policy.allow_networks"
        return None
