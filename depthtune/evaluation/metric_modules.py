"""Project-local `evaluate` metric modules (Hub metric loading does not work offline).

Used through the evaluate API: `ClassificationReport().compute(predictions=..., references=...)`, `add_batch`, and
`evaluate.combine([LabelMetric(name, num_labels) ...])`. The scores themselves come from the metric registry
(depthtune.evaluation.metrics: one implementation each, the same the intervals, the paired tests and the registry's
re-scoring use); the per-class report and the confusion matrix from scikit-learn.
"""
from __future__ import annotations

from typing import Optional

import datasets
import evaluate
import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from depthtune.evaluation import metrics

_FEATURES = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})
_CITATION = "scikit-learn: Machine Learning in Python, Pedregosa et al., JMLR 12, 2011."


class LabelMetric(evaluate.Metric):
    """One classification metric of the registry (accuracy, macro_f1, ...) through the evaluate API. `num_labels`:
    a macro average over every label id (a class absent from references and predictions scores 0)."""

    def __init__(self, name: str, num_labels: Optional[int] = None, **kwargs):
        self.metric = metrics.get(name)
        self.num_labels = num_labels
        super().__init__(config_name=name, **kwargs)

    def _info(self):
        return evaluate.MetricInfo(description=f"{self.metric.display} of predicted label ids (depthtune).",
                                   citation=_CITATION, inputs_description="predictions, references: label ids",
                                   features=_FEATURES)

    def _compute(self, predictions, references):
        return {self.metric.name: self.metric.of_labels(references, predictions, self.num_labels)}


class ClassificationReport(evaluate.Metric):
    """Every label metric, macro and per-class precision/recall/F1, and the confusion matrix."""

    def _info(self):
        return evaluate.MetricInfo(description="Full classification report with confusion matrix.",
                                   citation=_CITATION, inputs_description="predictions, references: label ids",
                                   features=_FEATURES)

    def _compute(self, predictions, references, num_labels=None, label_names=None):
        n = num_labels or (max(max(predictions, default=0), max(references, default=0)) + 1)
        labels = list(range(n))
        names = list(label_names) if label_names else [str(i) for i in labels]
        p, r, f, s = precision_recall_fscore_support(references, predictions, labels=labels, zero_division=0)
        mp, mr, _, _ = precision_recall_fscore_support(references, predictions, labels=labels, average="macro",
                                                       zero_division=0)
        return {
            **{m.name: m.of_labels(references, predictions, n) for m in metrics.label_metrics()},
            "macro_precision": float(mp), "macro_recall": float(mr),
            "per_class": {names[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                     "support": int(s[i])} for i in labels},
            "confusion_matrix": confusion_matrix(references, predictions, labels=labels).tolist(),
        }


def quick_scores(predictions, references, num_labels: int) -> dict:
    """Every label metric through the evaluate API (validation during training), macro averages over every label."""
    combined = evaluate.combine([LabelMetric(m.name, num_labels) for m in metrics.label_metrics()])
    return combined.compute(predictions=np.asarray(predictions), references=np.asarray(references))
