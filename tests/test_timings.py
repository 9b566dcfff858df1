"""flows.timings: the per-stage split of a pipeline's wall time (what `make repro` prints)."""
from __future__ import annotations

import json

from flows.timings import markdown, overhead_report


def test_split_of_two_sequential_stages(tmp_path):
    # stage a: process 10 s from t=101 (imports 2, work 7 of which MLflow 1); stage b from t=113 (2 s gap)
    rows = [{"stage": "a", "process_start": 101.0, "process_s": 10.0, "startup_s": 2.0, "work_s": 7.0, "mlflow_s": 1.0},
            {"stage": "b", "process_start": 113.0, "process_s": 5.0, "startup_s": 1.0, "work_s": 3.5, "mlflow_s": 0.0},
            {"stage": "old", "process_start": 50.0, "process_s": 1.0, "startup_s": 0.5, "work_s": 0.5}]
    path = tmp_path / "timings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = overhead_report(100.0, 20.0, path)  # wall: 100 -> 120
    a, b = report["stages"]["a"], report["stages"]["b"]
    assert set(report["stages"]) == {"a", "b"}  # a run before t_start is not this pipeline's
    assert (a["own_s"], a["prefect_s"], a["mlflow_s"], a["dvc_s"]) == (8.0, 1.0, 1.0, 1.0)
    assert (b["own_s"], b["prefect_s"], b["dvc_s"]) == (4.5, 0.5, 2.0)
    assert a["overhead_s"] == 3.0 and b["overhead_s"] == 2.5
    assert report["median_stage_overhead_s"] == 2.75
    # wall = own work + overhead; DVC = wall - the processes (gaps 1 + 2, tail 2)
    assert report["stage_own_s"] + report["overhead_s"] == 20.0 and report["dvc_and_exit_s"] == 5.0
    assert "| a | 10.0 | 2.0 | 8.0 | 1.0 | 1.0 | 1.0 | 3.0 |" in markdown(report)
