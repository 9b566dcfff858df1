"""Which MLflow run a result belongs to: one parent per pipeline execution, one child per variant.

  pipeline-<key>            parent run (tags depthtune.pipeline_key, depthtune.role=pipeline)
    ├── full                child run per variant (tags depthtune.variant + mlflow.parentRunId)
    └── top2 ...

The parent is found by its pipeline key: DEPTHTUNE_PIPELINE_KEY (set by flows/pipeline),
else sha256(git commit | params.yaml | prepared-data fingerprint)[:16], so re-running or
resuming a stage re-attaches to the same runs instead of making new ones. A child is the
run id its finetune stage saved, else found by (parent, variant). Two processes creating
the same run at once both end up with the oldest one.

Every function here takes an open client (depthtune.tracking.store.use_store) and raises
on store errors; depthtune.tracking.log_runs turns those into warnings.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from depthtune.layout import PREPARED, PROJECT_ROOT
from depthtune.provenance import file_sha256, git_sha, tree_fingerprint

PIPELINE_KEY_ENV = "DEPTHTUNE_PIPELINE_KEY"
TAG_KEY = "depthtune.pipeline_key"
TAG_ROLE = "depthtune.role"
TAG_VARIANT = "depthtune.variant"
TAG_PARENT = "mlflow.parentRunId"
TAG_MODEL_URI = "depthtune.model_uri"
TAG_MODEL_FP = "depthtune.model_fingerprint"

# ----------------------------------------------------------------------------- fingerprints


def data_fingerprint(root: str | Path = ".") -> Optional[str]:
    """sha256 over the prepared splits + labels (what every variant trained and was tested on)."""
    return tree_fingerprint(Path(root) / PREPARED)


def dvc_lock_hash(stage: str, root: str | Path = ".") -> Optional[str]:
    """sha256 of a stage's recorded deps + params in dvc.lock (None if dvc.lock has no such stage)."""
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return None
    import yaml

    try:
        # libyaml when present: the pure-Python parser spends ~0.5 s on a 5-variant dvc.lock
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        entry = (yaml.load(lock.read_text(), Loader=loader) or {}).get("stages", {}).get(stage)
    except (yaml.YAMLError, OSError, AttributeError):
        return None
    if not entry:
        return None
    blob = json.dumps({"deps": entry.get("deps"), "params": entry.get("params")}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def git_commit(root: str | Path = ".") -> Optional[str]:
    """HEAD without the -dirty suffix (stages write tracked metrics mid-pipeline); falls back to the code's repo."""
    sha = git_sha(root) or git_sha(PROJECT_ROOT)
    return sha[:-len("-dirty")] if sha and sha.endswith("-dirty") else sha


def pipeline_key(root: str | Path = ".") -> str:
    """DEPTHTUNE_PIPELINE_KEY, else sha256(git commit | params.yaml | prepared data)[:16]."""
    env = os.environ.get(PIPELINE_KEY_ENV)
    if env:
        return env
    root = Path(root)
    params = root / "params.yaml"
    parts = [git_commit(root) or "no-git", file_sha256(params) if params.is_file() else "no-params",
             data_fingerprint(root) or "no-data"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- find or create


def find_runs(client, exp_id: str, tags: dict) -> list:
    """Active runs carrying all of `tags`, oldest first."""
    from mlflow.entities import ViewType

    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([exp_id], filter_string=flt, run_view_type=ViewType.ACTIVE_ONLY, max_results=50)
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def find_or_create_run(client, exp_id: str, tags: dict, extra_tags: dict, run_name: str) -> str:
    """First run with `tags`, else a new one. Two creators racing both keep the oldest; the loser deletes its own."""
    runs = find_runs(client, exp_id, tags)
    if runs:
        return runs[0].info.run_id
    mine = client.create_run(exp_id, tags={**tags, **extra_tags}, run_name=run_name).info.run_id
    runs = find_runs(client, exp_id, tags)
    winner = runs[0].info.run_id if runs else mine
    if winner != mine:
        client.delete_run(mine)
    return winner


def parent_run_id(client, exp_id: str, root: str | Path = ".") -> str:
    """This pipeline execution's parent run (by pipeline key)."""
    key = pipeline_key(root)
    root = Path(root)
    params = root / "params.yaml"
    extra = {"depthtune.git_commit": git_commit(root) or "",
             "depthtune.params_sha256": file_sha256(params) if params.is_file() else "",
             "depthtune.data_fingerprint": data_fingerprint(root) or ""}
    return find_or_create_run(client, exp_id, {TAG_KEY: key, TAG_ROLE: "pipeline"}, extra, f"pipeline-{key[:8]}")


def is_variant_run(client, run_id: Optional[str], exp_id: str, variant: str) -> bool:
    """True if `run_id` is an active run of `variant` in this experiment (a saved id may be stale)."""
    if not run_id:
        return False
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001  (deleted DB, unknown id: the caller falls back to a search)
        return False
    return (run.info.lifecycle_stage == "active" and run.info.experiment_id == exp_id
            and run.data.tags.get(TAG_VARIANT) == variant)


def variant_run(client, exp_id: str, variant: str, resume_run_id: Optional[str] = None,
                root: str | Path = ".") -> str:
    """The variant's run: `resume_run_id` if still usable, else found or created under the parent."""
    if is_variant_run(client, resume_run_id, exp_id, variant):
        return resume_run_id
    parent = parent_run_id(client, exp_id, root)
    return find_or_create_run(client, exp_id, {TAG_PARENT: parent, TAG_VARIANT: variant},
                              {TAG_ROLE: "variant", TAG_KEY: pipeline_key(root)}, variant)
