"""Project-local `evaluate` metric modules (Hub metric loading does not work offline).

Used through the evaluate API: `ClassificationReport().compute(predictions=..., references=...)`,
`add_batch`, and `evaluate.combine([Accuracy(), MacroF1()])`.
"""
from __future__ import annotations

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

_FEATURES = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})
_CITATION = "scikit-learn: Machine Learning in Python, Pedregosa et al., JMLR 12, 2011."


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="Fraction of predictions equal to the reference label.",
                                   citation=_CITATION, inputs_description="predictions, references: label ids",
                                   features=_FEATURES)

    def _compute(self, predictions, references):
        return {"accuracy": float(accuracy_score(references, predictions))}


class MacroF1(evaluate.Metric):
    """Macro-averaged precision, recall and F1 (every class weighs the same)."""

    def _info(self):
        return evaluate.MetricInfo(description="Macro precision, recall and F1.", citation=_CITATION,
                                   inputs_description="predictions, references: label ids", features=_FEATURES)

    def _compute(self, predictions, references, num_labels=None):
        labels = list(range(num_labels)) if num_labels else None
        p, r, f, _ = precision_recall_fscore_support(references, predictions, labels=labels, average="macro",
                                                     zero_division=0)
        return {"macro_f1": float(f), "macro_precision": float(p), "macro_recall": float(r)}


class ClassificationReport(evaluate.Metric):
    """Accuracy, macro and per-class precision/recall/F1, and the confusion matrix."""

    def _info(self):
        return evaluate.MetricInfo(description="Full classification report with confusion matrix.",
                                   citation=_CITATION, inputs_description="predictions, references: label ids",
                                   features=_FEATURES)

    def _compute(self, predictions, references, num_labels=None, label_names=None):
        n = num_labels or (max(max(predictions, default=0), max(references, default=0)) + 1)
        labels = list(range(n))
        names = list(label_names) if label_names else [str(i) for i in labels]
        p, r, f, s = precision_recall_fscore_support(references, predictions, labels=labels, zero_division=0)
        mp, mr, mf, _ = precision_recall_fscore_support(references, predictions, labels=labels, average="macro",
                                                        zero_division=0)
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "macro_f1": float(mf), "macro_precision": float(mp), "macro_recall": float(mr),
            "per_class": {names[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                     "support": int(s[i])} for i in labels},
            "confusion_matrix": confusion_matrix(references, predictions, labels=labels).tolist(),
        }


def quick_scores(predictions, references, num_labels: int) -> dict:
    """Accuracy and macro-F1 through the evaluate API (validation during training)."""
    combined = evaluate.combine([Accuracy(), MacroF1()])
    out = combined.compute(predictions=np.asarray(predictions), references=np.asarray(references))
    # combine() cannot pass num_labels; recompute macro-F1 over every class so absent classes count as 0
    out.update(MacroF1().compute(predictions=predictions, references=references, num_labels=num_labels))
    return {"accuracy": out["accuracy"], "macro_f1": out["macro_f1"]}
