"""The pretrain stage (issue 17): masking, the pass-through, a tokenizer + MLM from zero that the variants
build from and fine-tune, resume after SIGKILL to the same weights, no validation or test text ever used,
one-line errors. Tiny models (hidden 32, 2 layers), a few hundred SST-2 phrases."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from depthtune.config import load_params
from depthtune.errors import ConfigError
from depthtune.training.masked_lm import IGNORE, mask_tokens, step_generator
from tests.conftest import in_project, make_project, project_env, read_sst2, tiny_params
from tests.reliability._util import assert_one_line_error

MARKER_TEST = "zqxjvtestonly"  # only in test texts: must never reach the tokenizer or the batches
MARKER_VAL = "qqvzvalonly"  # only in validation texts (and a corpus line that repeats one)


# ----------------------------------------------------------------------------- masking


def test_masking_statistics_follow_bert():
    """15% of real, non-special tokens chosen; of them 80% [MASK], 10% random, 10% kept; pads and specials
    never; the same (seed, step) masks the same way."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (256, 64), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    mask = torch.ones_like(ids)
    mask[:, 48:] = 0
    kwargs = dict(mask_id=4, special_ids=[0, 1, 2, 3, 4], vocab_size=1000, probability=0.15)
    masked, labels = mask_tokens(ids, mask, generator=step_generator(7, 3), **kwargs)
    chosen = labels != IGNORE
    maskable = (mask == 1) & (ids > 4)
    assert not (chosen & ~maskable).any()
    share = chosen.sum() / maskable.sum()
    assert 0.14 < share < 0.16, share
    assert torch.equal(labels[chosen], ids[chosen])
    as_mask = (masked == 4) & chosen
    kept = (masked == ids) & chosen
    randomised = chosen & ~as_mask & ~kept
    n = chosen.sum()
    assert 0.77 < as_mask.sum() / n < 0.83 and 0.08 < kept.sum() / n < 0.12 and 0.08 < randomised.sum() / n < 0.12
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert (masked[randomised] > 4).all()  # random replacements are ordinary tokens
    again, labels2 = mask_tokens(ids, mask, generator=step_generator(7, 3), **kwargs)
    assert torch.equal(again, masked) and torch.equal(labels2, labels)
    other, _ = mask_tokens(ids, mask, generator=step_generator(7, 4), **kwargs)
    assert not torch.equal(other, masked)


def test_a_batch_always_has_one_prediction():
    ids, mask = torch.tensor([[2, 9, 3]]), torch.tensor([[1, 1, 1]])
    for step in range(20):
        _, labels = mask_tokens(ids, mask, mask_id=4, special_ids=[2, 3, 4], vocab_size=10, probability=0.01,
                                generator=step_generator(0, step))
        assert (labels != IGNORE).sum() == 1 and labels[0, 1] == 9


# ----------------------------------------------------------------------------- a tiny project


def write_split(path: Path, texts: list, labels: list) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))


def marked_data(shared: Path, folder: Path) -> dict:
    """SST-2 phrases as csv splits; the markers sit only in validation / test texts."""
    folder.mkdir(parents=True, exist_ok=True)
    texts, labels = read_sst2(shared / "sst2" / "train.tsv", 360)
    files = {"train": folder / "train.csv", "validation": folder / "validation.csv", "test": folder / "test.csv"}
    write_split(files["train"], texts[:240], labels[:240])
    write_split(files["validation"], [f"{t} {MARKER_VAL}" for t in texts[240:300]], labels[240:300])
    write_split(files["test"], [f"{t} {MARKER_TEST}" for t in texts[300:]], labels[300:])
    (folder / "corpus.txt").write_text(f"{texts[250]} {MARKER_VAL}\nan unlabeled line about films\n")
    return {k: str(v) for k, v in files.items()}


def pretrain_params(shared: Path, tmp: Path, **pretrain) -> dict:
    params = tiny_params(shared, variants={"full": {}, "probe": {"train_top": 0, "train": {"lr": 5e-3}}})
    params["data"] = {"source": "local", "files": marked_data(shared, tmp / "data"), "format": "csv",
                      "max_train_samples": 240, "max_eval_samples": 60}
    params["model"]["scratch"].update(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    params["pretrain"] = {"enabled": True, "max_steps": 12, "batch_size": 16, "max_length": 48, "eval_every": 6,
                          "checkpoint_every": 5, "lr": 2e-3, "tokenizer": {"vocab_size": 600, "min_frequency": 2},
                          "corpus": [str(tmp / "data" / "corpus.txt")], **pretrain}
    params["tracking"] = {"enabled": False}
    return params


def test_pass_through_when_off(tmp_path, shared_data):
    from stages import prepare, pretrain

    proj = make_project(tmp_path / "proj", tiny_params(shared_data), git=False)
    with in_project(proj):
        prepare.main([])
        pretrain.main([])
        params = load_params("params.yaml")
    record = json.loads((proj / "metrics" / "pretrain.json").read_text())
    assert record["enabled"] is False and record["model_source"] == "scratch" and record["steps"] == 0
    assert sorted(p.name for p in (proj / "pretrained").iterdir()) == ["pretrain.json"]  # nothing trained
    assert params.model.source == "scratch"  # the configured model, untouched


def test_tokenizer_and_mlm_from_zero_make_the_base_model_of_every_variant(tmp_path, shared_data):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from stages import audit, evaluation, finetune, prepare, pretrain, tokenization

    proj = tmp_path / "proj"
    params = pretrain_params(shared_data, tmp_path)
    params["tracking"] = {"enabled": True, "uri": f"sqlite:///{proj}/mlflow.db",
                          "artifact_root": str(proj / "mlartifacts")}
    make_project(proj, params, git=False)
    with in_project(proj):
        prepare.main([])
        pretrain.main([])
        resolved = load_params("params.yaml")
        assert resolved.model.source == "./pretrained" and resolved.model.tokenizer is None
        assert load_params("params.yaml", as_configured=True).model.source == "scratch"
        tokenization.main([])
        audit.main([])
        for v in ("full", "probe"):
            finetune.main(["--variant", v])
            evaluation.main(["--variant", v])
    folder = proj / "pretrained"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    tok = AutoTokenizer.from_pretrained(str(folder))
    mlm = AutoModelForMaskedLM.from_pretrained(str(folder))  # a standard HF folder
    assert mlm.config.vocab_size == len(tok) <= 600
    vocab = tok.get_vocab()
    assert MARKER_TEST not in vocab and MARKER_VAL not in vocab  # never trained on validation / test texts
    record = json.loads((proj / "metrics" / "pretrain.json").read_text())
    assert record["objective"] == "mlm" and record["steps"] == 12 and record["tokenizer"]["trained"]
    assert record["data"]["train_texts"] == 241 and record["data"]["corpus_dropped"] == 1  # the val text dropped
    assert [p["step"] for p in record["val_curve"]] == [0, 6, 12] and len(record["loss_curve"]) == 12
    assert record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1 and record["final_perplexity"] > 1
    assert set(record["coverage"]) == {"train", "validation", "test"}
    assert record["trainable_params"] == record["total_params"] == record["audit"]["trainable_params"]
    assert record["tracking"]["logged"], record["tracking"]
    train = json.loads((proj / "metrics" / "train" / "full.json").read_text())
    assert train["trainable_params"] > 0
    token_report = json.loads((proj / "data" / "tokenized" / "report.json").read_text())
    assert token_report["tokenizer"]["vocab_size"] == len(tok)
    saved = json.loads((proj / "models" / "full" / "config.json").read_text())
    assert saved["vocab_size"] == len(tok)  # the variant was built from the pretrained folder


def test_no_validation_or_test_text_reaches_pretraining(tmp_path, shared_data):
    """Pretraining reads the train split (the rows max_train_samples keeps out of fine-tuning too, unless
    train_texts: capped) and the corpus less any validation/test text; never a validation or test text."""
    from depthtune.training.pretraining import pretrain_texts
    from depthtune.records import read_prepared_split
    from stages import prepare

    params = pretrain_params(shared_data, tmp_path)
    params["data"]["max_train_samples"] = 200  # of the 240 training rows: 40 left out of fine-tuning
    proj = make_project(tmp_path / "proj", params, git=False)
    corpus = (str(tmp_path / "data" / "corpus.txt"),)
    with in_project(proj):
        prepare.main([])
        tuned = [r.text for r in read_prepared_split(Path("data/prepared/train.jsonl"), 2)]
        left_out = [r.text for r in read_prepared_split(Path("data/prepared/train_left_out.jsonl"), 2)]
        texts = pretrain_texts(Path("data/prepared"), corpus)
        capped = pretrain_texts(Path("data/prepared"), corpus, train_texts="capped")
    assert len(tuned) == 200 and len(left_out) == 40 and not set(tuned) & set(left_out)
    assert texts.train == tuned + left_out + ["an unlabeled line about films"] and texts.left_out == 40
    assert capped.train == tuned + ["an unlabeled line about films"] and capped.left_out == 0
    assert texts.train and not any(MARKER_TEST in t or MARKER_VAL in t for t in texts.train)
    assert all(MARKER_TEST in t for t in texts.test) and texts.corpus_dropped == 1


def stage(proj: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.pretrain"], cwd=proj, env=env, capture_output=True,
                          text=True, timeout=300)


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path, shared_data):
    from safetensors.torch import load_file

    from stages import prepare

    params = pretrain_params(shared_data, tmp_path)
    projects = {}
    for name in ("ref", "killed"):
        projects[name] = make_project(tmp_path / name, params, git=False)
        with in_project(projects[name]):
            prepare.main([])
    ref = stage(projects["ref"], project_env(projects["ref"]))
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed_env = project_env(projects["killed"], DEPTHTUNE_FAULT_KILL_AT_STEP="pretrain:8")
    first = stage(projects["killed"], killed_env)
    assert first.returncode == -9, first.stderr[-2000:]
    assert (projects["killed"] / "checkpoints" / "_pretrain" / "checkpoint-00000005").is_dir()
    resumed = stage(projects["killed"], project_env(projects["killed"]))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from checkpoint-00000005" in resumed.stdout
    a = load_file(str(projects["ref"] / "pretrained" / "model.safetensors"))
    b = load_file(str(projects["killed"] / "pretrained" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((p / "metrics" / "pretrain.json").read_text()) for p in projects.values())
    assert ra["loss_curve"] == [{**p, "lr": p["lr"]} for p in rb["loss_curve"]] and ra["val_curve"] == rb["val_curve"]
    assert rb["resumed_from_step"] == 5 and not (projects["killed"] / "checkpoints" / "_pretrain").exists()


@pytest.mark.parametrize("pretrain, needle", [
    ({"enabled": True, "bogus": 1}, "pretrain.bogus: unknown key"),
    ({"enabled": True, "start_from": "model"}, "pretrain.tokenizer.train"),
    ({"enabled": True, "max_length": 512}, "model.scratch.max_position_embeddings"),
    ({"enabled": True, "mask_probability": 1.5}, "pretrain.mask_probability"),
])
def test_a_bad_pretrain_key_is_a_one_line_error(tmp_path, shared_data, pretrain, needle):
    params = tiny_params(shared_data)
    params["pretrain"] = pretrain
    path = tmp_path / "params.yaml"
    import yaml

    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")) as info:
        load_params(path)
    assert "\n" not in str(info.value)


def test_an_objective_of_the_other_family_is_refused(shared_data):
    from depthtune.config import parse_params
    from depthtune.training.pretraining import resolve_plan

    params = parse_params({**tiny_params(shared_data), "pretrain": {"enabled": True, "objective": "causal_lm"}})
    with pytest.raises(ConfigError, match=r"pretrain\.objective: causal_lm does not fit a bert"):
        resolve_plan(params, "bert")
    assert resolve_plan(params.__class__(), "llama").objective == "causal_lm"


def test_the_stage_refuses_a_bad_key_in_one_line(tmp_path, shared_data):
    params = tiny_params(shared_data)
    params["pretrain"] = {"enabled": True, "start_from": "model", "tokenizer": {"train": False}}  # scratch: nothing to continue
    proj = make_project(tmp_path / "proj", params, git=False)
    proc = stage(proj, project_env(proj))
    assert_one_line_error(proc, "pretrain.start_from")
    assert os.listdir(proj).count("pretrained") == 0


def test_a_decoder_pretrains_causally_with_a_byte_level_tokenizer(tmp_path, shared_data):
    """start_from scratch with a llama: byte-level BPE (nothing unknown), causal-LM loss, then task causal_lm
    variants build from the folder."""
    from transformers import AutoModelForCausalLM

    from stages import audit, finetune, prepare, pretrain, tokenization

    params = pretrain_params(shared_data, tmp_path, max_steps=6, eval_every=3, checkpoint_every=0, corpus=[])
    params["task"] = "causal_lm"
    params["variants"] = {"full": {}, "top1": {"train_top": 1}}
    params["model"]["scratch"] = {**params["model"]["scratch"], "model_type": "llama", "num_key_value_heads": 1,
                                  "type_vocab_size": 2}
    params["evaluation"] = {"metric": "perplexity", "latency_examples": 5}
    params["registry"] = {"metric": "perplexity", "min_delta": 0.0, "min_metric": 0.0}
    params["compare"] = {"tolerance": 5.0}
    proj = make_project(tmp_path / "proj", params, git=False)
    with in_project(proj):
        prepare.main([])
        pretrain.main([])
        tokenization.main([])
        audit.main([])
        finetune.main(["--variant", "top1"])
    record = json.loads((proj / "metrics" / "pretrain.json").read_text())
    assert record["objective"] == "causal_lm" and record["tokenizer"]["kind"] == "bytelevel_bpe"
    assert all(c["unk_fraction"] == 0.0 for c in record["coverage"].values())
    model = AutoModelForCausalLM.from_pretrained(str(proj / "pretrained"))
    assert model.config.model_type == "llama" and model.config.vocab_size == record["tokenizer"]["vocab_size"]
    assert (proj / "models" / "top1" / "model.safetensors").is_file()
