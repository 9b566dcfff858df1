"""DVC stage `tokenization`: data/prepared/ + the model's fast tokenizer -> data/tokenized/.

Outputs (written all at once; a failed run leaves the previous ones intact):
  data/tokenized/  a datasets.DatasetDict (save_to_disk) with splits train/validation/test and
                   columns input_ids, attention_mask, token_type_ids (if the tokenizer makes
                   them), labels (ClassLabel ids), length; truncated at train.max_length, unpadded
  data/tokenized/report.json  tokenizer, max_length, token-length stats per split

Usage: python -m stages.tokenization [--params params.yaml] [--prepared data/prepared]
                                     [--out data/tokenized] [--num-proc N]
"""
from __future__ import annotations

import argparse
import time

from depthtune.config import load_params
from depthtune.files import run_main
from depthtune.sources import load_tokenizer
from depthtune.token_stats import run, summary_lines, warn, write_tokenized


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.tokenization", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--prepared", default="data/prepared", help="prepare stage output (default: data/prepared)")
    parser.add_argument("--out", default="data/tokenized", help="output directory (default: data/tokenized)")
    parser.add_argument("--num-proc", type=int, default=None,
                        help="worker processes per split (default: by split size and cores)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    params = load_params(args.params)
    tokenizer = load_tokenizer(params.model)
    source = params.model.tokenizer or params.model.source
    dsd, report = run(args.prepared, tokenizer, max_length=params.train.max_length,
                      tokenizer_source=source, num_proc=args.num_proc)
    write_tokenized(dsd, report, args.out)
    for line in summary_lines(report):
        print(line)
    warn(report)
    print(f"wrote {args.out}/ in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_main(main)
