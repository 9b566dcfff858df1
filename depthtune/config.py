"""params.yaml -> typed, frozen config objects, validated once at the edge. Every error names the key path and
what was expected (`variants.top9.train_top: 9 exceeds the model's 6 layers`); inside, code never re-parses YAML."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from depthtune import layout, methods, tasks
from depthtune.evaluation import metrics
from depthtune.errors import ConfigError
from depthtune.model.families import DECODER_TYPES, ENCODER_TYPES, GQA_TYPES
from depthtune.schema import parse_section, setting as _f

# DVC stage names become `finetune@<name>`: keep to letters, digits, '_' and '-'.
VARIANT_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


# ----------------------------------------------------------------------------- sections



# What the variants are trained to do (depthtune.tasks: classification, causal_lm) and what ranks them
# (depthtune.evaluation.metrics: accuracy, macro_f1 | perplexity, bits_per_byte; each with its direction).
TASKS = tasks.names()
METRIC_NAMES = metrics.NAMES


@dataclass(frozen=True)
class ScratchArch:
    """Architecture for `model.source: scratch` (random init) and pretrain.start_from: scratch. One set of names for
    every family; depthtune.model.families.config_kwargs maps them to each family's own (gpt2: n_embd, n_layer, ...)."""
    model_type: str = _f("bert", choices=ENCODER_TYPES + DECODER_TYPES)
    vocab_size: int = _f(30522, lo=2)
    hidden_size: int = _f(384, lo=1)
    num_hidden_layers: int = _f(6, lo=1)
    num_attention_heads: int = _f(12, lo=1)
    intermediate_size: int = _f(1536, lo=1)
    max_position_embeddings: int = _f(512, lo=2)
    type_vocab_size: int = _f(2, lo=1)  # bert and roberta only
    num_key_value_heads: Optional[int] = _f(None, lo=1)  # llama/qwen2/qwen3/mistral; None = num_attention_heads
    head_dim: Optional[int] = _f(None, lo=1)  # llama/qwen2/qwen3/mistral; None = hidden_size / num_attention_heads
    tie_word_embeddings: Optional[bool] = _f(None)  # decoders' lm_head = the input embeddings; None = family default

    def __post_init__(self):
        path = "model.scratch"
        if self.model_type not in GQA_TYPES:
            for key in ("num_key_value_heads", "head_dim"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"{path}.{key}: {self.model_type} has no such setting "
                                      f"(only {', '.join(GQA_TYPES)}); set it to null")
        if self.model_type in ENCODER_TYPES and self.tie_word_embeddings is not None:
            raise ConfigError(f"{path}.tie_word_embeddings: only decoders ({', '.join(DECODER_TYPES)}) take it; "
                              "set it to null")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{path}.hidden_size: {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}")
        kv = self.num_key_value_heads
        if kv is not None and self.num_attention_heads % kv:
            raise ConfigError(f"{path}.num_key_value_heads: num_attention_heads {self.num_attention_heads} is not "
                              f"divisible by {kv} (each key/value head serves a whole group of query heads)")


@dataclass(frozen=True)
class ModelConfig:
    # packaged:minilm-l6 | scratch | a local HF folder | a Hub id (online only)
    source: str = _f("packaged:minilm-l6")
    tokenizer: Optional[str] = _f(None)  # defaults to the source's (packaged MiniLM for scratch)
    revision: Optional[str] = _f(None)
    trust_remote_code: bool = _f(False)
    allow_pickle: bool = _f(False)  # .bin (pickle) checkpoints refused unless opted in
    scratch: ScratchArch = field(default_factory=ScratchArch)


@dataclass(frozen=True)
class SplitFractions:
    validation: float = _f(0.1, lo=0.0, hi=0.5, lo_open=True)
    test: float = _f(0.1, lo=0.0, hi=0.5, lo_open=True)


@dataclass(frozen=True)
class DataConfig:
    # builtin:rotten_tomatoes | hub:<dataset id> | a local file path
    source: str = _f("builtin:rotten_tomatoes")
    # split name -> path, when the data comes already split (train/validation/test)
    files: dict = _f({})
    format: str = _f("auto", choices=("auto", "csv", "tsv", "jsonl", "parquet", "labeltext"))
    text_column: str = _f("text")
    label_column: str = _f("label")
    delimiter: Optional[str] = _f(None)
    quoting: bool = _f(True)
    encoding: str = _f("utf-8")
    labels: Optional[list] = _f(None)  # declared label set (in id order); None = sorted labels found
    split: SplitFractions = field(default_factory=SplitFractions)
    seed: int = _f(42, lo=0)
    max_train_samples: Optional[int] = _f(2000, lo=1)  # quick default run; None = all
    max_eval_samples: Optional[int] = _f(1000, lo=1)
    max_drop_fraction: float = _f(0.2, lo=0.0, hi=1.0)
    # the same text with different labels: drop every copy (default) | first (the first label) | majority
    # (the most frequent label; a tie drops the text)
    conflicts: str = _f("drop", choices=("drop", "first", "majority"))
    header: bool = _f(True)  # csv/tsv: false = no header row (columns then named by position: "0", "1", ...)
    hub_config: Optional[str] = _f(None)
    # task causal_lm: train on `completion_column` given `prompt_column` (both or neither; null = data.text_column)
    prompt_column: Optional[str] = _f(None)
    completion_column: Optional[str] = _f(None)


@dataclass(frozen=True)
class VariantTrain:
    """Per-variant overrides of the `train` section (None = inherit)."""
    lr: Optional[float] = _f(None, lo=0.0, hi=1.0, lo_open=True)
    epochs: Optional[int] = _f(None, lo=1)
    batch_size: Optional[int] = _f(None, lo=1)
    weight_decay: Optional[float] = _f(None, lo=0.0, hi=1.0)
    head_lr: Optional[float] = _f(None, lo=0.0, hi=1.0, lo_open=True)


@dataclass(frozen=True)
class VariantCommon:
    """The keys of a variant every kind shares (its kind's own key is read by depthtune.methods)."""
    depth: Optional[int] = _f(None, lo=1)  # keep the embeddings and the first `depth` blocks
    train: VariantTrain = field(default_factory=VariantTrain)


@dataclass(frozen=True)
class VariantSpec:
    """One variant: its kind (depthtune.methods: full, top, probe, lora, bitfit, scratch) with the kind's typed
    options, a truncation to the first `depth` blocks (any kind combines with it) and its training overrides.
    params.yaml writes the kind as one key (`lora: {...}`, `train_top: 2`, ...): `as_params` gives that shape."""
    depth: Optional[int] = None
    kind: str = "full"
    options: Any = None  # the kind's parsed options (LoraSpec, the t of train_top, ...)
    train: VariantTrain = field(default_factory=VariantTrain)

    @property
    def method(self) -> methods.Method:
        return methods.get(self.kind)

    def describe(self) -> str:
        parts = [f"depth={self.depth}"] if self.depth is not None else []
        own = self.method.describe(self.options)
        return ", ".join(parts + ([own] if own else [])) or "full fine-tuning"

    def as_params(self) -> dict:
        """The variant as params.yaml writes it, every kind's key present (depthtune.json, MLflow params)."""
        out = {"depth": self.depth}
        out.update({m.key: m.unset for m in methods.ordered() if m.key and m.listed_when_unset})
        if self.method.key:
            out[self.method.key] = to_dict(self.method.to_params(self.options))
        out["train"] = to_dict(self.train)
        return out


@dataclass(frozen=True)
class LrSearch:
    """train.lr_search: each variant's lr chosen on the validation split by successive halving over its own lr x
    each factor (a log-spaced grid): all train from the same weights, seed and batches to evaluation `first_rung`;
    the best third and the configured lr go on to 3 x first_rung, and so on; the last one trains on (lr_search)."""
    enabled: bool = _f(False)
    factors: list = _f([0.25, 0.5, 1.0, 2.0, 4.0])
    first_rung: int = _f(1, lo=1)  # evaluations every candidate trains before the first cut
    # the winner replaces the configured lr only when its paired test against it on the validation split
    # (McNemar for accuracy, paired bootstrap for macro-F1) has p < alpha; 1.0 = the best score always wins
    alpha: float = _f(0.05, lo=0.0, hi=1.0, lo_open=True)

    def __post_init__(self):
        bad = [f for f in self.factors if isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0]
        if not self.factors or bad:
            raise ConfigError(f"train.lr_search.factors: {list(self.factors)} must be a non-empty list of numbers "
                              "> 0 (the configured lr is multiplied by each)")
        if len(set(self.factors)) != len(self.factors):
            raise ConfigError(f"train.lr_search.factors: {list(self.factors)} has duplicates")


@dataclass(frozen=True)
class Convergence:
    """train.convergence: when a run that its budget ended counts as converged, and how far it may go on.

    Converged = early stopping ended it, or the best of its last `window` validations is not significantly better
    than its best before them (the metric's paired test on the validation texts, p >= alpha). A run still rising at
    the end of train.epochs goes on in extensions of half as many epochs (each: the warmup and the linear decay
    again), up to max_epochs; depthtune.evaluation.convergence has the reasoning."""
    window: int = _f(4, lo=1, hi=1000)  # validations (4 = 2 epochs at 2 an epoch)
    alpha: float = _f(0.05, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    max_epochs: Optional[int] = _f(None, lo=1, hi=10000)  # None = 2 x train.epochs; train.epochs = never extend


# max_epochs <= train.epochs: a run trains its budget and is never extended (benchmarks timing a fixed number of
# epochs, tests counting steps)
FIXED_BUDGET = Convergence(max_epochs=1)


@dataclass(frozen=True)
class TrainConfig:
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    seed: int = _f(42, lo=0)
    seeds: int = _f(1, lo=1, hi=100)  # N > 1: train each variant N times (seed, seed+1, ...) for the spread
    epochs: int = _f(8, lo=1, hi=1000)  # a maximum: early stopping (patience) usually ends the run first
    batch_size: int = _f(16, lo=1)
    grad_accum: int = _f(1, lo=1)
    max_length: int = _f(128, lo=8, hi=8192)
    lr: Optional[float] = _f(None, lo=0.0, hi=1.0, lo_open=True)  # None = by variant kind (depthtune/methods: default_lr)
    # a labelled task's new, randomly initialised head (classifier): None = the probe's lr (a head alone trains
    # well there) or the variant's lr when that is higher, for the kinds that raise it (full, depth, LoRA, BitFit,
    # scratch; train_top and train_layers keep their own lr); set it to the variant's lr for one lr throughout
    head_lr: Optional[float] = _f(None, lo=0.0, hi=1.0, lo_open=True)
    weight_decay: float = _f(0.01, lo=0.0, hi=1.0)
    warmup_fraction: float = _f(0.1, lo=0.0, hi=1.0, hi_open=True)
    max_grad_norm: float = _f(1.0, lo=0.0)
    eval_every: int = _f(0, lo=0)  # optimizer steps between evaluations; 0 = evals_per_epoch an epoch
    evals_per_epoch: int = _f(2, lo=1, hi=1000)  # evenly spaced, the last at the epoch's end
    patience: int = _f(2, lo=0)  # evaluations without improvement before stopping; 0 = never
    checkpoint_every: int = _f(100, lo=0)  # optimizer steps; 0 = epoch ends only
    keep_checkpoints: int = _f(2, lo=1)
    cache_frozen_prefix: bool = _f(True)
    num_threads: int = _f(0, lo=0)  # torch threads on the CPU; 0 = all cores
    # auto = bf16 autocast on a GPU, fp32 on the CPU; fp32; bf16-autocast (fp32 weights, bf16 matmuls);
    # bf16 (the weights themselves in bf16: half the memory of weights, gradients and optimizer state)
    precision: str = _f("auto", choices=("auto", "fp32", "bf16-autocast", "bf16"))
    gradient_checkpointing: bool = _f(False)  # recompute block activations in backward: less memory, ~1.3x time
    lr_search: LrSearch = field(default_factory=LrSearch)
    convergence: Convergence = field(default_factory=Convergence)

    @property
    def max_epochs(self) -> int:
        """The most epochs a run still rising may reach (train.convergence.max_epochs; default 2 x epochs)."""
        cap = self.convergence.max_epochs
        return max(self.epochs, cap if cap is not None else 2 * self.epochs)

    @property
    def extension_epochs(self) -> int:
        """Epochs one extension adds: half the planned budget, at least one."""
        return max(1, -(-self.epochs // 2))


@dataclass(frozen=True)
class EvaluationConfig:
    # classification: accuracy | macro_f1; causal_lm: perplexity | bits_per_byte (lower is better)
    metric: str = _f("accuracy", choices=METRIC_NAMES)
    batch_size: int = _f(32, lo=1)
    latency_examples: int = _f(50, lo=1)  # batch-1 forward passes timed for p50/p95
    generations: int = _f(3, lo=0, hi=100)  # causal_lm: test texts continued by greedy decoding (result JSON)
    max_new_tokens: int = _f(24, lo=1, hi=1024)  # causal_lm: tokens generated per continuation


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = _f(True)
    uri: Optional[str] = _f(None)  # None = sqlite:///<project root>/mlflow.db
    experiment: str = _f("depthtune")
    artifact_root: Optional[str] = _f(None)  # None = <project root>/mlartifacts


@dataclass(frozen=True)
class CompareConfig:
    tolerance: float = _f(0.01, lo=0.0)  # in the metric's units (accuracy: <= 1; perplexity: e.g. 5)
    # significance level of the paired tests against the best variant (McNemar / paired bootstrap)
    alpha: float = _f(0.05, lo=0.0, hi=1.0, lo_open=True, hi_open=True)


@dataclass(frozen=True)
class RegistryConfig:
    model_name: str = _f("depthtune-classifier")
    metric: str = _f("accuracy", choices=METRIC_NAMES)
    min_delta: float = _f(0.005, lo=0.0)  # in the metric's units (accuracy: <= 1)
    # the candidate must beat the champion by a paired test at this level (and by min_delta)
    alpha: float = _f(0.05, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    min_metric: float = _f(0.6, lo=0.0, hi=1.0)  # accuracy / macro_f1: at least this to be registered
    max_metric: Optional[float] = _f(None, lo=0.0, lo_open=True)  # perplexity / bits_per_byte: at most this
    max_trainable_params: Optional[int] = _f(None, lo=1)
    max_latency_ms: Optional[float] = _f(None, lo=0.0, lo_open=True)
    # a variant still rising when its budget ran out that could close the gap to the candidate (its test interval or
    # its curve's trend reaches it; depthtune.evaluation.convergence) holds the promotion back; true = promote anyway
    promote_unsettled: bool = _f(False)


@dataclass(frozen=True)
class TokenizationConfig:
    # the share of unknown tokens (and of characters the tokenizer cannot represent) above which the
    # tokenization stage refuses the data: a model that cannot read its text scores noise (warns above 1%)
    max_unk_fraction: float = _f(0.2, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class PretrainTokenizer:  # trained on the train split's texts (+ pretrain.corpus); start_from: scratch only
    train: bool = _f(True)  # false = model.tokenizer, else model.source's (MiniLM's for scratch)
    kind: str = _f("auto", choices=("auto", "wordpiece", "bytelevel_bpe"))  # auto: wordpiece (encoders), BPE (decoders)
    vocab_size: int = _f(8000, lo=100, hi=1_000_000)
    min_frequency: int = _f(2, lo=1)


@dataclass(frozen=True)
class PretrainConfig:
    """pretrain: develop the base model every variant starts from (depthtune.training.pretraining). Off by default."""
    enabled: bool = _f(False)
    start_from: str = _f("scratch", choices=("scratch", "model"))  # random init (model.scratch) | model.source's
    objective: str = _f("auto", choices=("auto", "mlm", "causal_lm"))  # auto: mlm for encoders, causal_lm decoders
    tokenizer: PretrainTokenizer = field(default_factory=PretrainTokenizer)
    corpus: list = _f([])  # unlabeled local .txt (a text a line) / .csv / .tsv / .jsonl (`corpus_column`) files
    corpus_column: str = _f("text")
    # all: every training-split text, the rows data.max_train_samples keeps out of fine-tuning included
    # (data/prepared/train_left_out.jsonl) | capped: only the rows the variants fine-tune on
    train_texts: str = _f("all", choices=("all", "capped"))
    max_steps: int = _f(1000, lo=1)  # optimizer steps (the schedule spans them)
    max_minutes: Optional[float] = _f(None, lo=0.0, lo_open=True)  # a wall-clock budget too; null = steps only
    batch_size: int = _f(32, lo=1)
    max_length: int = _f(128, lo=8, hi=8192)
    lr: float = _f(5e-4, lo=0.0, hi=1.0, lo_open=True)
    weight_decay: float = _f(0.01, lo=0.0, hi=1.0)
    warmup_fraction: float = _f(0.06, lo=0.0, hi=1.0, hi_open=True)
    max_grad_norm: float = _f(1.0, lo=0.0)
    mask_probability: float = _f(0.15, lo=0.0, hi=1.0, lo_open=True, hi_open=True)  # mlm: share of tokens predicted
    seed: int = _f(42, lo=0)
    eval_every: int = _f(100, lo=1)  # optimizer steps between held-out (validation) perplexity measurements
    checkpoint_every: int = _f(100, lo=0)  # optimizer steps; 0 = none (no resume after a kill)


@dataclass(frozen=True)
class RetrainConfig:
    cron: str = _f("0 3 * * 1")
    timezone: str = _f("UTC")


@dataclass(frozen=True)
class Params:
    task: str = _f("classification", choices=TASKS)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenization: TokenizationConfig = field(default_factory=TokenizationConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    variants: dict = _f({})  # name -> VariantSpec
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)


# ----------------------------------------------------------------------------- parsing


def parse_variant(name: str, raw, path: str) -> VariantSpec:
    """`variants.<name>` -> VariantSpec: `depth`, `train` and the one key that chooses the kind (depthtune.methods)."""
    if not isinstance(name, str) or not VARIANT_NAME_RE.match(name):
        raise ConfigError(f"{path}: invalid variant name {name!r}, expected a letter then letters, "
                          "digits, '_' or '-' (at most 64 characters; DVC stage names)")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(raw).__name__} {raw!r}")
    kind_keys = methods.keys()
    common = parse_section(VariantCommon, {k: v for k, v in raw.items() if k not in kind_keys}, path,
                           extra_keys=kind_keys)
    method, options = methods.choose(raw, path)
    return VariantSpec(depth=common.depth, kind=method.name, options=options, train=common.train)


def check_variant_against_model(spec: VariantSpec, num_layers: int, path: str) -> None:
    """Depth-dependent checks, once the model's layer count is known."""
    if spec.depth is not None and spec.depth > num_layers:
        raise ConfigError(f"{path}.depth: {spec.depth} exceeds the model's {num_layers} layers")
    spec.method.check_against_model(spec.options, spec.depth if spec.depth is not None else num_layers, path)


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    variants_raw = raw.pop("variants", None)
    params = parse_section(Params, raw, "params")
    if variants_raw is None or variants_raw == {}:
        raise ConfigError("variants: empty, expected a mapping of variant name -> spec, e.g. {full: {}}")
    if not isinstance(variants_raw, dict):
        raise ConfigError(f"variants: expected a mapping of variant name -> spec, got {type(variants_raw).__name__}")
    variants = {}
    for name, spec in variants_raw.items():
        variants[name] = parse_variant(name, spec, f"variants.{name}")
    if len({n.lower() for n in variants}) != len(variants):
        raise ConfigError("variants: names differ only by case; DVC outputs would collide on some filesystems")
    check_task_metrics(params)
    check_pretrain(params)
    return dataclasses.replace(params, variants=variants)


def check_pretrain(params: Params) -> None:
    """pretrain's settings against the model they start from (when on; the objective by family: pretraining)."""
    pre, model = params.pretrain, params.model
    if pre.enabled and pre.start_from == "model" and pre.tokenizer.train:
        raise ConfigError("pretrain.tokenizer.train: a new tokenizer needs new embeddings, so it only goes with "
                          "pretrain.start_from: scratch; set it to false to continue model.source with its own")
    if pre.enabled and pre.start_from == "model" and model.source == "scratch":
        raise ConfigError("pretrain.start_from: model continues the weights of model.source, and scratch has "
                          "none; set pretrain.start_from: scratch (model.scratch's architecture)")
    longest = max(pre.max_length, params.train.max_length)
    if pre.enabled and pre.start_from == "scratch" and longest > model.scratch.max_position_embeddings:
        raise ConfigError(f"model.scratch.max_position_embeddings: {model.scratch.max_position_embeddings} is "
                          f"shorter than pretrain.max_length / train.max_length ({longest})")


def check_task_metrics(params: Params) -> None:
    """evaluation.metric and registry.metric must be metrics of the task (perplexity ranks no classifier)."""
    task = tasks.get(params.task)
    for key, metric in (("evaluation.metric", params.evaluation.metric), ("registry.metric", params.registry.metric)):
        if metric not in task.metrics:
            raise ConfigError(f"{key}: {metric} is not a {task.name} metric; expected one of {', '.join(task.metrics)}")
    units = (("compare.tolerance", params.compare.tolerance, params.evaluation.metric),
             ("registry.min_delta", params.registry.min_delta, params.registry.metric))
    for key, value, metric in units:
        if metrics.get(metric).bounded and value > 1.0:
            raise ConfigError(f"{key}: {value} is out of range, expected <= 1.0 ({metric} lies in 0..1)")
    data = params.data
    if (data.prompt_column is None) != (data.completion_column is None):
        raise ConfigError("data.prompt_column / data.completion_column: give both (the prompt is context, the "
                          "completion is trained on) or neither")
    prompt_tasks = [t.name for t in tasks.every() if t.prompts]
    if data.prompt_column is not None and not task.prompts:
        raise ConfigError(f"data.prompt_column: prompt/completion data is for task {' or '.join(prompt_tasks)}; set "
                          f"task: {prompt_tasks[0]} or the two columns to null")
    if params.train.lr_search.enabled and not task.lr_search:
        searchable = " or ".join(t.name for t in tasks.every() if t.lr_search)
        raise ConfigError(f"train.lr_search.enabled: the learning-rate search is built for {searchable} (its paired "
                          f"gate compares predictions); set it to false for {task.name}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a second `full:` silently replacing the first)."""


def _construct_mapping(loader, node, deep=False):
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            mark = key_node.start_mark
            raise ConfigError(f"line {mark.line + 1}, column {mark.column + 1}: duplicate key {key!r}")
        keys.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(f"{path}: invalid YAML at {where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None


def load_params(path: str | Path = "params.yaml", *, as_configured: bool = False) -> Params:
    """params.yaml, validated; pretrain on: model.source is its output (pretrained_model), unless as_configured."""
    params = parse_params(read_yaml(path), str(path))
    return params if as_configured else pretrained_model(params, path)


def pretrained_model(params: Params, params_path: str | Path = "params.yaml") -> Params:
    """The one place that swaps the base model: pretrain on -> model.source is layout.PRETRAINED beside the params
    file (./pretrained, relative: no output names the project's location; model.scratch stays for init: scratch)."""
    if not params.pretrain.enabled:
        return params
    folder = f"{Path(params_path).parent}/{layout.PRETRAINED}"
    return dataclasses.replace(params, model=dataclasses.replace(params.model, source=folder, tokenizer=None,
                                                                  revision=None))


def to_dict(obj) -> Any:
    """Frozen config -> plain JSON-able structure (tuples become lists)."""
    if isinstance(obj, VariantSpec):
        return obj.as_params()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def effective_train(params: Params, variant: VariantSpec) -> TrainConfig:
    """The train section with the variant's overrides applied; lr: the variant's, train.lr, else its kind's
    (`default_lr` of depthtune.methods.<kind>, each with its reason); head_lr: the variant's, train.head_lr, else
    the higher of HEAD_LR and its lr for a kind that raises_head_lr, else its lr."""
    overrides = {k: v for k, v in to_dict(variant.train).items() if v is not None}
    cfg = dataclasses.replace(params.train, **overrides)
    cfg = cfg if cfg.lr is not None else dataclasses.replace(cfg, lr=variant.method.default_lr)
    # the new head: at least the lr a head alone trains well at (depthtune.methods.base.HEAD_LR), for the kinds that
    # raise it; the others train it at their own lr
    if cfg.head_lr is not None:
        return cfg
    return dataclasses.replace(cfg, head_lr=max(cfg.lr, methods.HEAD_LR) if variant.method.raises_head_lr else cfg.lr)


def variant_of(params: Params, name: str) -> VariantSpec:
    """The spec of variant `name` (the per-variant stages' --variant), or a one-line ConfigError."""
    if name not in params.variants:
        raise ConfigError(f"--variant {name}: not in params variants ({', '.join(params.variants)})")
    return params.variants[name]
