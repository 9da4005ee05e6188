"""No dead code in ``gateway/``: every module-level function, class and constant, and every
method, is used somewhere (the package itself, the tests, the load tests).

Read with ``ast``, by name: a function, class or constant counts as used when its name is
loaded, imported or reached as an attribute anywhere; a method when its name is reached as
an attribute anywhere. Methods asyncio and httptools call by name (protocol callbacks,
``on_*`` parser callbacks) and dunders are used by definition. Being by name, it misses a
dead method whose name is also an attribute of something else (a dead ``busy()`` while a
load-test record has a ``.busy`` field).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEARCHED = ("gateway", "tests", "loadtests")
CALLED_BY_NAME = {
    "connection_made",
    "connection_lost",
    "data_received",
    "eof_received",
    "pause_writing",
    "resume_writing",
}


def _uses(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names loaded or imported (any definition), and attribute names (methods: a method
    is reached through an attribute, so a local variable of the same name does not count)."""
    names: set[str] = set()
    attributes: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load | ast.Del):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            attributes.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.name for alias in node.names)
    return names, attributes


def _definitions(path: Path, tree: ast.Module) -> list[tuple[str, str, bool]]:
    """(name, where, is a method) of what a module defines at its top level and in its
    classes."""
    where = path.relative_to(REPO)
    found: list[tuple[str, str, bool]] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.append((node.name, f"{where}:{node.name}", False))
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += [(t.id, f"{where}:{t.id}", False) for t in targets if isinstance(t, ast.Name)]
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef):
                    found.append((member.name, f"{where}:{node.name}.{member.name}", True))
    return [
        (name, label, method)
        for name, label, method in found
        if not name.startswith("__") and not name.startswith("on_") and name not in CALLED_BY_NAME
    ]


def test_every_definition_in_the_package_is_used() -> None:
    trees = [
        (path, ast.parse(path.read_text(), str(path)))
        for folder in SEARCHED
        for path in sorted((REPO / folder).rglob("*.py"))
    ]
    names: set[str] = set()
    attributes: set[str] = set()
    for _, tree in trees:
        loaded, reached = _uses(tree)
        names |= loaded
        attributes |= reached
    # A definition is a store, never a load: its own def does not count as a use.
    unused = [
        label
        for path, tree in trees
        if path.parts[len(REPO.parts)] == "gateway"
        for name, label, method in _definitions(path, tree)
        if name not in attributes and (method or name not in names)
    ]
    assert unused == []
