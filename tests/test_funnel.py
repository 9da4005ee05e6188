"""``gateway report funnel``: blocks (summaries included), tenants blocked, clicks, upgrades and
conversion per feature, from events files with the gateway's real event shapes."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.cli import main
from gateway.funnel import Event, Funnel, FunnelRow
from tests.conftest import IssueKey
from tests.harness import running_gateway
from tests.provisioning import event as billing_event
from tests.provisioning import provision

DAY = 86400.0
OPTIMIZE = "ops.basic_shipment_optimization"
T0 = 1_700_000_000.0


# The shapes the gateway writes (enforcer, event log, provisioning hook, entitlements API).
def blocked(tenant: str, ts: float, feature: str = OPTIMIZE) -> dict[str, Any]:
    return {
        "tenant": tenant, "tier": "core", "app": "operations", "feature": feature,
        "route": "/api/v1/shipments/{id}/optimize", "request_id": "r-1", "revision": "a/b",
        "role": "admin", "user": "u-1", "event": "feature_block", "ts": ts,
    }  # fmt: skip


def summary(tenant: str, ts: float, count: int, feature: str = OPTIMIZE) -> dict[str, Any]:
    return {
        "event": "feature_block_summary", "ts": ts, "tenant": tenant, "tier": "core",
        "app": "operations", "feature": feature, "count": count,
        "interval_start": ts - 60, "interval_end": ts,
    }  # fmt: skip


def clicked(tenant: str, ts: float, feature: str = OPTIMIZE) -> dict[str, Any]:
    return {
        "event": "upgrade_click", "ts": ts, "tenant": tenant, "tier": "core", "user": "u-1",
        "role": "admin", "feature": feature, "target": "tier:fleet", "source_request_id": "r-1",
    }  # fmt: skip


def upgraded(tenant: str, ts: float) -> dict[str, Any]:
    return {
        "tenant": tenant, "tier": "fleet", "previous_tier": "core", "addons": [],
        "addons_added": [], "license_id": "lic-2", "request_id": None, "revision": "a/b",
        "event": "upgrade_complete", "ts": ts,
    }  # fmt: skip


def count(events: list[dict[str, Any]], window: float = 14 * DAY) -> dict[str, FunnelRow]:
    funnel = Funnel(window=window)
    for event in events:
        funnel.add(msgspec.convert(event, Event))
    return {row.feature: row for row in funnel.rows()}


def write(path: Path, events: list[dict[str, Any]], *extra: str) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + "".join(extra))
    return path


def test_blocks_count_summaries_and_conversion_counts_tenants() -> None:
    rows = count(
        [
            blocked("acme", T0),
            summary("acme", T0 + 60, 41),
            blocked("beta", T0 + 1),
            blocked("gamma", T0 + 2, feature="ops.route_planning"),
            clicked("acme", T0 + 100),
            clicked("beta", T0 + 100),
            upgraded("acme", T0 + 2 * DAY),
            upgraded("acme", T0 + 3 * DAY),  # an add-on after the tier: two upgrades, one tenant
        ]
    )
    assert rows[OPTIMIZE] == FunnelRow(
        feature=OPTIMIZE, app="operations", blocks=43, tenants_blocked=2, clicks=2,
        upgrades=2, tenants_upgraded=1, conversion=0.5,
    )  # fmt: skip
    assert rows["ops.route_planning"].conversion == 0.0


@pytest.mark.parametrize(
    ("upgrade_after", "counts"),
    [
        pytest.param(13 * DAY, True, id="within-the-window"),
        pytest.param(14 * DAY, True, id="on-its-edge"),
        pytest.param(15 * DAY, False, id="after-the-window"),
        pytest.param(-1.0, False, id="before-the-block"),
    ],
)
def test_an_upgrade_counts_within_the_window_after_a_block(
    upgrade_after: float, counts: bool
) -> None:
    rows = count([blocked("acme", T0), upgraded("acme", T0 + upgrade_after)])
    assert (rows[OPTIMIZE].upgrades, rows[OPTIMIZE].tenants_upgraded) == (int(counts),) * 2


def test_a_click_alone_attributes_an_upgrade_but_is_no_conversion() -> None:
    rows = count([clicked("acme", T0), upgraded("acme", T0 + DAY)])
    row = rows[OPTIMIZE]
    assert (row.clicks, row.upgrades, row.tenants_blocked, row.conversion) == (1, 1, 0, None)


activity = st.tuples(
    st.sampled_from(["feature_block", "feature_block_summary", "upgrade_click"]),
    st.sampled_from(["acme", "beta"]),
    st.sampled_from(["f.one", "f.two"]),
    st.integers(0, 60),  # days
)
upgrade = st.tuples(st.sampled_from(["acme", "beta"]), st.integers(0, 60))


@settings(max_examples=200, deadline=None)
@given(st.lists(activity, max_size=25), st.lists(upgrade, max_size=6), st.randoms())
def test_attribution_matches_a_brute_force_count(
    activities: list[tuple[str, str, str, int]],
    upgrades: list[tuple[str, int]],
    shuffle: random.Random,
) -> None:
    window = 14 * DAY
    events = [
        (clicked if kind == "upgrade_click" else blocked)(tenant, day * DAY, feature)
        if kind != "feature_block_summary"
        else summary(tenant, day * DAY, 3, feature)
        for kind, tenant, feature, day in activities
    ] + [upgraded(tenant, day * DAY) for tenant, day in upgrades]
    shuffle.shuffle(events)  # rotated files and workers interleave: order must not matter
    rows = count(events, window)
    for feature in {feature for _, _, feature, _ in activities}:
        expected = 0
        for tenant, day in upgrades:
            u = day * DAY
            if any(
                t == tenant and f == feature and u - window <= d * DAY <= u
                for _, t, f, d in activities
            ):
                expected += 1
        assert rows[feature].upgrades == expected


# ------------------------------------------------------------------------------- the verb


def test_report_funnel_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    older = tmp_path / "events.jsonl.1.gz"
    with gzip.open(older, "wt") as stream:
        stream.write(json.dumps(blocked("old", T0 - 30 * DAY)) + "\n")
        stream.write(json.dumps(blocked("acme", T0)) + "\n")
    access_line = json.dumps({"ts": T0, "app": "operations", "method": "GET", "status": 200})
    current = write(
        tmp_path / "events.jsonl",
        [summary("acme", T0 + 60, 9), clicked("acme", T0 + 70), upgraded("acme", T0 + DAY)],
        access_line + "\n",  # an access-log line in a shared stdout capture: not an event
        "not json\n",
        '{"event": "feature_block", "ts": "yesterday"}\n',
    )
    since = "2023-11-01"  # after "old", before T0 (2023-11-14)
    args = ["report", "funnel", "--events", str(older), "--events", str(current)]
    assert main([*args, "--since", since]) == 0
    out, err = capsys.readouterr()
    header, first = out.splitlines()[1:3]
    assert header.split() == [
        "feature", "app", "blocks", "tenants", "clicks", "upgrades", "conversion",
    ]  # fmt: skip
    assert first.split() == [OPTIMIZE, "operations", "10", "1", "1", "1", "100.0%", "(1/1)"]
    assert "skipped 2 lines" in err

    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["since"] is None and report["skipped_lines"] == 2
    (row,) = report["features"]
    assert (row["blocks"], row["tenants_blocked"], row["conversion"]) == (11, 2, 0.5)


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        pytest.param(["--events", "missing.jsonl"], 1, "missing.jsonl", id="missing-file"),
        pytest.param(["--events", "e", "--since", "soon"], 2, "not a date", id="bad-date"),
        pytest.param(["--since", "2024-01-01"], 2, "--events", id="no-events"),
    ],
)
def test_report_funnel_usage_errors(
    argv: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if code == 2:
        with pytest.raises(SystemExit) as exited:
            main(["report", "funnel", *argv])
        assert exited.value.code == 2
    else:
        assert main(["report", "funnel", *argv]) == code
    assert message in capsys.readouterr().err


async def test_funnel_of_a_running_gateway(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    issue_key: IssueKey,
    provision_secret: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Blocks past the per-interval limit become a summary; the report still counts each."""
    acme_core = issue_key(sub="acme", tier="core", serial=1)
    beta_core = issue_key(sub="beta", tier="core", serial=1)
    url_path = "/api/v1/shipments/1/optimize"
    extra = "feature_blocks_per_interval = 10\nsummary_interval = 3600\n"
    async with (
        running_gateway(tmp_path, key_dir, upstream_ports, extra=extra) as gateway,
        aiohttp.ClientSession() as session,
    ):
        status, _ = await provision(session, gateway, billing_event("license", key=acme_core))
        assert status == 200
        for key in [acme_core] * 13 + [beta_core]:
            async with session.post(
                gateway.url("operations", url_path), headers={"X-License-Key": key}
            ) as response:
                assert response.status == 403
        # What the entitlements API emits for a click on the nudge.
        gateway.runtime.events.emit(
            "upgrade_click", tenant="acme", tier="core", user="u-1", role="admin",
            feature=OPTIMIZE, target="tier:fleet", source_request_id=None, app="operations",
        )  # fmt: skip
        fleet = issue_key(sub="acme", tier="fleet", serial=2)
        status, _ = await provision(session, gateway, billing_event("license", key=fleet))
        assert status == 200
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("feature_block") == 11 and kinds.count("feature_block_summary") == 1
    assert main(["report", "funnel", "--events", str(tmp_path / "events.jsonl"), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["features"]
    assert row == {
        "feature": OPTIMIZE, "app": "operations", "blocks": 14, "tenants_blocked": 2,
        "clicks": 1, "upgrades": 1, "tenants_upgraded": 1, "conversion": 0.5,
    }  # fmt: skip
