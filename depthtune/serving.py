"""Serve a fine-tuned variant: raw text in, label NAMES out (a causal LM: a prompt in, its continuation out).

A saved variant is a plain Hugging Face folder (`models/<variant>/`: config.json
with id2label, model.safetensors, tokenizer files). `TextClassifier` wraps it as
an `mlflow.pyfunc.PythonModel`, so the same object serves three ways:

  load_predictor("models/full")                         # local folder, no MLflow store needed
  load_predictor("models:/depthtune-classifier@champion")  # registry alias
  mlflow.pyfunc.load_model(uri).predict(["a great film"])  # -> ["fresh"]

Weights load with `use_safetensors=True` and never run code from the folder
(`trust_remote_code=False`), so a pickle checkpoint or custom code is refused.

A causal LM's folder (depthtune.json `task: causal_lm`) is served by `TextGenerator` the same
three ways: `predict(["The film"])` -> greedy continuations; `score_texts` gives the per-text
negative log-likelihood the registry's paired test compares.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from depthtune import tasks
from depthtune.tracking import store as mlflow_store
from depthtune.errors import ModelError, first_line
from depthtune.records import PROMPT_SEP
from depthtune.data.tokenized import encode_pair

ARTIFACT_KEY = "hf_model"  # name of the HF folder inside the logged MLflow model
EXAMPLE_TEXTS = ["a great film", "a dull, lifeless film"]
MODEL_CODE = """import mlflow
from depthtune.serving import {cls}
mlflow.models.set_model({cls}())
"""


def _texts(model_input: Any) -> list[str]:
    """list[str] | str | DataFrame with a `text` column (or one column) | ndarray -> list[str]."""
    if isinstance(model_input, str):
        return [model_input]
    columns = getattr(model_input, "columns", None)
    if columns is not None:  # pandas DataFrame
        col = "text" if "text" in columns else (columns[0] if len(columns) == 1 else None)
        if col is None:
            raise ModelError(f"input DataFrame needs a 'text' column, got columns {list(columns)}")
        return [str(t) for t in model_input[col].tolist()]
    if hasattr(model_input, "tolist"):  # numpy array / pandas Series
        model_input = model_input.tolist()
    if isinstance(model_input, dict) and "text" in model_input:
        model_input = model_input["text"]
    if not isinstance(model_input, (list, tuple)):
        raise ModelError(f"expected a list of strings or a DataFrame with a 'text' column, got {type(model_input).__name__}")
    return [t if isinstance(t, str) else str(t[0] if isinstance(t, (list, tuple)) else t) for t in model_input]


class FolderModel(mlflow.pyfunc.PythonModel):
    """A saved Hugging Face folder served as a pyfunc model: the weights are never pickled, `load_context`
    (MLflow, with the logged artifacts: the folder is artifacts["hf_model"]) or `from_folder` loads them."""

    def load_context(self, context) -> None:
        self._load(context.artifacts[ARTIFACT_KEY])

    @classmethod
    def from_folder(cls, path: str | Path, **kwargs):
        obj = cls(**kwargs)
        obj._load(path)
        return obj

    def _load(self, path: str | Path) -> None:
        raise NotImplementedError


class TextClassifier(FolderModel):
    """A Hugging Face sequence classifier that returns label names."""

    def __init__(self, batch_size: int = 32, max_length: int = 512):
        self.batch_size = batch_size
        self.max_length = max_length
        self._model = None

    def _load(self, path: str | Path) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        model = load_folder(path, AutoModelForSequenceClassification, self)
        self._torch = torch
        id2label = model.config.id2label or {}
        n = model.config.num_labels
        self.labels = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]
        self.path = str(path)

    def _check_loaded(self):
        if self._model is None:
            raise ModelError("model not loaded: use TextClassifier.from_folder(path) or load_predictor(uri)")

    def predict_proba(self, texts: list[str]) -> list[list[float]]:
        self._check_loaded()
        torch = self._torch
        out: list[list[float]] = []
        max_len = min(self.max_length, getattr(self._tokenizer, "model_max_length", self.max_length) or self.max_length)
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = self._tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                        max_length=max_len, return_tensors="pt")
                logits = self._model(**batch).logits.float()
                out.extend(torch.softmax(logits, dim=-1).tolist())
        return out

    def predict_with_scores(self, texts: list[str]) -> list[dict]:
        """[{"label": name, "score": probability of that label}] per text (for `depthtune predict`)."""
        texts = _texts(texts)
        rows = []
        for probs in self.predict_proba(texts):
            k = max(range(len(probs)), key=probs.__getitem__)
            rows.append({"label": self.labels[k], "score": float(probs[k])})
        return rows

    def predict_names(self, texts: list[str]) -> list[str]:
        return [r["label"] for r in self.predict_with_scores(texts)]

    # pyfunc entry point: list of str or DataFrame with a `text` column -> list of label names
    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        return self.predict_names(_texts(model_input))


def load_folder(path: str | Path, auto_class, into) -> object:
    """Weights (safetensors only, no remote code) and tokenizer of a saved folder, set on `into`; the model."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a Hugging Face model folder (no config.json)")
    if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
        raise ModelError(f"{path}: no model.safetensors (pickle checkpoints are not loaded)")
    try:
        into._tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        model = auto_class.from_pretrained(str(path), use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{path}: cannot load model ({first_line(exc)})") from None
    into._model = model.eval()
    return model


class TextGenerator(FolderModel):
    """A causal LM: prompts in, greedy continuations out (deterministic: the same prompt, the same text)."""

    def __init__(self, max_new_tokens: int = 32, max_length: int = 512):
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length
        self.labels: list = []  # a language model has none (the registry's label check passes trivially)
        self._model = None

    def _load(self, path: str | Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        load_folder(path, AutoModelForCausalLM, self)
        self._torch = torch
        self.path = str(path)

    def _ids(self, text: str) -> list[int]:
        return self._tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]

    def generate(self, prompts: list[str], max_new_tokens: int | None = None) -> list[str]:
        """The continuation of each prompt (without the prompt), greedy, one prompt at a time (no padding)."""
        if self._model is None:
            raise ModelError("model not loaded: use TextGenerator.from_folder(path) or load_predictor(uri)")
        torch, out = self._torch, []
        with torch.inference_mode():
            for prompt in prompts:
                ids = self._ids(prompt)
                special = set(self._tokenizer.all_special_ids)
                if len(ids) > 1 and ids[-1] in special:  # [SEP] / eos would end the text: continue the prompt instead
                    ids = ids[:-1]
                x = torch.tensor([ids])
                y = self._model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                         max_new_tokens=max_new_tokens or self.max_new_tokens,
                                         pad_token_id=self._model.config.pad_token_id)
                out.append(self._tokenizer.decode(y[0, len(ids):].tolist(), skip_special_tokens=True))
        return out

    def score_texts(self, texts: list[str]) -> dict:
        """{nll, tokens, n_bytes}: per text, summed next-token nll (nats), predicted tokens, UTF-8 bytes."""
        from depthtune.evaluation.next_token import token_nll  # torch: only once a model scores

        torch, nll, tokens, n_bytes = self._torch, [], [], []
        with torch.inference_mode():
            for text in texts:
                if PROMPT_SEP in text:  # a prompt/completion pair of the prepared data: the completion is scored
                    pair = encode_pair(self._tokenizer, *text.split(PROMPT_SEP, 1), self.max_length)
                    ids, start, size = pair["input_ids"], pair["loss_start"], pair["n_bytes"]
                else:
                    ids, start, size = self._ids(text), 0, len(text.encode("utf-8"))
                x = torch.tensor([ids])
                mask = torch.ones_like(x)
                row_nll, row_tokens = token_nll(self._model(input_ids=x, attention_mask=mask).logits, x, mask,
                                                torch.tensor([start]))
                nll.append(float(row_nll[0]))
                tokens.append(int(row_tokens[0]))
                n_bytes.append(size)
        return {"nll": nll, "tokens": tokens, "n_bytes": n_bytes}

    # pyfunc entry point: prompts (list of str, or a DataFrame with a `text`/`prompt` column) -> continuations
    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        columns = getattr(model_input, "columns", None)
        if columns is not None and "prompt" in columns:
            model_input = model_input["prompt"].tolist()
        return self.generate(_texts(model_input), (params or {}).get("max_new_tokens"))


# ----------------------------------------------------------------------------- logging (called by depthtune.tracking.log_runs)


def pip_requirements() -> list[str]:
    """Pinned to what is installed here; explicit, because MLflow's inference adds torchvision and fails."""
    reqs = []
    for name in ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pandas", "numpy"):
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return reqs


def served_class(task: str):
    """The pyfunc class that serves a task's models (depthtune.tasks: `served_class`)."""
    return {cls.__name__: cls for cls in (TextClassifier, TextGenerator)}[tasks.get(task).served_class]


def model_task(model_dir: str | Path) -> str:
    """classification or causal_lm, from the folder's depthtune.json (classification when absent)."""
    meta = Path(model_dir) / "depthtune.json"
    return json.loads(meta.read_text()).get("task", "classification") if meta.is_file() else "classification"


def model_labels(model_dir: str | Path) -> list[str]:
    """Label names in id order from a saved folder's config.json (no weights loaded)."""
    cfg_path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{cfg_path}: not found") from None
    id2label = cfg.get("id2label") or {}
    return [str(id2label[str(i)]) for i in range(len(id2label))]


def log_pyfunc_model(model_dir: str | Path, *, name: str = "model", tags: dict | None = None,
                     registered_model_name: str | None = None):
    """Log `model_dir` as a pyfunc model into the ACTIVE MLflow run; returns mlflow's ModelInfo.

    The HF folder travels as an artifact (copied as is); the signature is string in ->
    string out; the input example is two short texts (MLflow checks it predicts).
    """
    from mlflow.models import infer_signature

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    task = model_task(model_dir)
    row = tasks.get(task)
    labels = model_labels(model_dir) if row.labelled else []
    example = list(EXAMPLE_TEXTS)
    # unnamed string column in and out: accepts ["a", "b"] and a one-column DataFrame (e.g. `text`);
    # a generator's params: {"max_new_tokens": int} per call
    params = {"max_new_tokens": 32} if row.per_position else None
    signature = infer_signature(example, [labels[0] if labels else "a continuation"] * len(EXAMPLE_TEXTS), params)
    cls = row.served_class
    # "models from code": MLflow stores this 3-line file instead of a cloudpickle of the object
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / f"depthtune_{task}.py"
        code.write_text(MODEL_CODE.format(cls=cls))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code),
            artifacts={ARTIFACT_KEY: str(model_dir)},
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements(),
            metadata={"labels": labels, "task": task},
            tags=tags,
            registered_model_name=registered_model_name,
        )


# ----------------------------------------------------------------------------- depthtune predict


def _is_mlflow_uri(text: str) -> bool:
    return any(text.startswith(p) for p in ("models:/", "runs:/", "mlflow-artifacts:/", "file:/", "s3://", "gs://",
                                            "http://", "https://"))


def load_predictor(uri_or_path: str) -> TextClassifier | TextGenerator:
    """A local HF folder, a local MLflow model folder (MLmodel), or an MLflow URI -> TextClassifier
    (a causal LM's: TextGenerator)."""
    path = Path(uri_or_path)
    if path.is_dir() and (path / "config.json").is_file():
        return served_class(model_task(path)).from_folder(path)
    if path.is_dir() and (path / "MLmodel").is_file():
        return _load_pyfunc(str(path))
    if _is_mlflow_uri(uri_or_path):
        if uri_or_path.startswith(("models:/", "runs:/")) and not os.environ.get("MLFLOW_TRACKING_URI"):
            # the project's store: params.yaml tracking.uri, else mlflow.db
            mlflow_store.use_store(mlflow_store.config_from_params())
        return _load_pyfunc(uri_or_path)
    if path.exists():
        raise ModelError(f"{uri_or_path}: neither a Hugging Face folder (config.json) nor an MLflow model (MLmodel)")
    raise ModelError(f"{uri_or_path}: no such folder, and not an MLflow URI like models:/<name>@champion")


def _load_pyfunc(uri: str) -> TextClassifier | TextGenerator:
    try:
        loaded = mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # MlflowException, OSError, connection errors: one clear line
        raise ModelError(f"{uri}: cannot load MLflow model ({first_line(exc)})") from None
    inner = loaded.unwrap_python_model()
    if not isinstance(inner, (TextClassifier, TextGenerator)):
        raise ModelError(f"{uri}: not a depthtune model (python model {type(inner).__name__})")
    return inner
