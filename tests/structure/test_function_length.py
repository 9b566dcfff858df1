"""Small functions: a reader sees a function whole. No function over 60 lines (docstring included) in the package,
the stages, the flows and the benchmark's runner and report writer; a longer one is split into its phases."""
from __future__ import annotations

import ast

from import_graph import ROOT

LIMIT = 60
WHERE = [*(ROOT / "depthtune").rglob("*.py"), *(ROOT / "stages").glob("*.py"), *(ROOT / "flows").glob("*.py"),
         ROOT / "bench" / "run.py"]


def test_no_function_over_the_limit():
    long = []
    for path in WHERE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LIMIT:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {LIMIT} lines: {long}"
