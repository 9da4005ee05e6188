"""Which peers' identity headers are honoured: ``[identity] trusted_peers`` and
``trusted_proxies`` compiled once, answers cached per address.

The rule (README, Identity): walk from the direct peer leftwards through X-Forwarded-For.
An address in ``trusted_peers`` means the headers were set by the trusted layer: honoured.
An address in ``trusted_proxies`` (a load balancer that appends its own peer to
X-Forwarded-For) means "look one hop further left". Any other address, an entry that is not
an address, or the end of the list: not honoured. So a client can prepend whatever it likes
to X-Forwarded-For: the walk stops at the address a trusted proxy recorded for it.

    trust = PeerTrust([parse_network("10.0.0.5/32")], [parse_network("10.1.0.0/16")])
    trust.honoured(b"10.1.2.3", b"203.0.113.9, 10.0.0.5")   # True: the proxy saw 10.0.0.5
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Final

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_OTHER: Final = 0
_PEER: Final = 1
_PROXY: Final = 2


def parse_network(text: str) -> IPNetwork:
    """``"10.0.0.0/8"`` or a single address (``"10.0.0.5"`` → ``/32``); ``ValueError``
    names what is wrong (host bits set, not an address...)."""
    return ipaddress.ip_network(text.strip(), strict=True)


def parse_address(raw: bytes) -> IPAddress | None:
    """A peer or X-Forwarded-For entry as an address: ``1.2.3.4``, ``1.2.3.4:80``,
    ``[2001:db8::1]:80``, ``2001:db8::1``; IPv4-mapped IPv6 (a dual-stack listener's view of
    an IPv4 client) as IPv4. None when it is not an address."""
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if text.startswith("["):
        text = text[1 : text.find("]")]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class PeerTrust:
    """``honoured(peer, forwarded_for)`` for one ``[identity]`` section (module docstring)."""

    __slots__ = ("_peers", "_proxies", "_kinds", "_size")

    def __init__(
        self, peers: Sequence[IPNetwork], proxies: Sequence[IPNetwork], size: int = 4096
    ) -> None:
        self._peers = tuple(peers)
        self._proxies = tuple(proxies)
        # Per address as the relay holds it (bytes): a connection's requests, and most
        # proxy hops, repeat, so the common case is one dict look-up.
        self._kinds: dict[bytes, int] = {}
        self._size = size

    def honoured(self, peer: bytes, forwarded_for: bytes | None) -> bool:
        kind = self._kinds.get(peer)
        if kind is None:
            kind = self._classify(peer)
        if kind != _PROXY:
            return kind == _PEER
        if not forwarded_for:
            return False
        for hop in reversed(forwarded_for.split(b",")):
            hop = hop.strip()
            kind = self._kinds.get(hop)
            if kind is None:
                kind = self._classify(hop)
            if kind != _PROXY:
                return kind == _PEER
        return False

    def _classify(self, raw: bytes) -> int:
        address = parse_address(raw)
        kind = _OTHER
        if address is not None:
            if any(address in network for network in self._peers):
                kind = _PEER
            elif any(address in network for network in self._proxies):
                kind = _PROXY
        if len(self._kinds) >= self._size:  # bounded: hops are client-supplied text
            del self._kinds[next(iter(self._kinds))]
        self._kinds[raw] = kind
        return kind
