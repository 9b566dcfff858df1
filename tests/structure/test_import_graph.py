"""The house's structure: no import cycles, no stage imports another stage, no private names across
modules, DVC deps = every project module a stage imports (directly or not), nothing more."""
from __future__ import annotations

import ast

import pytest
import yaml

from import_graph import PACKAGES, ROOT, as_path, closure, cycles, generated, graph, module_path, project_modules

STAGES = ("prepare", "pretrain", "tokenization", "audit", "finetune", "evaluation", "compare", "promote")


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_body(name: str) -> dict:
    entry = dvc_stages()[name]
    return entry.get("do", entry)


def test_no_import_cycles():
    assert cycles() == [], "import cycles between project modules"


def test_no_stage_imports_another_stage():
    g = graph()
    for stage in STAGES:
        others = {m for m in g[f"stages.{stage}"] if m.startswith("stages.")}
        assert not others, f"stages/{stage}.py imports {sorted(others)}"


def test_the_core_knows_no_orchestrator():
    """depthtune/ never imports flows/ or stages/ (and so neither Prefect's runner nor a stage)."""
    g = graph()
    for m, deps in g.items():
        if m.startswith("depthtune."):
            bad = {d for d in deps if not d.startswith("depthtune.")}
            assert not bad, f"{m} imports {sorted(bad)}"


def _private_uses(module: str) -> list[str]:
    """`other_module._name` attribute uses and `from other import _name` of project modules."""
    tree = ast.parse(module_path(module).read_text())
    aliases = {}  # local name -> project module
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    out.append(f"from {node.module} import {a.name}")
                if module_path(f"{node.module}.{a.name}") is not None:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    aliases[a.asname or a.name] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            out.append(f"{aliases[node.value.id]}.{node.attr}")
    return out


def test_no_private_names_across_modules():
    found = {m: _private_uses(m) for m in project_modules()}
    assert not {m: u for m, u in found.items() if u}


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_are_the_stage_import_closure(stage):
    """Editing any module a stage runs re-runs it; editing one it does not import does not.

    The closure starts at stages/<stage>.py (flows/stage.py, the Prefect wrapper that runs every
    stage, changes no output and is left out on purpose).
    """
    code = {as_path(m) for m in closure(f"stages.{stage}")}
    deps = {d for d in stage_body(stage).get("deps", []) if d.endswith(".py")}
    missing, extra = sorted(code - deps), sorted(deps - code)
    assert not missing, f"dvc.yaml {stage}: modules it imports but does not list as deps: {missing}"
    assert not extra, f"dvc.yaml {stage}: lists modules it does not import: {extra}"


def test_dvc_yaml_code_deps_are_generated():
    """`python -m flows.dvc_deps` wrote dvc.yaml's `.py` deps: nobody edits them by hand."""
    text = (ROOT / "dvc.yaml").read_text()
    assert generated(text) == text, "dvc.yaml code deps are stale: run python -m flows.dvc_deps"
