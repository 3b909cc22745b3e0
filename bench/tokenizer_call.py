"""How long one tokenizer call takes for one long text (issue 22: one text is one
uninterruptible call, so its length bounds how late a request can stop).

For SmolLM2's tokenizer (the embedded model's dequantised copy, made by the
first `pairscore serve`) and the tests' tiny tokenizers it times the two calls
the server makes for one text: the prompt side of a pair (ids and the spans
covering the text, `PairTokenizer.encode_prompts`) and the `Tokenize` RPC's
(`PairTokenizer.tokenize`), on English prose (the licence texts of
/usr/share/common-licenses repeated) of 100k, 1M and 16M characters. Prints the
best of three (one run for 16M), the tokens, and the process's peak RSS::

    PYTHONPATH=client:server .venv/bin/python bench/tokenizer_call.py . [--sizes 100000,1000000]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from pairscore_server.engine.loading import default_cache_dir
from pairscore_server.engine.tokenization import PairTokenizer


def prose(chars: int) -> str:
    """``chars`` characters of English prose (licence texts, repeated)."""
    base = "\n\n".join(
        p.read_text(errors="replace")
        for p in sorted(Path("/usr/share/common-licenses").glob("*"))
        if p.is_file()
    )
    return (base * (chars // len(base) + 1))[:chars]


def tokenizers(repo: str) -> dict[str, object]:
    from transformers import AutoTokenizer

    sys.path.insert(0, repo + "/tests")
    from harness.models import build_bpe_tokenizer, build_qwen2_tokenizer, build_sentencepiece_tokenizer

    out: dict[str, object] = {}
    copies = sorted((default_cache_dir() / "dequantised").glob("SmolLM2*"))
    if copies:
        out["SmolLM2"] = AutoTokenizer.from_pretrained(str(copies[0]))
    else:
        print("no dequantised SmolLM2 copy (run `pairscore serve` once); skipping it")
    tmp = Path(tempfile.mkdtemp())
    out["tiny GPT-2 BPE"] = build_bpe_tokenizer(tmp / "bpe")
    out["tiny Llama SentencePiece"] = build_sentencepiece_tokenizer(tmp / "sp")
    out["tiny Qwen2 (NFC)"] = build_qwen2_tokenizer(tmp / "qwen2")
    return out


def best(call, repeats: int) -> float:
    """The shortest of ``repeats`` timings of ``call()``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("repo")
    parser.add_argument("--sizes", default="100000,1000000,16000000")
    parser.add_argument("--only", default="", help="a substring of the tokenizer names to keep")
    parser.add_argument(
        "--tokenize-only", action="store_true", help="time only the Tokenize call (less memory)"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    texts = {n: prose(n) for n in sizes}
    print(
        "| tokenizer | characters | tokens | prompt side (ids + spans) | Tokenize | s per 100k chars | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, hf in tokenizers(args.repo).items():
        if args.only not in name:
            continue
        pt = PairTokenizer(hf)
        for n in sizes:
            text = texts[n]
            repeats = 1 if n > 2_000_000 else 3
            tokens = len(pt.tokenize([text])[0])
            t_prompt = float("nan")
            if not args.tokenize_only:
                t_prompt = best(lambda text=text, pt=pt: pt.encode_prompts([text]), repeats)
            t_tok = best(lambda text=text, pt=pt: pt.tokenize([text]), repeats)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
            print(
                f"| {name} | {n:,} | {tokens:,} | {t_prompt:.3f} s | {t_tok:.3f} s | "
                f"{(t_tok if args.tokenize_only else max(t_prompt, t_tok)) / n * 100_000:.3f} s | {rss:.0f} MiB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
