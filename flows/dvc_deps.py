"""dvc.yaml's code deps, generated: every project module a stage imports, directly or not, read from the source.

    python -m flows.dvc_deps           # rewrite the `.py` lines of every stage's deps in dvc.yaml
    python -m flows.dvc_deps --check   # exit 1 and name the stages whose deps are stale (tests/structure runs it)

The closure starts at stages/<stage>.py (flows/stage.py, the Prefect wrapper that runs every stage, changes no output
and is left out on purpose). A package whose `__init__` discovers its modules (`pkgutil.iter_modules(__path__)`,
depthtune.methods: the variant kinds) imports every module of its folder: adding a kind re-runs what builds
variants. Only the `.py` lines of each `deps:` list are rewritten; data deps, params, outs and comments stay.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("depthtune", "stages", "flows")
DISCOVERS = "iter_modules(__path__)"


def module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> list[str]:
    """Every module of the project's packages, sub-packages included (`depthtune.methods.lora`)."""
    return [module_name(p) for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def imports_of(name: str) -> set[str]:
    """Project modules `name` imports anywhere in its source (module level or inside functions)."""
    path = module_path(name)
    source = path.read_text()
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            cands = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for c in cands:
            if c.split(".")[0] in PACKAGES and module_path(c) is not None and c not in PACKAGES:
                found.add(c)
                found.update(parents_of(c))  # importing a.b.c runs a.b's __init__ first
    if path.name == "__init__.py" and DISCOVERS in source:
        found.update(module_name(p) for p in path.parent.glob("*.py") if p.name != "__init__.py")
    found.discard(name)
    return found


def parents_of(name: str) -> list[str]:
    """The packages above a module that have an `__init__` of their own to run (top-level ones aside)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts)) if module_path(".".join(parts[:i])) is not None]


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
    """Every strongly connected component with more than one module (Tarjan). A package's `__init__` and the
    modules it discovers are one unit by design (each module imports the package's base), so a discovering
    `__init__`'s edges to its own folder are left out here."""
    g = g if g is not None else graph()
    g = {m: {d for d in deps if not discovered_by(m, d)} for m, deps in g.items()}
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


def discovered_by(package: str, module: str) -> bool:
    path = module_path(package)
    return (path is not None and path.name == "__init__.py" and module.rsplit(".", 1)[0] == package
            and DISCOVERS in path.read_text())


def as_path(module: str) -> str:
    return str(module_path(module).relative_to(ROOT))


def code_deps(stage: str, g: dict[str, set[str]] | None = None) -> list[str]:
    """The `.py` deps of a stage: the files of its import closure, sorted."""
    return sorted(as_path(m) for m in closure(f"stages.{stage}", g))


STAGE_RE = re.compile(r"^  ([A-Za-z_][A-Za-z0-9_-]*):\s*$")
DEPS_RE = re.compile(r"^(\s+)deps:\s*$")
ITEM_RE = re.compile(r"^(\s+)- (.+?)\s*$")


def rewrite(text: str, deps_of: dict[str, list[str]]) -> str:
    """dvc.yaml's text with each stage's `.py` deps replaced by deps_of[stage] (data deps kept, after them)."""
    lines, out, stage, i = text.splitlines(keepends=True), [], None, 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if m := STAGE_RE.match(line):
            stage = m.group(1)
        deps = DEPS_RE.match(line)
        if not deps or stage not in deps_of:
            continue
        items, indent = [], None
        while i < len(lines) and (item := ITEM_RE.match(lines[i])) and len(item.group(1)) > len(deps.group(1)):
            indent = item.group(1)
            items.append(item.group(2))
            i += 1
        indent = indent or deps.group(1) + "  "
        data = [d for d in items if not d.endswith(".py")]
        out.extend(f"{indent}- {d}\n" for d in deps_of[stage] + data)
    return "".join(out)


def generated(text: str) -> str:
    from depthtune.layout import STAGES

    g = graph()
    return rewrite(text, {stage: code_deps(stage, g) for stage in STAGES})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.dvc_deps", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="report stale deps, change nothing")
    ap.add_argument("--file", default=str(ROOT / "dvc.yaml"))
    args = ap.parse_args(argv)
    path = Path(args.file)
    text = path.read_text()
    new = generated(text)
    if new == text:
        print(f"{path.name}: every stage's code deps are its import closure")
        return 0
    if args.check:
        print(f"{path.name}: code deps are stale; run python -m flows.dvc_deps", file=sys.stderr)
        return 1
    path.write_text(new)
    print(f"{path.name}: code deps rewritten from the import closure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
