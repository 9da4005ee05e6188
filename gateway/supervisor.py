"""``gateway serve --workers N``: one supervisor process and N gateway worker processes.

The workers share the listeners through ``SO_REUSEPORT`` (the kernel spreads connections)
and their metrics through prometheus-client multiprocess mode, so any worker answers
``/metrics`` for all. The supervisor forwards SIGHUP (reload), SIGUSR1 (reopen log files)
and SIGTERM/SIGINT (drain, then exit) to the workers and restarts a worker that dies
unexpectedly. It runs no event loop: it only starts, signals and waits for processes.

    sys.exit(supervise(Path("gateway.toml"), workers=4, log_level="INFO"))
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import multiprocess

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.runtime import require_c_parsers
from gateway.store import per_process

log = logging.getLogger(__name__)

# Passed on to every worker as they are; SIGTERM and SIGINT also stop the supervisor.
FORWARDED = (signal.SIGHUP, signal.SIGUSR1)
STOPPING = (signal.SIGTERM, signal.SIGINT)
RESTART_PAUSE = 0.5  # seconds before restarting a dead worker: one that cannot start must not spin
POLL = 0.1  # seconds between looks at signals and workers


def supervise(config_path: Path, workers: int, log_level: str) -> int:
    """Run ``workers`` gateway processes until SIGTERM/SIGINT; the exit status (0)."""
    require_c_parsers()
    config = load_config(config_path)  # fail here, once, with the full list of problems
    url = config.store_url
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
        received.append(signum)  # handled in the loop below, outside the signal handler

    for sig in (*FORWARDED, *STOPPING):
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
                if signum not in FORWARDED:
                    stopping = True
                for child in children:
                    child.send_signal(signum if signum in FORWARDED else signal.SIGTERM)
            if stopping:
                if all(child.poll() is not None for child in children):
                    return 0
            else:
                for index, child in enumerate(children):
                    if child.poll() is not None:
                        log.error("worker %d exited with %s; restarting", index, child.returncode)
                        multiprocess.mark_process_dead(child.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
                        time.sleep(RESTART_PAUSE)
                        children[index] = spawn(index)
            time.sleep(POLL)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        shutil.rmtree(metrics_dir, ignore_errors=True)
