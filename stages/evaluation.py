"""DVC stage `evaluation@<variant>`: test-split metrics and inference cost of one variant.

    python -m stages.evaluation --variant top2 [--params params.yaml] [--model models/top2]
        [--tokenized data/tokenized] [--labels data/prepared/labels.json]
        [--metrics metrics/eval/top2.json] [--confusion-plot plots/confusion/top2.csv]

Reads params `evaluation`, `train.device`, `train.num_threads`. With train.seeds > 1 the other
seeds' models (seed_models/<variant>/seed-<s>/) are scored on the same texts too. Writes the eval record
(depthtune.records.EvalRecord) and the confusion CSV (DVC confusion plot). The compare stage logs
every variant's eval record into its MLflow run (one MLflow start-up for all variants, not one each).
"""
from __future__ import annotations

import statistics

from depthtune import layout, runtime, tasks
from depthtune.data.batching import Examples
from depthtune.evaluation.class_summary import worst_classes
from depthtune.config import load_params, variant_of
from depthtune.evaluation import metrics
from depthtune.evaluation.evaluator import confusion_csv, evaluate, load_saved_model, seed_scores
from depthtune.files import write_text_atomic
from depthtune.provenance import provenance
from depthtune.records import EvalRecord, LabelSet
from depthtune.data.tokenized import load_tokenized


def main(argv=None) -> None:
    args = layout.parse_stage_args("evaluation", argv, __doc__)
    params = load_params(args.params)
    name = args.variant
    variant_of(params, name)
    device = runtime.pick_device(params.train.device)
    runtime.set_threads(params.train.num_threads)
    labels = LabelSet.read(args.labels).names
    model = load_saved_model(args.model, device, params.task)
    test = Examples.from_dataset(load_tokenized(args.tokenized)["test"])
    record, preds = evaluate(model, test, task=params.task, name=name, labels=labels, ev=params.evaluation,
                             device=device, provenance=provenance(), model_dir=args.model, labels_path=args.labels)
    # train.seeds > 1: the other seeds' models on the same texts (the spread of training randomness)
    record.seed_scores = seed_scores(args.model, args.seed_models, test, record=record, labels=labels,
                                     device=device, batch_size=params.evaluation.batch_size)
    # the confusion plot (a labelled task); a causal LM's file holds only the header (DVC tracks it either way)
    write_text_atomic(args.confusion_plot, confusion_csv(test.labels if preds else [], preds, labels))
    record.write(args.metrics)
    for line in summary_lines(record, params.evaluation.metric):
        print(line)
    print(f"-> {args.metrics}")


def summary_lines(record: EvalRecord, metric: str) -> list[str]:
    """What the stage prints: the test scores, their cost, the spread over seeds, the continuations."""
    task = tasks.get(record.task)
    scores = ", ".join(f"{metrics.get(m).display} {record.metric(m):.4f}" for m in task.metrics)
    if task.per_position:
        lines = [f"evaluation {record.variant}: {scores}, loss {record.loss:.4f} on {record.n} test texts "
                 f"({sum(record.tokens):,} tokens); {record.tokens_per_s:,.0f} tokens/s, latency p50 "
                 f"{record.latency_ms['p50']:.1f} ms"]
        lines += [f"  {g['prompt']!r} -> {g['continuation']!r}" for g in record.generations]
    else:
        lines = [f"evaluation {record.variant}: {scores} on {record.n} test texts; latency p50 "
                 f"{record.latency_ms['p50']:.1f} ms, {record.throughput_per_s:.0f} texts/s"]
        worst = worst_classes(record.per_class, 3)
        if len(record.per_class) > 2:  # many classes: name the weakest (the report lists more)
            lines.append(f"evaluation {record.variant}: lowest F1: "
                         + ", ".join(f"{r['label']} {r['f1']:.3f} ({r['support']} texts)" for r in worst))
    if record.seed_scores:
        vals = [s[metric] for s in record.seed_scores]
        lines.append(f"evaluation {record.variant}: {metric} over {len(vals)} seeds {statistics.mean(vals):.4f} "
                     f"(sd {statistics.stdev(vals):.4f}, {min(vals):.4f}-{max(vals):.4f})")
    return lines


if __name__ == "__main__":
    from depthtune.files import run_main

    runtime.configure_process()
    run_main(main)
