"""The relay timed without sockets: one client connection and one pooled upstream connection
on fake transports, driven through a real ``Runtime`` (its listener's protocol factory), for
the allowed, blocked and classic requests of ``bench.py``.

No kernel and no load generator, so what is timed is the gateway's own Python per request:
a before/after comparison of the request path takes a minute (a few per cent from run to
run; the table gives each median's range), where the CPU column of ``make bench`` needs a
quiet machine and nine minutes. It
reproduces ``make bench``'s before/after gaps in user time (loadtests/ANALYSIS.md), which
counting instructions (e.g. under cachegrind) does not: most of the gap is cache misses.

    python loadtests/relay_loop.py                      # this tree
    python loadtests/relay_loop.py --baseline e9b96f6   # and that commit's, interleaved
    python loadtests/relay_loop.py --bytecodes --baseline e9b96f6   # counted, not timed

``--bytecodes`` counts the Python bytecodes each request executes (a tracer, after the
warm-up), split into the relay (``gateway/proxy/``; a tree from before the package: its
``proxy.py``), the rest of ``gateway/`` (the enforcer, answers, events, ...) and the
harness: exact from run to run, so a change's cost is read in one run, without noise.

Each (tree, request) runs in a fresh interpreter pinned to one CPU (``--cpu``), imports the
tree's ``gateway`` (``PYTHONPATH``), warms up, then times ``--rounds`` rounds of
``--requests`` requests with the thread's CPU clock; the table gives the median and range.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402 - the load test's keys, config and requests

KINDS = ("allowed", "blocked", "classic")
UPSTREAM_BODY = (
    b'{"id":"shp_000001","status":"optimized","route":{"stops":3,"distance_km":12.4,'
    b'"eta_minutes":38},"driver":{"id":"drv_0017","name":"Sam Carter"},'
    b'"upstream":"bench-nginx","note":"synthetic JSON body for the load test"}'
)
UPSTREAM_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 30 Nov 2026 04:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n"
    b"\r\n%s" % (len(UPSTREAM_BODY), UPSTREAM_BODY)
)


class FakeTransport:
    """Just what the relay's protocols ask of a transport; writes are kept to be read."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.reading = True
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class _FakeServer:
    sockets: list[Any] = []

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass


async def _child(
    config: Path,
    request: bytes,
    expect: bytes,
    requests: int,
    rounds: int,
    count: bool = False,
) -> Any:
    """In the child: start the runtime on fake listeners; µs of CPU per request per round
    (``count``: bytecodes per request instead, by side and by function)."""
    loop = asyncio.get_running_loop()
    factories: list[Any] = []
    upstreams: list[tuple[Any, FakeTransport]] = []

    async def create_server(factory: Any, *args: Any, **kwargs: Any) -> _FakeServer:
        factories.append(factory)
        return _FakeServer()

    async def create_connection(factory: Any, *args: Any, **kwargs: Any) -> Any:
        protocol, transport = factory(), FakeTransport()
        protocol.connection_made(transport)
        upstreams.append((protocol, transport))
        return transport, protocol

    loop.create_server = create_server  # type: ignore[method-assign]
    loop.create_connection = create_connection  # type: ignore[method-assign]
    import gateway.runtime as runtime_module

    if "config_path" in inspect.signature(runtime_module.Runtime).parameters:
        runtime = runtime_module.Runtime(config)  # a tree from before Runtime(Config)
    else:
        from gateway.config import load_config

        runtime = runtime_module.Runtime(load_config(config))
    await runtime.start()
    client, wire = factories[0](), FakeTransport()  # the first listener: operations
    client.connection_made(wire)

    def answer_upstreams() -> None:
        for protocol, transport in upstreams:
            if transport.out:
                transport.out.clear()
                protocol.data_received(UPSTREAM_RESPONSE)

    async def one() -> bytes:
        client.data_received(request)
        answer_upstreams()
        for _ in range(50):  # a first request waits for its upstream connection (a task)
            if wire.out:
                reply = wire.out[0]
                wire.out.clear()
                return reply
            await asyncio.sleep(0)
            answer_upstreams()
        raise SystemExit("relay_loop: no answer to the request")

    for _ in range(2000):  # warm-up: caches, the pooled connection, the tenant look-ups
        reply = await one()
    if not reply.startswith(expect):
        raise SystemExit(f"relay_loop: expected {expect!r}, got {reply[:200]!r}")
    if count:
        return await _count_bytecodes(one, requests)
    results = []
    for _ in range(rounds):
        start = time.thread_time_ns()
        for _ in range(requests):
            await one()
        results.append((time.thread_time_ns() - start) / requests / 1000)
    return results


async def _count_bytecodes(one: Any, requests: int) -> dict[str, Any]:
    """Bytecodes per request of ``requests`` calls of ``one``, by side (``SIDES``) and by
    function (the gateway's own, ``file:function``)."""
    root = str(Path(os.environ["PYTHONPATH"]).resolve()) + "/"
    counts: dict[tuple[str, str], int] = {}

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        code = frame.f_code
        key = (code.co_filename.removeprefix(root), code.co_name)

        def opcode(frame: Any, event: str, arg: Any) -> Any:
            if event == "opcode":
                counts[key] = counts.get(key, 0) + 1
            return opcode

        return opcode

    sys.settrace(tracer)
    try:
        for _ in range(requests):
            await one()
    finally:
        sys.settrace(None)
    sides = dict.fromkeys(SIDES, 0.0)
    functions: dict[str, float] = {}
    for (filename, name), n in counts.items():
        sides[_side(filename)] += n / requests
        if filename.startswith("gateway/"):
            functions[f"{filename}:{name}"] = n / requests
    return {"sides": sides, "functions": functions}


SIDES = ("relay", "gateway", "harness")


def _side(filename: str) -> str:
    if filename.startswith(("gateway/proxy/", "gateway/proxy.py")):
        return "relay"
    return "gateway" if filename.startswith("gateway/") else "harness"


def _request(kind: str, keys: dict[str, str]) -> bytes:
    key = {"allowed": keys["fleet"], "blocked": keys["core"], "classic": bench.CLASSIC_KEY}[kind]
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-License-Key: %s\r\n"
        b"Content-Length: 0\r\n\r\n" % (bench.ROUTE.encode(), key.encode())
    )


def _configure(folder: Path, source: Path, keys_from: Path) -> Path:
    folder.mkdir()
    shutil.copytree(keys_from / "keys", folder / "keys")
    shutil.copy(keys_from / "tenants.toml", folder / "tenants.toml")
    ports = {"operations": 1, "client_portal": 2, "driver_app": 3, "admin": 4}  # never bound
    return bench.gateway_toml(folder, "gateway", ports, 5, "memory://", source)


def _run_child(tree: Path, config: Path, kind: str, keys: dict[str, str], args: Any) -> Any:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(config), kind]
    argv += ["--requests", str(args.requests), "--rounds", str(args.rounds)]
    if args.bytecodes:
        argv.append("--bytecodes")
    if args.cpu is not None and shutil.which("taskset"):
        argv = ["taskset", "-c", str(args.cpu), *argv]
    env = {**os.environ, "PYTHONPATH": str(tree), "RELAY_LOOP_KEYS": json.dumps(keys)}
    done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"relay_loop: {kind} in {tree} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="COMMIT", help="also time this commit's gateway")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (3)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per run (5)")
    parser.add_argument("--requests", type=int, default=20_000, help="per round (20,000)")
    parser.add_argument("--cpu", type=int, default=1, help="pin each run to this CPU (1)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="allowed,blocked,classic")
    parser.add_argument(
        "--bytecodes", action="store_true", help="count bytecodes per request instead of timing"
    )
    parser.add_argument("--top", type=int, default=0, help="with --bytecodes: list N functions")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        keys = json.loads(os.environ["RELAY_LOOP_KEYS"])
        config, kind = Path(args.child[0]), args.child[1]
        expect = b"HTTP/1.1 403" if kind == "blocked" else b"HTTP/1.1 200"
        request = _request(kind, keys)
        measured = asyncio.run(
            _child(config, request, expect, args.requests, args.rounds, args.bytecodes)
        )
        print(json.dumps(measured))
        return
    kinds = [kind for kind in args.kinds.split(",") if kind]
    if not kinds or set(kinds) - set(KINDS):
        parser.error(f"--kinds: some of {', '.join(KINDS)}")
    with tempfile.TemporaryDirectory(prefix="gateway-relay-loop-") as tmp:
        folder = Path(tmp)
        keys = bench.issue_keys(folder)
        trees = {"this tree": (bench.REPO, _configure(folder / "now", bench.REPO, folder))}
        if args.baseline:
            base, label = bench.export_tree(args.baseline, folder)
            trees[f"baseline {label}"] = (base, _configure(folder / "base", base, folder))
        if args.bytecodes:
            counted = {
                (name, kind): _run_child(tree, config, kind, keys, args)
                for kind in kinds
                for name, (tree, config) in trees.items()
            }
            _print_bytecodes(counted, kinds, list(trees), args.top)
            return
        runs: dict[tuple[str, str], list[float]] = {}
        for rep in range(args.reps):
            for kind in kinds:
                for name, (tree, config) in trees.items():
                    rounds = _run_child(tree, config, kind, keys, args)
                    runs.setdefault((name, kind), []).append(statistics.median(rounds))
                    print(f"relay_loop: rep {rep + 1} {kind:8} {name}: {rounds[-1]:.2f} µs")
    print()
    print("| request | " + " | ".join(f"{name}, µs per request" for name in trees) + " |")
    print("|---|" + "---:|" * len(trees))
    for kind in kinds:
        cells = []
        for name in trees:
            values = runs[(name, kind)]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})")
        print(f"| {kind} | " + " | ".join(cells) + " |")


def _print_bytecodes(
    counted: dict[tuple[str, str], dict[str, Any]], kinds: list[str], names: list[str], top: int
) -> None:
    print("| request | tree | relay (gateway/proxy) | rest of gateway/ | harness | total |")
    print("|---|---|---:|---:|---:|---:|")
    for kind in kinds:
        for name in names:
            sides = counted[(name, kind)]["sides"]
            cells = [f"{sides[side]:,.0f}" for side in SIDES]
            print(f"| {kind} | {name} | {' | '.join(cells)} | {sum(sides.values()):,.0f} |")
    if top:
        for (name, kind), found in counted.items():
            print(f"\n{kind}, {name}: the {top} functions of gateway/ with the most bytecodes")
            ranked = sorted(found["functions"].items(), key=lambda item: -item[1])
            for function, n in ranked[:top]:
                print(f"  {n:8.1f}  {function}")


if __name__ == "__main__":
    main()
