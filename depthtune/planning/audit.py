"""The parameter audit: exact counts per computational layer, a closed-form check,
and training memory / FLOPs estimates. Works on the meta device: no weights load.

    records = audit_variants(params, num_labels, typical_seq_len, cache_tokens)  # [AuditRecord]
    summary_markdown(records)                                                    # audit/summary.md

The audit stage (stages/audit.py) and `depthtune audit` (depthtune/cli.py) both call
`audit_specs` / `audit_variants`; finetune checks the model it trains against the record.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional

from torch import nn

from depthtune import tasks
from depthtune.config import ModelConfig, Params, VariantSpec, to_dict
from depthtune.model.families import family_of, is_tied
from depthtune.planning.costs import dims, estimate, estimate_settings
from depthtune.errors import DepthtuneError
from depthtune.model.layer_order import ordered_layer_names
from depthtune.training.precision import resolve_precision
from depthtune.records import AuditRecord, LabelSet, TokenReport
from depthtune.runtime import pick_device
from depthtune.model.param_names import classify_param, coarse_bucket
from depthtune.model.variants import BuiltVariant, build_variant, load_base_config

class AuditMismatch(DepthtuneError):
    pass


# ----------------------------------------------------------------------------- counting


def bucket_counts(model: nn.Module) -> list[dict]:
    """Fine buckets in model order: [{name, total, trainable}].

    A parameter shared by two modules (a causal LM's lm_head tied to the input embeddings) is counted
    once, in the bucket of its first name; the second bucket gets a row {name, total 0, trainable 0,
    tied_to: <the first bucket>} so the audit shows the tie."""
    buckets: "OrderedDict[str, list[int]]" = OrderedDict()
    first_bucket: dict[int, str] = {}
    tied: "OrderedDict[str, str]" = OrderedDict()
    for name, p in model.named_parameters(remove_duplicate=False):
        bucket = classify_param(name)
        if id(p) in first_bucket:
            if first_bucket[id(p)] != bucket:
                tied.setdefault(bucket, first_bucket[id(p)])
            continue
        first_bucket[id(p)] = bucket
        b = buckets.setdefault(bucket, [0, 0])
        b[0] += p.numel()
        b[1] += p.numel() if p.requires_grad else 0
    rows = [{"name": k, "total": v[0], "trainable": v[1]} for k, v in buckets.items()]
    rows += [{"name": k, "total": 0, "trainable": 0, "tied_to": to} for k, to in tied.items() if k not in buckets]
    return rows


def coarse_counts(buckets: list[dict]) -> list[dict]:
    """Embeddings, layer.0 .. layer.k-1 (adapters included), pooler, final_norm, head (`tied_to` kept)."""
    out: "OrderedDict[str, dict]" = OrderedDict()
    for b in buckets:
        c = coarse_bucket(b["name"])
        row = out.setdefault(c, {"name": c, "total": 0, "trainable": 0, "adapter": 0})
        row["total"] += b["total"]
        row["trainable"] += b["trainable"]
        if b["name"].endswith("adapter"):
            row["adapter"] += b["total"]
        if "tied_to" in b:
            row["tied_to"] = b["tied_to"]
    return list(out.values())


# ----------------------------------------------------------------------------- closed form


def closed_form_total(cfg, num_labels: int, task: str = "classification") -> Optional[tuple[int, str]]:
    """Total parameters from the config alone (no model built), or None for a family without a closed form
    (depthtune.model.families: each row's `closed_form`).

    task classification: num_labels=0 the bare model as AutoModel builds it; N AutoModelForSequenceClassification.
    task causal_lm (decoders): AutoModelForCausalLM, the lm_head V*H counted only when untied.
    """
    form = family_of(cfg.model_type).closed_form
    row = tasks.get(task)
    return None if form is None else form(cfg, row.num_labels(num_labels), row.lm_head)


def closed_form_adapters(model: nn.Module) -> int:
    """LoRA adds r*(in+out) per adapted linear module: A is r x in, B is out x r."""
    total = 0
    for _, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "r") and hasattr(mod, "in_features"):
            for key, r in mod.r.items():
                if key in mod.lora_A:
                    total += r * (mod.in_features + mod.out_features)
    return total


# ----------------------------------------------------------------------------- the audit


def audit_built(built: BuiltVariant, *, variant_name: str, spec: VariantSpec, num_labels: int,
                batch_size: int, seq_len: int, typical_seq_len: Optional[int] = None, check: bool = True,
                cache_tokens: int = 0, task: str = "classification", precision: str = "fp32",
                gradient_checkpointing: bool = False, model_source: str = "") -> AuditRecord:
    """Count a built variant (meta device is enough), check the closed form, estimate its cost.

    check=True raises AuditMismatch when counted != closed form; typical_seq_len adds the
    estimates at the typical batch shape (the tokenized train split's p95 length). precision is
    the resolved one (fp32 | bf16-autocast | bf16, depthtune.training.precision.resolve_precision).
    """
    model, cfg = built.model, built.config
    buckets = bucket_counts(model)
    total = sum(b["total"] for b in buckets)
    trainable = sum(b["trainable"] for b in buckets)
    adapters = sum(b["total"] for b in buckets if b["name"].endswith("adapter"))
    cf = closed_form_total(cfg, num_labels, task=task)
    closed = None
    if cf is not None:
        base, formula = cf
        expected = base + closed_form_adapters(model)
        closed = {"total": expected, "formula": formula, "adapters": adapters, "matches": expected == total}
        if check and expected != total:
            raise AuditMismatch(f"variant {variant_name}: counted {total:,} parameters but the closed form from "
                                f"the config gives {expected:,} ({formula})")
    # only kinds with a cacheable frozen prefix (train_top, probe) keep its outputs
    cache_tokens = cache_tokens if spec.method.cached_prefix_layers(spec.options, built.num_layers) else 0
    settings = estimate_settings(spec, model_source, task=task, precision=precision,
                                 gradient_checkpointing=gradient_checkpointing)
    typical = None
    if typical_seq_len:
        typical = estimate(cfg, buckets, total, trainable, batch_size, typical_seq_len, cache_tokens, **settings)
    architecture = {"model_type": cfg.model_type, "num_layers": built.num_layers, "hidden_size": dims(cfg)["H"],
                    "num_labels": tasks.get(task).num_labels(num_labels)}
    if tasks.get(task).lm_head:
        architecture["task"] = task
        architecture["tied_lm_head"] = is_tied(cfg)
    return AuditRecord(
        variant=variant_name,
        spec=to_dict(spec),
        description=spec.describe(),
        architecture=architecture,
        total_params=total,
        trainable_params=trainable,
        trainable_fraction=trainable / total if total else 0.0,
        adapter_params=adapters,
        closed_form=closed,
        layers=coarse_counts(buckets),
        buckets=buckets,
        estimates=estimate(cfg, buckets, total, trainable, batch_size, seq_len, cache_tokens, **settings),
        estimates_typical=typical,
    )


def audit_specs(model_cfg: ModelConfig, base_config, specs: Iterable[tuple[str, VariantSpec]], *, num_labels: int,
                batch_size: int, seq_len: int, typical_seq_len: Optional[int] = None, cache_tokens: int = 0,
                where: str = "variants.{name}", task: str = "classification", precision: str = "fp32",
                gradient_checkpointing: bool = False) -> list[AuditRecord]:
    """Audit each (name, spec) of one model on the meta device; `where` names a spec in errors."""
    records = []
    for name, spec in specs:
        built = build_variant(model_cfg, spec, num_labels, device="meta", base_config=base_config,
                              path=where.format(name=name), task=task)
        records.append(audit_built(built, variant_name=name, spec=spec, num_labels=num_labels,
                                   batch_size=batch_size, seq_len=seq_len, typical_seq_len=typical_seq_len,
                                   cache_tokens=cache_tokens, task=task, precision=precision,
                                   gradient_checkpointing=gradient_checkpointing, model_source=model_cfg.source))
    return records


def planned_precision(params: Params) -> str:
    """The precision finetune will train in: train.precision resolved for the device it will use
    (auto: bf16 autocast on cuda, fp32 on the CPU). An explicit `train.device: cuda` counts as cuda
    even where the audit runs without one (the audit plans; finetune refuses a missing GPU)."""
    device = params.train.device if params.train.device != "auto" else pick_device("auto")
    return resolve_precision(params.train.precision, device)


def audit_variants(params: Params, num_labels: int, typical_seq_len: Optional[int] = None,
                   cache_tokens: int = 0, precision: Optional[str] = None) -> list[AuditRecord]:
    """Every variant of params.yaml, in params order, at the training batch shape
    (train.batch_size x train.max_length), for params.task and train.gradient_checkpointing.
    precision: the resolved one (None: planned_precision(params)). cache_tokens counts only when
    the frozen prefix is cached."""
    return audit_specs(params.model, load_base_config(params.model), params.variants.items(),
                       num_labels=num_labels, batch_size=params.train.batch_size,
                       seq_len=params.train.max_length, typical_seq_len=typical_seq_len,
                       cache_tokens=cache_tokens if params.train.cache_frozen_prefix else 0, task=params.task,
                       precision=precision or planned_precision(params),
                       gradient_checkpointing=params.train.gradient_checkpointing)


# ----------------------------------------------------------------------------- inputs of the audit stage


def read_num_labels(labels_path: Path) -> int:
    """The label count from the prepare stage's labels.json; 2 when it does not exist yet (a quick audit)."""
    if not labels_path.exists():
        return 2
    return len(LabelSet.read(labels_path).names)


def read_token_stats(report_path: Path) -> tuple[Optional[int], int]:
    """(the longest train example's token length, tokens in train + validation) from the tokenization
    report; (None, 0) when it does not exist yet. The longest length sets the batch shape of the
    estimates that are compared with the measured peak: length-grouped batching puts the longest
    examples into one batch, padded to the longest (a p95 shape under-counts that step's activations);
    the token count sizes the frozen-prefix cache."""
    if not report_path.exists():
        return None, 0
    report = TokenReport.read(report_path)
    return report.longest("train") or report.p95("train"), report.tokens("train", "validation")  # old reports: p95


# ----------------------------------------------------------------------------- summary


def fmt_int(n: int) -> str:
    return f"{n:,}"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summary_table(records: list[AuditRecord]) -> str:
    """One row per variant: counts, the closed-form check, memory and FLOPs estimates."""
    def shape(e: dict) -> str:
        return f"{e['assumptions']['batch_size']} x {e['assumptions']['seq_len']}"

    lines = ["| variant | spec | layers | total params | trainable | trainable % | closed form | "
             "est. train memory (batch x tokens) | at max_length | fwd GFLOPs/token | train GFLOPs/token |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in records:
        check = "n/a" if r.closed_form is None else ("ok" if r.closed_form["matches"] else "MISMATCH")
        flops = r.estimates["flops_per_token"]
        used = r.estimates_typical or r.estimates  # AuditRecord.memory_estimate(): the figure every report shows
        lines.append(f"| {r.variant} | {r.description} | {r.architecture['num_layers']} | "
                     f"{fmt_int(r.total_params)} | {fmt_int(r.trainable_params)} | "
                     f"{100 * r.trainable_fraction:.2f} | {check} | "
                     f"{fmt_bytes(r.memory_estimate())} ({shape(used)}) | "
                     f"{fmt_bytes(r.estimates['memory_bytes']['total'])} ({shape(r.estimates)}) | "
                     f"{flops['forward'] / 1e9:.3f} | {flops['train'] / 1e9:.3f} |")
    return "\n".join(lines)


def summary_markdown(records: list[AuditRecord]) -> str:
    """The variants table, then trainable / total parameters per layer, variants side by side."""
    lines = ["# Parameter audit", "", summary_table(records),
             "", "## Trainable parameters per layer", "",
             "| layer | " + " | ".join(r.variant for r in records) + " |",
             "|---|" + "---:|" * len(records)]
    for name in ordered_layer_names(records):
        cells = []
        for r in records:
            row = next((x for x in r.layers if x["name"] == name), None)
            if row is None:
                cells.append("—")
            elif "tied_to" in row:  # a tied lm_head: its weight is counted once, under the row it is tied to
                cells.append(f"tied to {row['tied_to']}")
            else:
                cells.append(f"{fmt_int(row['trainable'])} / {fmt_int(row['total'])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    shape = records[0].estimates["assumptions"] if records else {}
    ckpt = "gradient checkpointing" if shape.get("gradient_checkpointing") else "no gradient checkpointing"
    lines += ["", "Estimated training memory: at the batch size x the longest tokenized train text (length-grouped "
              "batches put the longest texts in one batch): the figure the finetune record, the comparison report, "
              "MLflow and `depthtune plan` show; *at max_length*: every text padded to train.max_length. "
              f"{shape.get('task', 'classification')}, precision {shape.get('precision', 'fp32')}, {ckpt}, "
              "AdamW; every term in audit/<variant>.json (`estimates.memory_bytes`), formulas in "
              "depthtune/planning/audit.py (`estimate`).", ""]
    return "\n".join(lines)
