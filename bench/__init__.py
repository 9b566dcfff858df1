"""Benchmark harness: depthtune's loop against plain transformers.Trainer recipes.

`python -m bench.run [--quick]`; see bench/README.md.
"""
