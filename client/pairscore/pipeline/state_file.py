"""The resume state: one small JSON document beside the output, replaced atomically.

It lives on the output's filesystem (so that a run on another machine can
resume it) and is saved after the parts are durable: the phase, the
arguments' fingerprint, the model, the counts and each part's length. A
complete ``--resume`` run leaves it as the record of what it wrote
(``phase: complete``), which :func:`completed_run` checks to make a rerun
of the finished command a no-op.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairscore.pipeline.storage import STDIO, FormatError, filesystem, is_remote, local_path, signature

if TYPE_CHECKING:
    from pairscore.pipeline.job import Job

STATE_VERSION = 1
#: The phase of the state a --resume run leaves when it is complete: the record of its outputs.
COMPLETE = "complete"


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class StateFile:
    """The resume checkpoint: one JSON document, replaced atomically (a local file or an object)."""

    def __init__(self, path: str | Path) -> None:
        self.url = str(path)
        self.remote = is_remote(self.url)
        self.path: Any = Path(local_path(self.url)) if not self.remote else self.url

    def load(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` when there is none."""
        try:
            if self.remote:
                fs, fs_path = filesystem(self.url)
                with contextlib.suppress(Exception):
                    fs.invalidate_cache(fs_path)
                text = fs.cat_file(fs_path).decode("utf-8")
            else:
                text = self.path.read_text(encoding="utf-8")
            return json.loads(text)
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:  # cannot happen through save(); say so if it does
            raise FormatError(f"the resume state {self.url} is unreadable: {exc}") from exc

    def save(self, state: dict[str, Any]) -> None:
        """Replace the state (an object store replaces an object whole)."""
        data = json.dumps(state).encode("utf-8")
        if self.remote:
            fs, fs_path = filesystem(self.url)
            fs.pipe_file(fs_path, data)
        else:
            atomic_write_bytes(self.path, data)

    def remove(self) -> None:
        """Delete the state (the run is complete)."""
        if self.remote:
            fs, fs_path = filesystem(self.url)
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(fs_path)
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def completed_run(job: Job) -> dict[str, Any] | None:
    """The record of a complete earlier run of this same ``--resume`` job whose outputs are still
    exactly what it wrote (same arguments and input; each output's size and version, a directory's
    ``_SUCCESS``), or ``None``. Needs no server: rerunning a finished command is a no-op."""
    if not job.resume or job.output == STDIO:
        return None
    state = StateFile(job.state_path).load()
    if not state or state.get("phase") != COMPLETE or state.get("version") != STATE_VERSION:
        return None
    if state.get("fingerprint") != job.fingerprint():
        return None
    recorded = state.get("outputs", {})
    paths = [path for path, _ in job.outputs().values()]
    if set(recorded) != set(paths) or any(signature(p) != recorded[p] for p in paths):
        return None
    return state


def model_identity(info: Any) -> dict[str, str]:
    """What the state records of the served model (a resume refuses another)."""
    return {
        "model_name": info.model_name,
        "model_source": info.model_source,
        "revision": info.revision,
        "dtype": info.dtype,
    }
