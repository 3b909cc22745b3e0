"""One method on one workload, measured (the child process of bench/throughput.py,
or the run itself with ``--in-process``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import tempfile
import time
from pathlib import Path

from bench_methods import SELECTION_METHODS, run_engine, run_grpc, run_lmeval, run_naive, run_vllm
from bench_models import build_model, flops_per_token, ideal_tokens_per_s, smollm2_dir
from bench_workloads import CHAT_WORKLOADS, SCORE_OPTIONS, chat_ids, make_pairs

#: Starts each line of a child's output that holds one method's measurement (JSON).
RESULT_MARK = "bench-result: "


def child(args) -> None:
    """The methods of ``--run-method`` (one, or several comma-separated with
    ``--one-child``) on one workload, one after another in this (child) process: each
    one's measurement as a line of its own as soon as it is measured."""
    for method in args.run_method.split(","):
        one = argparse.Namespace(**{**vars(args), "run_method": method})
        print(RESULT_MARK + json.dumps(measure(one)), flush=True)


def measure(args) -> dict:
    """Run ``args.run_method`` on ``args.run_workload`` and measure it."""
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    from pairscore_server.engine.host_allocator import apply_host_allocator

    # the process's allocator, as `pairscore serve` and Scorer set it (every in-process
    # method of this child gets it: baselines run on the same allocator)
    apply_host_allocator(args.host_allocator == "retain")
    from pairscore.types import ItemError
    from pairscore_server.engine.engine import ModelDescription, ScoringEngine
    from pairscore_server.engine.loading import ModelSpec, engine_limits, resolve_device, resolve_dtype

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or smollm2_dir())
    pairs = make_pairs(args, tokenizer)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = build_model(args.model, len(tokenizer), device).to(device=device, dtype=dtype)
    packing = {"engine_padded": "off", "engine_packed": "on"}.get(args.run_method, args.packing)
    spec = ModelSpec(packing=packing, dtype=args.dtype, max_batch_tokens=args.max_batch_tokens)
    limits = engine_limits(spec, device)
    if args.run_method == "engine_prompts":
        limits = dataclasses.replace(limits, share_prefixes=False)
    engine = ScoringEngine(model, tokenizer, description=ModelDescription("bench", "bench"), limits=limits)
    prepared = engine.prepare(pairs, SCORE_OPTIONS)
    for i, prep in enumerate(prepared):
        if isinstance(prep, ItemError):
            raise SystemExit(f"pair {i} of the {args.run_workload} workload cannot be scored: {prep.message}")
    if args.run_workload in CHAT_WORKLOADS:
        check_chat_ids(tokenizer, pairs, prepared)
    tokens = sum(p.num_tokens for p in prepared)
    # the unconditional rows add 1 + n per pair with a response (p + y): the expected extra work
    extra = sum(1 + p.response_tokens for p in prepared if p.response_tokens)
    # --gemm-seconds 0 (smoke runs): no GEMM rate, "% ideal" is not measured
    ideal = ideal_tokens_per_s(model, seconds=args.gemm_seconds) if args.gemm_seconds > 0 else float("nan")
    engine.warmup()  # first-call costs (allocator, kernels) are not throughput
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    method = args.run_method
    start = time.perf_counter()
    rss = None
    startup = None
    if method in ("naive_one", "naive_two"):
        results = run_naive(model, prepared, two_passes=method == "naive_two")
    elif method == "lmeval":
        results = run_lmeval(
            model, tokenizer, pairs, prepared, engine.prefix.token, "auto" if device.type == "cuda" else 1
        )
    elif method in ("engine", "engine_padded", "engine_packed", "engine_prompts"):
        results = run_engine(engine, pairs)
    elif method in SELECTION_METHODS:
        results = run_engine(engine, pairs, **SELECTION_METHODS[method])
    elif method == "engine_bf16":
        # the limits a server serving bfloat16 picks (its own tokens per forward pass)
        bf16_limits = engine_limits(dataclasses.replace(spec, dtype="bfloat16"), device)
        engine = ScoringEngine(
            model.to(torch.bfloat16),
            tokenizer,
            description=ModelDescription("bench", "bench"),
            limits=bf16_limits,
        )
        start = time.perf_counter()
        results = run_engine(engine, pairs)
    elif method == "grpc":
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            # Saved in the run's dtype (the server loads it with the same --dtype): a 1B
            # model in bfloat16 writes half the bytes of a float32 copy.
            model.save_pretrained(tmp)
            results, seconds, rss = run_grpc(
                tmp,
                pairs,
                streams=args.streams,
                chunk=args.chunk,
                log_path=Path(tmp) / "server.log",
                device=args.device,
                dtype=args.dtype,
                packing=args.packing,
                max_batch_tokens=args.max_batch_tokens,
                host_allocator=args.host_allocator,
            )
        start = time.perf_counter() - seconds
    elif method == "vllm":
        with tempfile.TemporaryDirectory() as tmp:
            results, seconds, rss, startup = run_vllm(args, model, tokenizer, prepared, tmp=tmp)
        start = time.perf_counter() - seconds
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cuda_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cuda_max_allocated": cuda_peak,
        "method": method,
        "seconds": seconds,
        "tokens": tokens,
        "pairs": len(pairs),
        "tokens_per_s": tokens / seconds,
        "pairs_per_s": len(pairs) / seconds,
        "ideal_tokens_per_s": ideal,
        "gemm_gflops": ideal * flops_per_token(model) / 1e9,
        "flops_per_token": flops_per_token(model),
        "peak_rss": rss or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before": rss_before,
        "weights_bytes": weights,
        "results": results,
        "unconditional_extra_tokens": extra,
        "startup_seconds": startup,
    }


def check_chat_ids(tokenizer, pairs, prepared) -> None:
    """Every method is given the engine's ids (vLLM, the naive loops) or checks against
    them (lm-eval): they must be what a user's own code scores, the ids of
    ``apply_chat_template(messages, add_generation_prompt=True)`` then the reply's,
    with y starting right after the generation prompt."""
    for i, (pair, prep) in enumerate(zip(pairs, prepared, strict=True)):
        prompt, whole = chat_ids(tokenizer, pair)
        if (
            whole[: len(prompt)] != prompt
            or list(prep.input_ids) != whole
            or 1 + prep.prompt_tokens != len(prompt)
        ):
            raise SystemExit(
                f"pair {i}: the engine scores other ids than apply_chat_template's "
                f"({len(prep.input_ids)} ids, {prep.prompt_tokens} in the prompt; the template: "
                f"{len(whole)} ids, {len(prompt)} in the generation prompt)"
            )
