"""The rollout runbook (docs/operations.md, "Rollout runbook") and the rollout settings'
documentation cannot drift: every ``toml`` block of the runbook, merged into a copy of the
shipped gateway.toml, passes ``gateway check`` and sets what it says; every ``promql`` block
is the query of the dashboard panel its first line names; every panel of the dashboard's
rollout row is in the runbook; every rollout setting is in the README's "Rolling out" and in
docs/design.md §9."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.cli import main
from gateway.config import load_settings
from gateway.rollout import CandidateSettings, RolloutSettings
from tests.conftest import REPO
from tests.harness import write_candidate_matrix
from tests.test_prometheus import DASHBOARD, dashboard_queries

ROLLOUT_ROW = "Rolling out: enforcement modes, candidate, unmatched"
# The rollout keys of an [apps.<name>] table (the other rollout keys are whole tables).
APP_KEYS = ("enforce", "default_hosts", "host_feature")


def section(text: str, heading: str) -> str:
    """From ``heading`` (a whole line) to the next heading of the same level."""
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n")
    end = text.find(f"\n{level} ", start + len(heading) + 2)
    return text[start : end if end != -1 else len(text)]


RUNBOOK = section((REPO / "docs" / "operations.md").read_text(), "## Rollout runbook")


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.M | re.S)


# ------------------------------------------------------------------ the toml blocks


def merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in change.items():
        old = merged.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            value = merge(old, value)
        merged[key] = value
    return merged


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def toml_text(table: dict[str, Any], path: tuple[str, ...] = ()) -> str:
    """``table`` as TOML: its values, then each sub-table under its own header."""
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items() if not _is_table(v)]
    for key, value in table.items():
        if _is_table(value):
            header = ".".join(json.dumps(part) for part in (*path, key))
            lines.append(f"\n[{header}]\n" + toml_text(value, (*path, key)))
    return "\n".join(lines)


def _is_table(value: Any) -> bool:
    # an empty table is written inline ({}): a header for it would say nothing
    return isinstance(value, dict) and bool(value)


def leaves(table: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found: list[tuple[tuple[str, ...], Any]] = []
    for key, value in table.items():
        if isinstance(value, dict):
            found.extend(leaves(value, (*path, key)))
        else:
            found.append(((*path, key), value))
    return found


def provide_named_files(folder: Path, settings: dict[str, Any]) -> None:
    """The cohort and candidate files a block names, as the runbook has them made."""
    cohort = settings.get("rollout", {}).get("enforce_tenants_file")
    if cohort is not None:
        (folder / cohort).write_text("# first adopters\ncust-0042\ncust-0107\n")
    candidate = settings.get("candidate", {})
    if "tier_matrix" in candidate:
        write_candidate_matrix(folder, candidate["tier_matrix"])
    if "routes" in candidate:
        shutil.copy(REPO / "routes.toml", folder / candidate["routes"])


def test_the_runbook_has_a_config_block_for_every_phase_and_its_rollback() -> None:
    phases = [h for h in re.findall(r"^### .+$", RUNBOOK, re.M) if h.startswith("### Phase ")]
    assert [h.split(":")[0] for h in phases] == [f"### Phase {n}" for n in range(4)]
    for heading in phases:
        text = section(RUNBOOK, heading)
        assert code_blocks(text, "toml"), f"{heading}: no config"
        assert "**Roll back**" in text, f"{heading}: nothing about rolling back"


TOML_BLOCKS = code_blocks(RUNBOOK, "toml")


@pytest.mark.parametrize(
    "block", [pytest.param(b, id=f"block{n}") for n, b in enumerate(TOML_BLOCKS)]
)
def test_each_runbook_config_block_merged_into_gateway_toml_passes_gateway_check(
    block: str, config_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    change = tomllib.loads(block)
    assert change, "an empty block"
    path = config_dir / "gateway.toml"
    merged = merge(tomllib.loads(path.read_text()), change)
    path.write_text(toml_text(merged) + "\n")
    provide_named_files(config_dir, merged)
    code = main(["check", "--config", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, f"{block}\n{out}{err}"
    settings = load_settings(path)
    for keys, value in leaves(change):
        found: Any = settings
        for key in keys:
            found = found[key] if isinstance(found, dict) else getattr(found, key)
        assert (list(found) if isinstance(found, tuple) else found) == value, keys


# ------------------------------------------------------------------ the promql blocks


def without_variables(expr: str) -> str:
    """A dashboard query as the runbook shows it: the job, instance and app variables'
    matchers left out, the intervals and the top N fixed."""
    expr = re.sub(r'(job|instance|app)=~"\$\1"(, )?', "", expr).replace("{}", "")
    for variable, value in (("$__rate_interval", "5m"), ("$__range", "1d"), ("$topn", "10")):
        expr = expr.replace(variable, value)
    return expr


def test_each_runbook_query_is_the_query_of_the_panel_it_names() -> None:
    panels: dict[str, list[str]] = {}
    for title, expr in dashboard_queries():
        panels.setdefault(title, []).append(without_variables(expr))
    blocks = code_blocks(RUNBOOK, "promql")
    assert blocks
    for block in blocks:
        first, *query = block.strip().splitlines()
        title = first.removeprefix("# ")
        assert title in panels, f"no dashboard panel {title!r}"
        assert " ".join(line.strip() for line in query) in panels[title], block


def test_every_panel_of_the_rollout_row_is_in_the_runbook() -> None:
    named = {block.splitlines()[0].removeprefix("# ") for block in code_blocks(RUNBOOK, "promql")}
    row: str | None = None
    in_row: list[str] = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
        elif row == ROLLOUT_ROW:
            in_row.append(panel["title"])
    assert len(in_row) >= 8, f"the dashboard has no row {ROLLOUT_ROW!r}?"
    assert set(in_row) <= named, sorted(set(in_row) - named)
    assert f"*{ROLLOUT_ROW}*" in RUNBOOK


def test_what_the_runbook_names_in_italics_is_on_the_dashboard() -> None:
    """Panel, row and variable names, exactly as the dashboard spells them."""
    dashboard = json.loads(DASHBOARD.read_text())
    names = {panel["title"] for panel in dashboard["panels"]}
    names |= {variable.get("label", "") for variable in dashboard["templating"]["list"]}
    italics = re.findall(r"(?<![*\w])\*([^*\s][^*]*?)\*(?![*\w])", RUNBOOK)
    assert italics
    unknown = {" ".join(text.split()) for text in italics} - names
    assert not unknown, sorted(unknown)


# ------------------------------------------------------------------ the settings


def rollout_keys() -> list[str]:
    return [
        *(f"apps.<name>.{key}" for key in APP_KEYS),
        *(f"rollout.{f.name}" for f in msgspec.structs.fields(RolloutSettings)),
        *(f"candidate.{f.name}" for f in msgspec.structs.fields(CandidateSettings)),
    ]


@pytest.mark.parametrize(
    ("document", "heading"),
    [
        pytest.param("README.md", "## Rolling out", id="readme"),
        pytest.param("docs/design.md", "## 9. Rollout, seats, audit", id="design"),
    ],
)
def test_every_rollout_setting_is_documented(document: str, heading: str) -> None:
    text = section((REPO / document).read_text(), heading)
    missing = [key for key in rollout_keys() if f"`{key}`" not in text]
    assert not missing, f"{document} {heading}: {missing}"
    assert "operations.md#rollout-runbook" in text
