"""CSV files from other systems (billing exports, migration plans), read strictly.

Column names are matched without case or surrounding spaces; a missing required column, an
unknown one, or a bad value is a ``CsvError`` naming the file, line and column, so a typo in
a spreadsheet is never read as "no value".

    for row in read_rows(path, required=("tenant", "tier"), optional=("addons",)):
        row.text("tenant"), row.names("addons"), row.count("ops_users"), row.date("ends_at")
"""

from __future__ import annotations

import csv
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

_LIST_SEPARATORS = re.compile(r"[;,\s|]+")


class CsvError(ValueError):
    """A CSV file that cannot be used; the message names file, line and column."""


class Row:
    """One data line: values by (normalised) column name, with typed accessors."""

    __slots__ = ("file", "line", "_values")

    def __init__(self, file: str, line: int, values: dict[str, str]) -> None:
        self.file = file
        self.line = line
        self._values = values

    def error(self, column: str, message: str) -> CsvError:
        return CsvError(f"{self.file}:{self.line} [{column}]: {message}")

    def text(self, column: str) -> str:
        """The stripped value; '' when the column is absent or empty."""
        return self._values.get(column, "").strip()

    def required(self, column: str) -> str:
        value = self.text(column)
        if not value:
            raise self.error(column, "must not be empty")
        return value

    def names(self, column: str) -> tuple[str, ...]:
        """A list in one cell: ``a;b``, ``a b``, ``a|b`` or a quoted ``"a,b"``."""
        return tuple(name for name in _LIST_SEPARATORS.split(self.text(column)) if name)

    def count(self, column: str) -> int | None:
        """A whole number >= 0, or None when empty."""
        value = self.text(column)
        if not value:
            return None
        if not value.isdigit():
            raise self.error(column, f"{value!r} is not a whole number")
        return int(value)

    def date(self, column: str) -> int | None:
        """``YYYY-MM-DD`` (or an ISO date-time; UTC unless it says otherwise) → unix
        seconds, or None when empty."""
        value = self.text(column)
        if not value:
            return None
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise self.error(column, f"{value!r} is not a date (YYYY-MM-DD)") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return int(parsed.timestamp())


def utc_day(ts: int | None) -> str:
    """Unix seconds as the files write dates (``YYYY-MM-DD``, UTC); ``-`` for none."""
    return "-" if ts is None else time.strftime("%Y-%m-%d", time.gmtime(ts))


def read_rows(path: Path, *, required: Iterable[str], optional: Iterable[str] = ()) -> list[Row]:
    """Every data line of ``path`` (blank lines and lines starting with ``#`` skipped)."""
    required, optional = tuple(required), tuple(optional)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheets like to write a BOM
    except OSError as exc:
        raise CsvError(f"{name}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise CsvError(f"{name}: not UTF-8 text ({exc.reason})") from exc
    lines = [
        (number, line)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise CsvError(f"{name}: empty (expected a header line: {', '.join(required)})")
    parsed: list[list[str]] = []
    for number, line in lines:  # one record per line: no cell spans lines in these files
        try:
            parsed.append(next(csv.reader([line], skipinitialspace=True)))
        except csv.Error as exc:
            raise CsvError(f"{name}:{number}: {exc}") from exc
    header = [column.strip().lower() for column in parsed[0]]
    header_line = lines[0][0]
    missing = [column for column in required if column not in header]
    unknown = [column for column in header if column not in (*required, *optional)]
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            problems.append(f"unknown column(s) {', '.join(unknown)}")
        expected = ", ".join((*required, *optional))
        raise CsvError(f"{name}:{header_line}: {'; '.join(problems)} (columns: {expected})")
    if len(set(header)) != len(header):
        raise CsvError(f"{name}:{header_line}: a column is named twice")
    rows: list[Row] = []
    for (number, _), cells in zip(lines[1:], parsed[1:], strict=True):
        if len(cells) > len(header):
            raise CsvError(f"{name}:{number}: {len(cells)} values for {len(header)} columns")
        rows.append(Row(name, number, dict(zip(header, cells, strict=False))))
    return rows
