"""The benchmark's models and its GEMM-rate ideal (bench/throughput.py).

GPT-2 shapes (``PRESETS``) and Llama shapes (``LLAMA_PRESETS``) get seeded
random weights, so only the tokenizer has to exist; ``smollm2`` is the real
embedded model. ``ideal_tokens_per_s`` is the rate the model's matrix
multiplies alone would allow at the GEMM rate measured in the calling process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

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


def smollm2_dir() -> str:
    """The dequantised embedded SmolLM2 (made once); its tokenizer serves every preset."""
    from pairscore_server.engine import loading

    cache = Path(os.environ.get("PAIRSCORE_CACHE_DIR") or loading.default_cache_dir())
    return str(loading._dequantised_copy(loading.embedded_gguf_path(), cache))


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
