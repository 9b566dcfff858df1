"""The project's import graph, read from the source (every import statement, function-level ones too):
flows.dvc_deps computes it (and dvc.yaml's code deps from it); the structure tests read it here."""
from __future__ import annotations

from flows.dvc_deps import (PACKAGES, ROOT, as_path, closure, code_deps, cycles, generated, graph,  # noqa: F401
                            module_path, project_modules)
