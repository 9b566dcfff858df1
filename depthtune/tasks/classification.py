"""classification: one label per text. Encoders read the first token, decoders the last non-pad one; the head is
new (random init), so every variant kind trains it. Ranked by accuracy (McNemar) or macro-F1."""
from __future__ import annotations

from depthtune.tasks.base import Task, register


class Classification(Task):
    name = "classification"
    metrics = ("accuracy", "macro_f1")
    labelled = True
    auto_class = "AutoModelForSequenceClassification"
    served_class = "TextClassifier"
    eval_fields = ("accuracy", "macro_f1", "accuracy_ci", "macro_f1_ci", "macro_precision", "macro_recall",
                   "per_class", "confusion_matrix", "predictions", "references")
    paired_fields = ("predictions", "references")
    lr_search = True

    def loss(self, logits, targets):
        from torch import nn

        return nn.functional.cross_entropy(logits.float(), targets)

    def validation_scores(self, outputs, examples, num_labels: int) -> dict:
        """Every metric of the task on the predicted label ids, macro averages over every label id (the registry's
        implementations, which the evaluate modules of the evaluation stage call too)."""
        from depthtune.evaluation import metrics

        return {m: metrics.get(m).of_labels(examples.labels, outputs, num_labels) for m in self.metrics}

    def paired_p(self, a, b, examples, metric: str, num_labels: int) -> float:
        from depthtune.evaluation.significance import paired_test

        return paired_test(examples.labels, a, b, metric, num_labels=num_labels)

    def chance_outputs(self, examples):
        """The majority validation label for every text (ties: the lowest label id)."""
        from collections import Counter

        counts = Counter(examples.labels)
        majority = min(counts, key=lambda label: (-counts[label], label))
        return [majority] * len(examples.labels)


register(Classification())
