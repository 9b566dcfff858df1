"""DVC stage `tokenization`: data/prepared/ + the model's fast tokenizer -> data/tokenized/.

Outputs (written all at once; a failed run leaves the previous ones intact):
  data/tokenized/  a datasets.DatasetDict (save_to_disk) with splits train/validation/test and
                   columns input_ids, attention_mask, token_type_ids (if the tokenizer makes
                   them), labels (ClassLabel ids), length; truncated at train.max_length, unpadded
  data/tokenized/report.json  tokenizer, max_length, token-length stats per split, vocabulary
                   coverage per split (unknown tokens, characters the tokenizer cannot represent)

Warns when more than 1% of a split is unknown to the tokenizer; refuses (exit 2, nothing written)
above tokenization.max_unk_fraction.

Worker processes per split are chosen by split size and cores (token_stats.choose_num_proc).

Usage: python -m stages.tokenization [--params params.yaml] [--prepared data/prepared] [--out data/tokenized]
"""
from __future__ import annotations

import time

from depthtune import layout, runtime
from depthtune.config import load_params
from depthtune.files import run_main
from depthtune.model.sources import load_tokenizer
from depthtune.data.token_stats import run, summary_lines, warn, write_tokenized


def main(argv: list | None = None) -> None:
    args = layout.parse_stage_args("tokenization", argv, __doc__)
    start = time.perf_counter()
    params = load_params(args.params)
    tokenizer = load_tokenizer(params.model)
    source = params.model.tokenizer or params.model.source
    dsd, report = run(args.prepared, tokenizer, max_length=params.train.max_length, tokenizer_source=source,
                      max_unk_fraction=params.tokenization.max_unk_fraction)
    write_tokenized(dsd, report, args.out)
    print(f"read {args.prepared}/")
    for line in summary_lines(report):
        print(line)
    warn(report)
    print(f"wrote {args.out}/ in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    runtime.configure_process()
    run_main(main)
