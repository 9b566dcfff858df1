"""Untrusted or broken model folders and checkpoints: refused with one line, never a traceback.

`depthtune.model.variants.build_variant` (what the finetune stage builds) and
`depthtune.evaluation.evaluator.load_saved_model` (what the evaluation stage loads) on tiny hand-made folders;
`depthtune.training.loop.train` on a checkpoint folder whose files are damaged. Each refusal is also
pushed through `run_main`, the stage edge, to check the exit code and the single stderr line.
The checkpoint-from-another-variant case is in tests/test_training.py (train level) and
tests/reliability/test_fault_pipeline.py (stage level).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from depthtune.config import FIXED_BUDGET, ModelConfig, TrainConfig, parse_section, parse_variant
from depthtune.errors import DepthtuneError, ModelError
from depthtune.files import run_main
from tests.conftest import TINY_ARCH, read_sst2

pytestmark = pytest.mark.timeout(300)

FULL = parse_variant("full", {}, "variants.full")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: a second thread only adds contention on a shared 2-core machine (8 steps: 0.4 s vs 2-11 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """good/ (safetensors), pickle/ (.bin only), remote/ (auto_map), truncated/ and garbage/ safetensors,
    bad_pickle/ and not_pickle/ .bin files, no_weights/ (config only)."""
    from transformers import BertConfig, BertForSequenceClassification

    d = tmp_path_factory.mktemp("models")
    cfg = BertConfig(**{k: v for k, v in TINY_ARCH.items() if k != "model_type"}, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(d / "good")
    (d / "pickle").mkdir()
    shutil.copy(d / "good/config.json", d / "pickle/config.json")
    torch.save(model.state_dict(), d / "pickle/pytorch_model.bin")
    shutil.copytree(d / "good", d / "remote")
    conf = json.loads((d / "remote/config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (d / "remote/config.json").write_text(json.dumps(conf))
    weights = (d / "good/model.safetensors").read_bytes()
    for name, data in (("truncated", weights[: len(weights) // 2]), ("garbage", b"\x00" * 64)):
        shutil.copytree(d / "good", d / name)
        (d / name / "model.safetensors").write_bytes(data)
    pickled = (d / "pickle/pytorch_model.bin").read_bytes()
    for name, data in (("bad_pickle", pickled[: len(pickled) // 2]), ("not_pickle", b"not a pickle at all" * 8)):
        shutil.copytree(d / "pickle", d / name)
        (d / name / "pytorch_model.bin").write_bytes(data)
    (d / "no_weights").mkdir()
    shutil.copy(d / "good/config.json", d / "no_weights/config.json")
    return d


def model_cfg(folder: Path, **kw) -> ModelConfig:
    return parse_section(ModelConfig, {"source": str(folder), **kw}, "model")


def one_line_exit(fn, capsys) -> str:
    """fn() under run_main: exit 2 and exactly one `error:` line on stderr."""
    with pytest.raises(SystemExit) as exit_:
        run_main(fn)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def build(folder, device="cpu", **kw):
    from depthtune.model.variants import build_variant

    return build_variant(model_cfg(folder, **kw), FULL, 2, device=device, path="variants.full")


def test_pickle_only_folder_is_refused_unless_allowed(folders, capsys):
    line = one_line_exit(lambda: build(folders / "pickle"), capsys)
    assert line == (f"error: {folders / 'pickle'}: only pickle weights (.bin/.pt) found; they can run arbitrary code "
                    "on load. Convert to safetensors or set model.allow_pickle: true")
    built = build(folders / "pickle", allow_pickle=True)
    good = build(folders / "good")
    assert all(torch.equal(a, b) for a, b in zip(built.model.state_dict().values(), good.model.state_dict().values()))


def test_remote_code_config_is_refused_unless_trusted(folders, capsys):
    line = one_line_exit(lambda: build(folders / "remote"), capsys)
    assert line == (f"error: {folders / 'remote' / 'config.json'}: the model asks to run its own code (auto_map); "
                    "set model.trust_remote_code: true only if you trust its author")
    # the audit stage (meta device, no weights) refuses it the same way, before any code could run
    line = one_line_exit(lambda: build(folders / "remote", device="meta"), capsys)
    assert "asks to run its own code (auto_map)" in line


@pytest.mark.parametrize("name,needle", [
    ("truncated", "Error while deserializing header: incomplete metadata, file not fully covered"),
    ("garbage", "Error while deserializing header"),
])
def test_corrupted_safetensors_in_the_model_folder(folders, name, needle, capsys):
    """Used to escape as a safetensors traceback: SafetensorError was not among the caught types."""
    line = one_line_exit(lambda: build(folders / name), capsys)
    assert line.startswith(f"error: variants.full: cannot build the model from {folders / name} (") and needle in line


@pytest.mark.parametrize("name,needle", [
    ("bad_pickle", "failed reading zip archive"),
    ("not_pickle", "Weights only load failed"),  # pickle.UnpicklingError: used to be a traceback too
])
def test_corrupted_pickle_weights_even_when_allowed(folders, name, needle, capsys):
    line = one_line_exit(lambda: build(folders / name, allow_pickle=True), capsys)
    assert line.startswith(f"error: variants.full: cannot build the model from {folders / name} (") and needle in line


def test_folder_without_weights(folders, capsys):
    line = one_line_exit(lambda: build(folders / "no_weights"), capsys)
    assert line == f"error: {folders / 'no_weights'}: no weights found (expected model.safetensors)"


@pytest.mark.parametrize("name", ["truncated", "garbage"])
def test_evaluation_refuses_a_corrupted_saved_model(folders, name, capsys):
    from depthtune.evaluation.evaluator import load_saved_model

    line = one_line_exit(lambda: load_saved_model(folders / name, "cpu"), capsys)
    assert line.startswith(f"error: {folders / name}: cannot load the model (Error while deserializing header")


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, shared_data, tokenizer):
    """One epoch of a tiny scratch model with its epoch-end checkpoint on disk."""
    from depthtune.data.batching import Examples
    from depthtune.training.loop import train
    from depthtune.model.variants import build_variant

    texts, labels = read_sst2(shared_data / "sst2" / "train.tsv", 64)
    enc = tokenizer(texts, truncation=True, max_length=32)
    ex = Examples(input_ids=enc["input_ids"], labels=labels, token_type_ids=enc["token_type_ids"])
    model = parse_section(ModelConfig, {"source": "scratch", "scratch": TINY_ARCH}, "model")
    cfg = TrainConfig(epochs=1,convergence=FIXED_BUDGET,  batch_size=16, lr=1e-3, checkpoint_every=0, seed=3, patience=0, evals_per_epoch=1)
    root = tmp_path_factory.mktemp("ck") / "checkpoints"
    built = build_variant(model, FULL, 2, seed=0)
    train(model=built.model, spec=FULL, num_layers=built.num_layers, train_ex=ex, val_ex=ex, cfg=cfg,
          metric="accuracy", device="cpu", pad_id=0, num_labels=2, checkpoint_dir=root, fingerprint="fp",
          log=lambda s: None)
    assert [p.name for p in root.iterdir()] == ["checkpoint-00000004"]

    def resume(ck_root: Path):
        b = build_variant(model, FULL, 2, seed=0)
        return train(model=b.model, spec=FULL, num_layers=b.num_layers, train_ex=ex, val_ex=ex,
                     cfg=dataclasses.replace(cfg, epochs=2), metric="accuracy", device="cpu", pad_id=0, num_labels=2,
                     checkpoint_dir=ck_root, fingerprint="fp", log=lambda s: None)

    return root, resume


@pytest.mark.parametrize("damage", ["trainable.safetensors", "optim.pt", "meta.json"])
def test_corrupted_checkpoint_is_refused_not_trained_on(checkpointed, damage, tmp_path, capsys):
    root, resume = checkpointed
    copy = tmp_path / "checkpoints"
    shutil.copytree(root, copy)
    f = copy / "checkpoint-00000004" / damage
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    line = one_line_exit(lambda: resume(copy), capsys)
    assert line.startswith(f"error: {copy / 'checkpoint-00000004'}: ")
    assert "unreadable checkpoint" in line or "not valid" in line, line
    with pytest.raises(ModelError):
        resume(copy)


def test_intact_checkpoint_resumes(checkpointed, tmp_path):
    """The control for the test above: the undamaged copy resumes (from step 4) and trains epoch 2."""
    root, resume = checkpointed
    shutil.copytree(root, tmp_path / "checkpoints")
    out = resume(tmp_path / "checkpoints")
    assert out.resumed_from_step == 4 and out.steps == 8


def test_checkpoint_folder_that_is_a_file_gives_one_line(checkpointed, tmp_path, capsys):
    """A file where the checkpoint folder belongs (or a full disk): one line naming the checkpoint, and
    no traceback from safetensors / torch.save (they raise their own error types)."""
    _, resume = checkpointed
    blocker = tmp_path / "checkpoints"
    blocker.write_text("not a folder")
    with pytest.raises(DepthtuneError, match=r"checkpoint-00000004: cannot write the checkpoint"):
        resume(blocker / "inner")
    line = one_line_exit(lambda: resume(blocker / "inner"), capsys)
    assert "cannot write the checkpoint" in line and "earlier checkpoints are kept" in line
    assert blocker.read_text() == "not a folder"


def test_write_error_inside_a_checkpoint_keeps_the_earlier_ones(checkpointed, tmp_path, monkeypatch, capsys):
    """safetensors raises its own SafetensorError on an I/O error (a full disk, EFBIG, EIO), not OSError:
    it used to escape as a traceback. Here the real error comes from writing into a folder that is gone."""
    import safetensors.torch as st

    root, resume = checkpointed
    copy = tmp_path / "checkpoints"
    shutil.copytree(root, copy)
    real = st.save_file

    def failing(tensors, filename, metadata=None):
        if "checkpoint-00000008" in str(filename):
            return real(tensors, str(tmp_path / "gone" / "x.safetensors"), metadata=metadata)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", failing)
    line = one_line_exit(lambda: resume(copy), capsys)
    assert line.startswith(f"error: {copy / 'checkpoint-00000008'}: cannot write the checkpoint (Error while "
                           "serializing"), line
    assert line.endswith("earlier checkpoints are kept")
    assert sorted(p.name for p in copy.iterdir()) == ["checkpoint-00000004"]  # no temp folder left either
