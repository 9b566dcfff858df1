"""What a person reads about the classes of one evaluated classifier, readable at 2 or 150 classes.

A 77 x 77 confusion picture is an unreadable band of labels; these two lists are not:
    worst_classes(per_class, k)          the k classes with the lowest F1 (ties: more test texts first)
    confused_pairs(matrix, labels, k)    the k largest off-diagonal cells: true label -> predicted label,
                                         with the share of the true class's test texts that went there
The full matrix stays in metrics/eval/<variant>.json and the DVC confusion plot file.
"""
from __future__ import annotations

from typing import Optional

from depthtune import tasks
from depthtune.records import EvalRecord

WORST_CLASSES = 15  # all classes when there are at most this many
CONFUSED_PAIRS = 10


def worst_classes(per_class: dict, k: int = WORST_CLASSES) -> list[dict]:
    """[{label, f1, precision, recall, support}], lowest F1 first (ties: larger support first, then name)."""
    rows = [{"label": name, **{m: s.get(m, 0.0) for m in ("f1", "precision", "recall")},
             "support": int(s.get("support", 0))} for name, s in per_class.items()]
    return sorted(rows, key=lambda r: (r["f1"], -r["support"], r["label"]))[:k]


def confused_pairs(matrix: list, labels: list, k: int = CONFUSED_PAIRS) -> list[dict]:
    """[{true, predicted, count, share}] for the k largest off-diagonal cells (share = count / true-class texts)."""
    cells = []
    for i, row in enumerate(matrix):
        total = sum(row)
        for j, count in enumerate(row):
            if i != j and count:
                cells.append({"true": labels[i], "predicted": labels[j], "count": int(count),
                              "share": count / total if total else 0.0})
    return sorted(cells, key=lambda c: (-c["count"], c["true"], c["predicted"]))[:k]


def class_section(ev: EvalRecord) -> Optional[dict]:
    """The per-class summary of one classifier's test record (None for a causal LM)."""
    if not tasks.get(ev.task).labelled or not ev.per_class:
        return None
    return {"variant": ev.variant, "classes": len(ev.labels),
            "worst": worst_classes(ev.per_class), "confused": confused_pairs(ev.confusion_matrix, ev.labels)}


def class_markdown(section: Optional[dict]) -> list[str]:
    """The report's "Per class" section: the worst classes and the most confused pairs, by label name."""
    if not section:
        return []
    n, worst = section["classes"], section["worst"]
    which = "every class" if len(worst) == n else f"the {len(worst)} of {n} classes with the lowest F1"
    lines = ["## Per class", "", f"{section['variant']} on the test split: {which}, worst first.", "",
             "| class | F1 | precision | recall | test texts |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['label']} | {r['f1']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['support']:,} |"
              for r in worst]
    if section["confused"]:
        lines += ["", "Most confused (true -> predicted: texts, share of the true class):", ""]
        lines += [f"- {c['true']} -> {c['predicted']}: {c['count']:,} ({c['share']:.0%})" for c in section["confused"]]
    return lines + [""]
