"""Per-app settings the relay reads on every request, resolved once, and the kinds of
header the request parser notes while it collects a head."""

from __future__ import annotations

from typing import Final

# Header kinds the request parser notes (ProxySettings.watch maps lower-case names to them).
H_LICENSE: Final = 1
H_TENANT: Final = 2
H_ROLE: Final = 3
H_USER: Final = 4
H_CONNECTION: Final = 5
H_TE: Final = 6
H_CL: Final = 7
H_HOST: Final = 8
H_XFF: Final = 9
H_EXPECT: Final = 10
H_UPGRADE: Final = 11
H_REQUEST_ID: Final = 12
H_TOKEN: Final = 13
H_CLIENT: Final = 14

# Client bytes held while an upgrade waits for the upstream's 101: past this, reading pauses.
UPGRADE_HIGH_WATER: Final = 64 * 1024
# Pipelined requests queued behind the one being answered: past this, reading pauses.
MAX_PIPELINE: Final = 16


class ProxySettings:
    """Per-app settings the protocols read on every request, resolved once."""

    __slots__ = (
        "watch",
        "host_header",
        "connect_timeout",
        "read_timeout",
        "keepalive_timeout",
        "max_header_bytes",
        "max_headers",
        "max_buffer",
        "max_body_bytes",
        "header_timeout",
        "body_timeout",
        "max_connections",
        "queue_timeout",
        "tick",
        "max_failed_keys",
    )

    def __init__(
        self,
        *,
        license_header: str,
        tenant_header: str,
        role_header: str,
        user_header: str,
        host_header: bytes | None,
        connect_timeout: float,
        read_timeout: float,
        keepalive_timeout: float = 75.0,
        max_header_bytes: int = 32 * 1024,
        max_headers: int = 100,
        max_body_bytes: int = 4 << 30,
        header_timeout: float = 10.0,
        body_timeout: float = 60.0,
        max_connections: int = 1000,
        queue_timeout: float = 5.0,
        token_header: str | None = None,
        client_header: str | None = None,
        max_failed_keys: int = 8,
    ) -> None:
        """``token_header``: the identity token's header (``RequestHead.token``);
        ``client_header``: the usage client id's (``RequestHead.client_id``); None: not
        read. ``max_failed_keys``: license keys refused (401) on one connection before it
        is answered and closed (a key flood pays a new connection every few keys)."""
        self.watch = {
            license_header.lower().encode(): H_LICENSE,
            tenant_header.lower().encode(): H_TENANT,
            role_header.lower().encode(): H_ROLE,
            user_header.lower().encode(): H_USER,
            b"connection": H_CONNECTION,
            b"transfer-encoding": H_TE,
            b"content-length": H_CL,
            b"host": H_HOST,
            b"x-forwarded-for": H_XFF,
            b"expect": H_EXPECT,
            b"upgrade": H_UPGRADE,
            b"x-request-id": H_REQUEST_ID,
        }
        for header, kind in ((token_header, H_TOKEN), (client_header, H_CLIENT)):
            if header is not None:
                name = header.lower().encode()
                if name in self.watch:
                    raise ValueError(f"{header}: already read for another purpose")
                self.watch[name] = kind
        self.host_header = host_header  # None: preserve the client's Host
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        # Request body held while the upstream connection is not ready: past this, reading
        # pauses (and an answer given here closes rather than reading the rest).
        self.max_buffer = 256 * 1024
        self.max_body_bytes = max_body_bytes
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        self.queue_timeout = queue_timeout
        # Watchdog period: timeouts fire at most a quarter late.
        self.tick = min(read_timeout, keepalive_timeout, header_timeout, body_timeout) / 4
        self.max_failed_keys = max_failed_keys
