"""Runs a :class:`~pairscore.pipeline.job.Job`: read, score, route, checkpoint, finish.

**Phase 1** streams the input through
:meth:`ScoringClient.score_iter <pairscore.client.ScoringClient.score_iter>`
(results in input order) and appends every row, input columns first and
score columns after, to the part file of its destination. Every
``checkpoint_seconds`` the parts are made durable and the state file records
how many input rows are done and how long each part is. ``--resume`` reads
the state, cuts the parts back to the recorded lengths, skips that many
input rows and goes on, so each input row lands in the outputs exactly once
and in input order, whether the tool was killed, the machine rebooted or
the server restarted (that one the client survives by itself).

**Phase 2** (``--top-fraction`` only) reads the intermediate scored file
twice: once for the exact cut-off, once to write kept/rejected/errors in
input order. It is local and simply redone if interrupted.

**Finishing** renames the parts into place; the state file, saved first
with ``phase: finishing``, lets a resume complete an interrupted finish.

A run refuses to start when an output exists, unless ``--overwrite`` or it
resumes an interrupted run. A run started without ``--resume`` cannot be
resumed, so when it fails it removes its part files and state. With
``--shard I/N`` the input's rows are counted first and only rows
``[(I-1)*total//N, I*total//N)`` are processed. Progress counts the rows
written (the input position of the last one), not the rows read ahead.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from pairscore.inputs import CANDIDATE_INDEX, INVALID_ROW
from pairscore.pipeline.columns import error_columns, metric, request_options, score_columns, value_of
from pairscore.pipeline.formats import STDIO, Row
from pairscore.pipeline.job import Job
from pairscore.pipeline.parts import ChunkedPart, LinePart, open_part
from pairscore.pipeline.progress import Progress
from pairscore.pipeline.row_reader import BadRow, RowReader, count_rows
from pairscore.pipeline.run_record import RunRecord, phase1_outputs
from pairscore.pipeline.state_file import model_identity
from pairscore.pipeline.stats import RunStats
from pairscore.pipeline.storage import remove
from pairscore.pipeline.top_fraction import PARQUET_CHUNK_ROWS, write_top_fraction
from pairscore.types import ItemError, Pair, PairScore, ScoreOutcome


@dataclass(frozen=True)
class Outcome:
    """How a run ended: its stats, where rows went, and the wall time."""

    stats: RunStats
    outputs: dict[str, tuple[str, str]]
    seconds: float
    resumed_from: int


class Runner:
    """One run of a Job against a client (anything with ``score_iter`` and ``model_info``)."""

    def __init__(self, job: Job, client: Any, *, stderr: TextIO | None = None) -> None:
        self.job = job
        self.client = client
        self.stderr = stderr if stderr is not None else sys.stderr
        self.metric = metric(job.by)
        self._emitting = False
        #: Some but not all output rows of an input row's candidates are written.
        self._mid_row = False
        self._ends_row = True
        self._last_checkpoint = 0.0

    # --- entry point ----------------------------------------------------------------

    def run(self) -> Outcome:
        """Do the job; returns the Outcome. Raises ResumeError, FormatError, ScoringError."""
        started = time.monotonic()
        self.record = RunRecord(self.job, self.job.fingerprint(), model_identity(self.client.model_info()))
        state = self.record.start()
        try:
            return self._run(state, started)
        except BaseException:
            if not self.job.resume and self.record.kept:
                self.record.discard_leftovers(None)  # nothing can resume it: leave no part files behind
            raise

    def _run(self, state: dict[str, Any] | None, started: float) -> Outcome:
        resumed_from = state["stats"]["rows"] if state else 0
        top = self.job.top_fraction is not None
        if state is not None and state["phase"] == "finishing":
            self._finish(state["finishing"])
            stats = RunStats.from_state(state["stats"])
            top = top and "scored" in state["finishing"]  # else that was phase 2's finish
        elif state is None or state["phase"] == 1:
            stats = self._phase1(state)
        else:
            stats = RunStats.from_state(state["stats"])
        if top:
            self.record.save(2, stats)
            write_top_fraction(self.job, self.metric, stats, lambda roles: self._finishing(roles, stats))
        self._drop_empty_default_errors(stats)
        self.record.complete(stats)
        return Outcome(stats, self.job.outputs(), time.monotonic() - started, resumed_from)

    def _drop_empty_default_errors(self, stats: RunStats) -> None:
        """The errors file filter names by itself only stays when a row failed."""
        if self.job.errors is None and stats.routed.get("errors", 0) == 0:
            default = self.job.errors_path()
            if default is not None:
                remove(default)

    # --- phase 1: score -------------------------------------------------------------

    def _route(self, row: Row, failed: bool, kept: bool) -> str | None:
        outs = self._parts
        if self.job.top_fraction is not None:
            return "scored"
        if failed:
            return "errors" if "errors" in outs else ("rejected" if "rejected" in outs else "output")
        if self.job.command == "score":
            return "output"
        if kept:
            return "kept"
        return "rejected" if "rejected" in outs else None

    def _pairs(self, row: Row) -> tuple[list[tuple[Row, Pair]], str | None]:
        """The pairs of an input row, each with the output row it becomes (one per
        candidate of a ``--responses-field`` list), or why the row cannot be scored."""
        fields = self.job.row_fields
        pairs, problem = fields.pairs(row)
        if problem is not None or fields.responses_field is None:
            return [(row, p) for p in pairs], problem
        base = {k: v for k, v in row.items() if k != fields.responses_field}
        return [
            ({**base, fields.response_field: p.response, CANDIDATE_INDEX: i}, p) for i, p in enumerate(pairs)
        ], None

    def _phase1(self, state: dict[str, Any] | None) -> RunStats:
        job = self.job
        stats = RunStats.from_state(state["stats"]) if state else RunStats()
        first_row, end_row = 0, None
        if job.shard is not None:
            index, count = job.shard
            total = count_rows(job.input, job.in_format, compression=job.compression, files=job.input_files)
            first_row, end_row = (index - 1) * total // count, index * total // count
        reader = RowReader(
            job.input,
            job.in_format,
            on_bad_row=job.on_bad_row,
            compression=job.compression,
            files=job.input_files if job.input != STDIO else None,
        )
        self._parts: dict[str, LinePart | ChunkedPart] = {}
        for role, (path, fmt) in phase1_outputs(job).items():
            part = open_part(path, fmt, reader.parquet_schema(), job.compression_for(path))
            part.open(state["parts"][role] if state else None)
            self._parts[role] = part
        done = [reader.position()]  # where the last row written ends in the input

        def fraction() -> float | None:
            if end_row is not None:  # a shard: rows written of the shard's rows
                return 1.0 if end_row == first_row else min(1.0, progress.rows / (end_row - first_row))
            return reader.fraction_at(done[0])

        progress = Progress(
            label=job.command,
            fraction=fraction,
            stream=self.stderr,
            mode=job.progress,
            log_every=job.log_every,
            start_rows=stats.rows,
            target=getattr(self.client, "target", None),
        )
        # (output row, its problem, where it ends in the input, whether it ends its input row)
        waiting: deque[tuple[Row, str | None, int, bool]] = deque()
        first = [True]

        def pairs() -> Iterator[Pair]:
            rows: Iterator[Row] = reader.rows(skip=first_row + stats.rows)
            if end_row is not None:
                rows = itertools.islice(rows, max(0, end_row - first_row - stats.rows))
            for row in rows:
                if isinstance(row, BadRow):
                    waiting.append((row, row.reason, reader.position(), True))
                    continue
                if first[0] and job.row_fields.missing_columns(row):
                    raise job.missing_columns_error(row)
                first[0] = False
                pairs, problem = self._pairs(row)
                if problem is not None:
                    waiting.append((row, problem, reader.position(), True))
                for i, (out_row, pair) in enumerate(pairs):
                    waiting.append((out_row, None, reader.position(), i == len(pairs) - 1))
                    yield pair

        def checkpoint() -> None:
            self.record.save(1, stats, parts={role: part.checkpoint() for role, part in self._parts.items()})
            self._last_checkpoint = time.monotonic()

        self._last_checkpoint = time.monotonic()

        def on_retry(error: Exception, delay: float) -> None:
            reason = getattr(error, "cause", "") or str(error)
            progress.waiting(f"{reason}; retrying (gives up after --timeout without an answer)")

        results = self.client.score_iter(
            pairs(),
            batch_size=job.batch_size,
            max_in_flight=job.max_in_flight,
            streams=job.concurrency,
            options=request_options(
                job.scores, job.tokenization, job.truncation, job.end_of_turn, job.prefix
            ),
            on_retry=on_retry,
        )
        try:
            for outcome in results:
                while waiting[0][1] is not None:
                    row, problem, done[0], _ = waiting.popleft()
                    self._emit(row, None, problem, stats, progress)
                row, _, position, ends_row = waiting.popleft()
                if ends_row:  # a candidate list's input row is done with its last candidate
                    done[0] = position
                self._ends_row = ends_row
                self._emit(row, outcome, None, stats, progress)
                self._ends_row = True
                if ends_row and self._checkpoint_due():  # never inside a candidate list
                    checkpoint()
            while waiting:
                row, problem, done[0], _ = waiting.popleft()
                self._emit(row, None, problem, stats, progress)
        except BaseException:
            results.close()  # cancels the streams
            if job.resume and not self._emitting and not self._mid_row and self.record.kept:
                checkpoint()  # keep what is done for --resume
            for part in self._parts.values():
                part.close()
            raise
        finally:
            progress.close()
            reader.close()
        checkpoint()
        self._finishing(list(self._parts), stats)
        for part in self._parts.values():
            part.finish()
        return stats

    def _checkpoint_due(self) -> bool:
        if time.monotonic() - self._last_checkpoint >= self.job.checkpoint_seconds:
            return True
        return any(
            isinstance(p, ChunkedPart) and p.buffered() >= PARQUET_CHUNK_ROWS for p in self._parts.values()
        )

    def _emit(
        self,
        row: Row,
        outcome: ScoreOutcome | None,
        problem: str | None,
        stats: RunStats,
        progress: Progress,
    ) -> None:
        """Write one output row. An input row with a list of candidate responses gives one
        output row per candidate; ``self._ends_row`` is False for all but its last."""
        ends_row = self._ends_row
        self._emitting = True
        if outcome is None:
            columns = error_columns(INVALID_ROW, problem or "", self.job.scores)
            code: str | None = INVALID_ROW
        elif isinstance(outcome, ItemError):
            columns = score_columns(outcome, self.job.scores)
            code = outcome.code.value
        else:
            columns = score_columns(outcome, self.job.scores)
            code = None
        if self.job.id_field is not None and isinstance(outcome, (PairScore, ItemError)):
            expected = str(row.get(self.job.id_field, ""))
            if outcome.id != expected:  # results are matched to rows by order; check it
                raise RuntimeError(f"result for id {outcome.id!r} arrived where {expected!r} was expected")
        out = {**row, **columns}
        kept = code is None and self.job.thresholds.passes(out)
        role = self._route(out, code is not None, kept)
        if role is not None:
            self._parts[role].write(out)
            stats.routed[role] += 1
        stats.rows += int(ends_row)  # input rows: what --resume skips
        self._mid_row = not ends_row
        tokens = 0
        if code is None:
            assert isinstance(outcome, PairScore)
            stats.scored += 1
            tokens = outcome.prompt_tokens + outcome.response_tokens
            stats.tokens += tokens
            stats.metric.add(value_of(out, self.metric.column))
        else:
            stats.errors[code] += 1
        progress.update(rows=int(ends_row), tokens=tokens, errors=int(code is not None))
        self._emitting = False

    # --- finishing ------------------------------------------------------------------

    def _finishing(self, roles: list[str], stats: RunStats) -> None:
        """Record that the parts of ``roles`` are being moved into place, so that a resume
        completes an interrupted finish (:meth:`_finish`)."""
        self.record.save("finishing", stats, finishing=roles)

    def _finish(self, roles: list[str]) -> None:
        """Complete a finish that was interrupted: move what is left into place (idempotent)."""
        outputs = {**phase1_outputs(self.job), **self.job.outputs()}
        for role in roles:
            path, fmt = outputs[role]
            open_part(path, fmt, compression=self.job.compression_for(path)).complete()
        if self.job.top_fraction is not None and "scored" not in roles:
            remove(self.job.scored_path)
