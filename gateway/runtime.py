"""The running gateway: listeners, upstream pools, admin listener, reloads and shutdown.

``Runtime.start`` loads the config and opens one listener per app plus the admin listener;
background work (event flushing, the config file watcher) runs in tasks the runtime holds
and cancels in ``stop``. ``reload`` re-reads ``routes.toml`` and ``tier_matrix.toml`` (and
the key ring), validates them fully and swaps one reference; on any error the last good
config stays. SIGHUP reloads; SIGTERM and SIGINT drain in-flight requests, then stop.

    runtime = Runtime(Path("gateway.toml"))
    await runtime.start()
    await runtime.wait_closed()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.admin import admin_app
from gateway.config import Config, Settings, load_config, load_rules, load_settings
from gateway.enforcer import Enforcer, Shared
from gateway.errors import ConfigError
from gateway.events import EventLog, sampled_rates
from gateway.identity import startup_warning
from gateway.license import KeyRing
from gateway.matrix import AppName
from gateway.metrics import Metrics, multiprocess_dir
from gateway.proxy import ProxySettings, Tracker, UpstreamPool, downstream_factory
from gateway.revocations import with_revocation_list
from gateway.rollout import load_rollout, watched_files
from gateway.store import StoreError, TenantStore, open_store, per_process
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


def store_url(config: Config) -> str:
    """``sqlite://relative.db`` is relative to the config file's folder."""
    url = config.settings.store.url
    if url.startswith("sqlite://") and not url.startswith("sqlite:///"):
        return "sqlite:///" + str(config.resolve(url[len("sqlite://") :]))
    return url


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def events_sink(config: Config) -> str:
    """``file://relative/path`` is relative to the config file's folder."""
    sink = config.settings.events.sink
    if sink.startswith("file://") and not sink.startswith("file:///"):
        return "file://" + str(config.resolve(sink[len("file://") :]))
    return sink


class Runtime:
    def __init__(
        self, config_path: Path, *, reuse_port: bool = False, config: Config | None = None
    ) -> None:
        self.config_path = config_path
        self.reuse_port = reuse_port
        # Loaded by the caller (``gateway replay`` moves the listeners and the upstream of
        # the file it was given); None: ``start`` loads config_path.
        self._preloaded = config
        self.metrics = Metrics()
        self.tracker = Tracker()
        self.pools: dict[AppName, UpstreamPool] = {}
        self.servers: list[asyncio.Server] = []
        self.started = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._admin: web.AppRunner | None = None
        self._stopped = asyncio.Event()
        # (mtime_ns, size, inode): mtimes come from a coarse clock, so an edit in the same
        # tick as the last one keeps its mtime; the size or inode then still tells.
        self._mtimes: dict[Path, tuple[int, int, int]] = {}
        self._reload_lock = asyncio.Lock()
        self._settings: Settings | None = None  # gateway.toml as of the last reload

    # ------------------------------------------------------------------ start
    async def start(self) -> None:
        require_c_parsers()
        config = self._preloaded or load_config(self.config_path)
        self.config = config
        settings = config.settings
        self.events = EventLog(
            events_sink(config),
            self.metrics,
            settings.events.max_queue,
            per_second=sampled_rates(settings.events),
        )
        self.store: TenantStore = with_revocation_list(
            open_store(store_url(config), config.keyring), config
        )
        if settings.store.seed is not None:
            await self._seed(config.resolve(settings.store.seed))
        self.shared = Shared(config, self.metrics, self.events, self.store)
        warning = startup_warning(settings)
        if warning is not None:
            log.warning("%s", warning)
        await self.shared.identifier.start()  # jwt mode: the provider's keys, fail-static
        self.seats = self.shared.seats
        self.usage = self.shared.usage
        self._remember_mtimes()
        lic = settings.license
        loop = asyncio.get_running_loop()
        for app, app_settings in settings.apps.items():
            up_host, up_port = _upstream_address(app_settings.upstream)
            proxy_settings = ProxySettings(
                license_header=lic.header,
                tenant_header=lic.tenant_header,
                role_header=lic.role_header,
                user_header=lic.user_header,
                host_header=(
                    None if app_settings.host == "preserve" else f"{up_host}:{up_port}".encode()
                ),
                connect_timeout=app_settings.connect_timeout,
                read_timeout=app_settings.read_timeout,
                keepalive_timeout=settings.server.keepalive_timeout,
                max_header_bytes=settings.server.max_header_bytes,
                max_headers=settings.server.max_headers,
                max_body_bytes=settings.server.max_body_bytes,
                header_timeout=settings.server.header_timeout,
                body_timeout=settings.server.body_timeout,
                max_connections=app_settings.max_connections,
                queue_timeout=app_settings.queue_timeout,
            )
            pool = UpstreamPool(up_host, up_port, proxy_settings, self.metrics.for_app(app))
            self.pools[app] = pool
            enforcer = Enforcer(app, config, self.shared)
            host, port = split_host_port(app_settings.listen)
            server = await loop.create_server(
                downstream_factory(enforcer, pool, proxy_settings, self.tracker),
                host,
                port,
                reuse_port=self.reuse_port or None,
                backlog=1024,
            )
            self.servers.append(server)
            log.info(
                "%s: listening on %s, upstream %s", app, app_settings.listen, app_settings.upstream
            )
        await self._start_admin(settings.admin.listen)
        self._tasks.append(loop.create_task(self.events.run(), name="events"))
        self._tasks.append(
            loop.create_task(self._watch(settings.server.reload_poll_interval), name="watcher")
        )
        self._tasks.append(loop.create_task(self._follow_store(), name="store-changes"))
        self._tasks.append(loop.create_task(self._flush_metrics(), name="metrics"))
        self._tasks.append(loop.create_task(self.usage.run(), name="usage"))
        for pool in self.pools.values():
            await pool.probe()
        self.started = True

    async def _start_admin(self, listen: str) -> None:
        self._admin = web.AppRunner(admin_app(self), access_log=None, handle_signals=False)
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
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal)

    def _on_sighup(self) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self.reload("SIGHUP")))
        self._tasks = [task for task in self._tasks if not task.done()]

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
            if not keyring.same_keys(self.shared.licenses.keyring):
                self._swap_keyring(keyring)
            self.metrics.reload_ok.inc()
            log.info(
                "reload (%s): routes %s, matrix %s, enforce %s",
                why, routes.sha, matrix.sha, rollout.describe(),
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
        log.info("reload: key ring now %s", ", ".join(sorted(keyring.keys)) or "empty")

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
        if self._admin is not None:
            await self._admin.cleanup()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in self._tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.shared.identifier.stop()
        self.metrics.flush()
        self.events.close()
        await self.usage.close()  # the last counts (kept in memory if the store is down)
        await self.store.close()
        self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def _upstream_address(url: str) -> tuple[str, int]:
    rest = url[len("http://") :].rstrip("/")
    if ":" in rest.rsplit("]", 1)[-1]:
        host, port = split_host_port(rest)
        return host, port
    return rest.strip("[]"), 80


def supervise(config_path: Path, workers: int, log_level: str) -> int:
    """``gateway serve --workers N``: N worker processes share the listeners through
    ``SO_REUSEPORT`` (the kernel spreads connections), and their metrics through
    prometheus-client multiprocess mode, so any worker answers ``/metrics`` for all.

    The supervisor forwards SIGHUP (reload) and SIGTERM/SIGINT (drain, then exit) to the
    workers and restarts a worker that dies unexpectedly."""
    import shutil
    import subprocess
    import sys
    import tempfile
    import time

    from prometheus_client import multiprocess

    require_c_parsers()
    config = load_config(config_path)  # fail here, once, with the full list of problems
    url = store_url(config)
    if per_process(url):
        # Each worker would hold its own tenants: a replayed signed suspend is applied once
        # per worker, a reinstate reaches one worker in N.
        raise ConfigError.single(
            str(config_path),
            "store.url",
            f"{url} lives inside one process, so {workers} workers would each keep their own "
            'tenants; use a shared store (store.url = "sqlite:///path/tenants.db" or '
            '"redis://host:6379/0") or --workers 1',
        )
    metrics_dir = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    command = [
        sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path),
        "--log-level", log_level, "--reuse-port",
    ]  # fmt: skip
    children: list[subprocess.Popen[bytes]] = []
    stopping = False
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    def spawn(index: int) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(command, env={**env, "GATEWAY_WORKER": str(index)})
        log.info("worker %d started (pid %d)", index, child.pid)
        return child

    try:
        children = [spawn(index) for index in range(workers)]
        while True:
            while received:
                signum = received.pop(0)
                if signum == signal.SIGHUP:
                    for child in children:
                        child.send_signal(signal.SIGHUP)
                else:
                    stopping = True
                    for child in children:
                        child.send_signal(signal.SIGTERM)
            if stopping:
                if all(child.poll() is not None for child in children):
                    return 0
            else:
                for index, child in enumerate(children):
                    if child.poll() is not None:
                        log.error("worker %d exited with %s; restarting", index, child.returncode)
                        multiprocess.mark_process_dead(child.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
                        time.sleep(0.5)  # a worker that cannot start must not spin
                        children[index] = spawn(index)
            time.sleep(0.1)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        shutil.rmtree(metrics_dir, ignore_errors=True)
