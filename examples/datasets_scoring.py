"""Add pairscore columns to a Hugging Face Dataset and keep the likely responses.

    pip install 'pairscore[datasets]'
    python examples/datasets_scoring.py pairs.jsonl kept/ --target localhost:50051 \\
        --prompt-field instruction --response-field output --min-mean-logprob -2.5

Loads the JSON Lines file as a Dataset, adds the score columns with
``Dataset.map(batched=True)`` through :func:`pairscore.hf.add_scores`, keeps
the rows whose mean conditional log-prob per response token is at least the
threshold, and saves the result with ``save_to_disk``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def score_and_filter(
    dataset: Any,
    target: str,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    min_mean_logprob: float = -2.5,
    batch_size: int = 256,
) -> tuple[Any, Any]:
    """(scored, kept): every row with score columns, and the rows that pass the threshold."""
    from pairscore.hf import add_scores

    scored = add_scores(
        dataset,
        target,
        prompt_field=prompt_field,
        response_field=response_field,
        batch_size=batch_size,
        load_from_cache_file=False,
        desc="pairscore",
    )

    def likely(row: dict[str, Any]) -> bool:
        value = row["mean_conditional_logprob"]
        return value is not None and value >= min_mean_logprob

    return scored, scored.filter(likely)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of the example."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", help="a JSON Lines file of rows")
    parser.add_argument("output", help="directory for Dataset.save_to_disk")
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--response-field", default="response")
    parser.add_argument("--min-mean-logprob", type=float, default=-2.5)
    args = parser.parse_args(argv)

    from datasets import load_dataset

    dataset = load_dataset("json", data_files=args.input, split="train")
    scored, kept = score_and_filter(
        dataset,
        args.target,
        prompt_field=args.prompt_field,
        response_field=args.response_field,
        min_mean_logprob=args.min_mean_logprob,
    )
    kept.save_to_disk(args.output)
    print(f"kept {kept.num_rows:,} of {scored.num_rows:,} rows -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
