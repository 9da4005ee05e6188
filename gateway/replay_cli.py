"""``gateway replay``: the classic regression suite, run before each rollout phase.

    gateway replay --har docs/examples/classic.har --app operations --config gateway.toml \\
        [--all] [--json] [--timeout 10]

Exit codes: 0 every replayed request reached the upstream byte for byte; 1 at least one did
not or could not be replayed (or the config is invalid, as for every verb); 2 the replay
could not run as asked: not a HAR 1.2 file, the app not in the config, no classic entry.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.config import load_config
from gateway.har import HarError, read_har
from gateway.matrix import APP_NAMES

if TYPE_CHECKING:  # the run itself (a whole gateway) is imported when the verb runs
    from gateway.replay import EntryResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Summary(msgspec.Struct, frozen=True):
    replayed: int
    passed: int
    failed: int
    errors: int
    skipped: int
    pass_rate: float | None  # passed / replayed; None when nothing was replayed

    @classmethod
    def of(cls, results: list[EntryResult]) -> Summary:
        counts = {kind: 0 for kind in ("pass", "fail", "error", "skipped")}
        for result in results:
            counts[result.result] += 1
        passed, failed, errors = counts["pass"], counts["fail"], counts["error"]
        replayed = passed + failed + errors
        rate = passed / replayed if replayed else None
        return cls(replayed, passed, failed, errors, counts["skipped"], rate)


def add_parsers(commands: Any) -> None:
    """Add ``replay`` to the ``gateway`` command's subparsers."""
    verb = commands.add_parser(
        "replay", help="replay recorded classic requests (HAR 1.2) through a real gateway"
    )
    verb.add_argument("--har", type=Path, required=True, metavar="FILE", help="a HAR 1.2 file")
    verb.add_argument("--app", required=True, choices=APP_NAMES)
    verb.add_argument("--config", type=Path, default=Path("gateway.toml"))
    verb.add_argument(
        "--all", action="store_true", help="also replay entries that are not classic traffic"
    )
    verb.add_argument("--json", action="store_true")
    verb.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer")


def run(args: argparse.Namespace) -> int:
    """The handler of ``gateway replay``."""
    import uvloop

    from gateway.replay import replay
    from gateway.runtime import ParserError

    if not args.timeout > 0:
        return _usage("--timeout must be a positive number of seconds")
    try:
        har = read_har(args.har)
    except HarError as exc:
        return _usage(str(exc))
    config = load_config(args.config)
    if args.app not in config.settings.apps:
        return _usage(f"{args.config} has no [apps.{args.app}]: no listener to replay through")
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results = runner.run(
                replay(
                    config, args.app, har.log.entries, include_all=args.all, timeout=args.timeout
                )
            )
    except ParserError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_FAILED
    summary = Summary.of(results)
    if args.json:
        report = {
            "har": str(args.har),
            "app": args.app,
            "config": str(args.config),
            "summary": summary,
            "entries": results,
        }
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
    else:
        for result in results:
            print(_describe(result))
        print(_summary_line(args.app, summary))
    if summary.replayed == 0:
        return _usage(
            f"nothing replayed: no entry of {args.har} is classic traffic for {args.app} "
            "(--all replays every entry)"
        )
    return EXIT_OK if summary.passed == summary.replayed else EXIT_FAILED


def _usage(message: str) -> int:
    print(f"gateway: {message}", file=sys.stderr)
    return EXIT_USAGE


_LABELS = {"pass": "PASS", "fail": "FAIL", "error": "ERROR", "skipped": "SKIP"}


def _describe(result: EntryResult) -> str:
    """One line per entry; a failure adds the first difference, shown with a caret."""
    line = f"{_LABELS[result.result]:5}  entries[{result.entry}]  {result.method} {result.url}"
    if result.result == "skipped":
        return f"{line}  (skipped: {result.reason})"
    if result.result == "error":
        return f"{line}  (not replayable: {result.reason})"
    notes = [f"classic {result.classic}" if result.classic else "not classic"]
    if result.recorded_status is not None:
        notes.append(f"recorded {result.recorded_status}")
    if result.status != result.recorded_status:
        notes.append(f"answered {result.status if result.status is not None else 'nothing'}")
    lines = [f"{line}  ({', '.join(notes)})"]
    diff = result.difference
    if result.result == "fail":
        if diff is None or diff.offset is None:
            lines.append(f"       {result.reason}")
        else:
            lines.append(f"       {diff.message} (byte {diff.offset} of the request)")
            for label, shown in (("expected", diff.expected), ("received", diff.received)):
                lines.append(f"         {label}: " + ("(nothing)" if shown is None else shown))
            if diff.expected is not None and diff.received is not None and diff.caret is not None:
                lines.append(" " * (19 + diff.caret) + "^")
    return "\n".join(lines)


def _summary_line(app: str, summary: Summary) -> str:
    rate = "-" if summary.pass_rate is None else f"{summary.pass_rate:.1%}"
    return (
        f"classic regression suite ({app}): {summary.passed} of {summary.replayed} replayed "
        f"requests passed ({rate}); {summary.failed} failed, {summary.errors} not replayable, "
        f"{summary.skipped} skipped (not classic)"
    )
