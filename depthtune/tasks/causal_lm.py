"""causal_lm: next-token training of a decoder on the texts (or on completions given prompts). The language-model
head is pretrained; no labels. Ranked by perplexity or bits per byte (lower is better)."""
from __future__ import annotations

from depthtune.tasks.base import Task, register


class CausalLM(Task):
    name = "causal_lm"
    metrics = ("perplexity", "bits_per_byte")
    labelled = False
    per_position = True
    needs_decoder = True
    lm_head = True
    auto_class = "AutoModelForCausalLM"
    served_class = "TextGenerator"
    eval_fields = ("loss", "perplexity", "bits_per_byte", "perplexity_ci", "bits_per_byte_ci", "nll", "tokens",
                   "n_bytes", "tokens_per_s", "generations")
    paired_fields = ("nll", "tokens")
    prompts = True

    def loss(self, logits, targets):
        """targets: (input ids, attention mask, each text's first trained position or None)."""
        from depthtune.evaluation.next_token import mean_loss, token_nll

        return mean_loss(*token_nll(logits, *targets))

    def validation_scores(self, outputs, examples, num_labels: int) -> dict:
        from depthtune.evaluation.metrics import lm_metrics

        nll, tokens = outputs
        return {k: v for k, v in lm_metrics(nll, tokens, examples.n_bytes).items() if k != "tokens"}

    def keepable(self, outputs):
        nll, tokens = outputs
        return [[float(x) for x in nll], [int(x) for x in tokens]]

    def paired_p(self, a, b, examples, metric: str, num_labels: int) -> float:
        """The paired bootstrap over validation texts; the denominator is tokens (perplexity) or bytes per text."""
        from depthtune.evaluation import metrics
        from depthtune.evaluation.significance import lm_paired_bootstrap

        denominator = a[1] if metrics.get(metric).denominator == "tokens" else examples.n_bytes
        return lm_paired_bootstrap(a[0], b[0], denominator, metric)


register(CausalLM())
