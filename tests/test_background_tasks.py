"""No fire-and-forget tasks: every task the code creates is held by reference.

The event loop keeps only a weak reference to a task, so a task nobody holds can be
garbage-collected half-way, and its exception is never seen. ruff's TID251 bans
``asyncio.create_task`` / ``asyncio.ensure_future`` outright, and RUF006 flags a discarded
``loop.create_task(...)`` only when ``loop`` is a local assigned from ``get_running_loop()``;
neither sees ``self.loop.create_task(...)`` or ``asyncio.get_running_loop().create_task(...)``.
This check reads every module (``ast``, no imports) and refuses any ``create_task`` or
``ensure_future`` call whose task is thrown away, whatever it is called on, except on an
``asyncio.TaskGroup`` (which holds its tasks itself).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("gateway", "tests", "loadtests")
SPAWNERS = {"create_task", "ensure_future"}


def _task_groups(tree: ast.AST) -> set[str]:
    """Names bound by ``[async] with [asyncio.]TaskGroup() as name``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With | ast.AsyncWith):
            for item in node.items:
                call = item.context_expr
                if not isinstance(call, ast.Call) or not isinstance(item.optional_vars, ast.Name):
                    continue
                func = call.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name == "TaskGroup":
                    names.add(item.optional_vars.id)
    return names


def dangling_tasks(source: str, filename: str = "<source>") -> list[str]:
    """``file:line`` of every task-creating call whose task is discarded: the call is an
    expression statement, or only a method chain on it is (``….add_done_callback(cb)``)."""
    tree = ast.parse(source, filename)
    groups = _task_groups(tree)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name not in SPAWNERS:
            continue
        receiver = func.value if isinstance(func, ast.Attribute) else None
        if isinstance(receiver, ast.Name) and receiver.id in groups:
            continue
        outer: ast.AST = node
        while isinstance(parents.get(outer), ast.Attribute):  # task.method(...)
            call = parents.get(parents[outer])
            if not isinstance(call, ast.Call):
                break
            outer = call
        if isinstance(parents.get(outer), ast.Expr):
            found.append(f"{filename}:{node.lineno}")
    return found


@pytest.mark.parametrize(
    ("source", "dangling"),
    [
        pytest.param("loop.create_task(work())", True, id="loop-local"),
        pytest.param("self.loop.create_task(work())", True, id="loop-attribute"),
        pytest.param("asyncio.get_running_loop().create_task(work())", True, id="loop-chained"),
        pytest.param("asyncio.ensure_future(work())", True, id="ensure-future"),
        pytest.param("loop.create_task(work()).add_done_callback(done)", True, id="chain"),
        pytest.param("task = loop.create_task(work())", False, id="assigned"),
        pytest.param("self.task = self.loop.create_task(work())", False, id="attribute"),
        pytest.param("tasks.append(loop.create_task(work()))", False, id="appended"),
        pytest.param("await loop.create_task(work())", False, id="awaited"),
        pytest.param(
            "async with asyncio.TaskGroup() as group:\n    group.create_task(work())",
            False,
            id="task-group",
        ),
    ],
)
def test_a_discarded_loop_task_is_found_whatever_it_is_called_on(
    source: str, dangling: bool
) -> None:
    wrapped = "async def f():\n" + textwrap.indent(source, "    ")
    assert bool(dangling_tasks(wrapped)) is dangling


def test_no_task_is_created_without_being_held() -> None:
    found: list[str] = []
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            found += dangling_tasks(path.read_text(), str(path.relative_to(REPO)))
    assert found == [], "tasks created and thrown away (hold them by reference)"
