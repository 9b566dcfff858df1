"""What a task is: one object that owns everything the fine-tuning objective decides.

classification (one label per text, a new head) and causal_lm (next-token training of a decoder on the texts). The
builder, the training loop, the evaluator, the records, the report, tracking, the registry and the served model ask
the task, never compare its name:
- the model: `auto_class` (transformers'), `needs_decoder`, `lm_head` (the model ends in a pretrained language-model
  head), `labelled` (a classifier's head is new and every variant kind trains it), `num_labels`;
- the objective: `per_position` (logits at every position are trained and scored: the loop's forward and its
  validation pass differ by it), `loss`, `validation_scores`;
- the results: `metrics` (depthtune.evaluation.metrics, the headline first), `eval_fields` (the EvalRecord fields it
  fills), `paired_fields` (the per-text fields its paired tests read), `served_class` (depthtune.serving);
- convergence (depthtune.evaluation.convergence): `keepable` validation outputs, `paired_p` between two of them,
  `chance_outputs` (what a model that learned nothing predicts);
- what it supports: `lr_search` (the search's gate is a paired test on predictions), `prompts` (prompt/completion
  data).
"""
from __future__ import annotations

from depthtune.named import Named


class Task:
    name: str = ""
    metrics: tuple = ()
    labelled: bool = True
    per_position: bool = False
    needs_decoder: bool = False
    lm_head: bool = False
    auto_class: str = ""
    served_class: str = ""
    eval_fields: tuple = ()
    paired_fields: tuple = ()
    lr_search: bool = False
    prompts: bool = False

    def num_labels(self, labels: int) -> int:
        """The model's label count: the labels for a classifier, 0 (no classification head) otherwise."""
        return labels if self.labelled else 0

    def loss(self, logits, targets):
        """The training loss of one batch: a scalar tensor."""
        raise NotImplementedError

    def validation_scores(self, outputs, examples, num_labels: int) -> dict:
        """The validation scores of what the loop collected (`per_position`: per-text nll sums; else predicted
        label ids): {metric: value, ...}."""
        raise NotImplementedError

    def keepable(self, outputs):
        """Validation outputs as JSON values: the checkpoint keeps a few for the plateau test (evaluation.convergence)."""
        return outputs

    def paired_p(self, a, b, examples, metric: str, num_labels: int) -> float:
        """The p-value of the metric's paired test between two validations' outputs (keepable form) on `examples`."""
        raise NotImplementedError

    def chance_outputs(self, examples):
        """The validation outputs of a model that learned nothing, or None when the task has no such level."""
        return None


REGISTRY = Named("task")
register = REGISTRY.register  # each module of depthtune.tasks calls it once for its task


def get(name: str) -> Task:
    return REGISTRY.find(name)
