"""Training: the fine-tuning loop in phases over one state (setup, step, validate, early stop, checkpoint), the
frozen-prefix cache, precision, data parallelism, resumable checkpoints, peak memory, the learning-rate search, the
finetune stage's core, and pretraining (masked-LM / causal-LM) for the pretrain stage."""
