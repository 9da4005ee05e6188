"""Reading TOML files into typed structs while collecting every problem with file, key, line.

msgspec stops at the first validation error of a document, so each section (one route,
one tier, one feature) is converted on its own; a file with five mistakes reports five.

    doc = TomlDocument.read(Path("routes.toml"))
    route = doc.convert(raw, RouteSpec, key="routes[3]", header="[[routes]]", index=3)
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from gateway.errors import ConfigError, ConfigProblem

T = TypeVar("T")

_TOML_LINE = re.compile(r"at line (\d+)")
# "... - at `$.a.b`", or "... - at `key` in `$.a`" when a table's key (not value) is wrong.
_MSGSPEC_PATH = re.compile(r" - at `(?:key` in `)?\$(.*)`$")


class TomlDocument:
    """One parsed TOML file: its data, its text (for line look-ups) and its digest."""

    __slots__ = ("path", "name", "text", "data", "sha", "problems", "_lines", "_header_lines")

    def __init__(self, path: Path, text: str, data: dict[str, Any]) -> None:
        self.path = path
        self.name = str(path)
        self.text = text
        self.data = data
        self.sha = hashlib.sha256(text.encode()).hexdigest()[:12]
        self.problems: list[ConfigProblem] = []
        self._lines = [line.strip() for line in text.splitlines()]
        self._header_lines: dict[str, list[int]] = {}

    @classmethod
    def read(cls, path: Path) -> TomlDocument:
        """Parse ``path``; raise ``ConfigError`` naming the file (and line) if it cannot be."""
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                [ConfigProblem(str(path), "", f"cannot read: {exc.strerror}")]
            ) from exc
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problem = ConfigProblem(str(path), "", f"not UTF-8 (byte {exc.start})")
            raise ConfigError([problem]) from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            found = _TOML_LINE.search(str(exc))
            line = int(found.group(1)) if found else None
            problem = ConfigProblem(str(path), "", f"TOML syntax error: {exc}", line)
            raise ConfigError([problem]) from exc
        return cls(path, text, data)

    def problem(
        self,
        key: str,
        message: str,
        *,
        header: str | None = None,
        index: int = 0,
        line: int | None = None,
    ) -> None:
        """Record a problem at ``key``; ``header`` locates its line (the ``index``-th one)."""
        if header:
            line = self.line_of(header, index)
        found = ConfigProblem(self.name, key, message, line)
        if found not in self.problems:  # inherited sections would report the same twice
            self.problems.append(found)

    def convert(
        self, raw: Any, type_: type[T], *, key: str, header: str | None = None, index: int = 0
    ) -> T | None:
        """Convert ``raw`` to ``type_``; on failure record the problem and return None."""
        try:
            return msgspec.convert(raw, type_)
        except msgspec.ValidationError as exc:
            message = str(exc)
            found = _MSGSPEC_PATH.search(message)
            full_key = key
            if found:
                message = message[: found.start()]
                full_key = f"{key}{found.group(1)}" if key else found.group(1).lstrip(".")
            self.problem(full_key, message, header=header, index=index)
            return None

    def line_of(self, header: str, index: int = 0) -> int | None:
        """Line number (1-based) of the ``index``-th line starting with ``header``.

        The lines starting with each header asked for are found in one pass and kept, so
        a routes.toml of 50,000 routes costs one scan, not one per route."""
        found = self._header_lines.get(header)
        if found is None:
            found = [
                number
                for number, line in enumerate(self._lines, start=1)
                if line.startswith(header)
            ]
            self._header_lines[header] = found
        return found[index] if 0 <= index < len(found) else None

    def line_of_key(self, key: str) -> int | None:
        """Line (1-based) where top-level ``key`` is first defined: an assignment before the
        first table header, or a ``[key]``, ``[key.sub]`` or ``[[key]]`` header."""
        name = rf"""(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')"""
        header = re.compile(rf"^\[\[?\s*{name}\s*[.\]]")
        assignment = re.compile(rf"^{name}\s*[.=]")
        in_root = True
        for number, line in enumerate(self.text.splitlines(), start=1):
            stripped = line.strip()
            if stripped.startswith("["):
                in_root = False
                if header.match(stripped):
                    return number
            elif in_root and assignment.match(stripped):
                return number
        return None

    def raise_if_problems(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)
