"""The block → click → upgrade funnel per feature, counted from events files.

Per feature: ``blocks`` (``feature_block`` lines plus the ``count`` of every
``feature_block_summary``), ``tenants_blocked`` (distinct), ``clicks`` (``upgrade_click``),
``upgrades`` (``upgrade_complete`` events of a tenant that was blocked on the feature, or
clicked its nudge, in the ``window`` before) and ``conversion``: the share of the blocked
tenants that upgraded so. Pure counting; ``EventReader`` is the only I/O.

    reader = EventReader([Path("events.jsonl")], since=None)
    funnel = Funnel()
    for event in reader:
        funnel.add(event)
    rows = funnel.rows()
"""

from __future__ import annotations

import gzip
import math
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import msgspec

DEFAULT_WINDOW = 14 * 86400.0  # the attribution window of upgrade_complete, in seconds


class Event(msgspec.Struct):
    """The fields the funnel reads (other fields are ignored; their types are checked where
    they are used, so an unrelated event's odd field never spoils a line)."""

    event: str = ""  # "": a JSON line that is no event (an access-log line, say)
    ts: float = 0.0
    tenant: Any = None
    feature: Any = None
    app: Any = None
    count: Any = None


class FunnelRow(msgspec.Struct, frozen=True):
    feature: str
    app: str | None
    blocks: int
    tenants_blocked: int
    clicks: int
    upgrades: int
    tenants_upgraded: int
    conversion: float | None  # tenants_upgraded / tenants_blocked; None: nobody blocked


class EventReader:
    """The events of JSON-lines files (``.gz`` too) at or after ``since``, in file order.
    Lines that are not JSON objects of the expected shape are counted in ``malformed``."""

    def __init__(self, paths: Sequence[Path], since: float | None = None) -> None:
        self.paths = paths
        self.since = since
        self.malformed = 0
        self._decoder = msgspec.json.Decoder(Event)

    def __iter__(self) -> Iterator[Event]:
        for path in self.paths:
            with _open(path) as stream:
                for line in stream:
                    if not line.strip():
                        continue
                    try:
                        event = self._decoder.decode(line)
                    except msgspec.DecodeError:
                        self.malformed += 1
                        continue
                    if event.event and (self.since is None or event.ts >= self.since):
                        yield event


def _open(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":  # logrotate's compress
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")  # noqa: SIM115 - the caller's with-block closes it


class Funnel:
    """Counts events as they come (in any order) and attributes upgrades at the end."""

    def __init__(self, window: float = DEFAULT_WINDOW) -> None:
        self.window = window
        self.malformed = 0  # funnel events without a tenant or feature, or a bad count
        self._blocks: Counter[str] = Counter()
        self._clicks: Counter[str] = Counter()
        self._blocked: defaultdict[str, set[str]] = defaultdict(set)
        self._apps: dict[str, str] = {}
        self._features_of: defaultdict[str, set[str]] = defaultdict(set)
        # (tenant, feature) → its blocks and clicks as episodes [first, last], sorted, each
        # more than a window from the next: "was there activity in [u - window, u]?" is
        # then "is first <= u <= last + window for an episode?" — exact, in little memory.
        self._episodes: dict[tuple[str, str], list[list[float]]] = {}
        self._upgrades: list[tuple[str, float]] = []

    def add(self, event: Event) -> None:
        kind = event.event
        if kind not in ("feature_block", "feature_block_summary", "upgrade_click"):
            if kind == "upgrade_complete":
                if isinstance(event.tenant, str):
                    self._upgrades.append((event.tenant, event.ts))
                else:
                    self.malformed += 1
            return
        tenant, feature = event.tenant, event.feature
        count = 1 if kind != "feature_block_summary" else event.count
        if not (isinstance(tenant, str) and isinstance(feature, str)) or not (
            isinstance(count, int) and count >= 0
        ):
            self.malformed += 1
            return
        if isinstance(event.app, str):
            self._apps[feature] = event.app
        if kind == "upgrade_click":
            self._clicks[feature] += 1
        else:
            self._blocks[feature] += count
            self._blocked[feature].add(tenant)
        self._features_of[tenant].add(feature)
        self._note(self._episodes.setdefault((tenant, feature), []), event.ts)

    def _note(self, episodes: list[list[float]], ts: float) -> None:
        window = self.window
        at = bisect_right(episodes, [ts, math.inf])  # the first episode starting after ts
        if at > 0 and ts <= episodes[at - 1][1] + window:
            at -= 1  # ts extends the episode before it
        merged = [ts, ts]
        end = at
        while end < len(episodes) and episodes[end][0] <= merged[1] + window:
            merged = [min(merged[0], episodes[end][0]), max(merged[1], episodes[end][1])]
            end += 1
        episodes[at:end] = [merged]

    def rows(self) -> list[FunnelRow]:
        upgrades: Counter[str] = Counter()
        upgraded: defaultdict[str, set[str]] = defaultdict(set)
        for tenant, when in self._upgrades:
            for feature in self._features_of.get(tenant, ()):
                episodes = self._episodes[(tenant, feature)]
                if any(first <= when <= last + self.window for first, last in episodes):
                    upgrades[feature] += 1
                    if tenant in self._blocked[feature]:
                        upgraded[feature].add(tenant)
        rows = []
        for feature in {*self._blocks, *self._clicks}:
            blocked = len(self._blocked[feature])
            converted = len(upgraded[feature])
            rows.append(
                FunnelRow(
                    feature=feature,
                    app=self._apps.get(feature),
                    blocks=self._blocks[feature],
                    tenants_blocked=blocked,
                    clicks=self._clicks[feature],
                    upgrades=upgrades[feature],
                    tenants_upgraded=converted,
                    conversion=converted / blocked if blocked else None,
                )
            )
        rows.sort(key=lambda row: (-row.blocks, -row.clicks, row.feature))
        return rows
