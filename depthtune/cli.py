"""`depthtune` for people at a terminal: quick audits and predictions.

  depthtune audit --config PATH/config.json --variant train_top=2 --variant depth=3,lora.r=8 --labels 2
  depthtune audit --config PATH --task causal_lm --precision bf16 --gradient-checkpointing --variant lora.r=8
  depthtune audit --params params.yaml            # every variant in params.yaml (its task and train settings)
  depthtune plan --config PATH/config.json --memory 24GiB --seq-len 256 --variant full --variant lora.r=16
  depthtune predict --model models/full "a great film"
  depthtune predict --model models:/depthtune-classifier@champion "a great film"
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml

from depthtune import tasks
from depthtune.config import ModelConfig, load_params, parse_variant
from depthtune.model.families import family_of
from depthtune.errors import ConfigError, DepthtuneError
from depthtune.runtime import configure_process


def parse_variant_arg(text: str) -> dict:
    """`depth=3,lora.r=8,lora.targets=query+value` -> {'depth': 3, 'lora': {'r': 8, 'targets': [...]}}."""
    out: dict = {}
    if text.strip() in ("", "full"):
        return out
    for part in text.split(","):
        if "=" not in part:
            raise ConfigError(f"--variant {text!r}: {part!r} is not KEY=VALUE (e.g. train_top=2 or lora.r=8)")
        key, value = part.split("=", 1)
        key = key.strip()
        if key in ("lora.targets", "lora.layers"):
            parsed = [yaml.safe_load(v) for v in value.split("+") if v]
        else:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"--variant {text!r}: cannot read value {value!r} of {key}") from None
        if key == "lora" and parsed in (True, "true"):
            out.setdefault("lora", {})
            continue
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--variant {text!r}: {key} conflicts with an earlier value")
        node[leaf] = parsed
    return out


def load_config_file(path: str):
    """A transformers config from a config.json (no code from the file is ever run)."""
    from transformers import AutoConfig

    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config: {p} not found") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--config: {p} is not readable JSON ({exc})") from None
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"--config: {p} has no model_type")
    for k in ("architectures", "auto_map", "transformers_version", "_name_or_path"):
        data.pop(k, None)
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"--config: {p}: unsupported model_type {model_type!r} ({exc})") from None


def cmd_audit(args) -> int:
    # imported here, not at the top: torch and transformers cost seconds that `depthtune predict --help` need not pay
    from depthtune.planning.audit import audit_specs, audit_variants, fmt_int, summary_markdown

    if args.params:
        records = audit_variants(load_params(args.params), args.labels)  # batch shape from params `train`
    elif args.config:
        specs = [(s, parse_variant("v", parse_variant_arg(s), f"--variant {s}")) for s in args.variant or ["full"]]
        records = audit_specs(ModelConfig(source=str(args.config)), load_config_file(args.config), specs,
                              num_labels=args.labels, batch_size=args.batch_size, seq_len=args.seq_len,
                              where="variant {name}", task=args.task, precision=args.precision,
                              gradient_checkpointing=args.gradient_checkpointing)
    else:
        raise ConfigError("audit: give --config PATH/config.json (or --params params.yaml)")
    if args.json:
        for rec in records:
            print(json.dumps(rec.to_dict()))
        return 0
    print(summary_markdown(records))
    for rec in records:
        if rec.closed_form is not None:
            print(f"{rec.variant}: {fmt_int(rec.total_params)} counted = {fmt_int(rec.closed_form['total'])} "
                  "closed form")
    return 0


def cmd_plan(args) -> int:
    import torch

    from depthtune.planning.planner import PlanSettings, at_hidden, parse_memory, plan, plan_table
    from depthtune.planning.step_time import measure
    from depthtune.model.variants import load_base_config

    if args.config:
        model_cfg, base = ModelConfig(source=str(args.config)), load_config_file(args.config)
    elif args.model:
        model_cfg = ModelConfig(source=args.model)
        base = load_base_config(model_cfg)
    else:
        raise ConfigError("plan: give --config PATH/config.json or --model SOURCE")
    targets = "+".join(family_of(base.model_type).lora_targets) or "query+value"  # the family's q/v projections
    specs = [(s, parse_variant("v", parse_variant_arg(s), f"--variant {s}"))
             for s in args.variant or ["full", "train_top=2", f"lora.r=8,lora.targets={targets}"]]
    device = "cuda" if args.precision != "fp32" and torch.cuda.is_available() else "cpu"
    throughput = measure(device, tokens=args.seq_len * 8, hidden=at_hidden(base), precision=args.precision)
    if args.tflops:
        throughput.gemm_flops_per_s = args.tflops * 1e12
    settings = PlanSettings(memory=parse_memory(args.memory), seq_len=args.seq_len, examples=args.examples,
                            task=args.task, num_labels=args.labels, precision=args.precision,
                            gradient_checkpointing=args.gradient_checkpointing, throughput=throughput,
                            mfu=args.mfu, device=device,
                            flops_source="--tflops" if args.tflops else f"GEMM timed now on {device}")
    rows = plan(model_cfg, base, specs, settings)
    if args.json:
        for row in rows:
            print(json.dumps({**row, "settings": dataclasses.asdict(settings)}))
        return 0
    print(plan_table(rows, settings))
    return 0


def cmd_predict(args) -> int:
    from depthtune.serving import load_predictor

    predictor = load_predictor(args.model)
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not predictor.labels:  # a causal LM (TextGenerator): the texts are prompts, continued greedily
        for text, cont in zip(texts, predictor.generate(texts)):
            print(json.dumps({"prompt": text, "continuation": cont}) if args.json else f"{text}\t{cont}")
        return 0
    for text, pred in zip(texts, predictor.predict_with_scores(texts)):
        print(json.dumps({"text": text, "label": pred["label"], "score": round(pred["score"], 4)})
              if args.json else f"{pred['label']}\t{pred['score']:.3f}\t{text}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="depthtune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("audit", help="count total/trainable parameters per layer for depth variants")
    a.add_argument("--config", help="a transformers config.json (or a folder holding one)")
    a.add_argument("--params", help="audit every variant of a params.yaml instead")
    a.add_argument("--variant", action="append", help="e.g. train_top=2, depth=3,lora.r=8, bitfit=true (repeatable)")
    a.add_argument("--labels", type=int, default=2, help="0 = bare AutoModel; N = sequence classifier with N labels")
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--seq-len", type=int, default=128)
    a.add_argument("--task", choices=tasks.names(), default="classification",
                   help="causal_lm: a decoder with its language-model head (--labels unused)")
    a.add_argument("--precision", choices=("fp32", "bf16-autocast", "bf16"), default="fp32",
                   help="training precision the memory estimate assumes")
    a.add_argument("--gradient-checkpointing", action="store_true", help="estimate with gradient checkpointing")
    a.add_argument("--json", action="store_true", help="one JSON object per variant per line")
    a.set_defaults(fn=cmd_audit)
    pl = sub.add_parser("plan", help="the largest batch each variant fits in a memory budget, its peak and epoch time")
    pl.add_argument("--config", help="a transformers config.json (or a folder holding one): no weights needed")
    pl.add_argument("--model", help="a model source as in params.yaml (packaged:minilm-l6, a folder, a Hub id)")
    pl.add_argument("--memory", required=True, help="the device memory training may use, e.g. 24GiB, 80GB")
    pl.add_argument("--seq-len", type=int, default=256)
    pl.add_argument("--examples", type=int, default=10_000, help="examples per epoch, for the time prediction")
    pl.add_argument("--labels", type=int, default=2)
    pl.add_argument("--task", choices=tasks.names(), default="classification")
    pl.add_argument("--precision", choices=("fp32", "bf16-autocast", "bf16"), default="bf16-autocast")
    pl.add_argument("--gradient-checkpointing", action="store_true")
    pl.add_argument("--mfu", type=float, default=None,
                    help="the share of the GEMM rate a training step reaches, for every variant (default: the "
                         "kind's measured value on this machine, else the kind's assumed efficiency in depthtune/methods/<kind>.py)")
    pl.add_argument("--tflops", type=float, default=None,
                    help="the target machine's GEMM TFLOP/s (e.g. 790 for an H200 in bf16); default: measured here")
    pl.add_argument("--variant", action="append", help="e.g. train_top=2, depth=3,lora.r=8 (repeatable; default: "
                                                       "full, train_top=2, LoRA r 8 on the q/v projections)")
    pl.add_argument("--json", action="store_true", help="one JSON object per variant per line")
    pl.set_defaults(fn=cmd_plan)
    p = sub.add_parser("predict", help="label texts with a saved model folder or an MLflow model URI")
    p.add_argument("--model", required=True, help="models/<variant> or models:/<name>@champion")
    p.add_argument("--json", action="store_true")
    p.add_argument("text", nargs="*", help="texts (default: one per line on stdin)")
    p.set_defaults(fn=cmd_predict)
    args = parser.parse_args(argv)
    if getattr(args, "labels", 0) is not None and getattr(args, "labels", 0) < 0:
        parser.error("--labels must be >= 0")
    configure_process()
    try:
        return args.fn(args)
    except DepthtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
