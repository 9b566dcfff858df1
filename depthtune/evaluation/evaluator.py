"""Score one saved variant on the test split: metrics with 95% intervals, predictions, confusion,
latency (an EvalRecord).

The model is loaded back from its saved folder, exactly as a user would serve it. The intervals
are percentile bootstraps over the test texts (depthtune/evaluation/significance.py, 1,000 resamples,
fixed seed: the same predictions always give the same interval); the predictions are kept in
test order so that the report and the registry can run paired tests between variants.
"""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from depthtune.data.batching import Examples, collate, predict_logits
from depthtune import tasks
from depthtune.config import EvaluationConfig
from depthtune.evaluation import metrics
from depthtune.errors import ModelError, first_line
from depthtune.evaluation.lm_scoring import continuations, score_texts
from depthtune.evaluation.metrics import lm_metrics
from depthtune.evaluation.scoring_batch import scoring_batch_size
from depthtune.evaluation.metric_modules import ClassificationReport, quick_scores
from depthtune.progress import QUIET_FOR_S, Progress, counting_forwards
from depthtune.records import EvalRecord
from depthtune.evaluation.significance import bootstrap_ci, lm_bootstrap_ci
from depthtune.model.sources import load_tokenizer_folder
from depthtune.model.variants import AUTO_CLASSES

CI_RESAMPLES, CI_SEED, CI_LEVEL = 1000, 0, 0.95  # every variant: same resamples of the same texts


def scoring_progress(model, n: int, batch_size: int, name: str):
    """A progress line (one batch = one forward pass) while the test split is scored, after a few seconds."""
    total = -(-n // batch_size)  # ceil
    return counting_forwards(model, Progress(f"scoring {name} (test)", total, unit="batch", delay_s=QUIET_FOR_S))


def load_saved_model(model_dir: Path, device: str, task: str = "classification"):
    model_dir = Path(model_dir)
    if not (model_dir / "model.safetensors").exists():
        raise ModelError(f"{model_dir}: no model.safetensors (run `dvc repro finetune` first)")
    auto = AUTO_CLASSES[tasks.get(task).auto_class]  # the task's model class, as it was trained
    try:
        return auto.from_pretrained(model_dir, use_safetensors=True).to(device).eval()
    except Exception as exc:  # noqa: BLE001  (any unloadable folder: one line naming it)
        raise ModelError(f"{model_dir}: cannot load the model ({first_line(exc, 160)})") from None


def check_labels(model, labels: list, model_dir: Path, labels_path: Path) -> None:
    saved = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if saved != labels:
        raise ModelError(f"{model_dir}: label mapping {saved} differs from {labels_path} {labels}")


@torch.no_grad()
def latency(model, ex: Examples, *, n: int, batch_size: int, device: str, pad_id: int,
            throughput: bool = True) -> dict:
    """p50/p95 ms per example at batch 1, and examples/s at `batch_size` (after 3 warm-up passes;
    throughput=False: latency only, the caller times its own batched pass)."""
    idx = list(range(min(n, len(ex))))
    for i in idx[:3]:
        model(**{k: v.to(device) for k, v in collate(ex, [i], pad_id).items() if k != "labels"})
    times = []
    for i in idx:
        batch = {k: v.to(device) for k, v in collate(ex, [i], pad_id).items() if k != "labels"}
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model(**batch)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    if not throughput:
        return {"latency_ms": {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95))}}
    m = min(len(ex), batch_size * 8)  # up to 8 batches for throughput
    sub = Examples(input_ids=ex.input_ids[:m], labels=ex.labels[:m],
                   token_type_ids=ex.token_type_ids[:m] if ex.token_type_ids is not None else None)
    t = time.perf_counter()
    predict_logits(model, sub, batch_size, device, pad_id)
    dt = time.perf_counter() - t
    return {"latency_ms": {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95))},
            "throughput_per_s": m / dt if dt else 0.0}


def evaluate_model(model, test: Examples, *, name: str, labels: list, ev: EvaluationConfig, device: str,
                   provenance: dict) -> tuple[EvalRecord, list]:
    """(the variant's EvalRecord, predicted label ids in test order)."""
    pad_id = model.config.pad_token_id or 0
    with scoring_progress(model, len(test), ev.batch_size, name):
        logits = predict_logits(model, test, ev.batch_size, device, pad_id)
    preds = logits.argmax(-1).tolist()
    refs = [int(y) for y in test.labels]
    report = ClassificationReport().compute(predictions=preds, references=refs, num_labels=len(labels),
                                            label_names=labels)
    # every label metric's interval; macro-F1 over every label id, as the report above (an absent class scores 0)
    intervals = {f"{m.name}_ci": list(bootstrap_ci(refs, preds, m.name, n=CI_RESAMPLES, seed=CI_SEED, level=CI_LEVEL,
                                                   num_labels=len(labels))) for m in metrics.label_metrics()}
    cost = latency(model, test, n=ev.latency_examples, batch_size=ev.batch_size, device=device, pad_id=pad_id)
    record = EvalRecord.from_dict({"schema": EvalRecord.SCHEMA, "variant": name, "split": "test", "n": len(test),
                                   "labels": labels, "device": device, **report, **intervals, **cost,
                                   "predictions": preds, "references": refs, **provenance},
                                  f"evaluation of {name}")
    return record, preds


def evaluate_lm(model, tokenizer, test: Examples, *, name: str, ev: EvaluationConfig, device: str,
                provenance: dict, task: str) -> EvalRecord:
    """A per-position task (causal_lm): loss, perplexity and bits per byte on the test split with 95% intervals,
    the per-text sums that pair two variants, scoring tokens/s, batch-1 latency and a few greedy continuations."""
    pad_id = model.config.pad_token_id or 0
    t = time.perf_counter()
    size = scoring_batch_size(model.config.vocab_size, max(test.lengths, default=1), ev.batch_size)  # score_texts'
    with scoring_progress(model, len(test), size, name):
        nll, tokens = score_texts(model, test, batch_size=ev.batch_size, device=device, pad_id=pad_id)
    seconds = time.perf_counter() - t
    n_bytes = np.asarray(test.n_bytes if test.n_bytes is not None else [0] * len(test))
    scores = lm_metrics(nll, tokens, n_bytes)
    per_text = {"tokens": tokens, "n_bytes": n_bytes}  # each ratio metric's denominator, per text
    intervals = {f"{m.name}_ci": list(lm_bootstrap_ci(nll, per_text[m.denominator], m.name, n=CI_RESAMPLES,
                                                      seed=CI_SEED, level=CI_LEVEL)) for m in metrics.ratio_metrics()}
    cost = latency(model, test, n=ev.latency_examples, batch_size=ev.batch_size, device=device, pad_id=pad_id,
                   throughput=False)
    real = sum(test.lengths)
    generations = continuations(model, tokenizer, test.input_ids[:ev.generations], max_new_tokens=ev.max_new_tokens,
                                device=device, prompt_lengths=test.loss_start)
    doc = {"schema": EvalRecord.SCHEMA, "variant": name, "split": "test", "task": task, "n": len(test),
           "labels": [], "device": device, "loss": scores["loss"],
           **{m.name: scores[m.name] for m in metrics.ratio_metrics()}, **intervals, "nll": nll.tolist(), "tokens": tokens.tolist(),
           "n_bytes": n_bytes.tolist(), "tokens_per_s": real / seconds if seconds else 0.0,
           "throughput_per_s": len(test) / seconds if seconds else 0.0, "latency_ms": cost["latency_ms"],
           "generations": generations, **provenance}
    return EvalRecord.from_dict(doc, f"evaluation of {name}")


def evaluate(model, test: Examples, *, task: str, name: str, labels: list, ev: EvaluationConfig, device: str,
             provenance: dict, model_dir: Path, labels_path: Path) -> tuple[EvalRecord, list]:
    """The task's evaluation of a loaded model: (its EvalRecord, predicted label ids; [] for a per-position task)."""
    if tasks.get(task).per_position:
        record = evaluate_lm(model, load_tokenizer_folder(model_dir), test, name=name, ev=ev, device=device,
                             provenance=provenance, task=task)
        return record, []
    check_labels(model, labels, model_dir, labels_path)
    return evaluate_model(model, test, name=name, labels=labels, ev=ev, device=device, provenance=provenance)


def seed_models(seed_dir: Path) -> list[tuple[int, Path]]:
    """(seed, folder) of each extra seed's model in seed_models/<variant>/, seed order ([] with one seed)."""
    if not seed_dir.is_dir():
        return []
    found = [(int(p.name.split("-", 1)[1]), p) for p in seed_dir.glob("seed-*")
             if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found)


def seed_scores(model_dir: Path, seed_dir: Path, test: Examples, *, record: EvalRecord, labels: list,
                device: str, batch_size: int) -> list[dict]:
    """train.seeds > 1: [{seed, <metrics>}] on the test texts, the evaluated model's seed first:
    accuracy and macro_f1 (classification), perplexity and bits_per_byte (causal_lm)."""
    others = seed_models(seed_dir)
    if not others:
        return []
    meta_path = model_dir / "depthtune.json"
    seed = json.loads(meta_path.read_text()).get("seed") if meta_path.is_file() else None
    task = tasks.get(record.task)
    scores = [{"seed": seed, **{m: record.metric(m) for m in task.metrics}}]
    for s, folder in others:
        model = load_saved_model(folder, device, record.task)
        pad_id = model.config.pad_token_id or 0
        if task.per_position:
            nll, tokens = score_texts(model, test, batch_size=batch_size, device=device, pad_id=pad_id)
            lm = lm_metrics(nll, tokens, test.n_bytes)
            scores.append({"seed": s, **{m: lm[m] for m in task.metrics}})
            continue
        check_labels(model, labels, folder, folder / "config.json")
        preds = predict_logits(model, test, batch_size, device, pad_id).argmax(-1).tolist()
        scores.append({"seed": s, **quick_scores(preds, [int(y) for y in test.labels], len(labels))})
    return scores


def confusion_csv(gold: list, preds: list, labels: list) -> str:
    """plots/confusion/<variant>.csv: actual,predicted per test example (label names)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["actual", "predicted"])
    for y, p in zip(gold, preds):
        w.writerow([labels[y], labels[p]])
    return buf.getvalue()
