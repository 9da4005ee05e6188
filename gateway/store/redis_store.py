"""Redis tenant store: fleets of sidecars sharing one Redis (docs/design.md §7).

(Longer than ~500 lines: the whole ``TenantStore`` interface over one key layout, each method
next to its Lua script, plus the change subscription those scripts publish to.)

``redis://host:port/db`` (``rediss://`` for TLS, credentials in the URL as usual), with the
``redis`` package's asyncio client. Key layout, under a prefix (default ``gw:``):

============================  ==========  ====================================================
``gw:tenants``                set         every tenant id the store knows
``gw:lic:<tenant>``           sorted set  raw license keys scored by ``serial``
``gw:state:<tenant>``         hash        ``suspended`` (``0``/``1``), ``ops_users``, ``drivers``
``gw:revoked:<tenant>``       set         revoked license ids (``jti``)
``gw:event:<event id>``       string      a claimed provisioning event (``SET NX``, 30 days)
``gw:classic``                hash        classic key → tenant
``gw:changes``                channel     the tenant id of every write, from every instance
``gw:seats:<kind>:<tenant>``  sorted set  seat holders (user ids) scored by last-seen time
``gw:extra:<tenant>``         hash        extra seats bought: ``ops_users``, ``drivers``
``gw:usage:<day>:<tenant>``   hash        ``[minute, feature, client]`` (JSON) → calls
``gw:usagedays:<tenant>``     sorted set  the days (``YYYY-MM-DD``) with usage, by timestamp
============================  ==========  ====================================================

A seat admission is one Lua script (``ADMIT_SEAT``): trim the holders older than the window,
then admit a holder, add a new user while the hard limit allows, or refuse — so gateways
sharing the Redis never admit more users than the limit between them. Usage buckets and
their day index expire after ``USAGE_RETENTION_SECONDS``.

Writes are Lua scripts, so each is atomic against every other instance (an older serial never
replaces a newer one however two writers interleave) and publishes the tenant id on the
channel in the same step. ``changes()`` subscribes to that channel: a change made through any
instance reaches every instance's cache at once. A quiet subscription is PINGed every
``HEARTBEAT_SECONDS`` and dropped only when nothing at all comes back. When Redis goes away
the iterator reconnects at once, then with a short backoff (at most half a second) and, once
back, names every known tenant, since changes published while it was away are lost.

Short socket timeouts (connect 1 s, command 2 s, one retry on a fresh connection) make an
outage a ``StoreError`` within seconds, never a hang; the caller keeps serving from its cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import cast
from urllib.parse import urlsplit, urlunsplit

import msgspec
import redis.asyncio
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.decision import TenantRecord
from gateway.license import KeyRing, License, Seats
from gateway.store import (
    USAGE_RETENTION_SECONDS,
    SeatAdmission,
    SeatHolder,
    SeatKind,
    StoredKeys,
    StoreError,
    TenantStore,
    UsageCount,
    by_last_seen,
)

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "gw:"
EVENT_TTL_SECONDS = 30 * 86400
CONNECT_TIMEOUT = 1.0
COMMAND_TIMEOUT = 2.0
BACKOFF_START = 0.05  # the subscription's reconnect backoff, after a first retry at once
BACKOFF_MAX = 0.5
HEARTBEAT_SECONDS = 5.0  # a silent subscription is PINGed; no answer within this → reconnect
POLL_SECONDS = 0.5  # how often a waiting changes() iterator looks at the clock and close()
LIST_BATCH = 500  # tenants read per pipeline by list_tenants()

# KEYS: licenses, tenants. ARGV: serial, token, tenant, channel.
PUT_LICENSE = """
local top = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if top[2] ~= nil and tonumber(top[2]) >= tonumber(ARGV[1]) then
    return 0
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1
"""

# KEYS: state, tenants. ARGV: tenant, "1" or "0", channel.
SET_SUSPENDED = """
local known = redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1
local current = redis.call('HGET', KEYS[1], 'suspended')
if known and (current == '1') == (ARGV[2] == '1') then
    return 0
end
redis.call('HSET', KEYS[1], 'suspended', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 1
"""

# KEYS: revoked, tenants. ARGV: license id, tenant, channel.
REVOKE = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then
    return 0
end
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
"""

# KEYS: state, tenants. ARGV: tenant, ops_users, drivers, channel.
SET_USAGE = """
redis.call('HSET', KEYS[1], 'ops_users', ARGV[2], 'drivers', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
"""

# KEYS: the seat holders. ARGV: user, now, cutoff (now - window), hard limit, ttl seconds.
# Returns {admitted, new, used}.
ADMIT_SEAT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local used = redis.call('ZCARD', KEYS[1])
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
if seen then
    if tonumber(seen) < tonumber(ARGV[2]) then
        redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
    end
    redis.call('EXPIRE', KEYS[1], ARGV[5])
    return {1, 0, used}
end
if used >= tonumber(ARGV[4]) then
    return {0, 1, used}
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {1, 1, used + 1}
"""

# KEYS: the seat holders. ARGV: user, tenant, channel.
RELEASE_SEAT = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
    return 0
end
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
"""

# KEYS: extra seats. ARGV: ops_users, drivers, tenant, channel.
SET_EXTRA_SEATS = """
redis.call('HSET', KEYS[1], 'ops_users', ARGV[1], 'drivers', ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1
"""


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


class RedisStore(TenantStore):
    def __init__(
        self,
        url: str,
        keyring: KeyRing,
        *,
        prefix: str = DEFAULT_PREFIX,
        connect_timeout: float = CONNECT_TIMEOUT,
        command_timeout: float = COMMAND_TIMEOUT,
        heartbeat: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.url = url
        self._heartbeat = heartbeat
        self._where = redacted(url)
        self._prefix = prefix
        self._channel = f"{prefix}changes"
        self._tenants_key = f"{prefix}tenants"
        self._classic_key = f"{prefix}classic"
        self._redis: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=connect_timeout,
            socket_timeout=command_timeout,
            # One retry on a fresh connection when the connection broke: a pooled connection
            # that died with a Redis restart must not fail the first command after it. No
            # retry after a timeout, so a hung Redis costs one command timeout, not two.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._put_license = self._redis.register_script(PUT_LICENSE)
        self._set_suspended = self._redis.register_script(SET_SUSPENDED)
        self._revoke = self._redis.register_script(REVOKE)
        self._set_usage = self._redis.register_script(SET_USAGE)
        self._admit_seat = self._redis.register_script(ADMIT_SEAT)
        self._release_seat = self._redis.register_script(RELEASE_SEAT)
        self._set_extra_seats = self._redis.register_script(SET_EXTRA_SEATS)
        self._closed = asyncio.Event()
        self.keys = StoredKeys(keyring, "redis")

    def _key(self, kind: str, name: str) -> str:
        return f"{self._prefix}{kind}:{name}"

    @contextlib.contextmanager
    def _errors(self, op: str) -> Iterator[None]:
        """Anything Redis raises (unreachable, timed out, an error reply) → ``StoreError``."""
        if self._closed.is_set():
            raise StoreError(f"redis store {self._where}: {op}: the store is closed")
        try:
            yield
        except (RedisError, OSError) as exc:
            raise StoreError(
                f"redis store {self._where}: {op}: {type(exc).__name__}: {exc}"
            ) from exc

    # -- reads ------------------------------------------------------------------------------

    async def get(self, tenant: str) -> TenantRecord | None:
        with self._errors("get"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.sismember(self._tenants_key, tenant)
                pipe.zrevrange(self._key("lic", tenant), 0, -1)
                pipe.hgetall(self._key("state", tenant))
                pipe.smembers(self._key("revoked", tenant))
                known, tokens, state, revoked = await pipe.execute()
        if not known:
            return None
        return self._record(tenant, tokens, state, revoked)

    def _record(
        self, tenant: str, tokens: list[str], state: dict[str, str], revoked: set[str]
    ) -> TenantRecord:
        return TenantRecord(
            tenant,
            suspended=state.get("suspended") == "1",
            revoked=frozenset(revoked),
            licenses=self.keys.licenses(tenant, tokens),
            usage=_usage(state),
        )

    async def list_tenants(self) -> list[TenantRecord]:
        records: list[TenantRecord] = []
        tenants = await self.tenants()
        with self._errors("list_tenants"):
            # Pipelined in batches: a round trip per batch, and no reply too large to buffer.
            for start in range(0, len(tenants), LIST_BATCH):
                batch = tenants[start : start + LIST_BATCH]
                async with self._redis.pipeline(transaction=False) as pipe:
                    for tenant in batch:
                        pipe.zrevrange(self._key("lic", tenant), 0, -1)
                        pipe.hgetall(self._key("state", tenant))
                        pipe.smembers(self._key("revoked", tenant))
                    replies = await pipe.execute()
                for index, tenant in enumerate(batch):
                    tokens, state, revoked = replies[3 * index : 3 * index + 3]
                    records.append(self._record(tenant, tokens, state, revoked))
        return records

    async def is_classic_key(self, key: str) -> bool:
        with self._errors("is_classic_key"):
            return bool(await self._redis.hexists(self._classic_key, key))

    async def tenants(self) -> list[str]:
        with self._errors("tenants"):
            members = await self._redis.smembers(self._tenants_key)
        return sorted(str(member) for member in members)

    async def ping(self) -> bool:
        try:
            with self._errors("ping"):
                return bool(await self._redis.ping())
        except StoreError:
            return False

    # -- writes -----------------------------------------------------------------------------

    async def put_license(self, token: str) -> License | None:
        lic = self.keys.verify(token)  # LicenseError before anything is stored
        tenant = lic.claims.sub
        with self._errors("put_license"):
            stored: int = await self._put_license(
                keys=[self._key("lic", tenant), self._tenants_key],
                args=[lic.claims.serial, token, tenant, self._channel],
            )
        return lic if stored == 1 else None

    async def set_suspended(self, tenant: str, suspended: bool) -> bool:
        with self._errors("set_suspended"):
            changed: int = await self._set_suspended(
                keys=[self._key("state", tenant), self._tenants_key],
                args=[tenant, "1" if suspended else "0", self._channel],
            )
        return changed == 1

    async def revoke(self, tenant: str, license_id: str) -> bool:
        with self._errors("revoke"):
            changed: int = await self._revoke(
                keys=[self._key("revoked", tenant), self._tenants_key],
                args=[license_id, tenant, self._channel],
            )
        return changed == 1

    async def set_usage(self, tenant: str, ops_users: int, drivers: int) -> None:
        with self._errors("set_usage"):
            await self._set_usage(
                keys=[self._key("state", tenant), self._tenants_key],
                args=[tenant, ops_users, drivers, self._channel],
            )

    async def claim_event(self, event_id: str) -> bool:
        with self._errors("claim_event"):
            claimed = await self._redis.set(
                self._key("event", event_id), "1", nx=True, ex=EVENT_TTL_SECONDS
            )
        return bool(claimed)

    async def release_event(self, event_id: str) -> None:
        with self._errors("release_event"):
            await self._redis.delete(self._key("event", event_id))

    async def import_classic_key(self, tenant: str, key: str) -> None:
        with self._errors("import_classic_key"):
            await self._redis.hset(self._classic_key, key, tenant)

    async def remove_classic_key(self, key: str) -> bool:
        with self._errors("remove_classic_key"):
            return bool(await self._redis.hdel(self._classic_key, key))

    # -- seats and usage --------------------------------------------------------------------

    def _seats_key(self, tenant: str, kind: SeatKind) -> str:
        return f"{self._prefix}seats:{kind}:{tenant}"

    async def admit_seat(
        self, tenant: str, kind: SeatKind, user: str, now: float, window: float, hard_limit: int
    ) -> SeatAdmission:
        # The set expires a little after its newest holder would: an idle tenant leaves
        # nothing behind.
        ttl = int(window) + 3600
        with self._errors("admit_seat"):
            result: list[int] = await self._admit_seat(
                keys=[self._seats_key(tenant, kind)],
                args=[user, repr(now), repr(now - window), hard_limit, ttl],
            )
        admitted, new, used = result
        return SeatAdmission(bool(admitted), bool(new), int(used))

    async def seat_holders(
        self, tenant: str, kind: SeatKind, now: float, window: float
    ) -> list[SeatHolder]:
        with self._errors("seat_holders"):
            rows = await self._redis.zrevrangebyscore(
                self._seats_key(tenant, kind), "+inf", f"({now - window!r}", withscores=True
            )
        pairs = cast("list[tuple[str, float]]", rows)
        return by_last_seen([SeatHolder(user, float(seen)) for user, seen in pairs])

    async def release_seat(self, tenant: str, kind: SeatKind, user: str) -> bool:
        with self._errors("release_seat"):
            released: int = await self._release_seat(
                keys=[self._seats_key(tenant, kind)], args=[user, tenant, self._channel]
            )
        return released == 1

    async def set_extra_seats(self, tenant: str, ops_users: int, drivers: int) -> None:
        with self._errors("set_extra_seats"):
            await self._set_extra_seats(
                keys=[self._key("extra", tenant)],
                args=[ops_users, drivers, tenant, self._channel],
            )

    async def extra_seats(self, tenant: str) -> Seats | None:
        with self._errors("extra_seats"):
            state = await self._redis.hgetall(self._key("extra", tenant))
        return _usage(cast("dict[str, str]", state))

    async def add_usage(self, batch: Sequence[UsageCount]) -> None:
        if not batch:
            return
        touched: dict[str, tuple[str, int]] = {}  # hash key -> (tenant, start of its day)
        with self._errors("add_usage"):
            # MULTI/EXEC: a batch is added whole or not at all.
            async with self._redis.pipeline(transaction=True) as pipe:
                for count in batch:
                    day = count.minute - count.minute % 86400
                    key = f"{self._prefix}usage:{_day(day)}:{count.tenant}"
                    field = _bucket.encode((count.minute, count.feature, count.client))
                    pipe.hincrby(key, field.decode(), count.calls)
                    touched[key] = (count.tenant, day)
                for key, (tenant, day) in touched.items():
                    pipe.expireat(key, day + 86400 + USAGE_RETENTION_SECONDS)
                    pipe.zadd(self._key("usagedays", tenant), {key: day})
                oldest = int(time.time()) - USAGE_RETENTION_SECONDS - 86400
                for tenant in {tenant for tenant, _ in touched.values()}:
                    pipe.zremrangebyscore(self._key("usagedays", tenant), "-inf", oldest)
                await pipe.execute()

    async def usage(
        self, tenant: str, since: float, until: float | None = None
    ) -> list[UsageCount]:
        end = float("inf") if until is None else until
        first_day = since - since % 86400
        with self._errors("usage"):
            keys = await self._redis.zrangebyscore(
                self._key("usagedays", tenant), first_day, "+inf" if until is None else until
            )
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in cast("list[str]", keys):
                    pipe.hgetall(key)
                buckets: list[dict[str, str]] = await pipe.execute()
        found: list[UsageCount] = []
        for bucket in buckets:
            for field, calls in bucket.items():
                minute, feature, client = _bucket_decoder.decode(field)
                if since <= minute < end:
                    found.append(UsageCount(tenant, minute, feature, client, int(calls)))
        return sorted(found)

    # -- invalidation -----------------------------------------------------------------------

    def changes(self) -> AsyncIterator[str]:
        return self._listen()

    async def _listen(self) -> AsyncIterator[str]:
        """Tenant ids published by every instance; survives outages, ends on ``close()``."""
        missed = False  # changes may have been published while we were not listening
        attempt = 0
        while not self._closed.is_set():
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                confirmed = False
                async for kind, data in self._frames(pubsub):
                    if kind == "message":
                        yield data
                        continue
                    if kind != "subscribe":
                        continue
                    if confirmed:  # redis-py reconnected and re-subscribed inside a read
                        missed = True
                    confirmed, attempt = True, 0
                    if missed:
                        # Whatever was published while we were away is lost: name every
                        # tenant, so the caches drop what may have changed meanwhile.
                        log.info("redis store %s: subscribed again", self._where)
                        for tenant in sorted(await self._redis.smembers(self._tenants_key)):
                            yield str(tenant)
                        missed = False
            except (RedisError, OSError) as exc:
                if not missed:
                    log.warning(
                        "redis store %s: subscription to %s lost (%s: %s); reconnecting",
                        self._where,
                        self._channel,
                        type(exc).__name__,
                        exc,
                    )
                missed = True
            finally:
                with contextlib.suppress(RedisError, OSError):
                    # PubSub.aclose is not annotated in redis-py.
                    await cast("Callable[[], Awaitable[None]]", pubsub.aclose)()
            # The first retry at once (a restarted Redis is usually back), then a short,
            # jittered backoff: a change published before we are back is learnt only from
            # the re-read, so every second of waiting delays upgrades by a second.
            delay = min(BACKOFF_START * 2**attempt, BACKOFF_MAX) if attempt else 0.0
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), delay * (0.5 + random.random() / 2))

    async def _frames(self, pubsub: PubSub) -> AsyncIterator[tuple[str, str]]:
        """``(kind, data)`` of each pub/sub frame until ``close()``; raises
        ``RedisConnectionError`` when a PING of a quiet subscription gets no answer.

        Frames are read raw (``PubSub.parse_response``), not through ``get_message``:
        whether redis-py hands the PONG of a subscribed connection to ``get_message``
        depends on the protocol and decoding (under RESP3 with ``decode_responses`` it is
        read and dropped), and a heartbeat whose answer cannot be seen dropped a healthy
        subscription every other interval. Here any frame at all proves the connection
        alive."""
        loop = asyncio.get_running_loop()
        last_heard, pinged_at = loop.time(), None
        while not self._closed.is_set():
            frame = await pubsub.parse_response(block=False, timeout=POLL_SECONDS)
            if self._closed.is_set():
                return  # close() ran while we read (redis-py may even have reconnected)
            now = loop.time()
            if frame is not None:
                last_heard, pinged_at = now, None
                if isinstance(frame, list) and len(frame) == 3:
                    yield str(frame[0]), str(frame[2])
            elif pinged_at is not None:
                if now - pinged_at > self._heartbeat:
                    raise RedisConnectionError("no answer to PING on the subscription")
            elif now - last_heard > self._heartbeat:
                await pubsub.ping()
                pinged_at = now

    async def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()


_bucket = msgspec.json.Encoder()
_bucket_decoder = msgspec.json.Decoder(tuple[int, str, str])


def _day(ts: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def _usage(state: dict[str, str]) -> Seats | None:
    ops_users, drivers = state.get("ops_users"), state.get("drivers")
    if ops_users is None or drivers is None:
        return None
    return Seats(int(ops_users), int(drivers))
