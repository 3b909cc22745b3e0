"""Init container of the gpu-model-volume overlay: put a Hub model on the model volume.

Downloads MODEL_REPO at MODEL_REVISION into MODEL_DIR (on the shared volume)
unless a complete copy is already there, so only the first pod to start
downloads. The download goes to a folder of its own and is renamed into place
when complete: a pod that was killed half-way, or two pods starting at once,
never leave a partial model where the server would load it.

Environment: MODEL_REPO (a Hub id), MODEL_REVISION (a branch, tag or commit:
pin a commit), MODEL_DIR (where the server's PAIRSCORE_MODEL points), HF_TOKEN
(optional, for gated models), HOSTNAME (the pod's name, set by Kubernetes).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

#: Weights in other formats than safetensors, and GGUF/ONNX exports: not needed.
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "original/*"]
#: A file every transformers model has; a folder is renamed to MODEL_DIR only once complete.
COMPLETE = "config.json"


def fetch(repo: str, revision: str | None, dest: Path, worker: str) -> str:
    """Make ``dest`` a complete copy of ``repo`` at ``revision``; returns what it did."""
    if (dest / COMPLETE).is_file():
        return f"{dest} is already there"
    from huggingface_hub import snapshot_download

    partial = dest.parent / f".{dest.name}.partial-{worker}"
    shutil.rmtree(partial, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    snapshot_download(repo, revision=revision, local_dir=str(partial), ignore_patterns=IGNORE_PATTERNS)
    if not (partial / COMPLETE).is_file():
        raise SystemExit(f"{repo}@{revision} has no {COMPLETE}: not a transformers model")
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping
    try:
        partial.rename(dest)
    except OSError:
        if not (dest / COMPLETE).is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)
        return f"{dest} was put there by another pod meanwhile"
    return f"downloaded {repo}@{revision or 'main'} into {dest}"


def main() -> None:
    repo = os.environ["MODEL_REPO"]
    revision = os.environ.get("MODEL_REVISION") or None
    dest = Path(os.environ["MODEL_DIR"])
    print(fetch(repo, revision, dest, os.environ.get("HOSTNAME", "pod")), flush=True)


if __name__ == "__main__":
    sys.exit(main())
