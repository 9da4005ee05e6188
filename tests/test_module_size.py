"""Every module of ``gateway/`` is short enough to read in one sitting: none over ~500
lines (520 here) unless its docstring says why, in a sentence that begins "Longer than
~500 lines"."""

from __future__ import annotations

import ast
from pathlib import Path

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"
LIMIT = 520
REASON = "Longer than ~500 lines"


def test_a_module_over_500_lines_says_why_in_its_docstring() -> None:
    unexplained = {}
    for path in sorted(GATEWAY.rglob("*.py")):
        text = path.read_text()
        lines = text.count("\n")
        if lines > LIMIT:
            docstring = ast.get_docstring(ast.parse(text)) or ""
            if REASON not in " ".join(docstring.split()):
                unexplained[str(path.relative_to(GATEWAY.parent))] = lines
    assert not unexplained, f"over {LIMIT} lines, no reason in the docstring: {unexplained}"


def test_the_size_check_reads_every_module() -> None:
    assert len(list(GATEWAY.rglob("*.py"))) > 50
