"""DVC stage `evaluation@<variant>`: test-split metrics and inference cost of one variant.

    python -m stages.evaluation --variant top2 [--params params.yaml]

Reads params `evaluation`, `train.device`; inputs models/<variant>/ and data/tokenized.
Writes metrics/eval/<variant>.json and plots/confusion/<variant>.csv (DVC confusion plot).
The model is loaded back from its saved folder, exactly as a user would serve it.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np
import torch

from depthtune import runtime
from depthtune.config import load_variant_args
from depthtune.errors import ModelError
from depthtune.files import read_json, run_main, write_json_atomic, write_text_atomic
from depthtune.metric_modules import ClassificationReport
from depthtune.provenance import provenance
from depthtune.training import Examples, collate, predict_logits


def load_saved_model(model_dir: Path, device: str):
    from transformers import AutoModelForSequenceClassification

    if not (model_dir / "model.safetensors").exists():
        raise ModelError(f"{model_dir}: no model.safetensors (run `dvc repro finetune` first)")
    try:
        return AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True).to(device).eval()
    except Exception as exc:
        raise ModelError(f"{model_dir}: cannot load the model ({str(exc).splitlines()[0][:160]})") from None


@torch.no_grad()
def latency(model, ex: Examples, *, n: int, batch_size: int, device: str, pad_id: int) -> dict:
    """p50/p95 ms per example at batch 1, and examples/s at `batch_size` (after 3 warm-up passes)."""
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
    m = min(len(ex), batch_size * 8)  # up to 8 batches for throughput
    sub = Examples(input_ids=ex.input_ids[:m], labels=ex.labels[:m],
                   token_type_ids=ex.token_type_ids[:m] if ex.token_type_ids is not None else None)
    t = time.perf_counter()
    predict_logits(model, sub, batch_size, device, pad_id)
    dt = time.perf_counter() - t
    return {"latency_ms": {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95))},
            "throughput_per_s": m / dt if dt else 0.0}


def main(argv=None) -> None:
    params, name = load_variant_args(argv, __doc__)
    device = runtime.pick_device(params.train.device)
    runtime.set_threads(params.train.num_threads)
    from stages.finetune import load_tokenized

    labels = read_json("data/prepared/labels.json")["names"]
    model_dir = Path("models") / name
    model = load_saved_model(model_dir, device)
    saved_labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if saved_labels != labels:
        raise ModelError(f"{model_dir}: label mapping {saved_labels} differs from data/prepared/labels.json {labels}")
    test = Examples.from_dataset(load_tokenized(Path("data/tokenized"))["test"])
    pad_id = model.config.pad_token_id or 0
    ev = params.evaluation
    logits = predict_logits(model, test, ev.batch_size, device, pad_id)
    preds = logits.argmax(-1).tolist()
    report = ClassificationReport().compute(predictions=preds, references=test.labels, num_labels=len(labels),
                                            label_names=labels)
    cost = latency(model, test, n=ev.latency_examples, batch_size=ev.batch_size, device=device, pad_id=pad_id)
    result = {"schema": "depthtune.eval/1", "variant": name, "split": "test", "n": len(test), "labels": labels,
              "device": device, **report, **cost, **provenance()}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["actual", "predicted"])
    for y, p in zip(test.labels, preds):
        w.writerow([labels[y], labels[p]])
    confusion = Path("plots/confusion") / f"{name}.csv"
    write_text_atomic(confusion, buf.getvalue())
    from depthtune import tracking
    train_json = Path("metrics/train") / f"{name}.json"
    run_id = read_json(train_json).get("mlflow_run_id") if train_json.exists() else None
    result["tracking"] = tracking.log_variant_evaluation(params.tracking, name, eval_result=result,
                                                         confusion_csv_path=confusion, run_id=run_id)
    write_json_atomic(Path("metrics/eval") / f"{name}.json", result)
    print(f"evaluation {name}: accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f} on {len(test)} "
          f"test texts; latency p50 {cost['latency_ms']['p50']:.1f} ms, {cost['throughput_per_s']:.0f} texts/s")


if __name__ == "__main__":
    run_main(main)
