"""train.seeds: each variant trained N times; the evaluation scores every seed's model on the same test
texts, and the report shows the spread (real stages on a tiny random-init BERT, tracking off)."""
from __future__ import annotations

import json
import statistics

import pytest
import torch
import yaml

from depthtune.data.batching import Examples
from depthtune.evaluation.evaluator import load_saved_model
from depthtune.evaluation.metric_modules import quick_scores
from depthtune.records import EvalRecord, TrainRecord
from depthtune.data.tokenized import load_tokenized
from tests.conftest import in_project, run_stages, tiny_params


@pytest.fixture(scope="module")
def seeded(shared_data, tmp_path_factory):
    from stages import compare

    project = tmp_path_factory.mktemp("seeds")
    params = tiny_params(shared_data, variants={"probe": {"train_top": 0, "train": {"lr": 5e-3}}, "full": {}},
                         tracking={"enabled": False}, train={"seeds": 3})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_stages(project, ["probe", "full"])
    with in_project(project):
        compare.main([])
    return project


def test_every_seed_is_trained_saved_and_recorded(seeded):
    rec = TrainRecord.read(seeded / "metrics/train/probe.json")
    assert [r["seed"] for r in rec.seed_runs] == [42, 43, 44]
    assert rec.seed_runs[0]["best_val_accuracy"] == rec.best_val["accuracy"] and rec.seed_runs[0]["steps"] == rec.steps
    listing = json.loads((seeded / "seed_models/probe/seeds.json").read_text())
    assert [r["seed"] for r in listing["runs"]] == [43, 44] and listing["lr"] == 5e-3
    assert sorted(p.name for p in (seeded / "seed_models/probe").iterdir()) == ["seed-43", "seed-44", "seeds.json"]
    assert json.loads((seeded / "models/probe/depthtune.json").read_text())["seed"] == 42
    # the seeds differ (head initialisation, dropout, batch order): not three copies of one model
    heads = [load_saved_model(seeded / d, "cpu").classifier.weight for d in
             ("models/probe", "seed_models/probe/seed-43", "seed_models/probe/seed-44")]
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])


def test_evaluation_scores_every_seed_on_the_same_texts_and_the_report_shows_the_spread(seeded):
    ev = EvalRecord.read(seeded / "metrics/eval/probe.json")
    assert [s["seed"] for s in ev.seed_scores] == [42, 43, 44]
    assert ev.seed_scores[0]["accuracy"] == ev.accuracy
    test = Examples.from_dataset(load_tokenized(seeded / "data/tokenized")["test"])
    model = load_saved_model(seeded / "seed_models/probe/seed-44", "cpu")
    with torch.no_grad():
        enc = [torch.tensor([ids]) for ids in test.input_ids]
        preds = [int(model(input_ids=x).logits.argmax(-1)) for x in enc]
    assert ev.seed_scores[2] == {"seed": 44, **quick_scores(preds, test.labels, 2)}
    accs = [s["accuracy"] for s in ev.seed_scores]
    md = (seeded / "reports/comparison.md").read_text()
    assert "accuracy across seeds" in md
    assert f"{statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f} ({min(accs):.4f}-{max(accs):.4f})" in md
    # the verdict says whether the seeds separate the two best means, in the markdown and in comparison.json
    seeds = json.loads((seeded / "reports/comparison.json").read_text())["verdict"]["seeds"]
    full = EvalRecord.read(seeded / "metrics/eval/full.json").seed_scores
    means = {"probe": statistics.mean(accs), "full": statistics.mean(s["accuracy"] for s in full)}
    assert sorted(seeds["by_mean"]) == ["full", "probe"] and means[seeds["by_mean"][0]] >= means[seeds["by_mean"][1]]
    assert abs(seeds["lead"] - abs(means["full"] - means["probe"])) < 1e-9 and "Across seeds (3 each" in md


def test_one_seed_writes_an_empty_seed_folder_and_no_spread(shared_data, tmp_path):
    params = tiny_params(shared_data, variants={"probe": {"train_top": 0, "train": {"lr": 5e-3}}},
                         tracking={"enabled": False}, train={"epochs": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_stages(tmp_path, ["probe"])
    assert [p.name for p in (tmp_path / "seed_models/probe").iterdir()] == ["seeds.json"]
    assert TrainRecord.read(tmp_path / "metrics/train/probe.json").seed_runs == []
    assert EvalRecord.read(tmp_path / "metrics/eval/probe.json").seed_scores == []
