"""The gateway's few error types, each carrying structured attributes.

``ConfigProblem`` is one thing wrong in one file; ``ConfigError`` carries all of them, so
``gateway check`` and the hot reloader can list every problem at once. ``LicenseError``
carries one stable reason code from docs/design.md §4.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem in one configuration file: which file, which key, which line."""

    file: str
    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        key = f" [{self.key}]" if self.key else ""
        return f"{where}{key}: {self.message}"


class ConfigError(Exception):
    """Configuration that cannot be used; ``problems`` lists every finding."""

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def single(cls, file: str, key: str, message: str) -> ConfigError:
        return cls([ConfigProblem(file, key, message)])


class LicenseError(Exception):
    """A license key that cannot be trusted; ``reason`` is a stable code (docs/design.md §4)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class RequestError(Exception):
    """A request the gateway answers itself with a problem+json: HTTP ``status``, a stable
    ``code``, a ``title``, the precise ``detail``, and headers to add (``Retry-After``)."""

    def __init__(
        self,
        status: int,
        code: str,
        title: str,
        detail: str,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.headers = headers


class IdentityError(Exception):
    """Who is asking could not be established, or is not who the license says.

    ``code`` is stable: ``identity_untrusted`` and ``identity_invalid`` (401),
    ``tenant_mismatch`` (403), or ``bad_header`` (400). Like ``LicenseError`` on the request
    path, it is returned as a value (never raised there), so the common failures are built
    once and shared."""

    def __init__(self, code: str, status: int, title: str, detail: str) -> None:
        self.code = code
        self.status = status
        self.title = title
        self.detail = detail
        super().__init__(f"{code}: {detail}")
