"""The argparse side of ``pairscore score``, ``pairscore filter`` and ``pairscore report``."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from typing import Any

from pairscore.connect_args import add_connection_args, client_kwargs, target_of
from pairscore.inputs import INPUT_OPTIONS
from pairscore.pipeline.columns import METRICS
from pairscore.pipeline.compression import COMPRESSIONS
from pairscore.pipeline.formats import FORMATS
from pairscore.pipeline.progress import MODES
from pairscore.pipeline.row_reader import BAD_ROW_POLICIES

_METRIC_HELP = ", ".join(METRICS)
_FORMATS_HELP = (
    "Formats follow the extension: .jsonl/.ndjson/.json, .csv, .tsv, .parquet (needs pyarrow), "
    "optionally compressed (.gz, .zst, .bz2, .xz); '-' is JSON Lines on stdin/stdout. INPUT may be a "
    "glob or a directory of such files (read in sorted order as one input), OUTPUT a directory "
    "ending in '/' (one shard per checkpoint, then _SUCCESS); both may be URLs of any fsspec "
    "filesystem (s3://, gs://, az://, hf://: pip install 'pairscore[s3]', [gcs], [azure], [hf])."
)


def _input_forms(p: argparse.ArgumentParser) -> None:
    """Flags of the other input forms (docs/pipeline.md, "Input forms") and their options."""
    forms = p.add_argument_group("input forms (instead of the text columns)")
    forms.add_argument(
        "--messages-field",
        metavar="COLUMN",
        help="column with the prompt as a conversation: a list of {role, content} (the response "
        "column is then the assistant's reply), rendered with the model's chat template",
    )
    forms.add_argument(
        "--prompt-ids-field", metavar="COLUMN", help="column with the prompt as a list of token ids"
    )
    forms.add_argument(
        "--response-ids-field", metavar="COLUMN", help="column with the response as a list of token ids"
    )
    forms.add_argument(
        "--responses-field",
        metavar="COLUMN",
        help="column with a list of candidate responses to the row's prompt: one output row per "
        "candidate, with its text in the response column and candidate_index",
    )
    for flag, help_text in (
        (
            "--truncation",
            "a pair longer than the server's limit: 'none' fails the row, 'left' drops prompt tokens "
            "from the start (prompt_tokens_dropped)",
        ),
        (
            "--end-of-turn",
            "chat rows: whether the template's end of the assistant turn is scored with the response",
        ),
        (
            "--prefix",
            "'server': the server's prefix token before the prompt; 'none': the first prompt token is "
            "context only (as lm-evaluation-harness)",
        ),
    ):
        choices, default = INPUT_OPTIONS[flag[2:].replace("-", "_")]
        forms.add_argument(flag, choices=choices, default=default, help=f"{help_text} (default: {default})")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "input",
        metavar="INPUT",
        help="rows to score: a file, a glob, a directory or a URL (s3://bucket/in/); '-': JSONL on stdin",
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="OUTPUT", help="where to write ('-': JSONL on stdout)"
    )
    p.add_argument("--input-format", choices=FORMATS, help="override the input's format")
    p.add_argument("--output-format", choices=FORMATS, help="override the outputs' format")
    p.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        help="the input's compression, when its extension does not say it (none: not compressed)",
    )
    p.add_argument(
        "--output-compression",
        choices=COMPRESSIONS,
        help="the outputs' compression, when their extensions do not say it (default for a directory "
        "output: the input's)",
    )
    p.add_argument(
        "--prompt-field", default="prompt", metavar="COLUMN", help="column with the prompt (default: prompt)"
    )
    p.add_argument(
        "--response-field",
        default="response",
        metavar="COLUMN",
        help="column with the response (default: response)",
    )
    p.add_argument(
        "--id-field", metavar="COLUMN", help="column sent as the pair id (and checked on the way back)"
    )
    _input_forms(p)
    p.add_argument("--errors", metavar="FILE", help="write rows that fail here instead of into the output")
    p.add_argument(
        "--on-bad-row",
        choices=BAD_ROW_POLICIES,
        default="fail",
        help="an input row that cannot be read (a line that is not a JSON object, a CSV row with more "
        "fields than the header): 'fail' stops with its line number (default); 'skip' writes it to "
        "--errors (needed) with error invalid_row and the line number in error_message, and goes on",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace outputs that already exist (without it the run refuses to start, unless "
        "--resume continues an interrupted run)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run with the same arguments (start one so that it can be resumed; "
        "without --resume a failed run removes its partial files). A server that cannot be reached is "
        "waited for, up to --timeout, with a line every 5 s; without --resume the run fails at once",
    )
    p.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="process only the I-th of N contiguous slices of the input's rows (I = 1..N; the rows are "
        "counted first, so not for stdin). Run N of them (e.g. on N machines) with different outputs: "
        "their outputs concatenated in order 1..N equal the output of one run over the whole input "
        "(CSV/TSV: drop the header line of shards 2..N)",
    )
    p.add_argument("--joint", action="store_true", help="tokenize prompt+response as one text (JOINT mode)")
    p.add_argument(
        "--scores",
        default="conditional",
        metavar="LIST",
        help="score groups to write, comma-separated: conditional (the default columns, always on), "
        "unconditional (adds unconditional_logprob, pmi, ifd: the response also scored alone, about "
        "n/(m+n) more work), greedy (adds response_is_greedy). A --min/--max/--by metric of a group "
        "turns it on. See docs/scores.md",
    )
    p.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="pairs per stream message (default: 32)"
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="concurrent streams; with several replicas, use at least one per replica (default: 1)",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        metavar="N",
        help="pairs sent but not yet written (default: 8 batches per stream)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how often progress is made durable for --resume (default: 10)",
    )
    p.add_argument(
        "--progress", choices=MODES, default="auto", help="bar on a terminal, log lines otherwise (auto)"
    )
    p.add_argument(
        "--log-every", type=float, default=30.0, metavar="SECONDS", help="seconds between log lines (30)"
    )
    add_connection_args(p, timeout=120.0)


def _shard(text: str) -> tuple[int, int]:
    """``"2/4"`` -> ``(2, 4)`` (argparse type of --shard)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 1/4, got {text!r}") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"I/N needs 1 <= I <= N, got {text!r}")
    return index, count


def add_pipeline_commands(commands: Any) -> None:
    """Register score, filter and report on the ``pairscore`` subparsers."""
    score = commands.add_parser(
        "score",
        help="add score columns to every row of a dataset",
        description=(
            "Score every (prompt, response) row of INPUT and write it, all columns kept, with score columns "
            "added: joint_logprob, prompt_logprob, conditional_logprob, prompt_tokens, response_tokens, "
            "mean_conditional_logprob, perplexity, error, error_message. " + _FORMATS_HELP
        ),
    )
    _common(score)
    score.add_argument(
        "--summary-metric",
        default="mean_conditional_logprob",
        metavar="METRIC",
        help=f"metric whose quantiles the summary shows ({_METRIC_HELP})",
    )
    score.set_defaults(run=_run_pipeline)

    flt = commands.add_parser(
        "filter",
        help="keep the rows whose scores pass thresholds or rank in the top fraction",
        description=(
            "Score INPUT and write the rows that pass to OUTPUT, the others to --rejected (or nowhere). "
            "Rows that fail to score go to --errors, else to --rejected, else to OUTPUT with '.errors' "
            "before the extension. Thresholds are inclusive; a row without a value for a bounded metric "
            "(empty response) does not pass. --top-fraction is exact: the rows are scored once into an "
            "intermediate file, then two local passes pick exactly ceil(Q*n) rows, ties by input order; "
            "it is a selection over all rows, so it refuses --shard (thresholds work with --shard). "
            + _FORMATS_HELP
        ),
    )
    _common(flt)
    flt.add_argument("--rejected", metavar="FILE", help="write the rows that do not pass here")
    flt.add_argument(
        "--min",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help=f"keep rows with METRIC >= VALUE ({_METRIC_HELP})",
    )
    flt.add_argument(
        "--max", action="append", default=[], metavar="METRIC=VALUE", help="keep rows with METRIC <= VALUE"
    )
    flt.add_argument(
        "--top-fraction", type=float, metavar="Q", help="keep the best Q (0 < Q <= 1) of the rows by --by"
    )
    flt.add_argument(
        "--top-among",
        choices=("all", "passing"),
        default="all",
        help="rows --top-fraction ranks: all scored rows, thresholds then applied on top (default), or only "
        "the rows passing --min/--max. IFD selection (highest IFD below 1): --scores unconditional "
        "--max ifd=1 --top-among passing --top-fraction 0.1 --by ifd",
    )
    flt.add_argument(
        "--by",
        default="mean_conditional_logprob",
        metavar="METRIC",
        help="metric of --top-fraction and of the summary (default: mean_conditional_logprob)",
    )
    flt.set_defaults(run=_run_pipeline)

    report = commands.add_parser(
        "report",
        help="draw a histogram of a score column of a scored file (needs matplotlib)",
        description="Histogram of METRIC in SCORED with its 5/50/95 % quantiles and an optional threshold line.",
    )
    report.add_argument("scored", metavar="SCORED", help="a file written by pairscore score (any format)")
    report.add_argument("-o", "--output", required=True, metavar="FILE", help="the image: .png, .svg or .pdf")
    report.add_argument(
        "--metric", default="mean_conditional_logprob", help=f"column to draw ({_METRIC_HELP})"
    )
    report.add_argument(
        "--threshold", type=float, help="draw this threshold and the share of rows on its kept side"
    )
    report.add_argument("--bins", type=int, default=60, help="histogram bins (default: 60)")
    report.add_argument("--title", help="figure title")
    report.add_argument("--input-format", choices=FORMATS, help="override SCORED's format")
    report.add_argument(
        "--overwrite", action="store_true", help="replace FILE if it exists (without it the report refuses)"
    )
    report.set_defaults(run=_run_report)


def _job(args: argparse.Namespace) -> Any:
    from pairscore.pipeline.columns import group_of, metric, parse_scores
    from pairscore.pipeline.job import Job
    from pairscore.pipeline.selection import Thresholds, parse_bound

    filtering = args.command == "filter"
    bounds = []
    if filtering:
        bounds = [parse_bound(t, upper=False) for t in args.min] + [
            parse_bound(t, upper=True) for t in args.max
        ]
    by = args.by if filtering else args.summary_metric
    # the metrics a run filters or summarises on need their score group
    wanted = {*parse_scores(args.scores), *(group_of(b.metric.column) for b in bounds)}
    wanted.add(group_of(metric(by).column))
    scores = parse_scores(",".join(sorted(wanted)))
    return Job(
        command=args.command,
        input=args.input,
        output=args.output,
        input_format=args.input_format,
        output_format=args.output_format,
        rejected=args.rejected if filtering else None,
        errors=args.errors,
        prompt_field=args.prompt_field,
        response_field=args.response_field,
        id_field=args.id_field,
        thresholds=Thresholds(bounds),
        top_fraction=args.top_fraction if filtering else None,
        by=by,
        tokenization="joint" if args.joint else "separate",
        resume=args.resume,
        batch_size=args.batch_size,
        max_in_flight=args.max_in_flight,
        concurrency=args.concurrency,
        checkpoint_seconds=args.checkpoint_every,
        progress=args.progress,
        log_every=args.log_every,
        shard=args.shard,
        on_bad_row=args.on_bad_row,
        overwrite=args.overwrite,
        scores=scores,
        top_among=args.top_among if filtering else "all",
        messages_field=args.messages_field,
        prompt_ids_field=args.prompt_ids_field,
        response_ids_field=args.response_ids_field,
        responses_field=args.responses_field,
        truncation=args.truncation,
        end_of_turn=args.end_of_turn,
        prefix=args.prefix,
        compression=args.compression,
        output_compression=args.output_compression,
    )


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Treat SIGTERM like Ctrl-C (so the run saves a checkpoint); returns the undo."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return lambda: None

    def undo() -> None:
        signal.signal(signal.SIGTERM, previous)

    return undo


def _run_pipeline(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pairscore.client import ScoringClient
    from pairscore.errors import ConnectionFailedError, ScoringError
    from pairscore.pipeline.formats import FormatError
    from pairscore.pipeline.reach import reach_server
    from pairscore.pipeline.run_record import ResumeError
    from pairscore.pipeline.runner import Runner
    from pairscore.pipeline.state_file import completed_run
    from pairscore.pipeline.summary import summary_lines

    try:
        job = _job(args)
    except ValueError as exc:  # the subcommand's arguments do not fit together
        # Not parser.error: that is the top-level parser, whose usage line says nothing about this.
        print(
            f"pairscore {args.command}: error: {exc} (see pairscore {args.command} --help)", file=sys.stderr
        )
        raise SystemExit(2) from None
    target = target_of(args)
    restore = _sigterm_as_interrupt()
    try:
        job.check_storage()  # a missing extra, an empty glob: said before any server is asked
        done = completed_run(job)
        if done is not None:  # a scheduler's rerun of a finished command: nothing to do, success
            rows = done["stats"]["rows"]
            print(
                f"pairscore {args.command}: {job.output} is complete ({rows:,} input rows, written by an "
                "earlier run of this command); nothing to do. To score again, pass --overwrite "
                "without --resume",
                file=sys.stderr,
            )
            return 0
        # No wait_for_ready: a server that cannot be reached must say why, not stall.
        with ScoringClient(target, **client_kwargs(args)) as client:
            reach_server(
                client,
                label=args.command,
                target=target,
                patience_s=args.timeout,
                wait_for_unreachable=job.resume,
                stream=sys.stderr,
            )
            outcome = Runner(job, client).run()
    except KeyboardInterrupt:
        hint = " run the same command with --resume to continue." if job.resume else ""
        print(f"\npairscore {args.command}: interrupted.{hint}", file=sys.stderr)
        return 130
    except ConnectionFailedError as exc:
        hint = " Then rerun with --resume to continue." if job.resume else ""
        fix = exc.hint[:1].upper() + exc.hint[1:]
        print(f"pairscore {args.command}: cannot reach {target}: {exc.cause}. {fix}.{hint}", file=sys.stderr)
        return 1
    except ScoringError as exc:
        hint = " Fix the cause and rerun with --resume to continue." if job.resume else ""
        print(f"pairscore {args.command}: {target}: {exc}.{hint}", file=sys.stderr)
        return 1
    except (FormatError, ResumeError, OSError) as exc:
        print(f"pairscore {args.command}: {exc}", file=sys.stderr)
        return 1
    finally:
        restore()
    from pairscore.pipeline.columns import metric

    for line in summary_lines(args.command, outcome, metric(job.by).column):
        print(line, file=sys.stderr)
    return 0


def _run_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pairscore.pipeline.formats import FormatError
    from pairscore.pipeline.report import draw_report, read_metric
    from pairscore.pipeline.storage import exists

    if not args.overwrite and exists(args.output):
        print(
            f"pairscore report: {args.output} already exists; pass --overwrite to replace, "
            "or choose another output",
            file=sys.stderr,
        )
        return 1
    try:
        data = read_metric(args.scored, args.metric, args.input_format)
        draw_report(data, args.output, threshold=args.threshold, bins=args.bins, title=args.title)
    except ValueError as exc:  # FormatError is a ValueError; so is an unknown metric
        if not isinstance(exc, FormatError):
            parser.error(str(exc))
        print(f"pairscore report: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pairscore report: {exc}", file=sys.stderr)
        return 1
    print(
        f"pairscore report: {len(data.values):,} values of {data.metric.column} -> {args.output}",
        file=sys.stderr,
    )
    return 0
