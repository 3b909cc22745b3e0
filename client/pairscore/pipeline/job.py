"""What one ``pairscore score`` / ``pairscore filter`` run is asked to do.

A :class:`Job` holds the arguments; :meth:`Job.outputs` says which files it
writes and :meth:`Job.fingerprint` which arguments a resumed run must share
with the run it continues.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pairscore.inputs import RowFields, input_options
from pairscore.pipeline.compression import COMPRESSION_SUFFIX, compression_of, split_compression
from pairscore.pipeline.formats import STDIO, SourceFile, _format_by_name, detect_format, input_files
from pairscore.pipeline.row_reader import BAD_ROW_POLICIES
from pairscore.pipeline.selection import Thresholds
from pairscore.pipeline.storage import (
    FormatError,
    check_writable,
    filesystem,
    is_directory_path,
    is_remote,
    local_path,
    same_place,
)

#: Suffix of the resume state file, next to the main output.
STATE_SUFFIX = ".pairscore-state.json"
#: Choices of Job.top_among / --top-among.
TOP_AMONG = ("all", "passing")

#: Infix of the intermediate file of --top-fraction, next to the kept output.
SCORED_INFIX = ".pairscore-scored"


def with_infix(path: str, infix: str) -> str:
    """``kept.csv`` + ``.errors`` -> ``kept.errors.csv``; ``kept.jsonl.gz`` -> ``kept.errors.jsonl.gz``;
    a directory ``s3://b/kept/`` -> ``s3://b/kept.errors/`` (any URL: string operations only)."""
    if path.endswith("/"):
        return path.rstrip("/") + infix + "/"
    base, compression = split_compression(path)
    tail = COMPRESSION_SUFFIX[compression] if compression else ""
    head, _, name = base.rpartition("/")
    dot = name.rfind(".")
    if dot > 0 and _format_by_name(name) is not None:
        name = name[:dot] + infix + name[dot:]
    else:
        name = name + infix
    return (head + "/" if head or base.startswith("/") else "") + name + tail


@dataclass(frozen=True)
class Job:
    """The arguments of one score or filter run.

    ``command`` is ``"score"`` or ``"filter"``; ``output`` is the scored file
    (score) or the kept rows (filter). ``rejected``: where filter writes the
    rows it drops (else they are dropped). ``errors``: where rows that failed
    go; without it, score keeps them in ``output`` with the error columns
    set, and filter sends them to ``rejected``, or to ``OUTPUT`` with
    ``.errors`` before the extension.

    ``shard``: ``(i, n)`` to process only the i-th (1-based) of n contiguous,
    equal (within one row) slices of the input's rows: rows
    ``[(i-1)*total//n, i*total//n)``. The n outputs, concatenated in order
    of i, hold exactly the rows of one run over the whole input, in the same
    order (for CSV/TSV, drop the header line of shards 2..n). ``on_bad_row``:
    ``"fail"`` stops at an input row that cannot be read, ``"skip"`` sends it
    to ``errors`` (error ``invalid_row``, the line number in
    ``error_message``). ``overwrite``: replace existing outputs (otherwise a
    run refuses to start, unless it resumes an interrupted run).
    """

    command: str
    input: str
    output: str
    input_format: str | None = None
    output_format: str | None = None
    rejected: str | None = None
    errors: str | None = None
    prompt_field: str = "prompt"
    response_field: str = "response"
    id_field: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    top_fraction: float | None = None
    by: str = "mean_conditional_logprob"
    tokenization: str = "separate"
    resume: bool = False
    batch_size: int = 32
    max_in_flight: int | None = None
    concurrency: int = 1
    checkpoint_seconds: float = 10.0
    progress: str = "auto"
    log_every: float = 30.0
    shard: tuple[int, int] | None = None
    on_bad_row: str = "fail"
    overwrite: bool = False
    #: Extra score groups (columns.SCORE_GROUPS) the output gets: "unconditional", "greedy".
    scores: tuple[str, ...] = ()
    #: Which rows --top-fraction ranks: "all" scored rows (then thresholds apply on top),
    #: or only those "passing" the thresholds (IFD selection: --max ifd=1 among passing).
    top_among: str = "all"
    #: Other input forms (inputs.RowFields): a conversation or token ids as the prompt,
    #: token ids or a list of candidate responses as the response.
    messages_field: str | None = None
    prompt_ids_field: str | None = None
    response_ids_field: str | None = None
    responses_field: str | None = None
    #: Request options of the new input forms (ScoreOptions; defaults: the server's).
    truncation: str = "none"
    end_of_turn: str = "included"
    prefix: str = "server"
    #: The input's compression when not the extension's (storage.COMPRESSIONS; "none": not compressed).
    compression: str | None = None
    #: The outputs' compression when not their extensions' (a directory output: the input's).
    output_compression: str | None = None

    def __post_init__(self) -> None:
        self.row_fields  # noqa: B018 - two forms of one side: ValueError naming the flags
        input_options(self.truncation, self.end_of_turn, self.prefix)  # an unknown value: ValueError
        if self.top_among not in TOP_AMONG:
            raise ValueError(f"--top-among must be one of {', '.join(TOP_AMONG)}, got {self.top_among!r}")
        if self.command not in ("score", "filter"):
            raise ValueError(f"command must be score or filter, got {self.command!r}")
        if self.command == "score" and (self.thresholds.bounds or self.top_fraction or self.rejected):
            raise ValueError("thresholds, --top-fraction and --rejected belong to `pairscore filter`")
        if self.resume and self.output == STDIO:
            raise ValueError("--resume needs an output file, not stdout")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ValueError(f"--top-fraction must be in (0, 1], got {self.top_fraction}")
        if self.top_fraction is not None and self.output == STDIO:
            raise ValueError("--top-fraction needs an output file (it writes an intermediate file)")
        if (
            self.command == "filter"
            and self.output == STDIO
            and self.errors is None
            and self.rejected is None
        ):
            raise ValueError(
                "filtering to stdout: give --errors FILE or --rejected FILE so that rows "
                "which fail have somewhere to go"
            )
        if self.shard is not None:
            index, count = self.shard
            if not 1 <= index <= count:
                raise ValueError(f"--shard I/N needs 1 <= I <= N, got {index}/{count}")
            if self.input == STDIO:
                raise ValueError("--shard needs an input file, not stdin (it counts the rows first)")
            if self.top_fraction is not None:
                raise ValueError(
                    "--top-fraction cannot be combined with --shard: it picks the best Q of all rows, "
                    "which no shard sees. Use --min/--max thresholds (they judge each row alone), or "
                    "run --top-fraction without --shard"
                )
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"--on-bad-row must be one of {', '.join(BAD_ROW_POLICIES)}")
        if self.on_bad_row == "skip" and self.errors is None:
            raise ValueError("--on-bad-row skip needs --errors FILE: unreadable rows go there")
        if self.max_in_flight is not None and self.max_in_flight < self.batch_size:
            raise ValueError(
                f"--max-in-flight ({self.max_in_flight}) must be at least --batch-size ({self.batch_size}): "
                "a batch is sent whole"
            )
        for path in (self.output, self.rejected, self.errors):
            if path is not None and is_remote(path) and "/" not in path.split("://", 1)[-1].strip("/"):
                raise ValueError(
                    f"{path!r} is the root of a bucket: name an object or a prefix inside it "
                    f"({path.rstrip('/')}/scored.jsonl, {path.rstrip('/')}/scored/); the run keeps its "
                    "parts and resume state beside the output"
                )
        for name in (self.compression, self.output_compression):
            compression_of("", name)  # an unknown name: FormatError, a ValueError
        named = [p for p in (self.output, self.rejected, self.errors) if p not in (None, STDIO)]
        if self.input != STDIO:
            named.append(self.input)
        resolved = same_place(named)
        if len(set(resolved)) != len(resolved):
            same = sorted({p for p, r in zip(named, resolved, strict=True) if resolved.count(r) > 1})
            raise ValueError(
                f"{' and '.join(repr(p) for p in same)} name the same file: the input, -o/--output, "
                "--rejected and --errors must all be different files"
            )

    @cached_property
    def _input(self) -> tuple[list[SourceFile], str]:
        return input_files(self.input, self.input_format)

    @property
    def input_files(self) -> list[SourceFile]:
        """The input's files, in reading order (one; a glob's or a directory's, sorted; none for stdin).

        Listed once, on first use: a missing filesystem package, an empty
        glob or a directory without data files raise FormatError here."""
        return self._input[0]

    def check_storage(self) -> None:
        """List the input and reach every output's filesystem: raises FormatError (naming the extra
        to install, the glob that matched nothing, an output's missing directory) or OSError before
        any row is read."""
        self.in_format  # noqa: B018 - lists the input's files
        for path, _ in self.outputs().values():
            if is_remote(path):
                filesystem(path)
            check_writable(path)

    @property
    def in_format(self) -> str:
        """The input's format."""
        if self.input_format or self.input == STDIO:
            return detect_format(self.input, self.input_format)
        return self._input[1]

    def format_of(self, path: str) -> str:
        """The format an output at ``path`` gets: --output-format, the extension, or (a directory) the input's."""
        if self.output_format or not is_directory_path(path):
            return detect_format(path, self.output_format)
        return self.in_format

    def compression_for(self, path: str) -> str | None:
        """The compression an output at ``path`` gets: --output-compression, the extension's, or (a
        directory) the input's when all its files share one."""
        if path == STDIO:
            return compression_of(path, self.output_compression) if self.output_compression else None
        if is_directory_path(path) and self.output_compression is None:
            found = {compression_of(f.url, self.compression) for f in self.input_files}
            return found.pop() if len(found) == 1 and self.format_of(path) != "parquet" else None
        return compression_of(path, self.output_compression)

    @property
    def out_format(self) -> str:
        """The main output's format."""
        return self.format_of(self.output)

    @property
    def state_path(self) -> str:
        """Where the resume state lives."""
        return self.output.rstrip("/") + STATE_SUFFIX

    @property
    def scored_path(self) -> str:
        """The intermediate file of --top-fraction."""
        return with_infix(self.output, SCORED_INFIX)

    def errors_path(self) -> str | None:
        """Where failed rows go as a separate file (``None``: into another output)."""
        if self.errors is not None:
            return self.errors
        if self.command == "filter" and self.rejected is None:
            return with_infix(self.output, ".errors")
        return None

    def outputs(self) -> dict[str, tuple[str, str]]:
        """The final outputs: role -> (path, format). Roles: output, kept, rejected, errors."""
        outs: dict[str, tuple[str, str]] = {}
        main = "output" if self.command == "score" else "kept"
        outs[main] = (self.output, self.out_format)
        if self.rejected is not None:
            outs["rejected"] = (self.rejected, self.format_of(self.rejected))
        errors = self.errors_path()
        if errors is not None:
            fmt = self.out_format if self.errors is None else self.format_of(errors)
            outs["errors"] = (errors, fmt)
        return outs

    def fingerprint(self) -> dict[str, object]:
        """The arguments that must not change between a run and its resumption."""
        source: dict[str, Any] = {"input": self.input}
        files = self.input_files
        if len(files) == 1 and files[0].url == self.input and not is_remote(self.input):
            st = os.stat(local_path(self.input))
            source = {
                "input": os.path.realpath(local_path(self.input)),
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
            }
        elif files:  # a glob, a directory or a URL: every file, its size and version
            source["files"] = [[f.url, f.size, f.version] for f in files]
        return {
            "command": self.command,
            **source,
            "input_format": self.in_format,
            "outputs": {
                k: [same_place([p])[0] if p != STDIO else p, f] for k, (p, f) in self.outputs().items()
            },
            "fields": [self.prompt_field, self.response_field, self.id_field],
            "thresholds": self.thresholds.describe(),
            "top_fraction": self.top_fraction,
            "by": self.by,
            "tokenization": self.tokenization,
            "shard": list(self.shard) if self.shard is not None else None,
            "on_bad_row": self.on_bad_row,
            # only when set, so that runs begun before --scores existed still resume
            **({"scores": list(self.scores)} if self.scores else {}),
            **({"top_among": self.top_among} if self.top_among != "all" else {}),
            **self.row_fields.describe(),
            **input_options(self.truncation, self.end_of_turn, self.prefix),
            **({"compression": self.compression} if self.compression else {}),
            **({"output_compression": self.output_compression} if self.output_compression else {}),
        }

    @property
    def row_fields(self) -> RowFields:
        """Which columns hold each row's prompt and response."""
        return RowFields(
            prompt_field=self.prompt_field,
            response_field=self.response_field,
            id_field=self.id_field,
            messages_field=self.messages_field,
            prompt_ids_field=self.prompt_ids_field,
            response_ids_field=self.response_ids_field,
            responses_field=self.responses_field,
        )

    def missing_columns_error(self, row: dict[str, Any]) -> FormatError:
        """The error for an input whose first row lacks the columns the flags name: what it has,
        and which flags would read it."""
        fields = self.row_fields
        missing = fields.missing_columns(row)
        hints = {
            "messages": "--messages-field messages",
            "prompt_ids": "--prompt-ids-field prompt_ids",
            "response_ids": "--response-ids-field response_ids",
            "responses": "--responses-field responses",
        }
        present = [flag for column, flag in hints.items() if column in row and column not in missing]
        hint = (
            f"; it has {', '.join(sorted(set(hints) & row.keys()))}: pass {' '.join(present)}"
            if present
            else ""
        )
        return FormatError(
            f"the input has no column {' or '.join(repr(c) for c in missing)} (its first row has "
            f"{sorted(row)}){hint}; name the columns with --prompt-field/--response-field, "
            "--messages-field, --prompt-ids-field, --response-ids-field or --responses-field"
        )
