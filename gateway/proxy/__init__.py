"""The reverse proxy: asyncio protocols with httptools (llhttp) on both sides.

aiohttp's high-level request/response machinery costs about 160 µs of CPU per proxied
request; a protocol-level relay with a C parser costs a fraction of that. Bodies stream both
ways with transport flow control (no buffering beyond the transports' high-water marks), so
a 1 GiB upload or download runs in flat memory.

A request's life, one module each:

- ``settings``: what each app listener reads on every request, resolved once.
- ``client``: the ``Downstream`` protocol of one client connection parses requests, queues
  pipelined ones and begins each in turn; ``request`` reads a parsed head into the
  ``RequestHead`` the enforcer decides on and the facts of its framing.
- ``exchange``: one request/response pair as a state machine — decided by the ``Enforcer``,
  answered here or relayed, and finished.
- ``pool``: keep-alive ``Upstream`` connections from an ``UpstreamPool``; a WebSocket upgrade
  the upstream accepts with 101 turns both connections into a raw byte tunnel.
- ``flow``: one ``FlowControl`` per client connection, which remembers why reading is paused.
- ``framing``: the bytes of every head and answer, as pure functions.
"""

from gateway.enforcer import CLASSIC, FORWARD
from gateway.proxy.client import Downstream, Tracker, downstream_factory
from gateway.proxy.framing import is_entitlement_header
from gateway.proxy.pool import Upstream, UpstreamPool
from gateway.proxy.settings import UPGRADE_HIGH_WATER, ProxySettings

__all__ = [
    "CLASSIC",
    "FORWARD",
    "UPGRADE_HIGH_WATER",
    "Downstream",
    "ProxySettings",
    "Tracker",
    "Upstream",
    "UpstreamPool",
    "downstream_factory",
    "is_entitlement_header",
]
