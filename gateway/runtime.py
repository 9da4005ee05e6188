"""The running gateway: listeners, upstream pools, admin listener, reloads and shutdown.

A ``Runtime`` is built whole from a loaded ``Config`` (store, event log, access log, caches,
pools, enforcers); ``start`` opens one listener per app plus the admin listener and starts
the background work (event and access log flushers, the config file watcher, store change
follower, metrics and usage flushes, reminders), held by reference and ended in ``stop``.
``reload`` re-reads ``routes.toml`` and ``tier_matrix.toml`` (and the key ring), validates
them fully and swaps one reference; on any error the last good config stays. SIGHUP
reloads; SIGUSR1 reopens the log files; SIGTERM and SIGINT drain in-flight requests,
deliver what the event sinks still hold, then stop. (``--workers``: gateway.supervisor.)

    runtime = Runtime(load_config(Path("gateway.toml")))
    await runtime.start()
    runtime.install_signal_handlers()
    await runtime.wait_closed()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.accesslog import AccessLog
from gateway.admin import admin_app, public_key_fingerprint
from gateway.config import AppSettings, Config, Settings, load_rules, load_settings
from gateway.decision import Policy
from gateway.enforcer import Enforcer, Shared
from gateway.errors import ConfigError
from gateway.events import EventLog
from gateway.identity import startup_warning
from gateway.license import KeyRing
from gateway.matrix import AppName
from gateway.metrics import Metrics, multiprocess_dir
from gateway.proxy import ProxySettings, Tracker, UpstreamPool, downstream_factory
from gateway.reminders import Reminders
from gateway.revocations import with_revocation_list
from gateway.rollout import load_rollout, watched_files
from gateway.store import StoreError, TenantStore, open_store
from gateway.store.seed import import_tenants, read_tenants

log = logging.getLogger(__name__)


class ParserError(RuntimeError):
    """A pure-Python HTTP parser would be in use: refuse to start."""


def require_c_parsers() -> None:
    """The data path parses with llhttp (httptools, always compiled); the admin listener
    with aiohttp, whose pure-Python fallback parser has had request-smuggling bugs. It
    is used when the compiled extension is missing or AIOHTTP_NO_EXTENSIONS is set."""
    from aiohttp import http_parser

    if http_parser.HttpRequestParser is http_parser.HttpRequestParserPy:
        raise ParserError(
            "aiohttp's C HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS is set, or aiohttp "
            "was installed without its compiled extensions): refusing to start"
        )


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class Runtime:
    """One gateway process, built complete from a loaded ``Config``: ``start`` opens the
    listeners and starts the background work, ``stop`` drains and closes everything."""

    def __init__(self, config: Config, *, reuse_port: bool = False) -> None:
        settings = config.settings
        self.config = config
        self.reuse_port = reuse_port
        self.metrics = Metrics()
        self.tracker = Tracker()
        self.events = EventLog.from_settings(config.events_sink, settings.events, self.metrics)
        self.access_log = AccessLog.from_settings(
            config.access_log_sink, settings.access_log, self.metrics
        )
        self.store: TenantStore = with_revocation_list(
            open_store(config.store_url, config.keyring), config
        )
        self.shared = Shared(config, self.metrics, self.events, self.store)
        self.seats = self.shared.seats  # [seats], README "Seats and usage"
        self.usage = self.shared.usage
        self.reminders = Reminders(
            self.store, self.events, self._policy, settings.reminders, self.metrics
        )
        self.pools: dict[AppName, UpstreamPool] = {}
        self._factories: dict[AppName, Callable[[], asyncio.Protocol]] = {}
        for app, app_settings in settings.apps.items():
            proxy_settings = _proxy_settings(settings, app_settings)
            up_host, up_port = _upstream_address(app_settings.upstream)
            pool = UpstreamPool(up_host, up_port, proxy_settings, self.metrics.for_app(app))
            self.pools[app] = pool
            enforcer = Enforcer(app, config, self.shared)
            factory = downstream_factory(
                enforcer, pool, proxy_settings, self.tracker, self.access_log
            )
            self._factories[app] = factory
        self.servers: list[asyncio.Server] = []
        self.started = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopped = asyncio.Event()
        # (mtime_ns, size, inode): mtimes come from a coarse clock, so an edit in the same
        # tick as the last one keeps its mtime; the size or inode then still tells.
        self._mtimes: dict[Path, tuple[int, int, int]] = {}
        self._reload_lock = asyncio.Lock()
        self._settings: Settings | None = None  # gateway.toml as of the last reload
        self._admin = web.AppRunner(admin_app(self), access_log=None, handle_signals=False)

    def _policy(self) -> Policy:
        return self.shared.rules.policy  # the one the last reload swapped in

    # ------------------------------------------------------------------ start
    async def start(self) -> None:
        require_c_parsers()
        settings = self.config.settings
        self.events.start()
        self.access_log.start()
        if settings.store.seed is not None:
            await self._seed(self.config.resolve(settings.store.seed))
        warning = startup_warning(settings)
        if warning is not None:
            log.warning("%s", warning)
        await self.shared.identifier.start()  # jwt mode: the provider's keys, fail-static
        self._remember_mtimes()
        loop = asyncio.get_running_loop()
        for app, factory in self._factories.items():
            app_settings = settings.apps[app]
            host, port = split_host_port(app_settings.listen)
            server = await loop.create_server(
                factory, host, port, reuse_port=self.reuse_port or None, backlog=1024
            )
            self.servers.append(server)
            log.info(
                "%s: listening on %s, upstream %s", app, app_settings.listen, app_settings.upstream
            )
        await self._start_admin(settings.admin.listen)
        self._tasks.append(
            loop.create_task(self._watch(settings.server.reload_poll_interval), name="watcher")
        )
        self._tasks.append(loop.create_task(self._follow_store(), name="store-changes"))
        self._tasks.append(loop.create_task(self._flush_metrics(), name="metrics"))
        self._tasks.append(loop.create_task(self.usage.run(), name="usage"))
        self.reminders.start()
        for pool in self.pools.values():
            await pool.probe()
        log.info(
            "started: routes %s, matrix %s, %s",
            self.config.routes.sha, self.config.matrix.sha, describe_keys(self.config.keyring),
        )  # fmt: skip
        self.started = True

    async def _start_admin(self, listen: str) -> None:
        await self._admin.setup()
        host, port = split_host_port(listen)
        site = web.TCPSite(self._admin, host, port, reuse_port=self.reuse_port or None)
        await site.start()
        log.info("admin: listening on %s", listen)

    async def _seed(self, path: Path) -> None:
        try:
            result = await import_tenants(self.store, read_tenants(path))
        except StoreError as exc:  # fail-static: serve from headers, seed next start
            log.error("store.seed %s: the store is unreachable (%s); not imported", path, exc)
            return
        for problem in result.problems:
            log.warning("store.seed %s: %s", path, problem)
        log.info(
            "store.seed %s: %d tenants, %d keys stored", path, result.tenants, result.keys_stored
        )

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal)

    def _on_sighup(self) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self.reload("SIGHUP")))
        self._tasks = [task for task in self._tasks if not task.done()]

    def reopen_logs(self) -> None:
        """SIGUSR1, after logrotate moved the files: the event and access log files are
        opened again by name (in their writer threads, between two whole batches)."""
        self.events.reopen()
        self.access_log.reopen()
        log.info("SIGUSR1: reopening the events and access log files")

    def _on_stop_signal(self) -> None:
        if not self.tracker.closing:
            self._tasks.append(asyncio.get_running_loop().create_task(self.stop()))

    async def _flush_metrics(self) -> None:
        """Hot-path counts into the prometheus children once a second; a scrape flushes
        too. With ``--workers`` a scrape sees the other workers' files, so they are
        written four times a second (at most a quarter of a second behind)."""
        interval = 1.0 if multiprocess_dir() is None else 0.25
        while True:
            await asyncio.sleep(interval)
            self.metrics.flush()

    async def _follow_store(self) -> None:
        """Drop a tenant's cached record the moment the store says it changed (with Redis:
        a change made through any instance of the fleet)."""
        async for tenant in self.store.changes():
            self.shared.tenants.invalidate(tenant)
            self.seats.invalidate(tenant)

    # ------------------------------------------------------------------ reload
    @property
    def reloaded_settings(self) -> Settings | None:
        """``gateway.toml`` as the last reload read it (None: none since the start)."""
        return self._settings

    def _watched(self) -> list[Path]:
        files = self.config.settings.files
        rollout = watched_files(self.config, self._settings)
        return [self.config.resolve(files.routes), self.config.resolve(files.tier_matrix), *rollout]

    def _remember_mtimes(self, only_new: bool = False) -> None:
        for path in self._watched():
            if only_new and path in self._mtimes:
                continue
            with contextlib.suppress(OSError):
                self._mtimes[path] = _signature(path.stat())

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            changed = False
            for path in self._watched():
                try:
                    seen = _signature(path.stat())
                except OSError:
                    continue  # a file being replaced: look again next time
                if self._mtimes.get(path) != seen:
                    changed = True
            if changed:
                await self.reload("file change")

    async def reload(self, why: str) -> bool:
        """Validate routes + matrix (+ key ring) and swap them in; keep the old on error."""
        async with self._reload_lock:
            self._remember_mtimes()
            try:
                # Parsing and compiling runs in a thread: requests keep flowing meanwhile
                # (a large routes.toml takes a noticeable fraction of a second).
                matrix, routes = await asyncio.to_thread(load_rules, self.config)
                keyring = await asyncio.to_thread(
                    KeyRing.load, self.config.resolve(self.config.settings.license.public_keys)
                )
                # Enforcement modes, cohort, candidate and host features follow gateway.toml
                # at every reload (README "Rolling out"); its other settings need a restart.
                settings = await asyncio.to_thread(load_settings, self.config.path)
                rollout = await asyncio.to_thread(load_rollout, self.config, settings, matrix)
            except ConfigError as exc:
                self.metrics.reload_failed.inc()
                log.error(
                    "reload (%s) failed, keeping the last good config:\n  %s",
                    why,
                    "\n  ".join(str(p) for p in exc.problems),
                )
                return False
            self.shared.swap_rules(matrix, routes, rollout)
            self._settings = settings
            self._remember_mtimes(only_new=True)  # a cohort or candidate file named just now
            changed = not keyring.same_keys(self.shared.licenses.keyring)
            if changed:
                self._swap_keyring(keyring)
            self.metrics.reload_ok.inc()
            log.info(
                "reload (%s): routes %s, matrix %s, enforce %s, %s%s",
                why, routes.sha, matrix.sha, rollout.describe(), describe_keys(keyring),
                " (key ring changed)" if changed else "",
            )  # fmt: skip
            return True

    def _swap_keyring(self, keyring: KeyRing) -> None:
        """Every verdict earned under the old ring goes: verified header keys, the store's
        verified stored keys, and cached tenant records (they hold licenses verified with
        the old ring). A key replaced under its kid (rotated out, compromised) stops
        verifying at once."""
        self.shared.licenses.keyring = keyring
        self.shared.licenses.clear()
        self.store.use_keyring(keyring)
        self.shared.tenants.invalidate()

    # ------------------------------------------------------------------ stop
    async def stop(self, deadline: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to the deadline), close."""
        if self.tracker.closing:
            await self._stopped.wait()
            return
        self.tracker.closing = True
        if deadline is None:
            deadline = self.config.settings.server.shutdown_deadline
        for server in self.servers:
            server.close()
        for conn in list(self.tracker.connections):
            conn.close_if_idle()
        if self.tracker.connections:
            self.tracker.idle_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.tracker.idle_event.wait(), deadline)
        for conn in list(self.tracker.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for pool in self.pools.values():
            pool.close()
        await self._admin.cleanup()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in self._tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        flush_deadline = self.config.settings.events.flush_deadline
        await self.reminders.aclose(flush_deadline)  # a claimed reminder is still emitted
        await self.shared.identifier.stop()
        self.metrics.flush()
        # What is queued or in flight reaches its sink (a collector too) within the deadline.
        await self.events.aclose(flush_deadline)
        await self.access_log.aclose(flush_deadline)
        await self.usage.close()  # the last counts (kept in memory if the store is down)
        await self.store.close()
        self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def describe_keys(keyring: KeyRing) -> str:
    """The loaded public keys for a log line: ``keys k1 sha256:…, k2 sha256:…`` (the
    fingerprints ``/admin/config`` shows, so pods can be compared from their logs)."""
    if not keyring.keys:
        return "no public keys"
    listed = ", ".join(
        f"{kid} {public_key_fingerprint(key)}" for kid, key in sorted(keyring.keys.items())
    )
    return f"keys {listed}"


def _proxy_settings(settings: Settings, app: AppSettings) -> ProxySettings:
    up_host, up_port = _upstream_address(app.upstream)
    lic, server = settings.license, settings.server
    return ProxySettings(
        license_header=lic.header,
        tenant_header=lic.tenant_header,
        role_header=lic.role_header,
        user_header=lic.user_header,
        host_header=None if app.host == "preserve" else f"{up_host}:{up_port}".encode(),
        connect_timeout=app.connect_timeout,
        read_timeout=app.read_timeout,
        keepalive_timeout=server.keepalive_timeout,
        max_header_bytes=server.max_header_bytes,
        max_headers=server.max_headers,
        max_body_bytes=server.max_body_bytes,
        header_timeout=server.header_timeout,
        body_timeout=server.body_timeout,
        max_connections=app.max_connections,
        queue_timeout=app.queue_timeout,
        # What the enforcer reads besides the license and identity headers: the identity
        # provider's token ([identity] mode = "jwt") and the usage client id ([seats]).
        token_header=(
            settings.identity.header
            if settings.identity is not None and settings.identity.mode == "jwt"
            else None
        ),
        client_header=settings.seats.client_header,
    )


def _upstream_address(url: str) -> tuple[str, int]:
    rest = url[len("http://") :].rstrip("/")
    if ":" in rest.rsplit("]", 1)[-1]:
        host, port = split_host_port(rest)
        return host, port
    return rest.strip("[]"), 80
