"""Which way a request goes before any license is looked at: classic traffic (by key or by
path prefix), a path refused as ambiguous, or a route look-up on the canonical path.

One pure function, ``classify``, used by the relay (``Enforcer.check``) and by ``gateway
explain`` / ``gateway test`` alike, so the tools can never disagree with the proxy. The
steps, in order: a classic key (with ``license.classic_keys = "store"``, only one the
store imported: the caller passes the store's answer, or gets ``ASK_STORE``), the canonical
path (``gateway.paths``; 400 ``path_rejected`` when ambiguous), a classic path prefix (the
target must already be canonical: classic traffic is forwarded byte for byte), the route.

    rules = ClassicRules.for_app(config, "operations")
    found = classify(rules, config.routes.apps["operations"], "POST", b"/api/v1/x?a=1", key)
    if found is ASK_STORE: ...look the key up, then classify(..., store_answer=known)
    found.kind        # CLASSIC_KEY, CLASSIC_PATH, REJECTED or ROUTED
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import msgspec

from gateway.license import ClassicKeys
from gateway.paths import PathRejected, canonical_path
from gateway.routes import AppRoutes, RouteMatch

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.matrix import AppName

# Classified.kind
CLASSIC_KEY: Final = 1  # a classic X Dispatch key: forwarded untouched, not decided
CLASSIC_PATH: Final = 2  # under a classic path prefix: forwarded untouched, not decided
REJECTED: Final = 3  # 400 path_rejected (``reason`` says why)
ROUTED: Final = 4  # decide on ``found`` (the route look-up of the canonical ``path``)
ASK_STORE_KIND: Final = 5  # a classic-looking key: whether the store imported it decides


class ClassicRules:
    """What makes a request classic on one app listener."""

    __slots__ = ("keys", "from_store", "prefixes")

    def __init__(self, keys: ClassicKeys, from_store: bool, prefixes: tuple[str, ...]) -> None:
        self.keys = keys
        self.from_store = from_store  # license.classic_keys = "store"
        self.prefixes = prefixes

    @classmethod
    def for_app(cls, config: Config, app: AppName) -> ClassicRules:
        settings = config.settings.apps.get(app)
        prefixes = tuple(settings.classic_path_prefixes) if settings is not None else ()
        return cls(config.classic, config.settings.license.classic_keys == "store", prefixes)


class Classified(msgspec.Struct):
    """The answer of ``classify``; the classic and store answers are shared constants (a
    msgspec Struct: most requests get one of their own)."""

    kind: int
    path: str = ""  # the canonical path ("" when classified by key or refused)
    target: bytes = b""  # what the upstream receives: canonical path + query
    found: RouteMatch | None = None  # ROUTED: the route look-up
    reason: str = ""  # REJECTED: why

    def __repr__(self) -> str:
        return f"Classified(kind={self.kind}, path={self.path!r}, reason={self.reason!r})"


CLASSIC_BY_KEY: Final = Classified(CLASSIC_KEY)
ASK_STORE: Final = Classified(ASK_STORE_KIND)
_NOT_ASCII: Final = Classified(REJECTED, reason="non-ASCII request target")
_NOT_CANONICAL_CLASSIC: Final = Classified(REJECTED, reason="classic path is not canonical")


def classify(
    rules: ClassicRules,
    routes: AppRoutes,
    method: str,
    target: bytes,
    key: bytes | None,
    store_answer: bool | None = None,
) -> Classified:
    """Classify one request (module docstring). ``key`` is the license key header as
    sent; ``store_answer`` whether the store imported it as a classic key (only asked for
    with ``classic_keys = "store"``, after ``ASK_STORE``)."""
    if key is not None and rules.keys.matches(key):
        if not rules.from_store:
            return CLASSIC_BY_KEY
        if store_answer is None:
            return ASK_STORE
        if store_answer:
            return CLASSIC_BY_KEY
        # A classic-looking key the store never imported buys nothing: it goes on as an
        # ordinary (and so malformed) license key.
    query = b""
    mark = target.find(b"?")
    if mark >= 0:
        target, query = target[:mark], target[mark:]
    try:
        path = canonical_path(target.decode("ascii"))
    except PathRejected as exc:
        return Classified(REJECTED, reason=exc.reason)
    except UnicodeDecodeError:
        return _NOT_ASCII
    canonical = path.encode()
    prefixes = rules.prefixes
    if prefixes and path.startswith(prefixes):
        if canonical != target:
            return _NOT_CANONICAL_CLASSIC
        return Classified(CLASSIC_PATH, path)
    target = canonical + query if query else canonical
    return Classified(ROUTED, path, target, routes.match(method, path))  # positional: per request
