"""How many texts one causal-LM scoring batch holds: its logits kept under a fixed number of floats.

Torch-free, so the audit's memory estimate (depthtune.planning.costs.lm_scoring_bytes) and the scorer
(depthtune.evaluation.lm_scoring.score_texts) share the one figure without the audit importing the scorer.
"""
from __future__ import annotations

# logits of one scoring batch kept under 2^24 floats (64 MiB in fp32): 4 texts x 128 tokens x 30,522 vocab
# = 15.6M floats. Scoring holds ~3 copies (the logits, cross_entropy's contiguous transpose, its log-softmax:
# costs.lm_scoring_bytes), so validation peaks ~200 MiB over the weights whatever the vocabulary; at 2^26 it
# was ~770 MiB, more than many small variants' whole training step
MAX_LOGIT_FLOATS = 1 << 24


def scoring_batch_size(vocab_size: int, longest: int, requested: int) -> int:
    """A batch size whose logits fit MAX_LOGIT_FLOATS (at least 1)."""
    return max(1, min(requested, MAX_LOGIT_FLOATS // max(1, vocab_size * longest)))
