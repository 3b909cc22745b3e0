"""Whether a run resumes an earlier one, and what it leaves behind: :class:`RunRecord`.

A run of a :class:`~pairscore.pipeline.job.Job` keeps its record in the
state file beside its output (:mod:`~pairscore.pipeline.state_file`). At the
start, :meth:`RunRecord.start` decides: ``--resume`` continues the
interrupted run the state describes (same arguments, input and model, else
:class:`ResumeError`); without it, an earlier unfinished run's part files and
state are thrown away, and a run refuses to replace existing outputs unless
``--overwrite`` (:class:`OutputExistsError`). While it runs, every save
records the phase, the arguments' fingerprint, the model and the counts; at
the end a ``--resume`` run leaves the record of what it wrote (``phase:
complete``), any other run no state at all.
"""

from __future__ import annotations

from typing import Any

from pairscore.pipeline.formats import STDIO
from pairscore.pipeline.job import Job
from pairscore.pipeline.parts import open_part
from pairscore.pipeline.state_file import COMPLETE, STATE_VERSION, StateFile
from pairscore.pipeline.stats import RunStats
from pairscore.pipeline.storage import exists, remove, signature


class ResumeError(RuntimeError):
    """--resume cannot continue the earlier run (different arguments, input or model)."""


class OutputExistsError(FileExistsError):
    """An output file exists and neither --overwrite nor a run to resume allows replacing it."""


def phase1_outputs(job: Job) -> dict[str, tuple[str, str]]:
    """Role -> (final path, format) of what the scoring phase writes: the intermediate
    scored file with ``--top-fraction``, else the job's outputs."""
    if job.top_fraction is not None:
        return {"scored": (job.scored_path, job.out_format)}
    return job.outputs()


class RunRecord:
    """The state file of one run: what it resumes, what it saves, what it leaves at the end.

    ``fingerprint`` (the job's arguments and input) and ``model`` (the served
    model's identity) go into every save; a run writing to stdout keeps no
    state (nothing is saved, nothing resumes).
    """

    def __init__(self, job: Job, fingerprint: dict[str, object], model: dict[str, str]) -> None:
        self.job = job
        self.fingerprint = fingerprint
        self.model = model
        self.state_file = StateFile(job.state_path) if job.output != STDIO else None

    @property
    def kept(self) -> bool:
        """Whether this run has a state file at all (not for an output on stdout)."""
        return self.state_file is not None

    def start(self) -> dict[str, Any] | None:
        """The state of the interrupted run this one continues, or None for a run of its own
        (leftovers of an earlier unfinished run discarded, existing outputs refused unless
        ``--overwrite``). Raises ResumeError, OutputExistsError."""
        state = self._load()
        if state is None:
            self._refuse_to_overwrite()
        return state

    def save(self, phase: int | str, stats: RunStats, **fields: Any) -> None:
        """Record ``phase`` with the fingerprint, the model, the counts and ``fields``."""
        if self.state_file is not None:
            self.state_file.save(
                {
                    "version": STATE_VERSION,
                    "phase": phase,
                    "fingerprint": self.fingerprint,
                    "model": self.model,
                    **fields,
                    "stats": stats.to_state(),
                }
            )

    def complete(self, stats: RunStats) -> None:
        """The run is complete: a --resume run records what it wrote (so that running it again
        can say so, see :func:`~pairscore.pipeline.state_file.completed_run`); another run
        leaves no state behind."""
        if not self.job.resume:
            self._remove()
            return
        outputs = {path: signature(path) for path, _ in self.job.outputs().values()}
        self.save(COMPLETE, stats, outputs=outputs)

    def discard_leftovers(self, state: dict[str, Any] | None) -> None:
        """Throw away an unfinished run's part files, intermediate file and state (final
        files are kept); ``state``: the earlier run's, whose outputs may differ."""
        job = self.job
        for path, fmt in [*phase1_outputs(job).values(), *job.outputs().values()]:
            open_part(path, fmt, compression=job.compression_for(path)).discard()
        recorded = state.get("fingerprint", {}).get("outputs", {}) if state else {}
        for path, fmt in recorded.values():  # an earlier run with other outputs (--errors...)
            if path != STDIO:
                open_part(path, fmt).discard()  # a part's name does not depend on its compression
        if job.top_fraction is not None:
            remove(job.scored_path)
        self._remove()

    def _load(self) -> dict[str, Any] | None:
        if self.state_file is None:
            return None
        state = self.state_file.load()
        if state is None:
            return None
        if state.get("phase") == COMPLETE and self.job.resume:
            return None  # complete, but not this run's outputs (see completed_run): a run of its own
        if not self.job.resume:
            self.discard_leftovers(state)
            return None
        if state.get("version") != STATE_VERSION:
            raise ResumeError(f"{self.state_file.path} was written by another version of pairscore")
        if state["fingerprint"] != self.fingerprint:
            changed = sorted(
                k for k in self.fingerprint if state["fingerprint"].get(k) != self.fingerprint[k]
            )
            raise ResumeError(
                f"cannot resume: {', '.join(changed)} differ from the interrupted run "
                f"(see {self.state_file.path}); run without --resume to start again"
            )
        if state["model"] != self.model:
            raise ResumeError(
                f"cannot resume: the server now serves {self.model}, the interrupted run was scored "
                f"with {state['model']}; run without --resume to start again"
            )
        return state

    def _refuse_to_overwrite(self) -> None:
        if self.job.overwrite:
            return
        existing = [p for p, _ in self.job.outputs().values() if p != STDIO and exists(p)]
        if existing:
            raise OutputExistsError(
                f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                "pass --overwrite to replace, or choose another output"
            )

    def _remove(self) -> None:
        if self.state_file is not None:
            self.state_file.remove()
