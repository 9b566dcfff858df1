"""DVC stage `pretrain`: the base model every variant starts from (developing a model from zero, or continuing one).

    python -m stages.pretrain [--params params.yaml] [--prepared data/prepared] [--out pretrained]
        [--metrics metrics/pretrain.json] [--loss-plot plots/pretrain.csv]

Reads params `pretrain`, `model` (as configured), `train.device`, `train.num_threads`, `train.precision`,
`train.max_length`, `tracking`, and the prepared splits.
pretrain.enabled false (the default): writes only a pass-through record (pretrained/pretrain.json, the
  metrics record) naming the configured model: nothing trains, the pipeline's results are unchanged.
pretrain.enabled true: a tokenizer trained on the training split's texts (+ pretrain.corpus; never a
  validation or test text) unless pretrain.tokenizer.train is false, then masked-LM (encoders) or causal-LM
  (decoders) training from random init (start_from: scratch, model.scratch's architecture) or from
  model.source's weights (start_from: model), for pretrain.max_steps (or max_minutes). Writes pretrained/ (a
  Hugging Face folder: model.safetensors, config.json, tokenizer) that every later stage builds from
  (depthtune.config.load_params points model.source at it), the record (loss and held-out perplexity curves,
  tokens/s, MFU, the tokenizer's unknown-token share per split, the audit of the pretraining model) and the
  loss CSV. Checkpoints go to checkpoints/_pretrain/ (a killed run resumes to the same weights) and are
  removed on success. One MLflow run (tag depthtune.stage=pretrain).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from depthtune import layout, runtime, stopwatch
from depthtune.evaluation import metrics

from depthtune.training import pretraining

from depthtune.tracking import log_runs as tracking
from depthtune.config import load_params, to_dict
from depthtune.files import run_main, write_text_atomic
from depthtune.provenance import provenance


def main(argv: list | None = None) -> None:
    args = layout.parse_stage_args("pretrain", argv, __doc__)
    start = time.perf_counter()
    params = load_params(args.params, as_configured=True)  # the model pretraining starts from
    if not params.pretrain.enabled:
        record = pretraining.passthrough(params)
        pretraining.write_passthrough(record, args.out)
        record.write(args.metrics)
        write_text_atomic(args.loss_plot, pretraining.pretrain_csv(record))
        print(f"pretrain: off (pretrain.enabled: false); the variants start from {params.model.source} -> "
              f"{args.out}/pretrain.json, {args.metrics}")
        return
    device = runtime.pick_device(params.train.device)
    runtime.set_threads(params.train.num_threads)
    ck_dir = Path(layout.PRETRAIN_CHECKPOINTS)
    record = pretraining.pretrain(params, args.prepared, args.out, checkpoint_dir=ck_dir, device=device,
                                  log=print)  # print: inside a Prefect task it also goes to the run's log
    record.versions = provenance()["versions"]
    with stopwatch.measure("mlflow"):
        record.tracking = tracking.log_pretraining(params.tracking, record.to_dict(),
                                                   resolved_config=to_dict(params))
    record.write(args.metrics)
    write_text_atomic(args.loss_plot, pretraining.pretrain_csv(record))
    shutil.rmtree(ck_dir, ignore_errors=True)  # done: nothing left to resume
    cov = ", ".join(f"{s} {c['unk_fraction']:.2%}" for s, c in record.coverage.items())
    print(f"pretrain: {record.steps} steps ({record.stopped_by}) in {record.train_time_s:.1f} s, "
          f"{record.tokens_per_s:,.0f} tokens/s, MFU {record.mfu:.1%} of a {record.gemm_flops_per_s / 1e9:,.0f} "
          f"GFLOP/s GEMM; held-out perplexity {record.val_curve[0][metrics.PRETRAIN.name]:.1f} -> {record.final_perplexity:.2f}; "
          f"unknown tokens: {cov}")
    print(f"pretrain: wrote {args.out}/ (the base model of every variant), {args.metrics}, {args.loss_plot} "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    runtime.configure_process()
    run_main(main)
