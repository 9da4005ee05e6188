"""A real ``redis-server`` for the tests: a free loopback port, a temporary folder, no
persistence. ``make test`` installs the Debian package (scripts/system-deps); when the binary
is missing or the server does not start, the fixture fails with the reason — it never skips.

    server = RedisServer.start(tmp_path)
    server.url            # redis://127.0.0.1:<port>/0
    server.stop()         # an outage: the process is gone, the port refuses connections
    server.restart()      # the same port again (empty: nothing is persisted)

    server = start_redis(tmp_path)   # the same in a fixture: a failed test when it cannot
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import free_port, stop_process

START_DEADLINE_SECONDS = 10.0
STOP_DEADLINE_SECONDS = 10.0


class RedisServerError(RuntimeError):
    """``redis-server`` is missing or did not come up."""


class RedisServer:
    def __init__(self, binary: str, folder: Path, port: int) -> None:
        self.binary = binary
        self.folder = folder
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self._starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, folder: Path, attempts: int = 3) -> RedisServer:
        """A running server on a free port (another port if the first one was taken)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError(
                "redis-server is not installed: the Redis store tests need a real server "
                "(Debian package redis-server; `make test` installs it via scripts/system-deps)"
            )
        folder.mkdir(parents=True, exist_ok=True)
        error: RedisServerError | None = None
        for _ in range(attempts):
            server = cls(binary, folder, free_port())
            try:
                server._launch()
            except RedisServerError as exc:  # e.g. the port was taken meanwhile
                error = exc
                continue
            return server
        assert error is not None
        raise error

    def _launch(self) -> None:
        self._starts += 1
        log_path = self.folder / f"redis-{self.port}-{self._starts}.log"
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            str(log_path),
        ]
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                _, stderr = self.process.communicate()
                self.process = None
                raise RedisServerError(
                    f"redis-server on port {self.port} exited at start: "
                    f"{stderr.decode(errors='replace').strip()} {_tail(log_path)}"
                )
            if self.answers():
                return
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(
            f"redis-server on port {self.port} did not answer PING within "
            f"{START_DEADLINE_SECONDS:.0f} s {_tail(log_path)}"
        )

    def answers(self) -> bool:
        """True when the server answers PING (a raw RESP exchange, no client library)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        """Stop the server by its PID (SIGTERM, or SIGKILL for a crash; SIGKILL too when it
        does not exit in time) and wait until the process is gone."""
        process, self.process = self.process, None
        if process is None:
            return
        stop_process(process, kill=kill, grace=STOP_DEADLINE_SECONDS)
        if process.stderr is not None:
            process.stderr.close()

    def restart(self) -> None:
        """Start again on the same port, after ``stop()``."""
        self.stop()
        self._launch()


def start_redis(folder: Path) -> RedisServer:
    """A running server, or a failed test saying why (never a skip)."""
    try:
        return RedisServer.start(folder)
    except RedisServerError as exc:
        reason = str(exc)
    pytest.fail(reason, pytrace=False)


def _tail(log_path: Path, lines: int = 5) -> str:
    try:
        text = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "(log: " + " | ".join(text[-lines:]) + ")" if text else ""
