"""dvc.yaml agrees with depthtune/layout.py: every path a stage is handed on its command line is one of
its deps or outs, and every data dep/out is a path the layout gives it."""
from __future__ import annotations

import shlex

import pytest

from depthtune import layout
from test_import_graph import stage_body


def _out_paths(body: dict) -> set[str]:
    paths = set()
    for kind in ("outs", "metrics", "plots"):
        for item in body.get(kind, []) or []:
            paths.add(next(iter(item)) if isinstance(item, dict) else item)
    return paths


@pytest.mark.parametrize("stage", layout.STAGES)
def test_command_line_paths_are_the_layout(stage):
    body = stage_body(stage)
    io = layout.stage_io(stage)
    argv = shlex.split(body["cmd"])
    assert argv[:4] == ["python", "-m", "flows.stage", stage], body["cmd"]
    given = {argv[i][2:]: argv[i + 1] for i in range(4, len(argv) - 1) if argv[i].startswith("--")}
    given.pop("params", None)
    if stage in layout.PER_VARIANT:
        assert given.pop("variant") == "${key}"
    assert given == {**io["deps"], **io["outs"]}, f"{stage}: command-line paths differ from layout.stage_io"


@pytest.mark.parametrize("stage", layout.STAGES)
def test_deps_and_outs_are_the_layout(stage):
    body = stage_body(stage)
    io = layout.stage_io(stage)
    data_deps = {d for d in body.get("deps", []) if not d.endswith(".py")}
    assert data_deps == set(io["deps"].values()), f"{stage}: data deps differ from layout.stage_io"
    expected = set(io["outs"].values())
    if stage == "compare":  # reports/ also holds promote's output: DVC is given compare's files one by one
        expected = {f"{layout.REPORTS}/{f}" for f in layout.REPORT_FILES}
    assert _out_paths(body) == expected, f"{stage}: outs differ from layout.stage_io"


def test_every_variant_stage_shares_the_layout():
    """The per-variant paths are functions of the variant name only."""
    io = layout.stage_io("finetune", "top2")
    assert io["outs"]["model"] == "models/top2" and io["outs"]["metrics"] == "metrics/train/top2.json"
    assert layout.stage_io("evaluation", "top2")["deps"]["model"] == io["outs"]["model"]
