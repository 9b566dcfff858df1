"""The one place that knows the file layout of a depthtune project.

Every stage's inputs and outputs, relative to the project root. `dvc.yaml` hands
these paths to each stage on its command line (as iterative/example-get-started
does); the stages' argument defaults, the report, the registry and the tests take
them from here, and `tests/test_layout.py` checks `dvc.yaml` against `STAGE_IO`.

    data/prepared/{train,validation,test}.jsonl, labels.json, report.json   prepare
    data/prepared/train_left_out.jsonl (training rows the cap left out)     prepare
    pretrained/ (HF folder when pretrain is on; pretrain.json alone when off)  pretrain
    metrics/pretrain.json, plots/pretrain.csv                               pretrain
    checkpoints/_pretrain/ (while pretraining; removed on success)          pretrain
    data/tokenized/ (datasets.DatasetDict), data/tokenized/report.json      tokenization
    audit/<variant>.json, audit/summary.md                                  audit
    models/<variant>/, metrics/train/<variant>.json, plots/loss/<v>.csv     finetune@<variant>
    checkpoints/<variant>/ (while training; removed on success)             finetune@<variant>
    metrics/eval/<variant>.json, plots/confusion/<variant>.csv              evaluation@<variant>
    reports/comparison.{md,json}, variants.csv, pareto.png, depth.png       compare
    reports/index.html (the same report, self-contained, opens offline)     compare
    reports/promotion.json                                                  promote
"""
from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # where params.yaml and dvc.yaml live

SPLITS = ("train", "validation", "test")

PREPARED = "data/prepared"
TRAIN_LEFT_OUT_FILE = "train_left_out.jsonl"  # in PREPARED: training rows data.max_train_samples left out
PRETRAINED = "pretrained"  # the base model every variant starts from when pretrain is on (config.load_params)
PRETRAIN_METRICS = "metrics/pretrain.json"
PRETRAIN_PLOT = "plots/pretrain.csv"
PRETRAIN_CHECKPOINTS = "checkpoints/_pretrain"  # "_": no variant name starts with one
TOKENIZED = "data/tokenized"
AUDIT = "audit"
MODELS = "models"
SEED_MODELS = "seed_models"  # train.seeds > 1: the other seeds' models, evaluated for the spread
CHECKPOINTS = "checkpoints"
TRAIN_METRICS = "metrics/train"
EVAL_METRICS = "metrics/eval"
LOSS_PLOTS = "plots/loss"
CONFUSION_PLOTS = "plots/confusion"
REPORTS = "reports"
STATE = ".depthtune"  # run-local state: timings, locks (git- and dvc-ignored)


def prepared_split(split: str) -> str:
    return f"{PREPARED}/{split}.jsonl"


LABELS = f"{PREPARED}/labels.json"
TOKEN_REPORT = f"{TOKENIZED}/report.json"
AUDIT_SUMMARY = f"{AUDIT}/summary.md"
PROMOTION = f"{REPORTS}/promotion.json"
REPORT_FILES = ("comparison.md", "comparison.json", "variants.csv", "pareto.png", "depth.png", "index.html")


def _per_variant(template: str):
    """A path function of the variant name, e.g. audit_record("top2") -> "audit/top2.json"."""
    def path(variant: str) -> str:
        return template.format(variant=variant)
    return path


audit_record = _per_variant(AUDIT + "/{variant}.json")
model_dir = _per_variant(MODELS + "/{variant}")
seed_models_dir = _per_variant(SEED_MODELS + "/{variant}")  # seed-<s>/ per extra seed, and seeds.json
checkpoint_dir = _per_variant(CHECKPOINTS + "/{variant}")
train_record = _per_variant(TRAIN_METRICS + "/{variant}.json")
eval_record = _per_variant(EVAL_METRICS + "/{variant}.json")
loss_plot = _per_variant(LOSS_PLOTS + "/{variant}.csv")
confusion_plot = _per_variant(CONFUSION_PLOTS + "/{variant}.csv")


def stage_io(stage: str, variant: str = "${key}") -> dict[str, dict[str, str]]:
    """What a stage reads ("deps") and writes ("outs"), keyed by its command-line option name.

    `dvc.yaml` passes exactly these as `--<option> <path>`; its deps and outs hold the
    same paths (tests/test_layout.py). For the per-variant stages `variant` is the
    DVC template `${key}` unless a name is given.
    """
    v = variant
    table = {
        "prepare": ({}, {"out": PREPARED}),
        "pretrain": ({"prepared": PREPARED}, {"out": PRETRAINED, "metrics": PRETRAIN_METRICS,
                                              "loss-plot": PRETRAIN_PLOT}),
        # pretrained/ is a dep of every stage that builds or reads the model: new weights with the same
        # tokenizer leave data/tokenized unchanged, and finetune must still re-run
        "tokenization": ({"prepared": PREPARED, "pretrained": PRETRAINED}, {"out": TOKENIZED}),
        "audit": ({"labels": LABELS, "token-report": TOKEN_REPORT, "pretrained": PRETRAINED}, {"out": AUDIT}),
        "finetune": ({"tokenized": TOKENIZED, "labels": LABELS, "audit": audit_record(v), "pretrained": PRETRAINED},
                     {"model": model_dir(v), "seed-models": seed_models_dir(v), "metrics": train_record(v),
                      "loss-plot": loss_plot(v)}),
        "evaluation": ({"model": model_dir(v), "seed-models": seed_models_dir(v), "tokenized": TOKENIZED,
                        "labels": LABELS, "pretrained": PRETRAINED},
                       {"metrics": eval_record(v), "confusion-plot": confusion_plot(v)}),
        "compare": ({"audit": AUDIT, "train": TRAIN_METRICS, "eval": EVAL_METRICS, "pretrain": PRETRAIN_METRICS},
                    {"out": REPORTS}),
        "promote": ({"audit": AUDIT, "train": TRAIN_METRICS, "eval": EVAL_METRICS,
                     "test": prepared_split("test"), "labels": LABELS}, {"out": PROMOTION}),
    }
    deps, outs = table[stage]
    return {"deps": dict(deps), "outs": dict(outs)}


STAGES = ("prepare", "pretrain", "tokenization", "audit", "finetune", "evaluation", "compare", "promote")
PER_VARIANT = ("finetune", "evaluation")


def parse_stage_args(stage: str, argv: list | None, description: str | None = None):
    """The command line every stage takes: `--params`, `--variant` (per-variant stages) and one
    `--<option> PATH` per input and output in `stage_io(stage)`, defaulting to this layout.

    Returns an argparse.Namespace whose path attributes (dashes as underscores) are Paths,
    with the variant filled in, e.g. `args.metrics == Path("metrics/train/top2.json")`.
    """
    import argparse

    ap = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if stage in PER_VARIANT:
        ap.add_argument("--variant", required=True, help="a variant name from params.yaml `variants`")
    io = stage_io(stage, "{variant}")
    for option, default in {**io["deps"], **io["outs"]}.items():
        ap.add_argument(f"--{option}", default=None, help=f"default: {default.replace('{variant}', '<variant>')}")
    args = ap.parse_args(argv)
    variant = getattr(args, "variant", None)
    for option, default in {**io["deps"], **io["outs"]}.items():
        attr = option.replace("-", "_")
        value = getattr(args, attr)
        setattr(args, attr, Path(value if value is not None else default.format(variant=variant)))
    args.params = Path(args.params)
    return args
