"""params.yaml validation: every shipped config loads; bad input gives one clear line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from depthtune.config import Params, effective_train, load_params, parse_params
from depthtune.errors import ConfigError
from tests.conftest import ROOT

BASE = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_every_shipped_params_file_loads():
    files = [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]
    for f in files:
        p = load_params(f)
        assert isinstance(p, Params) and p.variants, f
    default = load_params(ROOT / "params.yaml")
    # the default ships at least: full, a truncated depth, a top-t, a linear probe, a LoRA variant
    specs = list(default.variants.values())
    assert any(s.describe() == "full fine-tuning" for s in specs)
    assert any(s.depth is not None for s in specs)
    assert {s.kind for s in specs} >= {"full", "top", "probe", "lora"}


def test_config_objects_are_frozen_and_overrides_apply():
    p = load_params(ROOT / "params.yaml")
    with pytest.raises(Exception):
        p.train.lr = 1.0  # frozen
    probe = p.variants["probe"]
    eff = effective_train(p, probe)
    assert eff.epochs == p.train.epochs and eff.batch_size == p.train.batch_size


def test_learning_rate_comes_from_the_variant_then_train_lr_then_the_variant_kind():
    from depthtune import methods

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["variants"] = {"full": {}, "d3": {"depth": 3}, "top2": {"train_top": 2}, "probe": {"train_top": 0},
                       "lora": {"lora": {"r": 4}}, "bitfit": {"bitfit": True}, "scratch": {"init": "scratch"},
                       "own": {"train_top": 0, "train": {"lr": 5e-3, "epochs": 3}}}
    p = parse_params(raw)
    kinds = {name: spec.kind for name, spec in p.variants.items()}
    assert kinds == {"full": "full", "d3": "full", "top2": "top", "probe": "probe", "lora": "lora",
                     "bitfit": "bitfit", "scratch": "scratch", "own": "probe"}
    lrs = {name: effective_train(p, spec).lr for name, spec in p.variants.items()}
    default_lr = {m.name: m.default_lr for m in methods.ordered()}
    assert lrs == {**{n: default_lr[k] for n, k in kinds.items()}, "own": 5e-3}
    assert default_lr["probe"] > default_lr["lora"] > default_lr["top"] > default_lr["full"]
    assert effective_train(p, p.variants["own"]).epochs == 3
    raw["train"]["lr"] = 1e-4  # train.lr set: every variant without its own lr takes it
    p = parse_params(raw)
    assert {n: effective_train(p, s).lr for n, s in p.variants.items()} == {**{n: 1e-4 for n in lrs}, "own": 5e-3}


def with_change(path: str, value):
    """Copy of the default params with one key set (value None deletes it)."""
    import copy

    raw = copy.deepcopy(BASE)
    node = raw
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return raw


_DELETE = object()

BAD = [
    ("unknown top-level key", with_change("trian", {"lr": 1}), r"params\.trian: unknown key \(did you mean 'train'\?\)"),
    ("unknown nested key", with_change("train.learning_rate", 0.1), r"params\.train\.learning_rate: unknown key"),
    ("typo in variant key", with_change("variants.top2.trian_top", 2), r"variants\.top2\.trian_top: unknown key \(did you mean 'train_top'\?\)"),
    ("wrong type int", with_change("train.batch_size", "sixteen"), r"params\.train\.batch_size: 'sixteen' is not an integer"),
    ("bool for int", with_change("train.epochs", True), r"params\.train\.epochs: True is not an integer"),
    ("wrong type number", with_change("train.lr", "fast"), r"params\.train\.lr: 'fast' is not a number"),
    ("zero batch size", with_change("train.batch_size", 0), r"params\.train\.batch_size: 0 is out of range, expected >= 1"),
    ("negative epochs", with_change("train.epochs", -1), r"params\.train\.epochs: -1 is out of range"),
    ("lr zero", with_change("train.lr", 0), r"params\.train\.lr: 0\.0 is out of range, expected > 0"),
    ("lr too large", with_change("train.lr", 3.0), r"params\.train\.lr: 3\.0 is out of range, expected <= 1"),
    ("variant lr out of range", with_change("variants.top2.train", {"lr": -1e-4}), r"variants\.top2\.train\.lr: -0\.0001 is out of range"),
    ("bad device", with_change("train.device", "tpu"), r"params\.train\.device: 'tpu' is not one of auto, cpu, cuda"),
    ("bad metric", with_change("evaluation.metric", "auc"), r"params\.evaluation\.metric: 'auc' is not one of"),
    ("empty variants", with_change("variants", {}), r"variants: empty"),
    ("variants not a mapping", with_change("variants", ["full"]), r"variants: expected a mapping"),
    ("invalid variant name", with_change("variants", {"top 2": {"train_top": 2}}), r"variants\.top 2: invalid variant name"),
    ("variant name with @", with_change("variants", {"a@b": {}}), r"invalid variant name"),
    ("negative depth", with_change("variants", {"d": {"depth": 0}}), r"variants\.d\.depth: 0 is out of range, expected >= 1"),
    ("lora not a mapping", with_change("variants", {"l": {"lora": 8}}), r"variants\.l\.lora: expected a mapping"),
    ("lora rank zero", with_change("variants", {"l": {"lora": {"r": 0}}}), r"variants\.l\.lora\.r: 0 is out of range"),
    ("lora empty targets", with_change("variants", {"l": {"lora": {"targets": []}}}), r"variants\.l\.lora\.targets: empty"),
    ("lora + bitfit", with_change("variants", {"l": {"lora": {}, "bitfit": True}}), r"variants\.l: lora and bitfit cannot be combined \(each chooses a variant kind: lora, bitfit\); keep one"),
    ("bad init", with_change("variants", {"s": {"init": "random"}}), r"variants\.s\.init: 'random' is not one of pretrained, scratch"),
    ("split fraction too big", with_change("data.split", {"validation": 0.7}), r"params\.data\.split\.validation: 0\.7 is out of range"),
    ("section not a mapping", with_change("train", 5), r"params\.train: expected a mapping"),
    ("missing value", with_change("train.batch_size", None), r"params\.train\.batch_size: missing value"),
    ("names differ by case", with_change("variants", {"Full": {}, "full": {}}), r"variants: names differ only by case"),
]


@pytest.mark.parametrize("case,raw,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_params_name_the_key_and_what_was_expected(case, raw, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        parse_params(raw)
    assert "\n" not in str(err.value)


def test_unreadable_yaml_reports_line_and_column(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("model:\n  source: packaged:minilm-l6\ntrain: [1, 2\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+, column \d+"):
        load_params(f)


def test_duplicate_variant_names_are_refused(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("variants:\n  full: {}\n  full: {depth: 2}\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: line 3, column 3: duplicate key 'full'"):
        load_params(f)


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match=r"params\.yaml: file not found"):
        load_params(tmp_path / "params.yaml")


def test_depth_above_the_models_layers_is_refused_before_anything_is_written(tmp_path):
    raw = with_change("variants", {"deep": {"train_top": 9}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "stages.audit", "--params", str(tmp_path / "params.yaml"),
                           "--out", str(tmp_path / "audit")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: variants.deep.train_top: 9 exceeds the model's 6 layers"], proc.stderr
    assert not (tmp_path / "audit").exists()
