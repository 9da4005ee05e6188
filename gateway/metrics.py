"""Prometheus metrics (the README's Metrics section), with label children bound once.

The hot path never calls ``.labels()``: ``AppMetrics`` holds the children of one app, and
feature-block children are made per (feature, tier) when a config is loaded. No tenant id
ever becomes a label (it goes into events instead).

The per-request series are ``Tally`` / ``FastHistogram`` objects: a plain attribute add
(no lock, ~40 ns) instead of prometheus-client's locked value (~300 ns, ~10 % of a
request's CPU, measured). ``Metrics.flush`` moves what they counted into the prometheus
children; the runtime flushes every second and before every scrape, so ``/metrics`` is
exact and, with ``--workers``, the multiprocess files are at most a quarter second behind.

    metrics = Metrics()
    ops = metrics.for_app("operations")
    ops.outcome["allowed"].inc()
"""

from __future__ import annotations

import os
import platform
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from gateway import __version__
from gateway.matrix import APP_NAMES, AppName, TierMatrix


def multiprocess_dir() -> str | None:
    """Set (by ``gateway serve --workers N``) when metrics are shared between workers."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


STORE_OPS = ("get", "classic_key", "provision", "seats", "usage", "reminders")
OUTCOMES = (
    "allowed",
    "blocked",
    "classic",
    "public",
    "unlicensed",
    "rejected",
    "upstream_error",
    "shadow_blocked",  # enforce = "shadow": would have been refused, forwarded
    "unenforced",  # enforce = "off": forwarded undecided
    "unmatched_allowed",  # no route matched, unmatched = "allow": forwarded
    "tenant_api",  # a tenant endpoint under [entitlements] prefix answered (200/202/304)
)
CANDIDATE_CHANGES = ("newly_blocked", "newly_allowed", "feature_changed")
UPSTREAM_ERROR_KINDS = ("refused", "reset", "timeout", "bad_response", "overloaded")
LICENSE_RESULTS = (
    "valid",
    "license_malformed",
    "license_unknown_key",
    "license_bad_signature",
    "license_check_busy",  # a never-seen key while the signature-check budget is spent
)

_REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
_DECISION_BUCKETS = (1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2)


class Tally:
    """A counter child for the hot path: ``inc`` adds to a plain int; ``flush`` hands the
    sum to the prometheus child."""

    __slots__ = ("n", "_child")

    def __init__(self, child: Any) -> None:
        self.n = 0
        self._child = child

    def inc(self, amount: int = 1) -> None:
        self.n += amount

    def flush(self) -> None:
        if self.n:
            self._child.inc(self.n)
            self.n = 0


class JointTally(Tally):
    """A ``Tally`` whose count goes to several prometheus children: one add on the hot path
    for counts that always move together (a flood key's outcome, key result and cache
    miss)."""

    __slots__ = ("_children",)

    def __init__(self, children: tuple[Any, ...]) -> None:
        super().__init__(children[0])
        self._children = children

    def flush(self) -> None:
        if self.n:
            for child in self._children:
                child.inc(self.n)
            self.n = 0


class FastHistogram:
    """A histogram child for the hot path: a bisect and two adds per observation."""

    __slots__ = ("_bounds", "_counts", "_sum", "_child")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds: list[float] = list(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def flush(self) -> None:
        # prometheus-client keeps one (non-cumulative) value per bucket and one for the
        # sum; adding to them is what its own observe() does, n times at once.
        counts = self._counts
        for index, count in enumerate(counts):
            if count:
                self._child._buckets[index].inc(count)
                counts[index] = 0
        if self._sum:
            self._child._sum.inc(self._sum)
            self._sum = 0.0


class AppMetrics:
    """The children of one app's labelled metrics, bound once."""

    __slots__ = (
        "outcome",
        "classic",
        "duration",
        "upstream_errors",
        "feature_blocks",
        "shadow_blocks",
        "candidate_diff",
        "_parent",
    )

    def __init__(self, parent: Metrics, app: str) -> None:
        self._parent = parent
        self.outcome = {
            o: parent.tally(parent.requests.labels(app=app, outcome=o)) for o in OUTCOMES
        }
        self.classic = parent.tally(parent.classic.labels(app=app))
        self.duration = parent.fast_histogram(parent.request_duration.labels(app=app))
        self.upstream_errors = {
            kind: parent.upstream_errors.labels(app=app, kind=kind) for kind in UPSTREAM_ERROR_KINDS
        }
        self.feature_blocks: dict[tuple[str, str], Tally] = {}
        self.shadow_blocks: dict[tuple[str, str], Tally] = {}
        self.candidate_diff = {
            change: parent.tally(parent.candidate_diff.labels(app=app, change=change))
            for change in CANDIDATE_CHANGES
        }

    def bind_features(self, app: str, matrix: TierMatrix) -> None:
        """Children for every (feature of this app, tier); called on every config load."""
        tally = self._parent.tally
        pairs = [
            (feature, tier)
            for feature, spec in matrix.features.items()
            if spec.app == app
            for tier in matrix.tiers
        ]
        blocks, shadow = self._parent.feature_blocks, self._parent.shadow_blocks
        self.feature_blocks = {
            (f, t): tally(blocks.labels(app=app, feature=f, tier=t)) for f, t in pairs
        }
        self.shadow_blocks = {
            (f, t): tally(shadow.labels(app=app, feature=f, tier=t)) for f, t in pairs
        }

    def feature_block(self, app: str, feature: str, tier: str, shadow: bool = False) -> Tally:
        """``gateway_feature_block_total`` (or, for a block in shadow mode,
        ``gateway_shadow_block_total``) of one (feature, tier)."""
        children = self.shadow_blocks if shadow else self.feature_blocks
        child = children.get((feature, tier))
        if child is None:  # a tier the matrix no longer has: rare, so bind lazily
            family = self._parent.shadow_blocks if shadow else self._parent.feature_blocks
            child = self._parent.tally(family.labels(app=app, feature=feature, tier=tier))
            children[(feature, tier)] = child
        return child


class Metrics:
    """Every metric of the gateway, in one registry (a fresh one per ``Metrics``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # *_created series only double the scrape size
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self._fast: list[Tally | FastHistogram] = []
        self._by_child: dict[int, Tally | FastHistogram] = {}
        self._joint: dict[tuple[int, ...], Tally] = {}
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "Requests by app and outcome", ["app", "outcome"], registry=r
        )
        self.feature_blocks = Counter(
            "gateway_feature_block",
            "Requests blocked because the tier does not include the feature",
            ["app", "feature", "tier"],
            registry=r,
        )
        self.shadow_blocks = Counter(
            "gateway_shadow_block",
            'Requests enforce = "shadow" forwarded although the tier lacks the feature',
            ["app", "feature", "tier"],
            registry=r,
        )
        self.candidate_diff = Counter(
            "gateway_candidate_diff",
            "Requests the [candidate] configuration decides differently, by app and change",
            ["app", "change"],
            registry=r,
        )
        self.classic = Counter(
            "gateway_classic_passthrough",
            "Classic X Dispatch requests forwarded untouched",
            ["app"],
            registry=r,
        )
        self.license_checks = Counter(
            "gateway_license_checks", "License key verifications by result", ["result"], registry=r
        )
        self.license_cache = Counter(
            "gateway_license_cache", "License cache look-ups", ["result"], registry=r
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from request head to response end, by app",
            ["app"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.decision_duration = Histogram(
            "gateway_decision_duration_seconds",
            "Time to decide one request (canonical path, route, license, decision)",
            buckets=_DECISION_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Upstream failures by app and kind",
            ["app", "kind"],
            registry=r,
        )
        self.config_reloads = Counter(
            "gateway_config_reloads", "Reloads of routes.toml and tier_matrix.toml", ["result"],
            registry=r,
        )  # fmt: skip
        self.config_info = Gauge(
            "gateway_config_info",
            "Revisions of the loaded routes and tier matrix, and the apps' enforcement modes",
            ["routes_sha", "matrix_sha", "enforce"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._info_labels: tuple[str, str, str] | None = None
        self.events_dropped = Counter(
            "gateway_events_dropped", "Analytics events dropped", ["sink"], registry=r
        )
        self.store_errors = Counter(
            "gateway_store_errors", "Tenant store failures by operation", ["op"], registry=r
        )
        for op in STORE_OPS:  # a series at 0 from the start, so rate() has a baseline
            self.store_errors.labels(op=op)
        ProcessCollector(registry=r)
        r.register(BuildInfoCollector())
        self.license_result = {
            result: self.tally(self.license_checks.labels(result=result))
            for result in LICENSE_RESULTS
        }
        self.cache_hit = self.tally(self.license_cache.labels(result="hit"))
        self.cache_miss = self.tally(self.license_cache.labels(result="miss"))
        self.decision_timer = self.fast_histogram(self.decision_duration)
        self.reload_ok = self.config_reloads.labels(result="success")
        self.reload_failed = self.config_reloads.labels(result="failure")
        self._apps = {app: AppMetrics(self, app) for app in APP_NAMES}

    def for_app(self, app: AppName) -> AppMetrics:
        return self._apps[app]

    def tally(self, child: Any) -> Tally:
        """The hot-path counter for a prometheus child (one per child, so a reload that
        binds the same labels again keeps counting into the same tally)."""
        found = self._by_child.get(id(child))
        if not isinstance(found, Tally):
            found = Tally(child)
            self._by_child[id(child)] = found
            self._fast.append(found)
        return found

    def joint_tally(self, *tallies: Tally) -> Tally:
        """One hot-path counter that counts into the children of all ``tallies`` (one per
        combination)."""
        children = tuple(tally._child for tally in tallies)
        key = tuple(id(child) for child in children)
        found = self._joint.get(key)
        if found is None:
            found = self._joint[key] = JointTally(children)
            self._fast.append(found)
        return found

    def fast_histogram(self, child: Any) -> FastHistogram:
        found = self._by_child.get(id(child))
        if not isinstance(found, FastHistogram):
            found = FastHistogram(child)
            self._by_child[id(child)] = found
            self._fast.append(found)
        return found

    def flush(self) -> None:
        """Move hot-path counts into the prometheus children (before a scrape, and every
        second for the multiprocess files)."""
        for fast in self._fast:
            fast.flush()

    def config_loaded(self, routes_sha: str, matrix: TierMatrix, enforce: str = "") -> None:
        """Expose the new revisions (and modes, ``operations=on,...``) and bind
        feature-block children for the new matrix."""
        labels = (routes_sha, matrix.sha, enforce)
        if self._info_labels is not None and self._info_labels != labels:
            if multiprocess_dir() is None:
                self.config_info.clear()
            else:  # the files of multiprocess mode cannot forget a series: zero it
                self.config_info.labels(*self._info_labels).set(0)
        self._info_labels = labels
        self.config_info.labels(*labels).set(1)
        for app, children in self._apps.items():
            children.bind_features(app, matrix)


class BuildInfoCollector:
    """``gateway_build_info{version, python} 1``: which release runs where. A collector,
    not a Gauge, so that with ``--workers`` it is one series, not one per worker file."""

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "gateway_build_info",
            "The gateway's version and the Python version running it (always 1)",
            labels=["version", "python"],
        )
        family.add_metric([__version__, platform.python_version()], 1)
        yield family


class WorkerProcessesCollector:
    """``process_*`` of a ``gateway serve --workers N`` as one figure for the whole gateway:
    whichever worker answers a scrape reports the supervisor and every worker, as the
    ``gateway_*`` counters are summed over the workers.

    CPU seconds, memory and open files add up; ``process_start_time_seconds`` is the latest
    start of any of them (a restarted worker shows, like the counter reset it causes), and
    ``process_max_fds`` is the lowest limit."""

    _COMBINE = {"process_start_time_seconds": max, "process_max_fds": min}

    def __init__(self, supervisor: int, proc: str = "/proc") -> None:
        self.supervisor = supervisor
        self.proc = proc

    def pids(self) -> list[int]:
        """The supervisor and its children: read from every ``/proc/<pid>/stat``, which
        needs no kernel option (``/proc/<pid>/task/<tid>/children`` does)."""
        found = [self.supervisor]
        with os.scandir(self.proc) as entries:
            for entry in entries:
                if not entry.name.isdigit():
                    continue
                try:
                    with open(os.path.join(entry.path, "stat"), "rb") as stat:
                        ppid = int(stat.read().rsplit(b")", 1)[-1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue  # gone meanwhile, or not ours to read
                if ppid == self.supervisor:
                    found.append(int(entry.name))
        return found

    def collect(self) -> Iterator[Metric]:
        totals: dict[str, tuple[str, str, float]] = {}  # name -> (type, help, value)
        for pid in self.pids():
            one = ProcessCollector(pid=_constant(pid), proc=self.proc, registry=None)
            for family in one.collect():
                value = family.samples[0].value
                seen = totals.get(family.name)
                if seen is not None:
                    value = self._COMBINE.get(family.name, _add)(seen[2], value)
                totals[family.name] = (family.type, family.documentation, value)
        for name, (kind, documentation, value) in totals.items():
            if kind == "counter":
                yield CounterMetricFamily(name, documentation, value=value)
            else:
                yield GaugeMetricFamily(name, documentation, value=value)


def _add(a: float, b: float) -> float:
    return a + b


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid


def multiprocess_registry() -> CollectorRegistry:
    """What ``/metrics`` exposes with ``--workers``: the ``gateway_*`` series summed over
    every worker's files, the build info once, and the processes of the whole gateway."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(BuildInfoCollector())
    if "GATEWAY_WORKER" in os.environ:  # started by the supervisor (gateway.runtime)
        registry.register(WorkerProcessesCollector(os.getppid()))
    else:
        ProcessCollector(registry=registry)
    return registry
