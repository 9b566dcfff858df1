"""Training mechanics on a tiny random-init BERT (hidden 32, 4 layers)."""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from depthtune.data.batching import Examples, collate, length_grouped_batches, predict_logits
from depthtune.training.checkpoints import checkpoint_meta, latest_checkpoint
from depthtune.config import Convergence, ModelConfig, TrainConfig, parse_section, parse_variant
from depthtune.errors import ModelError
from depthtune.training.prefix_cache import PrefixCache, frozen_prefix_layers, set_train_mode, top_forward
from depthtune.training.loop import TrainState, batch_logits, setup, train
from depthtune.model.variants import build_variant
from tests.conftest import TINY_ARCH

MODEL = parse_section(ModelConfig, {"source": "scratch", "scratch": TINY_ARCH}, "model")
CFG = TrainConfig(epochs=2, batch_size=8, lr=1e-3, warmup_fraction=0.1, checkpoint_every=0, seed=7,
                  patience=0, evals_per_epoch=1,  # a fixed 2 epochs, validated at each end
                  convergence=Convergence(max_epochs=1))  # max_epochs <= epochs: never extended

VARIANTS = {
    "full": {},
    "depth2": {"depth": 2},
    "top1": {"train_top": 1},
    "probe": {"train_top": 0},
    "lora": {"lora": {"r": 4, "alpha": 8, "targets": ["query", "value"], "layers": [2, 3]}},
    "bitfit": {"bitfit": True},
}


def build(name):
    spec = parse_variant(name, VARIANTS[name], f"variants.{name}")
    return spec, build_variant(MODEL, spec, 2, device="cpu", seed=0)


def test_length_grouped_batches_cover_every_index_once_and_depend_only_on_seed_and_epoch():
    lengths = [(i * 37) % 50 + 1 for i in range(203)]
    b1 = length_grouped_batches(lengths, 8, seed=3, epoch=1)
    assert sorted(i for b in b1 for i in b) == list(range(203))
    assert b1 == length_grouped_batches(lengths, 8, seed=3, epoch=1)
    assert b1 != length_grouped_batches(lengths, 8, seed=3, epoch=2)
    # grouping: padding waste far below a random order's
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in b1)
    assert waste < 0.15 * sum(lengths)


def test_collate_pads_to_the_longest_in_batch_only(data):
    train_ex, _ = data
    batch = collate(train_ex, [0, 1, 2], pad_id=0)
    longest = max(len(train_ex.input_ids[i]) for i in (0, 1, 2))
    assert batch["input_ids"].shape == (3, longest) and longest < 48
    assert int(batch["attention_mask"].sum()) == sum(len(train_ex.input_ids[i]) for i in (0, 1, 2))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_trains_and_frozen_parameters_stay_bit_identical(name, data):
    train_ex, val_ex = data
    spec, built = build(name)
    before = {n: p.detach().clone() for n, p in built.model.named_parameters()}
    out = train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex, cfg=CFG,
                metric="accuracy", device="cpu", pad_id=0, num_labels=2, log=lambda s: None)
    assert out.steps == 2 * 12  # 96 texts / batch 8 = 12 steps per epoch
    changed = frozen_changed = 0
    for n, p in built.model.named_parameters():
        same = torch.equal(before[n], p.detach())
        if p.requires_grad:
            changed += not same
        else:
            frozen_changed += not same
    assert frozen_changed == 0
    assert changed > 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in out.loss_curve)


def test_cached_prefix_matches_uncached_first_step_loss_and_gradients(data):
    train_ex, _ = data
    spec, built = build("top1")
    model = built.model
    k = frozen_prefix_layers(spec, built.num_layers)
    assert k == 3
    index = [0, 5, 9, 17]
    batch = collate(train_ex, index, pad_id=0)
    labels = batch.pop("labels")

    set_train_mode(model, k)
    torch.manual_seed(1)
    loss_ref = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
    loss_ref.backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    model.eval()
    cache = PrefixCache(model, train_ex, k, "cpu", batch_size=16, pad_id=0)
    set_train_mode(model, k)
    torch.manual_seed(1)  # same dropout masks in the trainable top
    hidden, mask = cache.batch(index, "cpu")
    loss = torch.nn.functional.cross_entropy(top_forward(model, hidden, mask, k), labels)
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) < 1e-5
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_ref[n], atol=1e-5, rtol=1e-4)


def test_saved_model_reloads_and_predicts_the_same_logits(data, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from depthtune.training.finetuning import save_model

    train_ex, val_ex = data
    spec, built = build("lora")
    train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex,
          cfg=dataclasses.replace(CFG, epochs=1), metric="accuracy", device="cpu", pad_id=0, num_labels=2,
          log=lambda s: None)
    expected = predict_logits(built.model, val_ex, 16, "cpu", 0)
    save_model(built.model, tokenizer, tmp_path / "m", variant="lora", spec=spec, labels=["neg", "pos"],
               audit=SimpleNamespace(trainable_params=built.trainable_params, total_params=built.total_params),
               base="scratch")
    assert (tmp_path / "m" / "model.safetensors").exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", use_safetensors=True)
    assert reloaded.config.id2label == {0: "neg", 1: "pos"}
    assert not any("lora" in n for n, _ in reloaded.named_parameters())  # merged
    got = predict_logits(reloaded, val_ex, 16, "cpu", 0)
    assert abs(got - expected).max() < 1e-4


def test_truncated_variant_saves_its_true_depth(tokenizer, tmp_path):
    from transformers import AutoConfig

    from depthtune.training.finetuning import save_model

    spec, built = build("depth2")
    save_model(built.model, tokenizer, tmp_path / "d", variant="depth2", spec=spec, labels=["a", "b"],
               audit=SimpleNamespace(trainable_params=1, total_params=1), base="scratch")
    assert AutoConfig.from_pretrained(tmp_path / "d").num_hidden_layers == 2


def _train_child(ckpt_dir: str, result_path: str, kill_at: int, data_pickle: str):
    import pickle

    torch.set_num_threads(1)
    train_ex, val_ex = pickle.loads(Path(data_pickle).read_bytes())
    spec, built = build("top1")

    def on_step(step, epoch):
        if kill_at and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = dataclasses.replace(CFG, checkpoint_every=5, keep_checkpoints=2, epochs=3)
    out = train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex, cfg=cfg,
                metric="accuracy", device="cpu", pad_id=0, num_labels=2, checkpoint_dir=Path(ckpt_dir),
                fingerprint="fp-top1", log=lambda s: None, on_step=on_step)
    logits = predict_logits(built.model, val_ex, 16, "cpu", 0)
    Path(result_path).write_bytes(pickle.dumps({"logits": logits, "val": out.val_curve, "loss": out.loss_curve,
                                                "resumed": out.resumed_from_step}))


def test_sigkill_then_resume_ends_with_the_same_metrics(data, tmp_path):
    import pickle

    blob = tmp_path / "data.pkl"
    blob.write_bytes(pickle.dumps(data))
    ctx = mp.get_context("spawn")

    def run(ckpt, out, kill_at):
        p = ctx.Process(target=_train_child, args=(str(ckpt), str(out), kill_at, str(blob)))
        p.start()
        p.join(300)
        return p.exitcode

    assert run(tmp_path / "ref_ck", tmp_path / "ref.pkl", 0) == 0
    assert run(tmp_path / "ck", tmp_path / "killed.pkl", 17) == -signal.SIGKILL  # killed mid-epoch 2
    kept = sorted(p.name for p in (tmp_path / "ck").glob("checkpoint-*"))
    assert kept == ["checkpoint-00000012", "checkpoint-00000015"]  # pruned to keep_checkpoints=2
    assert run(tmp_path / "ck", tmp_path / "resumed.pkl", 0) == 0
    ref = pickle.loads((tmp_path / "ref.pkl").read_bytes())
    res = pickle.loads((tmp_path / "resumed.pkl").read_bytes())
    assert res["resumed"] == 15
    assert res["val"] == ref["val"]
    assert [r["loss"] for r in res["loss"]] == [r["loss"] for r in ref["loss"]]
    assert (res["logits"] == ref["logits"]).all()


def test_checkpoint_from_another_variant_is_refused(data, tmp_path):
    train_ex, val_ex = data
    spec, built = build("probe")
    cfg = dataclasses.replace(CFG, epochs=1)
    train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex, cfg=cfg,
          metric="accuracy", device="cpu", pad_id=0, num_labels=2, checkpoint_dir=tmp_path, fingerprint="probe",
          log=lambda s: None)
    spec2, built2 = build("top1")
    with pytest.raises(ModelError, match="different variant"):
        train(model=built2.model, spec=spec2, num_layers=built2.num_layers, train_ex=train_ex, val_ex=val_ex, cfg=cfg,
              metric="accuracy", device="cpu", pad_id=0, num_labels=2, checkpoint_dir=tmp_path, fingerprint="top1",
              log=lambda s: None)


# ----------------------------------------------------------------------------- phases


def test_one_forward_path_gives_the_same_logits_from_the_cache_and_the_full_model(data):
    train_ex, val_ex = data
    spec, built = build("top1")
    index = [3, 8, 21, 40]
    logits = {}
    for cached in (True, False):
        run = setup(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex,
                    cfg=dataclasses.replace(CFG, cache_frozen_prefix=cached), metric="accuracy", device="cpu",
                    pad_id=0, num_labels=2, log=lambda s: None)
        assert (run.train_cache is not None) == cached and run.frozen == 3
        built.model.eval()  # no dropout: both paths are deterministic
        with torch.no_grad():
            logits[cached], labels, real = batch_logits(run, index)
        assert labels.tolist() == [train_ex.labels[i] for i in index]
        assert real == sum(len(train_ex.input_ids[i]) for i in index)
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-4)


def test_train_state_round_trips_through_checkpoint_meta_and_keeps_the_saved_extra_keys():
    state = TrainState(step=7, epoch=1, batch_in_epoch=3, best=0.5, best_val={"accuracy": 0.5},
                       loss_curve=[{"step": 1, "epoch": 0, "loss": 0.7, "lr": 1e-3}], fingerprint="fp",
                       extra={"mlflow_run_id": "saved"})
    meta = state.to_meta()
    assert meta["step"] == 7 and meta["mlflow_run_id"] == "saved" and "extra" not in meta
    back = TrainState.from_meta(meta, extra={"mlflow_run_id": "new", "other": 1})
    assert back == dataclasses.replace(state, extra={"mlflow_run_id": "saved", "other": 1})


def test_checkpoint_meta_gives_the_state_without_rng_and_refuses_a_garbled_file(data, tmp_path):
    train_ex, val_ex = data
    spec, built = build("probe")
    out = train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex,
                cfg=dataclasses.replace(CFG, epochs=1), metric="accuracy", device="cpu", pad_id=0, num_labels=2,
                checkpoint_dir=tmp_path, fingerprint="fp", extra_meta={"mlflow_run_id": "r1"}, log=lambda s: None)
    ck = latest_checkpoint(tmp_path)
    meta = checkpoint_meta(ck)
    assert meta["mlflow_run_id"] == "r1" and meta["step"] == out.steps and meta["fingerprint"] == "fp"
    assert not any(k.startswith("rng_") for k in meta)
    assert TrainState.from_meta(meta).val_curve == out.val_curve
    (ck / "meta.json").write_text('{"step": 1')
    with pytest.raises(ModelError, match="unreadable checkpoint"):
        checkpoint_meta(ck)


def test_evaluations_per_epoch_are_evenly_spaced_and_the_last_is_at_the_epoch_end():
    from depthtune.training.loop import is_eval_step

    cfg = TrainConfig(evals_per_epoch=2)
    # 125 steps an epoch (2,000 texts / 16): after steps 63 and 125, then 188 and 250
    assert [s for s in range(1, 251) if is_eval_step(cfg, s, 125)] == [63, 125, 188, 250]
    assert [s for s in range(1, 25) if is_eval_step(TrainConfig(evals_per_epoch=3), s, 12)] == [4, 8, 12, 16, 20, 24]
    assert [s for s in range(1, 5) if is_eval_step(TrainConfig(evals_per_epoch=9), s, 2)] == [1, 2, 3, 4]  # capped
    assert [s for s in range(1, 30) if is_eval_step(TrainConfig(eval_every=10), s, 12)] == [10, 20]  # steps win


def labelled_as_predicted(model, val_ex):
    """The validation texts relabelled with what the untrained model predicts, 1 in 8 flipped: it is right on 7/8
    and far from chance (the majority label's share), which an untrained model on the real labels is not."""
    preds = predict_logits(model, val_ex, 16, "cpu", 0).argmax(-1).tolist()
    labels = [p if i % 8 else 1 - p for i, p in enumerate(preds)]
    assert 0.2 < sum(labels) / len(labels) < 0.8, "the untrained model predicts one class: pick another seed"
    return dataclasses.replace(val_ex, labels=labels)


def test_a_run_near_chance_is_not_early_stopped_and_is_flagged(data):
    """Patience measures a plateau after learning: a model that never left chance trains its whole budget (here
    with no extension) and says it stayed near chance; its curve is flat, so it is a plateau, not rising."""
    train_ex, val_ex = data
    spec, built = build("probe")
    cfg = dataclasses.replace(CFG, lr=1e-12, epochs=3, evals_per_epoch=2, patience=2,
                              convergence=Convergence(max_epochs=3))
    out = train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex, cfg=cfg,
                metric="accuracy", device="cpu", pad_id=0, num_labels=2, log=lambda s: None)
    assert out.steps == 36 and not out.stopped_early and len(out.val_curve) == 6  # patience 2 would stop at 18
    majority = max(val_ex.labels.count(0), val_ex.labels.count(1)) / len(val_ex.labels)
    assert out.chance == majority and out.near_chance
    assert out.convergence == "plateau" and not out.not_converged and out.rise["gain"] <= 0


@pytest.fixture(scope="module")
def balanced(shared_data, tokenizer):
    """96 SST-2 phrases, 48 a class, alternating: a MiniLM probe at lr 1e-3 climbs on them for two epochs."""
    from tests.conftest import read_sst2

    texts, labels = read_sst2(shared_data / "sst2" / "train.tsv", 400, 0)
    neg = [t for t, y in zip(texts, labels) if y == 0][:48]
    pos = [t for t, y in zip(texts, labels) if y == 1][:48]
    texts = [t for pair in zip(neg, pos) for t in pair]
    enc = tokenizer(texts, truncation=True, max_length=48)
    return Examples(input_ids=enc["input_ids"], labels=[0, 1] * 48, token_type_ids=enc["token_type_ids"])


def climbing_probe(balanced, max_epochs: int, lines=None, checkpoint_dir=None):
    """The packaged MiniLM's probe, validated on its own training texts: 0.72 -> 0.86 accuracy in 2 epochs."""
    spec = parse_variant("probe", {"train_top": 0}, "variants.probe")
    built = build_variant(ModelConfig(), spec, 2, device="cpu", seed=0)
    cfg = dataclasses.replace(CFG, lr=1e-3, head_lr=1e-3, epochs=2, evals_per_epoch=2, patience=0,
                              warmup_fraction=0.0, convergence=Convergence(window=3, max_epochs=max_epochs),
                              checkpoint_every=5 if checkpoint_dir else 0)
    return train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=balanced, val_ex=balanced,
                 cfg=cfg, metric="accuracy", device="cpu", pad_id=0, num_labels=2, checkpoint_dir=checkpoint_dir,
                 fingerprint="climbing", log=(lines.append if lines is not None else lambda s: None))


def test_a_curve_still_rising_at_its_budget_is_flagged_and_the_verdict_crowns_no_rival(balanced):
    """Cut by the budget (no extension allowed) while climbing: flagged not converged, with the plateau test's
    figures; set beside a rival that scored better on the test split, the verdict refuses to call the rival
    significantly better, because this curve's trend could close the gap. Converged, the same rows crown it."""
    from depthtune.report.comparison import best_and_cheapest

    out = climbing_probe(balanced, max_epochs=2)
    accs = [p["accuracy"] for p in out.val_curve]
    assert accs[-1] == max(accs) and accs[-1] - accs[0] > 0.1, accs
    assert out.extensions == 0 and out.steps == 24 and not out.stopped_early
    assert out.convergence == "still rising" and out.not_converged and out.rise["rising"] and out.rise["p"] < 0.05
    assert out.horizon_steps == 24 and out.rise["rate_per_step"] > 0

    def rows(not_converged: bool) -> list:
        cut = {"variant": "cut", "accuracy": 0.80, "accuracy_ci": [0.775, 0.825], "trainable_params": 1_000,
               "p_vs_best": 1e-4, "n_test": 1000, "not_converged": not_converged, "rise": out.rise,
               "horizon_steps": out.horizon_steps}
        rival = {"variant": "rival", "accuracy": 0.88, "accuracy_ci": [0.86, 0.90], "trainable_params": 10,
                 "p_vs_best": None, "n_test": 1000, "not_converged": False}
        return [cut, rival]

    v = best_and_cheapest(rows(True), "accuracy")
    assert not v["significant"] and [u["variant"] for u in v["unsettled"]] == ["cut"]
    assert v["sentence"].startswith("Not settled: rival has the highest accuracy") and "would reach" in v["sentence"]
    crowned = best_and_cheapest(rows(False), "accuracy")
    assert crowned["significant"] and crowned["sentence"].startswith("Best by accuracy: **rival**")


def test_a_run_still_rising_at_its_budget_is_extended_until_it_levels_off(balanced):
    """Allowed up to 4 epochs: rising at the end of its 2, it gets 1 more (train.epochs / 2), with the warmup and
    decay again; after it the gain is noise (a plateau), so it stops there, converged."""
    lines = []
    out = climbing_probe(balanced, max_epochs=4, lines=lines)
    assert out.extensions == 1 and out.budget_epochs == 3 and out.steps == 36
    assert any("still rising" in line and "extending to 3 epochs" in line for line in lines), lines
    assert out.convergence == "plateau" and not out.not_converged and not out.rise["rising"]
    lrs = {p["step"]: p["lr"] for p in out.loss_curve}  # the lr after each step
    assert lrs[24] == 0.0 and lrs[25] > lrs[35] > 0.0 and lrs[36] == 0.0


def test_patience_stops_a_run_in_its_budget_but_not_inside_an_extension():
    from depthtune.training.loop import TrainState, patience_spent

    cfg = dataclasses.replace(CFG, patience=2)
    assert patience_spent(cfg, TrainState(bad_evals=2)) and not patience_spent(cfg, TrainState(bad_evals=1))
    assert not patience_spent(cfg, TrainState(bad_evals=5, extensions=1))  # the extension's warmup dip
    assert not patience_spent(dataclasses.replace(cfg, patience=0), TrainState(bad_evals=99))


def test_a_run_stopped_inside_its_extension_resumes_into_it_and_ends_the_same(balanced, tmp_path):
    """Checkpoints every 5 steps; the last one (the end, step 36) removed: the run resumes at step 35, inside its
    extension, with the extension's schedule and its kept validation outputs back, and ends as the uninterrupted
    run did (same curve, losses, lrs, verdict)."""
    ref = climbing_probe(balanced, max_epochs=4, checkpoint_dir=tmp_path)
    assert ref.extensions == 1 and ref.steps == 36
    ends = sorted(tmp_path.glob("checkpoint-*"))
    assert [p.name for p in ends][-1] == "checkpoint-00000036"
    import shutil
    shutil.rmtree(ends[-1])
    again = climbing_probe(balanced, max_epochs=4, checkpoint_dir=tmp_path)
    assert again.resumed_from_step == 35 and again.extensions == 1 and again.steps == 36
    assert again.val_curve == ref.val_curve and again.rise == ref.rise and again.convergence == ref.convergence
    assert [(p["loss"], p["lr"]) for p in again.loss_curve] == [(p["loss"], p["lr"]) for p in ref.loss_curve]


def test_early_stopping_ends_a_run_after_patience_evaluations_and_a_resume_does_not_train_on(data, tmp_path):
    """epochs is a maximum: validation twice an epoch, stop after `patience` evaluations without a new best."""
    train_ex, val_ex = data
    spec = parse_variant("probe", {"train_top": 0}, "variants.probe")
    built = build_variant(ModelConfig(), spec, 2, device="cpu", seed=0)  # MiniLM: its random head predicts both
    val_ex = labelled_as_predicted(built.model, val_ex)
    # lr 0: the weights never move, so every evaluation after the first ties the first (no new best)
    cfg = dataclasses.replace(CFG, lr=1e-12, epochs=8, evals_per_epoch=2, patience=2, checkpoint_every=0)
    out = train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex, cfg=cfg,
                metric="accuracy", device="cpu", pad_id=0, num_labels=2, checkpoint_dir=tmp_path, fingerprint="fp",
                log=lambda s: None)
    # 12 steps an epoch: evaluations after steps 6, 12, 18; the best stays the first; stop at step 18
    assert [p["step"] for p in out.val_curve] == [6, 12, 18] and [p["epoch"] for p in out.val_curve] == [0.5, 1, 1.5]
    assert out.steps == 18 and out.epochs_run == 1.5 and out.stopped_early and not out.not_converged
    assert out.best_step == 6 and out.best_epoch == 0.5
    # the stage killed after the last checkpoint and run again: nothing more to train
    again = train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex, cfg=cfg,
                  metric="accuracy", device="cpu", pad_id=0, num_labels=2, checkpoint_dir=tmp_path, fingerprint="fp",
                  log=lambda s: None)
    assert again.resumed_from_step == 18 and again.steps == 18 and again.val_curve == out.val_curve
