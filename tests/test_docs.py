"""Documents that cannot drift: the support matrix and the customer page are what the matrix
generates, the support playbook has an entry for every code the source can answer, and the
licensing guide's diagrams hold together."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import LicenseSettings
from gateway.docs import fill_blocks, kb_blocks, plans_markdown
from gateway.matrix import TierMatrix
from gateway.metrics import UPSTREAM_ERROR_KINDS
from gateway.migration import DEFAULT_GRANDFATHER_DAYS
from tests.conftest import REPO

Capture = pytest.CaptureFixture[str]
DOCS = REPO / "docs"
KB = DOCS / "kb" / "plans-and-limits.md"


def kb_of(matrix: TierMatrix) -> dict[str, str]:
    return kb_blocks(
        matrix, grace_days=LicenseSettings().grace_days, grandfather_days=DEFAULT_GRANDFATHER_DAYS
    )


# -- generated documents ----------------------------------------------------------------------


def test_committed_plans_md_is_what_the_matrix_generates(matrix: TierMatrix) -> None:
    assert (DOCS / "plans.md").read_text() == plans_markdown(matrix), (
        "docs/plans.md is out of date: run `gateway docs plans --out docs/plans.md`"
    )


def test_committed_kb_page_has_the_generated_blocks_of_the_matrix(matrix: TierMatrix) -> None:
    page = KB.read_text()
    assert fill_blocks(page, kb_of(matrix)) == page, (
        "docs/kb/plans-and-limits.md is out of date: "
        "run `gateway docs kb --out docs/kb/plans-and-limits.md`"
    )


def _cells(markdown: str, heading: str) -> list[list[str]]:
    """The rows of the first table after ``## heading``, without the header."""
    section = markdown.split(f"\n## {heading}\n", 1)[1]
    rows: list[str] = []
    for line in section.splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    assert len(rows) > 2, f"no table under ## {heading}"
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_plans_md_cells_agree_with_what_the_gateway_grants(matrix: TierMatrix) -> None:
    """Checked through ``TierMatrix.entitlement`` (what requests are decided on), not through
    the generator's own reasoning."""
    text = plans_markdown(matrix)
    tiers = list(matrix.tiers.values())
    for heading in ("Operations", "Client Portal", "Driver App"):
        for _, feature_id, *cells in _cells(text, heading):
            feature = feature_id.strip("`")
            for tier, cell in zip(tiers, cells, strict=True):
                granted = feature in matrix.entitlement(tier.name).features
                assert (cell == "✓") == granted, (feature, tier.name, cell)
                for addon in re.findall(r"add-on `(\w+)`", cell):
                    assert feature in matrix.entitlement(tier.name, (addon,)).features
                    assert tier.name in matrix.addons[addon].available_to
                if cell == "—":
                    assert not any(
                        feature in matrix.entitlement(tier.name, (name,)).features
                        for name, addon in matrix.addons.items()
                        if tier.name in addon.available_to
                    )
    plans = {row[0]: row[1:] for row in _cells(text, "Plans")}
    assert plans["Price / month"] == ["$600", "$1,500", "$4,000"]
    assert plans["Operations users included"] == [str(t.quotas.ops_users) for t in tiers]
    assert plans["Drivers included"] == [str(t.quotas.drivers) for t in tiers]
    assert [row[0] for row in _cells(text, "Add-ons")] == [f"`{name}`" for name in matrix.addons]


def test_docs_plans_cli_writes_and_checks(capsys: Capture, tmp_path: Path) -> None:
    out = tmp_path / "plans.md"
    matrix = ["--matrix", str(REPO / "tier_matrix.toml")]
    assert main(["docs", "plans", *matrix, "--out", str(out), "--check"]) == 1  # missing
    assert main(["docs", "plans", *matrix, "--out", str(out)]) == 0
    assert out.read_text() == (DOCS / "plans.md").read_text()
    assert main(["docs", "plans", *matrix, "--out", str(out), "--check"]) == 0
    out.write_text(out.read_text().replace("$1,500", "$1,400"))
    assert main(["docs", "plans", *matrix, "--out", str(out), "--check"]) == 1
    assert "gateway docs plans --out" in capsys.readouterr().out
    assert main(["docs", "plans", *matrix]) == 0
    assert capsys.readouterr().out == (DOCS / "plans.md").read_text()


def test_a_matrix_change_shows_in_the_generated_documents(capsys: Capture, tmp_path: Path) -> None:
    changed = tmp_path / "tier_matrix.toml"
    changed.write_text(
        (REPO / "tier_matrix.toml")
        .read_text()
        .replace("price_usd_month = 1500", "price_usd_month = 1750")
    )
    page = tmp_path / "kb.md"
    shutil.copy(KB, page)
    assert main(["docs", "kb", "--matrix", str(changed), "--out", str(page), "--check"]) == 1
    assert main(["docs", "kb", "--matrix", str(changed), "--out", str(page)]) == 0
    assert "**Fleet** — $1,750 a month" in page.read_text()
    assert main(["docs", "plans", "--matrix", str(changed)]) == 0
    assert "| Price / month | $600 | $1,750 | $4,000 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("page", "error"),
    [
        pytest.param("no markers at all\n", "no <!-- generated:NAME -->", id="missing"),
        pytest.param(
            "<!-- generated:prices -->\nx\n<!-- /generated:prices -->\n",
            "unknown generated block 'prices'",
            id="unknown",
        ),
    ],
)
def test_fill_blocks_refuses_a_page_that_does_not_match(page: str, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        fill_blocks(page, {"plans": "text"})


def test_fill_blocks_replaces_only_between_markers() -> None:
    page = "intro\n<!-- generated:plans -->\nold\n<!-- /generated:plans -->\noutro\n"
    assert fill_blocks(page, {"plans": "new\nlines"}) == (
        "intro\n<!-- generated:plans -->\nnew\nlines\n<!-- /generated:plans -->\noutro\n"
    )


def test_licensing_guide_points_at_the_generated_matrix_instead_of_copying_it() -> None:
    guide = (DOCS / "licensing.md").read_text()
    assert "](plans.md)" in guide and "](support.md)" in guide
    assert "](kb/plans-and-limits.md)" in guide
    for line in guide.splitlines():
        if line.startswith("|"):  # a table row with a price is a hand-copied matrix
            assert "$" not in line, f"{line}: link docs/plans.md instead"


# -- the support playbook covers every answer code ---------------------------------------------

_CODE = re.compile(r"^[a-z]+(?:_[a-z]+)+$")
# Constructors whose first argument is the code; elsewhere a code follows an HTTP status.
_CODE_FIRST = {"LicenseError", "IdentityError", "_deny"}
# f-string codes and what they expand to.
_TEMPLATES = {"upstream_": tuple(f"upstream_{kind}" for kind in UPSTREAM_ERROR_KINDS)}


def _string(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and _CODE.match(node.value):
        return node.value
    return None


def _codes_of(node: ast.expr, where: str) -> set[str]:
    code = _string(node)
    if code is not None:
        return {code}
    if isinstance(node, ast.JoinedStr):
        prefix = node.values[0]
        if isinstance(prefix, ast.Constant) and prefix.value in _TEMPLATES:
            return set(_TEMPLATES[prefix.value])
        raise AssertionError(f"{where}: teach this test what {ast.unparse(node)} expands to")
    return set()


def _is_status(node: ast.expr) -> bool:
    """An HTTP status: a literal 100-599, or a variable named ``status``."""
    if isinstance(node, ast.Name | ast.Attribute):
        return (node.id if isinstance(node, ast.Name) else node.attr) == "status"
    return isinstance(node, ast.Constant) and type(node.value) is int and 100 <= node.value < 600


def answer_codes() -> dict[str, str]:
    """Every code the gateway's source can answer with, and one place it comes from: the
    first argument of ``LicenseError``/``_deny``, the third of a positional ``Decision``,
    and a code right after an HTTP status in a call (``problem(status, code, ...)``,
    ``ProvisionError(401, code, ...)``) or a tuple."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "gateway").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            codes: set[str] = set()
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                if name in _CODE_FIRST and node.args:
                    codes = _codes_of(node.args[0], where)
                elif name == "Decision" and len(node.args) >= 3:  # (allowed, status, code, ...)
                    codes = _codes_of(node.args[2], where)
                elif len(node.args) >= 2 and _is_status(node.args[0]):
                    codes = _codes_of(node.args[1], where)
            elif isinstance(node, ast.Tuple) and len(node.elts) >= 2 and _is_status(node.elts[0]):
                codes = _codes_of(node.elts[1], where)
            for code in codes:
                found.setdefault(code, where)
    return found


def support_entries() -> dict[str, str]:
    """``### `code`[, `code`]`` headings of docs/support.md → the text of their entry."""
    text = (DOCS / "support.md").read_text()
    entries: dict[str, str] = {}
    for section in re.split(r"\n(?=### )", text)[1:]:
        heading, _, body = section.partition("\n")
        for code in re.findall(r"`([a-z_]+)`", heading):
            entries[code] = body.split("\n## ", 1)[0]
    return entries


def test_the_code_scanner_finds_the_codes_it_must() -> None:
    codes = answer_codes()
    for known in (
        "license_missing",  # _deny
        "feature_not_entitled",  # Decision(False, status, code, ...)
        "license_bad_signature",  # LicenseError
        "bad_request",  # a (status, code, title) tuple
        "upstream_timeout",  # f"upstream_{kind}"
        "signature_stale",  # ProvisionError
        "store_unavailable",
        "path_rejected",  # self._reject
        "client_timeout",  # _Reject
    ):
        assert known in codes


def test_every_answer_code_has_a_support_playbook_entry() -> None:
    entries = support_entries()
    missing = {code: where for code, where in answer_codes().items() if code not in entries}
    assert not missing, f"docs/support.md has no entry for: {missing}"


def test_the_support_playbook_names_no_code_the_gateway_lacks() -> None:
    stale = sorted(set(support_entries()) - set(answer_codes()))
    assert not stale, f"docs/support.md describes codes no code answers: {stale}"


def test_every_support_entry_says_what_is_seen_why_how_to_confirm_and_the_fix() -> None:
    for code, body in support_entries().items():
        for part in ("sees**:", "**Confirm**:", "**Fix**:"):
            assert part in body, f"docs/support.md, {code}: no {part!r}"


# -- diagrams ---------------------------------------------------------------------------------


def mermaid_blocks(path: Path) -> list[str]:
    return re.findall(r"```mermaid\n(.*?)```", path.read_text(), re.DOTALL)


def test_licensing_guide_has_the_issuance_and_tier_change_diagrams() -> None:
    blocks = mermaid_blocks(DOCS / "licensing.md")
    kinds = [block.split(None, 1)[0] for block in blocks]
    assert kinds == ["flowchart", "sequenceDiagram"]
    flow, sequence = blocks
    for step in ("gateway tenant show", "gateway explain", "gateway license inspect", "audit show"):
        assert step in flow
    for change in ("Upgrade", "Downgrade", "Trial conversion", "Grandfather end"):
        assert f"Note over B,C: {change}" in sequence


def test_sequence_diagrams_only_use_declared_participants() -> None:
    for block in mermaid_blocks(DOCS / "licensing.md"):
        if not block.startswith("sequenceDiagram"):
            continue
        declared = set(re.findall(r"^\s*participant (\w+)", block, re.MULTILINE))
        for line in block.splitlines():
            arrow = re.match(r"\s*(\w+)\s*-?->>\s*(\w+)\s*:", line)
            if arrow:
                assert set(arrow.groups()) <= declared, line
            note = re.match(r"\s*Note over (\w+),(\w+):", line)
            if note:
                assert set(note.groups()) <= declared, line


def test_flowchart_edges_join_declared_nodes() -> None:
    flow = mermaid_blocks(DOCS / "licensing.md")[0]
    declared = set(re.findall(r"(\w+)[\[({]", flow))
    for line in flow.splitlines()[1:]:
        ends = re.findall(r"(?:^|-->|-\.->)\s*(?:\|[^|]*\|\s*)?(\w+)", line.strip())
        assert set(ends) <= declared, line


# -- links ------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize(
    "page",
    [
        "support.md",
        "plans.md",
        "kb/plans-and-limits.md",
        "licensing.md",
        "../README.md",
        "operations.md",
        "design.md",
    ],
)
def test_relative_links_lead_somewhere(page: str) -> None:
    path = (DOCS / page).resolve()
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{page}: {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page}: {target}: no such heading"
