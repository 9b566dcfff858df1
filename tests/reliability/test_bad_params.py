"""params.yaml cases not already in tests/test_config.py, at the parser, the stage and the model level.

tests/test_config.py has 27 parser cases (unknown keys with suggestions, wrong types, zero/negative
sizes, lr out of range, empty/invalid/duplicate-by-case variant names, ...), unreadable YAML with
line/column, duplicate keys, a missing file, and train_top above the model's layers through the
audit stage. Here: the remaining ranges and combinations, the model-dependent checks (depth,
LoRA targets/layers, model sources) through the audit stage's entry point, and the one-line exit
of real stage processes.
"""
from __future__ import annotations

import copy

import pytest
import yaml

from depthtune.config import load_params, parse_params
from depthtune.errors import ConfigError
from tests.conftest import ROOT, TINY_ARCH
from tests.reliability._util import assert_one_line_error, snapshot, stage

pytestmark = pytest.mark.timeout(300)

BASE = yaml.safe_load((ROOT / "params.yaml").read_text())


def changed(path: str, value) -> dict:
    raw = copy.deepcopy(BASE)
    node = raw
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return raw


PARSE = [
    ("variants null", changed("variants", None), r"^variants: empty, expected a mapping"),
    ("variant spec not a mapping", changed("variants", {"full": 3}), r"^variants\.full: expected a mapping, got int 3"),
    ("unknown key in a variant's train, suggestion", changed("variants", {"t": {"train": {"epoch": 2}}}),
     r"^variants\.t\.train\.epoch: unknown key \(did you mean 'epochs'\?\); valid keys: lr, epochs"),
    ("unknown model key, suggestion", changed("model.sorce", "x"),
     r"^params\.model\.sorce: unknown key \(did you mean 'source'\?\)"),
    ("unknown scratch key, suggestion", changed("model.scratch", {"hidden": 3}),
     r"^params\.model\.scratch\.hidden: unknown key \(did you mean 'hidden_size'\?\)"),
    ("string for a bool", changed("model.allow_pickle", "yes"), r"^params\.model\.allow_pickle: 'yes' is not true/false"),
    ("float for an int", changed("train.epochs", 2.5), r"^params\.train\.epochs: 2\.5 is not an integer"),
    ("negative batch size", changed("train.batch_size", -8), r"^params\.train\.batch_size: -8 is out of range, expected >= 1"),
    ("zero grad_accum", changed("train.grad_accum", 0), r"^params\.train\.grad_accum: 0 is out of range"),
    ("zero keep_checkpoints", changed("train.keep_checkpoints", 0), r"^params\.train\.keep_checkpoints: 0 is out of range"),
    ("max_length below 8", changed("train.max_length", 4), r"^params\.train\.max_length: 4 is out of range, expected >= 8"),
    ("zero max_train_samples", changed("data.max_train_samples", 0), r"^params\.data\.max_train_samples: 0 is out of range"),
    ("zero test split", changed("data.split", {"test": 0}), r"^params\.data\.split\.test: 0\.0 is out of range, expected > 0\.0"),
    ("negative max_drop_fraction", changed("data.max_drop_fraction", -0.1), r"^params\.data\.max_drop_fraction: -0\.1 is out of range"),
    ("warmup fraction 1", changed("train.warmup_fraction", 1.0), r"^params\.train\.warmup_fraction: 1\.0 is out of range, expected < 1\.0"),
    ("zero latency examples", changed("evaluation.latency_examples", 0), r"^params\.evaluation\.latency_examples: 0 is out of range"),
    ("min_metric above 1", changed("registry.min_metric", 1.5), r"^params\.registry\.min_metric: 1\.5 is out of range, expected <= 1\.0"),
    ("variant lr too large (as YAML text 3e0)", changed("variants", {"t": {"train": {"lr": "3e0"}}}),
     r"^variants\.t\.train\.lr: 3\.0 is out of range, expected <= 1\.0"),
    ("lr not a number", changed("train.lr", "1e-4x"), r"^params\.train\.lr: '1e-4x' is not a number"),
    ("lora alpha zero", changed("variants", {"l": {"lora": {"alpha": 0}}}), r"^variants\.l\.lora\.alpha: 0\.0 is out of range, expected > 0\.0"),
    ("lora dropout 1", changed("variants", {"l": {"lora": {"dropout": 1.0}}}), r"^variants\.l\.lora\.dropout: 1\.0 is out of range, expected < 1\.0"),
    ("lora negative layer", changed("variants", {"l": {"lora": {"layers": [-1]}}}),
     r"^variants\.l\.lora\.layers: expected a list of layer indices >= 0, got \[-1\]"),
    ("train_top with lora", changed("variants", {"x": {"train_top": 1, "lora": {}}}),
     r"^variants\.x: train_top and lora cannot be combined \(each chooses a variant kind: top, lora\); keep one$"),
    ("scratch init with train_top", changed("variants", {"x": {"train_top": 1, "init": "scratch"}}),
     r"^variants\.x: train_top and init cannot be combined \(each chooses a variant kind: top, scratch\); keep one$"),
    ("variant name too long", changed("variants", {"a" * 65: {}}), r"invalid variant name 'a{65}'.*at most 64 characters"),
    ("variant name starts with a digit", changed("variants", {"2layers": {}}), r"^variants\.2layers: invalid variant name '2layers'"),
    ("variant name not a string", changed("variants", {1: {}}), r"^variants\.1: invalid variant name 1"),
]


@pytest.mark.parametrize("case,raw,pattern", PARSE, ids=[c[0] for c in PARSE])
def test_bad_params_one_line_naming_the_key(case, raw, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        parse_params(raw)
    assert "\n" not in str(err.value)


def test_exponent_floats_that_pyyaml_reads_as_text_are_numbers():
    """`lr: 3e-4` is a string to PyYAML (YAML 1.1 floats need a dot) but a number to DVC and YAML 1.2:
    it used to fail with "'3e-4' is not a number"."""
    raw = yaml.safe_load("train: {lr: 3e-4}\nvariants: {top: {train: {lr: 2E-3}}}\n")
    assert raw["train"]["lr"] == "3e-4"  # the PyYAML behaviour this guards against
    params = parse_params(raw)
    assert params.train.lr == 3e-4 and params.variants["top"].train.lr == 2e-3


FILES = [
    ("tab indentation", b"model:\n\tsource: x\n", r"invalid YAML at line 2, column 1: found character '\\t'"),
    ("not UTF-8", b"model:\n  source: caf\xe9\n", r"cannot read \('utf-8' codec can't decode byte 0xe9"),
    ("a list, not a mapping", b"- a\n- b\n", r"expected a mapping of sections, got list"),
    ("a scalar, not a mapping", b"hello\n", r"expected a mapping of sections, got str"),
    ("empty file", b"", r"^variants: empty"),
]


@pytest.mark.parametrize("case,content,pattern", FILES, ids=[c[0] for c in FILES])
def test_unreadable_params_files(case, content, pattern, tmp_path):
    f = tmp_path / "params.yaml"
    f.write_bytes(content)
    with pytest.raises(ConfigError, match=pattern) as err:
        load_params(f)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- real stage processes


def test_stage_process_exits_2_with_one_line_for_a_params_error(tmp_path):
    """Through `python -m stages.prepare` (every stage validates the whole file first): unknown key with a
    suggestion, and unreadable YAML with line and column; nothing is written."""
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(changed("trian", {"lr": 1})))
    proc = stage("prepare", "--params", f, "--out", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(proc, "params.trian: unknown key (did you mean 'train'?)")
    f.write_text("model:\n  source: packaged:minilm-l6\n  allow_pickle: [true\nvariants: {full: {}}\n")
    proc = stage("prepare", "--params", f, "--out", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(proc, f"{f}: invalid YAML at line 4, column 9: expected ',' or ']'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source,needle", [
    ("nonsense/thing/x", "error: model.source: nonsense/thing/x does not exist (expected a local Hugging Face model folder)"),
    ("someone/a-hub-model", "error: model.source: 'someone/a-hub-model' is neither packaged:minilm-l6, scratch, nor a "
                            "local folder, and the Hub is offline (HF_HUB_OFFLINE=1)"),
], ids=["path that does not exist", "hub id while offline"])
def test_unknown_model_source_through_the_audit_stage_process(source, needle, tmp_path):
    out = tmp_path / "audit"
    out.mkdir()
    (out / "full.json").write_text('{"earlier": "output"}\n')
    before = snapshot(out)
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"model": {"source": source}, "variants": {"full": {}}}))
    proc = stage("audit", "--params", f, "--labels", tmp_path / "none.json", "--token-report", tmp_path / "none.json",
                 "--out", out, cwd=tmp_path)
    line = assert_one_line_error(proc)
    assert line == needle
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["audit", "params.yaml"]


# ----------------------------------------------------------------------------- model-dependent checks, audit entry point


def _scratch(**arch) -> dict:
    return {"source": "scratch", "scratch": {**TINY_ARCH, **arch}}


def _local_folder(tmp_path, kind: str) -> str:
    d = tmp_path / kind
    if kind == "absent":
        return str(d)
    d.mkdir()
    if kind == "bad_config":
        (d / "config.json").write_text("{not json")
    return str(d)


MODEL_CASES = [
    ("depth above the model's layers", _scratch(), {"deep": {"depth": 9}},
     "error: variants.deep.depth: 9 exceeds the model's 4 layers"),
    ("train_top above the truncated depth", _scratch(), {"x": {"depth": 2, "train_top": 3}},
     "error: variants.x.train_top: 3 exceeds the model's 2 layers"),
    ("lora layer out of range", _scratch(), {"l": {"lora": {"layers": [7]}}},
     "error: variants.l.lora.layers: [7] out of range, the variant has layers 0..3"),
    ("lora target that matches no module", _scratch(), {"l": {"lora": {"targets": ["q_proj", "value"]}}},
     "error: variants.l.lora.targets: ['q_proj'] match no module; linear modules are: dense, key, query, value "
     "(in the kept layers)"),
    ("scratch hidden size not divisible by heads", _scratch(hidden_size=30, num_attention_heads=4), {"full": {}},
     "error: model.scratch.hidden_size: 30 is not divisible by num_attention_heads 4"),
    ("unknown packaged model", {"source": "packaged:bogus"}, {"full": {}},
     "error: model.source: unknown packaged model 'packaged:bogus', known: packaged:minilm-l6"),
    ("missing local folder", "absent", {"full": {}}, "does not exist (expected a local Hugging Face model folder)"),
    ("folder without config.json", "empty", {"full": {}}, "has no config.json, expected a Hugging Face model folder"),
    ("config.json not JSON", "bad_config", {"full": {}}, "config.json: unreadable config"),
]


@pytest.mark.parametrize("case,model,variants,expected", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_model_dependent_params_through_the_audit_entry_point(case, model, variants, expected, tmp_path, capsys):
    """stages.audit.main under run_main (what `python -m stages.audit` runs), in this process: exit 2,
    one stderr line, no audit folder written."""
    from depthtune.files import run_main
    from stages import audit

    if isinstance(model, str):
        model = {"source": _local_folder(tmp_path, model)}
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"model": model, "variants": variants}))
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: audit.main(["--params", str(f), "--labels", str(tmp_path / "none.json"),
                                     "--token-report", str(tmp_path / "none.json"), "--out", str(tmp_path / "out")]))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and expected in err[0], err[0]
    assert not (tmp_path / "out").exists()

