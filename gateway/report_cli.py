"""``gateway report``: what the events say, for Product.

    gateway report funnel --events events.jsonl [--events events.jsonl.1.gz] \\
        [--since 2024-05-01] [--window-days 14] [--json]
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from gateway.funnel import DEFAULT_WINDOW, EventReader, Funnel, FunnelRow


def _since(text: str) -> int:
    from gateway.issuer_cli import _date  # the one date syntax of every verb

    return _date(text)


def add_parsers(commands: Any) -> None:
    """Add ``report`` and its verbs to the ``gateway`` command's subparsers."""
    report = commands.add_parser("report", help="reports from the events").add_subparsers(
        dest="report_command", required=True, metavar="VERB"
    )
    funnel = report.add_parser(
        "funnel", help="per feature: blocks, tenants blocked, clicks, upgrades, conversion"
    )
    funnel.add_argument(
        "--events",
        type=Path,
        action="append",
        required=True,
        metavar="FILE",
        help="an events file (JSON lines; .gz too); repeat it for rotated files",
    )
    funnel.add_argument("--since", type=_since, metavar="DATE", help="only events from DATE on")
    funnel.add_argument(
        "--window-days",
        type=float,
        default=DEFAULT_WINDOW / 86400,
        help="an upgrade counts for a feature blocked or clicked this many days before it",
    )
    funnel.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    """The handler of ``gateway report``."""
    if args.window_days <= 0:
        print("gateway: --window-days must be positive", file=sys.stderr)
        return 2
    reader = EventReader(args.events, since=args.since)
    funnel = Funnel(window=args.window_days * 86400)
    for event in reader:
        funnel.add(event)
    rows = funnel.rows()
    skipped = reader.malformed + funnel.malformed
    if args.json:
        report = {
            "since": args.since,
            "window_days": args.window_days,
            "features": rows,
            "skipped_lines": skipped,
        }
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
    else:
        print(_table(rows, args.since, args.window_days))
    if skipped:
        print(f"gateway: skipped {skipped} lines that are not well-formed events", file=sys.stderr)
    return 0


_COLUMNS = ("feature", "app", "blocks", "tenants", "clicks", "upgrades", "conversion")


def _table(rows: list[FunnelRow], since: int | None, window_days: float) -> str:
    cells = [
        (
            row.feature,
            row.app or "-",
            str(row.blocks),
            str(row.tenants_blocked),
            str(row.clicks),
            str(row.upgrades),
            "-"
            if row.conversion is None
            else f"{row.conversion:.1%} ({row.tenants_upgraded}/{row.tenants_blocked})",
        )
        for row in rows
    ]
    widths = [max(len(text) for text in column) for column in zip(_COLUMNS, *cells, strict=False)]
    lines = []
    if since is not None:
        lines.append(f"events since {datetime.fromtimestamp(since, UTC):%Y-%m-%d %H:%M:%S} UTC")
    for line in (_COLUMNS, *cells):
        lines.append(
            "  ".join(
                text.ljust(width) if index < 2 else text.rjust(width)
                for index, (text, width) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
    if not rows:
        lines.append("(no feature_block, feature_block_summary or upgrade_click events)")
    lines.append(
        f"conversion: blocked tenants that upgraded within {window_days:g} days "
        "of a block or click on the feature"
    )
    return "\n".join(lines)
