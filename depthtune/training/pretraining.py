"""The pretrain stage's core: a tokenizer from the corpus and masked-LM / causal-LM pretraining (`pretrain:`).

    texts = pretrain_texts(prepared_dir)                  train split's texts (labels dropped); validation, test
    corpus = read_corpus(paths, column, held_out=...)     extra unlabeled texts, minus any validation/test text
    plan = resolve_plan(params, model_type)               objective, tokenizer kind, where the weights come from
    tokenizer = make_tokenizer(params, plan, texts, dir)  trained on train + corpus only, or the model's own
    model = build_model(params, plan, tokenizer)          random init (model.scratch) or model.source's weights
    outcome = run_pretraining(model, ...)                 AdamW, linear warmup/decay over max_steps, checkpoints
    save_pretrained(model, tokenizer, out_dir, ...)       a standard Hugging Face folder (safetensors + tokenizer)

Only training-split texts and pretrain.corpus ever reach the tokenizer trainer and the batches; the
validation texts give the held-out perplexity curve (never a gradient), the test texts only the coverage
figure. A corpus line equal to a validation or test text is dropped (counted in the record).

MLM perplexity is exp(mean nll over the masked tokens of the validation texts, masks fixed by the seed):
comparable across steps of one run, not with a causal LM's. MFU = training FLOPs a token x tokens/s over a
GEMM timed on this device now (depthtune.planning.step_time.gemm_rate): 6 x the parameters (forward 2N + backward 4N),
the MLM output matrix counted only for the predicted 15% (bert, roberta: mlm_logits runs it there alone).
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional

import torch
from torch import nn

from depthtune.evaluation import metrics
from depthtune.model import sources

from depthtune.planning import step_time
from depthtune.planning.audit import audit_built
from depthtune.data.batching import Examples, autocast, collate, length_grouped_batches
from depthtune.training.checkpoints import fault_kill_hook, resume_latest, save_checkpoint
from depthtune.training.checkpoints import fingerprint_of
from depthtune.training.loop import loss_csv
from depthtune.training.optimizer import apply_step, build_optimizer
from depthtune.config import Params, VariantSpec, to_dict
from depthtune.model.families import FAMILIES, family_of, is_decoder
from depthtune.data.coverage import split_coverage, unk_token_id
from depthtune.errors import ConfigError, DataError, ModelError, first_line
from depthtune.layout import TRAIN_LEFT_OUT_FILE
from depthtune.files import atomic_dir
from depthtune.training.masked_lm import IGNORE, mask_tokens, step_generator
from depthtune.evaluation.next_token import mean_loss, token_nll
from depthtune.records import PROMPT_SEP, LabelSet, Record, read_prepared_split
from depthtune.runtime import seed_everything
from depthtune.model.tokenizer_training import train_tokenizer
from depthtune.training.precision import autocast_dtype, resolve_precision
from depthtune.model.variants import BuiltVariant, count_params, num_layers_of, scratch_config

TOKENIZER_DIR = "tokenizer"  # inside the checkpoint folder: a resumed run keeps the tokenizer it started with
EVAL_SEED_STEP = 10 ** 9  # the validation masks' generator step: the same masks at every evaluation

# How the audit counts each objective's model: a masked LM as a labelled task's bare encoder (its vocabulary-wide
# logits run on the masked positions only: not counted per position), a causal LM as the causal_lm task's.
OBJECTIVE_TASK = {"mlm": "classification", "causal_lm": "causal_lm"}


@dataclass(kw_only=True)
class PretrainRecord(Record):
    """metrics/pretrain.json: what the pretrain stage did (enabled false: the pass-through)."""
    SCHEMA: ClassVar[str] = "depthtune.pretrain/1"
    WRITER: ClassVar[str] = "the pretrain stage"
    enabled: bool
    model_source: str  # what the variants start from: the configured model (off) or the pretrained folder
    base: str = ""  # start_from scratch: the architecture; model: the configured model.source
    objective: str = ""
    tokenizer: dict = field(default_factory=dict)  # trained?, kind, vocab_size, source
    data: dict = field(default_factory=dict)  # texts and tokens used: train split, corpus (dropped), validation
    coverage: dict = field(default_factory=dict)  # {split: unknown-token share ...} with the new tokenizer
    total_params: int = 0
    trainable_params: int = 0
    steps: int = 0
    stopped_by: str = ""  # max_steps | max_minutes
    train_time_s: float = 0.0
    tokens: int = 0  # real (non-pad) tokens trained on
    tokens_per_s: float = 0.0
    gemm_flops_per_s: float = 0.0
    mfu: float = 0.0
    flops_per_token: float = 0.0  # counted training FLOPs a token (flops_per_token)
    loss_curve: list = field(default_factory=list)  # {step, loss, lr}
    val_curve: list = field(default_factory=list)  # {step, loss, perplexity} on the validation texts
    final_perplexity: Optional[float] = None
    resumed_from_step: Optional[int] = None
    audit: dict = field(default_factory=dict)  # the pretraining model's buckets and estimates (audit_built)
    tracking: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- data


@dataclass
class Texts:
    train: list  # the training split's texts (labels dropped) + the corpus: all that pretraining sees
    validation: list
    test: list
    left_out: int = 0  # training rows the cap left out of fine-tuning, read too (pretrain.train_texts: all)
    corpus_read: int = 0
    corpus_dropped: int = 0  # corpus lines equal to a validation/test text


def split_texts(prepared_dir: Path, *, left_out: bool = False) -> dict:
    """{split: [text]} of the prepared splits, labels dropped (a prompt/completion pair becomes one text);
    left_out=True adds "train_left_out": the training rows data.max_train_samples kept out of fine-tuning
    ([] when the cap left none out, or for data prepared before that file existed)."""
    num_labels = len(LabelSet.read(prepared_dir / "labels.json").names)

    def texts(path: Path) -> list:
        return [r.text.replace(PROMPT_SEP, " ") for r in read_prepared_split(path, num_labels)]
    out = {split: texts(prepared_dir / f"{split}.jsonl") for split in ("train", "validation", "test")}
    if left_out:
        path = prepared_dir / TRAIN_LEFT_OUT_FILE  # empty when the cap left nothing out
        out["train_left_out"] = texts(path) if path.exists() and path.stat().st_size else []
    return out


def read_corpus_file(path: Path, column: str) -> list[str]:
    """A text a line (.txt and anything else), or column `column` of a .csv / .tsv / .jsonl file."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            if path.suffix in (".csv", ".tsv"):
                rows = csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ",")
                if rows.fieldnames is None or column not in rows.fieldnames:
                    raise DataError(f"pretrain.corpus: {path} has no column {column!r} "
                                    f"(columns: {', '.join(rows.fieldnames or [])}); set pretrain.corpus_column")
                return [str(r[column] or "").strip() for r in rows]
            if path.suffix == ".jsonl":
                out = []
                for i, line in enumerate(fh, 1):
                    if line.strip():
                        row = json.loads(line)
                        if not isinstance(row, dict) or not isinstance(row.get(column), str):
                            raise DataError(f"pretrain.corpus: {path}:{i}: no string {column!r} field")
                        out.append(row[column].strip())
                return out
            return [line.strip() for line in fh]
    except FileNotFoundError:
        raise DataError(f"pretrain.corpus: {path} not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"pretrain.corpus: cannot read {path} ({first_line(exc)})") from None


def pretrain_texts(prepared_dir: Path, corpus: tuple = (), column: str = "text", train_texts: str = "all") -> Texts:
    """The texts pretraining may use (train split, with the rows the cap left out unless train_texts is
    "capped", + corpus; never a validation or test text) and the held-out ones."""
    splits = split_texts(Path(prepared_dir), left_out=train_texts == "all")
    left_out = splits.get("train_left_out", [])
    held_out = set(splits["validation"]) | set(splits["test"])
    extra = [t for p in corpus for t in read_corpus_file(Path(p), column) if t]
    kept = [t for t in extra if t not in held_out]
    return Texts(train=splits["train"] + left_out + kept, validation=splits["validation"], test=splits["test"],
                 left_out=len(left_out), corpus_read=len(extra), corpus_dropped=len(extra) - len(kept))


# ----------------------------------------------------------------------------- what to build


@dataclass(frozen=True)
class Plan:
    objective: str  # mlm | causal_lm
    model_type: str
    tokenizer_kind: Optional[str]  # wordpiece | bytelevel_bpe when trained, else None


def resolve_plan(params: Params, model_type: Optional[str]) -> Plan:
    """The objective and tokenizer kind for the model pretraining starts from (auto: by family)."""
    pre = params.pretrain
    if model_type not in FAMILIES:
        raise ConfigError(f"pretrain: cannot pretrain a {model_type or 'model of unknown type'} "
                          f"(known: {', '.join(FAMILIES)})")
    encoder = not is_decoder(model_type)
    objective = pre.objective if pre.objective != "auto" else ("mlm" if encoder else "causal_lm")
    if (objective == "mlm") != encoder:
        raise ConfigError(f"pretrain.objective: {objective} does not fit a {model_type} "
                          f"({'encoders: mlm' if encoder else 'decoders: causal_lm'}); set it to auto")
    kind = None
    if pre.tokenizer.train:
        kind = pre.tokenizer.kind if pre.tokenizer.kind != "auto" else ("wordpiece" if encoder else "bytelevel_bpe")
    return Plan(objective=objective, model_type=model_type, tokenizer_kind=kind)


def base_model_type(params: Params) -> Optional[str]:
    """The family pretraining builds: model.scratch's (start_from scratch) or model.source's."""
    if params.pretrain.start_from == "scratch":
        return params.model.scratch.model_type
    return sources.model_type_of(params.model)


def make_tokenizer(params: Params, plan: Plan, texts: list, keep_dir: Path):
    """A tokenizer trained on `texts` (saved in keep_dir and reused from there on resume), or the model's."""
    from transformers import AutoTokenizer

    pre = params.pretrain
    if plan.tokenizer_kind is None:
        return sources.load_tokenizer(params.model)
    folder = Path(keep_dir) / TOKENIZER_DIR
    if not (folder / "tokenizer.json").is_file():
        max_length = max(pre.max_length, params.train.max_length)
        train_tokenizer(texts, folder, kind=plan.tokenizer_kind, vocab_size=pre.tokenizer.vocab_size,
                        min_frequency=pre.tokenizer.min_frequency, max_length=max_length)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    if is_decoder(plan.model_type):
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return tokenizer


def build_model(params: Params, plan: Plan, tokenizer, seed: int) -> nn.Module:
    """The pretraining model: a masked-LM or causal-LM head on random init (model.scratch, vocabulary = the
    tokenizer's) or on model.source's weights. Every parameter trains."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    auto = AutoModelForMaskedLM if plan.objective == "mlm" else AutoModelForCausalLM
    seed_everything(seed)  # the random init (and a new head's) is the seed's
    if params.pretrain.start_from == "scratch":
        arch = params.model.scratch
        cfg = scratch_config(type(arch)(**{**to_dict(arch), "vocab_size": len(tokenizer)}))
        cfg.pad_token_id = tokenizer.pad_token_id
        if is_decoder(plan.model_type):
            cfg.bos_token_id = cfg.eos_token_id = tokenizer.eos_token_id
        return auto.from_config(cfg)
    src = sources.resolve_source(params.model.source)
    sources.check_remote_code(src, params.model.trust_remote_code)
    sources.check_weights_format(src, params.model.allow_pickle)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a sentence encoder has no MLM head yet: reported as MISSING keys
    try:
        return auto.from_pretrained(src, revision=params.model.revision, use_safetensors=not params.model.allow_pickle,
                                    trust_remote_code=params.model.trust_remote_code)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"pretrain: cannot load {params.model.source} for {plan.objective} "
                         f"({first_line(exc, 300)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def encode(tokenizer, texts: list, max_length: int, decoder: bool) -> Examples:
    """Token ids (special tokens added, cut at max_length); decoders' texts end with eos (a document boundary)."""
    ids = tokenizer(texts, truncation=True, max_length=max_length - (1 if decoder else 0),
                    add_special_tokens=not decoder, verbose=False)["input_ids"]
    if decoder and tokenizer.eos_token_id is not None:
        ids = [x + [tokenizer.eos_token_id] for x in ids]
    ids = [x for x in ids if len(x) >= 2]
    return Examples(input_ids=ids, labels=[0] * len(ids))


def coverage_of(tokenizer, texts: Texts) -> dict:
    """{split: unknown-token and unrepresentable-character shares} with the tokenizer the variants will use."""
    unk, cache, out = unk_token_id(tokenizer), {}, {}
    for split in ("train", "validation", "test"):
        rows = getattr(texts, split)
        ids = tokenizer(rows, add_special_tokens=False, verbose=False)["input_ids"]
        tokens = sum(len(x) for x in ids)
        unknown = sum(t == unk for x in ids for t in x) if unk is not None else 0
        out[split] = split_coverage(rows, unk_tokens=unknown, tokens=tokens, tokenizer=tokenizer, cache=cache)
    return out


# ----------------------------------------------------------------------------- the loop


@dataclass
class Setup:
    """One pretraining run: the model, its data and optimizer, and where it checkpoints."""
    model: nn.Module
    objective: str
    train: Examples
    validation: Examples
    pad_id: int
    mask_id: Optional[int]
    special_ids: list
    vocab_size: int
    cfg: object  # the pretrain section (config.PretrainConfig)
    device: str
    autocast_dtype: Optional[torch.dtype]
    optimizer: torch.optim.Optimizer
    scheduler: object
    checkpoint_dir: Optional[Path]
    fingerprint: str
    log: Callable[[str], None] = print


@dataclass
class State:
    """Where pretraining stands (a checkpoint's meta.json)."""
    step: int = 0
    tokens: int = 0
    predicted: int = 0  # tokens whose loss counted (mlm: the chosen ones)
    train_time_s: float = 0.0
    loss_curve: list = field(default_factory=list)
    val_curve: list = field(default_factory=list)
    fingerprint: str = ""
    extra: dict = field(default_factory=dict)  # the caller's keys (mlflow_run_id)

    def to_meta(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "predicted": self.predicted, "train_time_s": self.train_time_s,
                "loss_curve": self.loss_curve, "val_curve": self.val_curve, "fingerprint": self.fingerprint,
                **self.extra}

    @classmethod
    def from_meta(cls, meta: dict) -> "State":
        known = ("step", "tokens", "predicted", "train_time_s", "loss_curve", "val_curve", "fingerprint")
        return cls(**{k: meta[k] for k in known}, extra={k: v for k, v in meta.items() if k not in known})


def mlm_logits(model: nn.Module, masked: torch.Tensor, mask: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """[chosen positions, vocabulary] logits: the encoder on every token, the MLM head only where a token is
    predicted (the same numbers as the full model's logits there); other families: the full model's."""
    # the family's masked-LM head (depthtune.model.families: mlm_head), run on the chosen positions only (15% of them);
    # measured: the packaged MiniLM's 30,522-way output at every position costs about what its encoder does
    head = getattr(model, family_of(model.config.model_type).mlm_head or "", None)
    if head is None:
        return model(input_ids=masked, attention_mask=mask).logits[chosen]
    return head(model.base_model(input_ids=masked, attention_mask=mask)[0][chosen])


def flops_per_token(model: nn.Module, objective: str, predicted_share: float) -> float:
    """Training FLOPs per token: 6 x the parameters (2 forward + 4 backward), the MLM head's output matrix
    counted only for the predicted share of tokens when mlm_logits runs it there alone."""
    total = sum(p.numel() for p in model.parameters())
    if objective != "mlm" or family_of(model.config.model_type).mlm_head is None:
        return 6.0 * total
    output = model.get_output_embeddings().weight.numel()
    return 6.0 * (total - output * (1.0 - predicted_share))


def batch_loss(run: Setup, index: list, generator: torch.Generator, examples: Examples) -> tuple:
    """(mean loss, summed nll, predicted tokens, real tokens) of one batch of `examples`."""
    batch = collate(examples, index, run.pad_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with autocast(run.device, run.autocast_dtype):
        if run.objective == "mlm":
            masked, labels = mask_tokens(ids, mask, mask_id=run.mask_id, special_ids=run.special_ids,
                                         vocab_size=run.vocab_size, probability=run.cfg.mask_probability,
                                         generator=generator)
            chosen = (labels != IGNORE).to(run.device)
            logits = mlm_logits(run.model, masked.to(run.device), mask.to(run.device), chosen)
            nll = nn.functional.cross_entropy(logits.float(), labels.to(run.device)[chosen], reduction="sum")
            counted = chosen.sum()
            return nll / counted.clamp(min=1), nll, counted, int(mask.sum())
        ids, mask = ids.to(run.device), mask.to(run.device)
        logits = run.model(input_ids=ids, attention_mask=mask).logits
    nll, counted = token_nll(logits, ids, mask)
    return mean_loss(nll, counted), nll.sum(), counted.sum(), int(mask.sum())


@torch.no_grad()
def held_out(run: Setup, batch_size: int = 32) -> dict:
    """{loss, perplexity} on the validation texts (MLM: the same masks every time)."""
    run.model.eval()
    generator = step_generator(run.cfg.seed, EVAL_SEED_STEP)
    order = sorted(range(len(run.validation)), key=run.validation.lengths.__getitem__)
    total, count = 0.0, 0
    for s in range(0, len(order), batch_size):
        _, nll, counted, _ = batch_loss(run, order[s:s + batch_size], generator, run.validation)
        total, count = total + float(nll), count + int(counted)
    run.model.train()
    loss = total / max(1, count)
    return {"loss": round(loss, 6), metrics.PRETRAIN.name: round(math.exp(min(loss, 50.0)), 4)}


def start_or_resume(run: Setup, extra: dict) -> tuple[State, Optional[int]]:
    resumed = resume_latest(run.checkpoint_dir, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                            fingerprint=run.fingerprint)
    if resumed is None:
        return State(fingerprint=run.fingerprint, extra=dict(extra)), None
    meta, _, name = resumed
    state = State.from_meta(meta)
    run.log(f"pretrain: resumed from {name} (step {state.step})")
    return state, state.step


def one_step(run: Setup, state: State, batches: list) -> None:
    """Optimizer step `state.step + 1` on its batch (batch order: by epoch and seed, as a resume sees it)."""
    epoch, at = divmod(state.step, len(batches[0]))
    if epoch >= len(batches):
        batches.append(length_grouped_batches(run.train.lengths, run.cfg.batch_size, run.cfg.seed, epoch))
    loss, _, counted, real = batch_loss(run, batches[epoch][at], step_generator(run.cfg.seed, state.step), run.train)
    loss.backward()
    lr = run.scheduler.get_last_lr()[0]
    apply_step(run.model, run.optimizer, run.scheduler, run.cfg.max_grad_norm)  # every parameter trains
    state.step += 1
    state.tokens += real
    state.predicted += int(counted)
    state.loss_curve.append({"step": state.step, "loss": round(loss.item(), 6), "lr": lr})


def run_pretraining(run: Setup, *, extra_meta: dict, keep: int = 2) -> tuple[State, Optional[int], str]:
    """Train to max_steps (or max_minutes): (final state, step resumed from or None, what stopped it)."""
    cfg = run.cfg
    run.model.to(run.device).train()
    state, resumed = start_or_resume(run, extra_meta)
    batches = [length_grouped_batches(run.train.lengths, cfg.batch_size, cfg.seed, 0)]
    on_step, stopped_by = fault_kill_hook("pretrain", named_only=True), "max_steps"
    if not state.val_curve:
        state.val_curve.append({"step": 0, **held_out(run)})
        run.log(f"pretrain: step 0 held-out perplexity {state.val_curve[-1][metrics.PRETRAIN.name]:.2f}")
    while state.step < cfg.max_steps:
        t0 = time.perf_counter()
        one_step(run, state, batches)
        state.train_time_s += time.perf_counter() - t0
        last = state.step == cfg.max_steps or (cfg.max_minutes and state.train_time_s >= 60 * cfg.max_minutes)
        if state.step % cfg.eval_every == 0 or last:
            state.val_curve.append({"step": state.step, **held_out(run)})
            run.log(f"pretrain: step {state.step}/{cfg.max_steps} loss {state.loss_curve[-1]['loss']:.4f}, held-out "
                    f"perplexity {state.val_curve[-1][metrics.PRETRAIN.name]:.2f}, "
                    f"{state.tokens / state.train_time_s:,.0f} "
                    "tokens/s")
        if on_step is not None:
            on_step(state.step)
        if run.checkpoint_dir is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            save_checkpoint(run.checkpoint_dir, state.step, model=run.model, optimizer=run.optimizer,
                            scheduler=run.scheduler, meta=state.to_meta(), best_state={}, keep=keep)
        if last and state.step < cfg.max_steps:
            stopped_by = "max_minutes"
            break
    return state, resumed, stopped_by


# ----------------------------------------------------------------------------- the stage's steps


def passthrough(params: Params) -> PretrainRecord:
    """pretrain off: nothing trained, the configured model goes through (the record says which)."""
    return PretrainRecord(enabled=False, model_source=params.model.source)


def folder_summary(record: PretrainRecord) -> dict:
    """pretrained/pretrain.json: what the folder holds, deterministic (no timings), so that DVC sees the same
    output when the same weights come out."""
    return {"enabled": record.enabled, "model_source": record.model_source, "base": record.base,
            "objective": record.objective, "steps": record.steps,
            "tokenizer": {k: record.tokenizer.get(k) for k in ("trained", "kind", "vocab_size")}}


def keep_pooler(model_file: Path, source: str) -> int:
    """An MLM model has no pooler: put model.source's pretrained pooler into the saved weights (the variants'
    classifiers read it; LoRA and BitFit leave it frozen). Returns the tensors added."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = Path(source)
    files = sorted(src.glob("*.safetensors")) if src.is_dir() else []
    pooler = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if key.split("pooler.", 1)[-1] in ("dense.weight", "dense.bias") and "pooler." in key:
                    pooler[key.split("pooler.", 1)[1]] = fh.get_tensor(key)
    if not pooler:
        return 0
    state = load_file(str(model_file))
    prefix = next(k for k in state if ".embeddings." in k).split("embeddings.")[0]  # "bert." / "roberta."
    state.update({f"{prefix}pooler.{k}": v for k, v in pooler.items()})
    save_file(state, str(model_file), metadata={"format": "pt"})
    return len(pooler)


def save_pretrained(model: nn.Module, tokenizer, out_dir: Path, record: PretrainRecord,
                    pooler_source: Optional[str]) -> None:
    """The base model as a standard Hugging Face folder: model.safetensors, config.json, the tokenizer, and
    pretrain.json (folder_summary); written all at once."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if pooler_source is not None:
            keep_pooler(tmp / "model.safetensors", pooler_source)
        (tmp / "pretrain.json").write_text(json.dumps(folder_summary(record), indent=2) + "\n")


def write_passthrough(record: PretrainRecord, out_dir: Path) -> None:
    with atomic_dir(out_dir) as tmp:
        (tmp / "pretrain.json").write_text(json.dumps(folder_summary(record), indent=2) + "\n")


def pretrain_csv(record: PretrainRecord) -> str:
    """plots/pretrain.csv: step, training loss, held-out perplexity where measured (DVC plots)."""
    val = {v["step"]: v[metrics.PRETRAIN.name] for v in record.val_curve}
    return loss_csv(record.loss_curve, {f"val_{metrics.PRETRAIN.name}": val})


def audit_model(model: nn.Module, plan: Plan, cfg, total: int) -> dict:
    """The audit of the pretraining model (buckets, estimates at batch x max_length); every parameter trains."""
    counted_total, trainable = count_params(model)
    built = BuiltVariant(model=model, config=model.config, num_layers=num_layers_of(model.config),
                         total_params=counted_total, trainable_params=trainable)
    rec = audit_built(built, variant_name="pretrain", spec=VariantSpec(), num_labels=0, batch_size=cfg.batch_size,
                      seq_len=cfg.max_length, check=False, task=OBJECTIVE_TASK[plan.objective],
                      model_source="scratch")
    if not (rec.trainable_params == trainable == total == rec.total_params):
        raise ModelError(f"pretrain: the audit counts {rec.trainable_params:,} trainable of {rec.total_params:,}, "
                         f"the model {trainable:,} of {total:,}: every parameter must train")
    return rec.to_dict()


def setup(params: Params, texts: Texts, *, checkpoint_dir: Optional[Path], device: str,
          log: Callable[[str], None] = print) -> tuple[Setup, Plan, object]:
    """Tokenizer, model, encoded texts, optimizer: everything a run needs, nothing trained yet."""
    pre = params.pretrain
    plan = resolve_plan(params, base_model_type(params))
    keep = checkpoint_dir if checkpoint_dir is not None else Path(".")
    tokenizer = make_tokenizer(params, plan, texts.train, keep)
    if plan.objective == "mlm" and tokenizer.mask_token_id is None:
        raise ConfigError(f"pretrain: the tokenizer of {params.model.tokenizer or params.model.source} has no mask "
                          "token for mlm; train one (pretrain.tokenizer.train: true)")
    model = build_model(params, plan, tokenizer, pre.seed)
    if model.config.vocab_size < len(tokenizer):
        raise ModelError(f"pretrain: the tokenizer has {len(tokenizer):,} tokens, the model's vocabulary "
                         f"{model.config.vocab_size:,}")
    decoder = is_decoder(plan.model_type)
    train = encode(tokenizer, texts.train, pre.max_length, decoder)
    validation = encode(tokenizer, texts.validation, pre.max_length, decoder)
    if not train.input_ids or not validation.input_ids:
        raise DataError("pretrain: no training or validation text of 2 tokens or more")
    optimizer, scheduler = build_optimizer(model, pre, pre.max_steps)  # the fine-tuning loop's: AdamW, linear
    vocab_fp = hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()
    data_fp = hashlib.sha256(json.dumps(train.input_ids).encode()).hexdigest()
    precision = resolve_precision(params.train.precision, device)
    run = Setup(model=model, objective=plan.objective, train=train, validation=validation,
                pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                mask_id=tokenizer.mask_token_id, special_ids=list(tokenizer.all_special_ids),
                vocab_size=model.config.vocab_size, cfg=pre, device=device,
                autocast_dtype=autocast_dtype(precision), optimizer=optimizer, scheduler=scheduler,
                checkpoint_dir=checkpoint_dir, log=log,
                fingerprint=fingerprint_of(to_dict(pre), params.model.source, to_dict(params.model.scratch),
                                           vocab_fp, data_fp))
    return run, plan, tokenizer


def pretrain(params: Params, prepared_dir: Path, out_dir: Path, *, checkpoint_dir: Optional[Path], device: str,
             extra_meta: Optional[dict] = None, log: Callable[[str], None] = print) -> PretrainRecord:
    """The stage's work when pretrain is on: train, measure, save pretrained/ (its record is returned)."""
    pre = params.pretrain
    texts = pretrain_texts(prepared_dir, pre.corpus, pre.corpus_column, pre.train_texts)
    log(f"pretrain: {len(texts.train):,} training texts (the train split's, labels dropped, "
        f"{texts.left_out:,} of them left out of fine-tuning by data.max_train_samples; + "
        f"{texts.corpus_read - texts.corpus_dropped:,} corpus lines; {texts.corpus_dropped:,} corpus lines equal to a "
        f"validation/test text dropped), {len(texts.validation):,} validation texts for the held-out perplexity")
    run, plan, tokenizer = setup(params, texts, checkpoint_dir=checkpoint_dir, device=device, log=log)
    total, trainable = count_params(run.model)
    audit = audit_model(run.model, plan, pre, total)
    log(f"pretrain: {plan.objective} on a {plan.model_type} "
        f"({'random init, model.scratch' if pre.start_from == 'scratch' else params.model.source}), "
        f"{total:,} parameters, all trainable; tokenizer {plan.tokenizer_kind or 'of the model'} "
        f"({len(tokenizer):,} tokens); {pre.max_steps} steps of {pre.batch_size} texts, device {device}")
    state, resumed, stopped_by = run_pretraining(run, extra_meta=extra_meta or {})
    gemm = step_time.gemm_rate(device, tokens=pre.batch_size * 32, hidden=run.model.config.hidden_size,
                               dtype=run.autocast_dtype or torch.float32)
    tokens_per_s = state.tokens / state.train_time_s if state.train_time_s else 0.0
    flops = flops_per_token(run.model, plan.objective, state.predicted / max(1, state.tokens))
    record = PretrainRecord(
        enabled=True, model_source=str(out_dir), objective=plan.objective,
        base=f"scratch ({plan.model_type})" if pre.start_from == "scratch" else params.model.source,
        tokenizer={"trained": plan.tokenizer_kind is not None, "kind": plan.tokenizer_kind or "the model's",
                   "vocab_size": len(tokenizer), "trained_on_texts": len(texts.train) if plan.tokenizer_kind else 0},
        data={"train_texts": len(texts.train), "train_left_out_texts": texts.left_out, "corpus_lines": texts.corpus_read, "corpus_dropped": texts.corpus_dropped,
              "train_sequences": len(run.train), "validation_sequences": len(run.validation),
              "train_tokens": sum(run.train.lengths)},
        coverage=coverage_of(tokenizer, texts), total_params=total, trainable_params=trainable, steps=state.step,
        stopped_by=stopped_by, train_time_s=round(state.train_time_s, 3), tokens=state.tokens,
        tokens_per_s=round(tokens_per_s, 1), gemm_flops_per_s=gemm,
        mfu=round(flops * tokens_per_s / gemm, 4) if gemm else 0.0, flops_per_token=flops, loss_curve=state.loss_curve,
        val_curve=state.val_curve, final_perplexity=state.val_curve[-1][metrics.PRETRAIN.name], resumed_from_step=resumed,
        audit=audit, extra={"mlflow_run_id": state.extra.get("mlflow_run_id")} if state.extra.get("mlflow_run_id") else {})
    save_pretrained(run.model.cpu(), tokenizer, out_dir, record,
                    pooler_source=sources.resolve_source(params.model.source)
                    if pre.start_from == "model" and plan.objective == "mlm" else None)
    return record
