"""The concepts users add to are one object in one place: a variant kind (depthtune/methods/), a task
(depthtune/tasks/), a metric (depthtune/evaluation/metrics.py), a model family (depthtune/model/families.py).
Everywhere else the code asks the object; these tests find the `if` chains that would creep back:
- a comparison with a task's name (`task == "causal_lm"`) outside the task modules;
- a metric's name as a string literal outside the metric registry and the task modules (a default argument value
  and a config default are data, not a branch);
- a comparison or a table keyed on a family's model_type outside the families table;
- a comparison of a variant's kind with a kind's name outside the kind modules.
"""
from __future__ import annotations

import ast

import pytest

from depthtune import methods, tasks
from depthtune.evaluation import metrics
from depthtune.model.families import FAMILIES
from import_graph import as_path, module_path, project_modules

CODE = [m for m in project_modules() if not m.startswith("tests")]


def tree_of(module: str) -> ast.AST:
    return ast.parse(module_path(module).read_text())


def names_in(node: ast.AST) -> set[str]:
    """String constants a comparison side holds: "x", or the members of ("x", "y") / ["x"] / {"x"}."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return set()


def ends_in(node: ast.AST, name: str) -> bool:
    """`name`, `x.name` or a call's result of either (`getattr(...)` aside)."""
    return (isinstance(node, ast.Name) and node.id == name) or (isinstance(node, ast.Attribute) and node.attr == name)


def comparisons(module: str):
    for node in ast.walk(tree_of(module)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            yield node, sides


def where(module: str, node: ast.AST) -> str:
    return f"{as_path(module)}:{node.lineno}"


def owned_by(module: str, *owners: str) -> bool:
    return any(module == o or module.startswith(o + ".") for o in owners)


def test_no_task_comparison_outside_the_task_modules():
    task_names = set(tasks.names())
    found = [where(m, node) for m in CODE if not owned_by(m, "depthtune.tasks")
             for node, sides in comparisons(m) if any(names_in(s) & task_names for s in sides)]
    assert not found, f"compare the task by name (ask depthtune.tasks instead): {found}"


def defaults_of(tree: ast.AST) -> set[int]:
    """ids of the nodes that are default argument values or config defaults (`setting(...)` / `_f(...)`'s first)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arguments):
            out.update(id(d) for d in node.defaults + [d for d in node.kw_defaults if d is not None])
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setting", "_f") \
                and node.args:
            out.add(id(node.args[0]))
    return out


def test_no_metric_literal_outside_the_metric_registry():
    owners = ("depthtune.evaluation.metrics", "depthtune.tasks")
    found = []
    for m in CODE:
        if owned_by(m, *owners):
            continue
        tree = tree_of(m)
        data = defaults_of(tree)
        found += [where(m, n) for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in metrics.NAMES
                  and id(n) not in data]
    assert not found, f"metric names as literals (read depthtune.evaluation.metrics / the task's metrics): {found}"


def test_no_family_branch_outside_the_families_table():
    families = set(FAMILIES)
    found = []
    for m in CODE:
        if owned_by(m, "depthtune.model.families"):
            continue
        found += [where(m, node) for node, sides in comparisons(m) if any(names_in(s) & families for s in sides)]
        found += [where(m, node) for node in ast.walk(tree_of(m)) if isinstance(node, ast.Dict)
                  and {k.value for k in node.keys if isinstance(k, ast.Constant)} & families]
    assert not found, f"branches on a model family (add a column to depthtune.model.families instead): {found}"


def test_no_kind_comparison_outside_the_kind_modules():
    kinds = set(methods.load())
    found = [where(m, node) for m in CODE if not owned_by(m, "depthtune.methods")
             for node, sides in comparisons(m)
             if any(ends_in(s, "kind") for s in sides) and any(names_in(s) & kinds for s in sides)]
    assert not found, f"branches on a variant kind's name (ask spec.method instead): {found}"


@pytest.mark.parametrize("registry,owner", [(methods.load, "depthtune.methods"), (tasks.load, "depthtune.tasks")])
def test_each_registered_object_lives_in_a_module_of_its_own_package(registry, owner):
    for name, obj in registry().items():
        assert type(obj).__module__.startswith(owner + "."), (name, type(obj).__module__)
