"""The project's import graph, read from the source (every import statement, function-level ones too)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("depthtune", "stages", "flows")


def module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def project_modules() -> list[str]:
    out = []
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).glob("*.py")):
            out.append(pkg if p.name == "__init__.py" else f"{pkg}.{p.stem}")
    return out


def imports_of(name: str) -> set[str]:
    """Project modules `name` imports anywhere in its source (module level or inside functions)."""
    tree = ast.parse(module_path(name).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            cands = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for c in cands:
            if c.split(".")[0] in PACKAGES and module_path(c) is not None and c not in PACKAGES:
                found.add(c)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    return {m: imports_of(m) for m in project_modules()}


def closure(name: str, g: dict[str, set[str]] | None = None) -> set[str]:
    g = g if g is not None else graph()
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(g.get(m, ()))
    return seen


def cycles(g: dict[str, set[str]] | None = None) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    g = g if g is not None else graph()
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def as_path(module: str) -> str:
    return str(module_path(module).relative_to(ROOT))
