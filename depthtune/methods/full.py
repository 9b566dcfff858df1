"""Full fine-tuning: every parameter trains. The kind no key chooses (`full: {}`); with `depth: k` it trains the
embeddings and the first k blocks of a truncated model."""
from __future__ import annotations

from depthtune.methods.base import Method, register


class Full(Method):
    name = "full"
    order = 0
    # Every pretrained weight moves; BERT-family fine-tuning works at 2e-5..1e-4 and MiniLM-L6 (small, 384 wide)
    # at the upper end (measured: 8e-5 beat 3e-5 and 2e-4 on Rotten Tomatoes).
    default_lr = 8e-5
    lr_reason = "every pretrained weight moves: BERT-family fine-tuning works at 2e-5..1e-4, small models at the top"
    # the default pipeline's full 0.45 and depth3 0.43 on the project's 2-core CPU (fp32, MiniLM-L6, batch 16 x ~30
    # tokens, 2026-11-28)
    efficiency = 0.45


register(Full())
