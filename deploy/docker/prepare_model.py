"""Prepare the served model at image build time, so that the server starts offline.

Run by deploy/Dockerfile (``BAKE_MODEL=true``) with the image's ``HF_HOME`` and
``PAIRSCORE_CACHE_DIR``; what it writes becomes part of the image:

* no model (the embedded SmolLM2 GGUF) or a ``.gguf`` file: loads it once the
  way the server does, which dequantises it into ``--cache-dir``; the server
  then finds the copy there and loads it in seconds;
* a Hugging Face Hub id: downloads its weights, config and tokenizer into the
  Hub cache (``HF_HOME``), then checks that config and tokenizer load from
  that cache with the Hub switched off, as the server will run;
* a local directory: nothing to prepare (it is mounted at run time).

Usage: python prepare_model.py [--model MODEL] [--revision REV] --cache-dir DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Everything but the weights in a format transformers loads (safetensors, or
# the PyTorch .bin files of repositories that have no safetensors).
_SKIP_ALWAYS = [
    "*.gguf",
    "*.onnx",
    "*.onnx_data",
    "*.msgpack",
    "*.h5",
    "*.ot",
    "*.tflite",
    "onnx/*",
    "original/*",
    "coreml/*",
    "openvino/*",
]
_SKIP_WITH_SAFETENSORS = ["*.bin", "*.pt", "*.pth"]


def prepare(model: str | None, cache_dir: str, revision: str | None = None) -> str:
    """Prepare ``model`` (None: the embedded default); returns what was done, for the log."""
    if not model or model.endswith(".gguf"):
        from pairscore_server.engine.loading import ModelSpec, load_engine

        engine = load_engine(ModelSpec(model=model or None, device="cpu", cache_dir=cache_dir))
        info = engine.info
        return f"loaded {info.model_name} ({info.model_source}); dequantised copy in {cache_dir}"
    path = Path(model).expanduser()
    if path.is_absolute() or model.startswith((".", "~")) or path.exists():
        return f"{model} is a path: nothing to prepare (mount the model there at run time)"
    return _download(model, revision)


def _download(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import list_repo_files, snapshot_download

    files = list_repo_files(repo_id, revision=revision)
    skip = list(_SKIP_ALWAYS)
    if any(f.endswith(".safetensors") for f in files):
        skip += _SKIP_WITH_SAFETENSORS
    where = snapshot_download(repo_id, revision=revision, ignore_patterns=skip)
    _check_offline(repo_id, revision)
    return f"downloaded {repo_id} into {where}"


def _check_offline(repo_id: str, revision: str | None) -> None:
    """Config and tokenizer must load from the cache alone (HF_HUB_OFFLINE=1 at run time)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from transformers import AutoConfig, AutoTokenizer

    AutoConfig.from_pretrained(repo_id, revision=revision)
    AutoTokenizer.from_pretrained(repo_id, revision=revision)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="as pairscore serve --model; empty: embedded")
    parser.add_argument("--revision", default=None, help="Hub revision, for a Hub id")
    parser.add_argument("--cache-dir", required=True, help="as pairscore serve --cache-dir")
    args = parser.parse_args(argv)
    print(prepare(args.model or None, args.cache_dir, args.revision or None), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
