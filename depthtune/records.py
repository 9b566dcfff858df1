"""Typed, versioned records: everything one stage writes and another reads.

One class per file kind, each with `read(path)` (validated: a missing key, a wrong
type or another schema version is a one-line DepthtuneError naming the file and the
key) and `write(path)` (atomic). Stages build a record and write it; the report,
the registry and tracking read records, never raw dict keys. docs/results.md
describes the files; changing a field means changing it here.

    LabelSet          data/prepared/labels.json           {"names": [...]}
    PreparedExample   data/prepared/<split>.jsonl         {"text": str, "label": int id} a line
    TokenReport       data/tokenized/report.json          token-length stats per split
    AuditRecord       audit/<variant>.json                depthtune.audit/1
    TrainRecord       metrics/train/<variant>.json        depthtune.train/1
    EvalRecord        metrics/eval/<variant>.json         depthtune.eval/2
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from depthtune import tasks
from depthtune.errors import DataError, DepthtuneError
from depthtune.files import read_json, write_json_atomic

# ----------------------------------------------------------------------------- validation


def _is_type(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return any(_is_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, dict):
        return isinstance(value, origin)
    return isinstance(value, tp)


def _expected(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Union:
        return " or ".join(_expected(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp) or tp
    return {type(None): "null", float: "a number", int: "an integer", str: "a string", bool: "true/false",
            list: "a list", dict: "an object"}.get(origin, getattr(origin, "__name__", str(origin)))


@dataclass(kw_only=True)
class Record:
    """Base: a JSON object with a `schema` tag and typed fields; unknown keys are kept in `extra`."""
    SCHEMA: ClassVar[str] = ""
    WRITER: ClassVar[str] = "its stage"
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, doc: Any, where: str = "record"):
        if not isinstance(doc, dict):
            raise DepthtuneError(f"{where}: expected a JSON object, got {type(doc).__name__}")
        if cls.SCHEMA and doc.get("schema") != cls.SCHEMA:
            raise DepthtuneError(f"{where}: schema {doc.get('schema')!r}, expected {cls.SCHEMA!r} "
                                 f"(written by another depthtune version; re-run {cls.WRITER})")
        hints = typing.get_type_hints(cls)
        kwargs, known = {}, {"schema"}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            known.add(f.name)
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if f.name not in doc:
                if required:
                    raise DepthtuneError(f"{where}: missing `{f.name}` (re-run {cls.WRITER})")
                continue
            value = doc[f.name]
            if not _is_type(value, hints[f.name]):
                raise DepthtuneError(f"{where}: `{f.name}` is {value!r:.80}, expected {_expected(hints[f.name])}")
            if isinstance(value, float) and not math.isfinite(value) and required:
                raise DepthtuneError(f"{where}: `{f.name}` is {value}, expected a finite number")
            kwargs[f.name] = value
        kwargs["extra"] = {k: v for k, v in doc.items() if k not in known}
        return cls(**kwargs)

    def to_dict(self) -> dict:
        out: dict = {"schema": self.SCHEMA} if self.SCHEMA else {}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out.update(self.extra)
        return out

    @classmethod
    def read(cls, path: str | Path):
        return cls.from_dict(read_json(path), str(path))

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())


# ----------------------------------------------------------------------------- prepared data


# task causal_lm reads texts only: every row carries this one label (labels.json ["text"]), so cleaning,
# deduplication, splitting and the leakage checks run unchanged (a split stratified on one class is random)
TEXT_ONLY_LABEL = "text"
# task causal_lm with data.prompt_column / completion_column: a prepared text is prompt + PROMPT_SEP + completion
# (ASCII unit separator; the readers replace it inside fields), and only the completion's tokens are trained on
PROMPT_SEP = "\x1f"


@dataclass(kw_only=True)
class LabelSet(Record):
    """data/prepared/labels.json: label names in id order (id = index); texts only (causal_lm): [TEXT_ONLY_LABEL]."""
    WRITER: ClassVar[str] = "the prepare stage"
    names: list

    @classmethod
    def read(cls, path: str | Path) -> "LabelSet":
        labels = super().read(path)
        if labels.names == [TEXT_ONLY_LABEL]:
            return labels
        if len(labels.names) < 2 or not all(isinstance(n, str) and n for n in labels.names):
            raise DataError(f"{path}: expected {{\"names\": [at least 2 label names]}}")
        return labels


# Characters that str.splitlines() (and some JSONL readers) take as line breaks but
# json.dumps(ensure_ascii=False) leaves raw: escaped so that one example stays one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


@dataclass(frozen=True)
class PreparedExample:
    """One line of data/prepared/<split>.jsonl."""
    text: str
    label: int

    def to_json(self) -> str:
        """UTF-8 JSON, non-ASCII kept readable, Unicode line breaks escaped."""
        return json.dumps({"text": self.text, "label": self.label}, ensure_ascii=False).translate(_LINE_BREAKS)


def read_prepared_split(path: str | Path, num_labels: int) -> list[PreparedExample]:
    """Every row validated: a bad line is a one-line DataError naming file and line; no rows is an error."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # "\n" only: the writer's line break
    except FileNotFoundError:
        raise DataError(f"{path}: not found (run the prepare stage first)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{i}: not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{i}: expected {{\"text\": str, \"label\": int}}")
        if not row["text"]:
            raise DataError(f"{path}:{i}: empty text")
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
            raise DataError(f"{path}:{i}: label {label!r} is not a label id in 0..{num_labels - 1} "
                            "(labels.json)")
        rows.append(PreparedExample(row["text"], label))
    if not rows:
        raise DataError(f"{path}: no examples (re-run the prepare stage)")
    return rows


def prepared_split_text(rows: list[PreparedExample]) -> str:
    return "".join(r.to_json() + "\n" for r in rows)


@dataclass(kw_only=True)
class TokenReport(Record):
    """data/tokenized/report.json: the tokenizer, max_length and token-length stats per split."""
    WRITER: ClassVar[str] = "the tokenization stage"
    splits: dict  # {split: {rows, tokens, p50, p95, max, fraction_truncated, ...}}
    report_version: int = 1
    max_length: int = 0
    labels: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    tokenizer: dict = field(default_factory=dict)  # source, class, vocab_size, ...
    coverage: dict = field(default_factory=dict)  # {split: {unk_fraction, uncovered_char_fraction, top_uncovered..}}

    def unknown_fraction(self) -> Optional[float]:
        """The largest share of unknown tokens or unrepresentable characters over the splits
        (depthtune.data.coverage); None for a report written before coverage was measured."""
        shares = [float(c.get(k, 0.0)) for c in self.coverage.values() if isinstance(c, dict)
                  for k in ("unk_fraction", "uncovered_char_fraction")]
        return max(shares) if shares else None

    def p95(self, split: str) -> Optional[int]:
        """The split's 95th-percentile token length (the typical batch shape), None when not recorded."""
        value = self.splits.get(split, {}).get("p95")
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def longest(self, split: str) -> Optional[int]:
        """The split's longest example in tokens (after truncation: the longest batch's padded length),
        None when not recorded."""
        value = self.splits.get(split, {}).get("max")
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def tokens(self, *splits: str) -> int:
        """Real (non-pad) tokens in these splits."""
        return sum(int(self.splits.get(s, {}).get("tokens", 0)) for s in splits)


# ----------------------------------------------------------------------------- per-variant results


@dataclass(kw_only=True)
class AuditRecord(Record):
    """audit/<variant>.json: exact parameter buckets and cost estimates of one variant."""
    SCHEMA: ClassVar[str] = "depthtune.audit/1"
    WRITER: ClassVar[str] = "the audit stage"
    variant: str
    spec: dict = field(default_factory=dict)
    description: str
    architecture: dict  # model_type, num_layers, hidden_size, num_labels
    total_params: int
    trainable_params: int
    trainable_fraction: float = 0.0
    adapter_params: int = 0
    closed_form: Optional[dict] = None
    layers: list  # coarse buckets [{name, total, trainable, adapter}]
    buckets: list  # fine buckets [{name, total, trainable}]
    estimates: dict
    estimates_typical: Optional[dict] = None
    versions: Optional[dict] = None
    unknown_fraction: Optional[float] = None  # TokenReport.unknown_fraction(): text the tokenizer cannot read

    def memory_estimate(self) -> int:
        """Estimated training memory (bytes) at the typical batch shape when known, else at max_length."""
        return int((self.estimates_typical or self.estimates)["memory_bytes"]["total"])


@dataclass(kw_only=True)
class VariantResult(Record):
    """A per-variant result: its variant, what produced it and what MLflow logging did with it."""
    variant: str
    versions: Optional[dict] = None
    git_sha: Optional[str] = None
    tracking: Optional[dict] = None  # the record tracking.log_variant_* returned

    def to_dict(self) -> dict:
        out = super().to_dict()
        for key in ("versions", "git_sha", "tracking"):  # after the variant's own fields
            out[key] = out.pop(key)
        return out


@dataclass(kw_only=True)
class TrainRecord(VariantResult):
    """metrics/train/<variant>.json: what training one variant did and cost."""
    SCHEMA: ClassVar[str] = "depthtune.train/1"
    WRITER: ClassVar[str] = "its finetune stage"
    description: str = ""
    device: str
    total_params: int
    trainable_params: int
    depth: int
    wall_time_s: float = 0.0
    train_time_s: float
    samples_per_s: float
    tokens_per_s: float = 0.0
    steps: int
    epochs_run: float = 0  # steps / steps per epoch: 2.5 = stopped halfway through the third
    best_epoch: float = -1  # epochs done at the best validation
    best_step: int = 0
    best_val: dict
    stopped_early: bool = False
    # depthtune.evaluation.convergence: how the run ended, early stopping | plateau (converged) | still rising
    # (not_converged); `rise` the plateau test's figures (None: too few validations); `chance` the majority
    # predictor's validation score, `near_chance` the best never got far from it (a flag beside convergence)
    not_converged: bool = False
    convergence: str = ""
    rise: Optional[dict] = None
    chance: Optional[float] = None
    near_chance: bool = False
    convergence_note: str = ""  # what to change when not converged or near chance
    extensions: int = 0  # budget extensions granted while still rising
    budget_epochs: int = 0  # train.epochs plus the extensions
    horizon_steps: int = 0  # optimizer steps of train.convergence.max_epochs (the verdict's trend horizon)
    world_size: int = 1
    per_device_batch_size: int = 0
    cached_prefix_layers: int = 0
    cache_bytes: int = 0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = "rss_growth"
    estimated_memory_bytes: Optional[int] = None
    memory_ratio: Optional[float] = None  # peak_memory_bytes / estimated_memory_bytes
    # what the process held beyond live tensors too: CPU = peak RSS growth (glibc's free heap blocks
    # included), CUDA = max_memory_reserved growth (depthtune.training.memory)
    peak_reserved_bytes: int = 0
    # depthtune.planning.step_time: the prediction made before training (for train.epochs: train_s, epoch_s,
    # step_s, throughput {gemm_flops_per_s, optimizer_s_per_param, step_floor_s, efficiency,
    # efficiency_source}) and, after it, predicted_s_for_steps_run, time_ratio (measured / predicted),
    # efficiency_measured, mfu
    time_prediction: dict = field(default_factory=dict)
    loss_curve: list = field(default_factory=list)  # [{step, epoch, loss, lr}]
    val_curve: list = field(default_factory=list)  # [{step, epoch, accuracy, macro_f1}]
    resumed_from_step: Optional[int] = None
    mlflow_run_id: Optional[str] = None
    config: dict = field(default_factory=dict)  # the effective train config
    # train.lr_search's result: {metric, candidates: [{lr, val_<metric>, steps, seconds}], chosen_lr, at_edge, seconds};
    # None when the search is off (config.lr is then the configured lr, else the chosen one)
    lr_search: Optional[dict] = None
    # train.seeds > 1: [{seed, steps, epochs_run, best_val_<metric>, not_converged, train_time_s}], this
    # run's seed first, then the others (their models in seed_models/<variant>/); [] with one seed
    seed_runs: list = field(default_factory=list)

    def run_id(self) -> Optional[str]:
        """The variant's MLflow run: the one training used, or the one logging found later."""
        return self.mlflow_run_id or (self.tracking or {}).get("run_id")


@dataclass(kw_only=True)
class EvalRecord(VariantResult):
    """metrics/eval/<variant>.json: test-split metrics, their 95% intervals, what pairs two variants, inference cost.

    classification: `predictions` and `references` are label ids in test-split order: the references
    repeat the test labels so that the report and the registry can pair two variants' predictions text
    by text (McNemar, paired bootstrap) without reading the data. causal_lm: `nll` (summed nats),
    `tokens` (predicted tokens) and `n_bytes` per test text pair them (paired bootstrap over texts),
    and `generations` holds a few greedy continuations. `<metric>_ci` is [low, high].
    The JSON holds only the fields of its task.
    """
    SCHEMA: ClassVar[str] = "depthtune.eval/2"
    WRITER: ClassVar[str] = "its evaluation stage"
    split: str = "test"
    task: str = "classification"
    n: int
    labels: list
    device: str = "cpu"
    latency_ms: dict = field(default_factory=dict)  # {p50, p95} at batch 1
    throughput_per_s: float = 0.0
    # classification
    accuracy: Optional[float] = None
    macro_f1: Optional[float] = None
    accuracy_ci: Optional[list] = None  # [low, high], 95% percentile bootstrap over test texts (seeded)
    macro_f1_ci: Optional[list] = None
    macro_precision: float = 0.0
    macro_recall: float = 0.0
    per_class: dict = field(default_factory=dict)  # {label name: {precision, recall, f1, support}}
    confusion_matrix: list = field(default_factory=list)  # rows = true, cols = predicted
    predictions: list = field(default_factory=list)  # predicted label id per test text, in test-split order
    references: list = field(default_factory=list)  # true label id per test text, same order
    # causal_lm (lower is better)
    loss: Optional[float] = None  # nats per predicted token
    perplexity: Optional[float] = None
    bits_per_byte: Optional[float] = None
    perplexity_ci: Optional[list] = None
    bits_per_byte_ci: Optional[list] = None
    nll: list = field(default_factory=list)  # summed nll per test text (nats), test-split order
    tokens: list = field(default_factory=list)  # predicted tokens per test text
    n_bytes: list = field(default_factory=list)  # UTF-8 bytes per test text
    tokens_per_s: float = 0.0  # scoring throughput at evaluation.batch_size
    generations: list = field(default_factory=list)  # [{prompt, continuation, reference}]
    # train.seeds > 1: [{seed, <metrics>}] on the same test texts, this model's seed first; [] with one
    seed_scores: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, doc, where: str = "record"):
        rec = super().from_dict(doc, where)
        if rec.task not in tasks.names():
            raise DepthtuneError(f"{where}: task {rec.task!r}, expected one of {', '.join(tasks.names())}")
        task = tasks.get(rec.task)
        for m in task.metrics:
            if not _is_type(getattr(rec, m), float) or not math.isfinite(getattr(rec, m)):
                raise DepthtuneError(f"{where}: missing `{m}` for task {rec.task} (re-run {cls.WRITER})")
            ci = getattr(rec, f"{m}_ci")
            if not isinstance(ci, list) or len(ci) != 2 or not all(_is_type(x, float) for x in ci):
                raise DepthtuneError(f"{where}: `{m}_ci` is {ci!r:.80}, expected [low, high]")
        names = task.paired_fields
        a, b = (getattr(rec, k) for k in names)
        if not len(a) == len(b) == rec.n:
            raise DepthtuneError(f"{where}: {len(a)} {names[0]} and {len(b)} {names[1]} for n={rec.n} test texts "
                                 f"(re-run {cls.WRITER})")
        return rec

    def to_dict(self) -> dict:
        own = tasks.get(self.task).eval_fields  # the fields of the other tasks are left out
        other = {f for t in tasks.every() for f in t.eval_fields if f not in own}
        return {k: v for k, v in super().to_dict().items() if k not in other}

    def metric(self, name: str) -> float:
        value = getattr(self, name, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DepthtuneError(f"metrics/eval/{self.variant}.json: no numeric metric {name!r}")
        return float(value)

    def interval(self, name: str) -> tuple[float, float]:
        """The 95% interval of metric `name` (accuracy, macro_f1, perplexity or bits_per_byte)."""
        ci = getattr(self, f"{name}_ci", None)
        if ci is None:
            raise DepthtuneError(f"metrics/eval/{self.variant}.json: no interval for {name!r}")
        return float(ci[0]), float(ci[1])


def read_variant_record(cls, path: str | Path, variant: str):
    """Read a per-variant record and check it belongs to `variant` (a stale or copied file is refused)."""
    rec = cls.read(path)
    if rec.variant != variant:
        raise DepthtuneError(f"{path}: belongs to variant {rec.variant!r}, expected {variant!r} "
                             "(stale or copied file; re-run its stage)")
    return rec
