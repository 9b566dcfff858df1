"""Where the stages meet MLflow: thin calls into depthtune.tracking (wired below)."""
from __future__ import annotations


def variant_run_id(params, variant: str):
    return None


def after_finetune(params, variant, audit, result, model_dir):
    return {"logged": False, "reason": "tracking not wired yet"}


def after_evaluation(params, variant, result, confusion_csv):
    return {"logged": False, "reason": "tracking not wired yet"}
