"""The ``pairscore`` command.

* ``pairscore serve [flags]`` runs the server (needs ``pip install 'pairscore[server]'``);
  ``pairscore serve --help`` lists its flags.
* ``pairscore info`` prints the served model as JSON; ``pairscore health`` prints
  SERVING or NOT_SERVING.
* ``pairscore query PROMPT RESPONSE [PROMPT RESPONSE ...]`` scores pairs given on
  the command line and prints one JSON line per pair.
* ``pairscore score INPUT -o OUTPUT`` adds score columns to a dataset;
  ``pairscore filter INPUT -o KEPT [--rejected REJECTED]`` keeps rows by score;
  ``pairscore report SCORED -o report.png`` draws a histogram
  (see :mod:`pairscore.pipeline`).

Every client command takes the connection flags of :mod:`pairscore.connect_args`.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import sys
from collections.abc import Sequence
from typing import Any

from pairscore.connect_args import DEFAULT_TARGET, add_connection_args, client_kwargs, target_of

__all__ = ["DEFAULT_TARGET", "main"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _result_record(index: int, result: Any, *, tokens: bool) -> dict[str, Any]:
    """One output line of ``pairscore query``."""
    from pairscore.types import ItemError

    if isinstance(result, ItemError):
        return {"index": index, "error": {"code": result.code.value, "message": result.message}}
    record = {"index": index, **_jsonable(result)}
    record.pop("id", None)
    if not tokens:
        record.pop("tokens", None)
    for name in ("unconditional_logprob", "pmi", "ifd", "response_is_greedy"):
        if record.get(name) is None:
            record.pop(name, None)  # not asked for: the line stays as before
    for name in ("prompt_tokens_dropped", "rendered_prompt", "rendered_response"):
        if not record.get(name):
            record.pop(name, None)  # nothing truncated, not a conversation: likewise
    if isinstance(record.get("ifd"), float) and record["ifd"] != record["ifd"]:
        record["ifd"] = None  # NaN is not JSON
    for token in record.get("tokens", ()):
        if not token.get("rank"):
            token.pop("rank", None)
        if not token.get("top_k"):
            token.pop("top_k", None)
    return record


def _make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pairscore",
        description=(
            "Score (prompt, response) pairs with a causal language model served over gRPC: "
            "log P(prompt), log P(response | prompt) and their sum (the joint), in nats."
        ),
        epilog=(
            "Start a server with `pairscore serve`, then e.g. "
            "`pairscore query --target localhost:50051 'The capital of France is' ' Paris.'` or "
            "`pairscore score data.jsonl -o scored.jsonl`."
        ),
    )
    from pairscore import __version__

    parser.add_argument("--version", action="version", version=f"pairscore {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser(
        "serve",
        help="run the scoring server (see `pairscore serve --help`; needs pairscore[server])",
        add_help=False,
    )

    def with_target(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add_connection_args(p)
        return p

    with_target(commands.add_parser("info", help="print the served model's description as JSON"))
    with_target(commands.add_parser("health", help="print the server's health: SERVING or NOT_SERVING"))
    query = with_target(
        commands.add_parser(
            "query",
            help="score pairs given on the command line; one JSON line per pair",
            description=(
                "Score PROMPT RESPONSE pairs. Each output line holds joint_logprob "
                "(log P(prompt + response)), prompt_logprob (log P(prompt)), "
                "conditional_logprob (log P(response | prompt)) and the token counts, "
                "or an error for a pair that could not be scored. Mind leading spaces: "
                "' Paris.' and 'Paris.' are different responses."
            ),
        )
    )
    query.add_argument(
        "texts",
        nargs="+",
        metavar="PROMPT RESPONSE",
        help="prompt and response, alternating: an even number of arguments",
    )
    query.add_argument(
        "--joint",
        action="store_true",
        help="tokenize prompt+response as one text (TOKENIZATION_MODE_JOINT) instead of separately",
    )
    query.add_argument(
        "--candidates",
        action="store_true",
        help="the texts are one PROMPT and its candidate RESPONSES: the prompt is sent and computed once "
        "(ScoreCandidates); one line per response, in order",
    )
    query.add_argument("--tokens", action="store_true", help="also print each token with its log-probability")
    query.add_argument(
        "--unconditional",
        action="store_true",
        help="also score the response alone: unconditional_logprob, pmi, ifd (docs/scores.md)",
    )
    query.add_argument(
        "--greedy", action="store_true", help="add response_is_greedy (and each token's rank with --tokens)"
    )
    query.add_argument(
        "--top-k",
        type=int,
        default=0,
        metavar="K",
        help="print the K most likely tokens at each position (implies --tokens; at most the server's "
        "max_top_k, see `pairscore info`)",
    )
    from pairscore.pipeline.commands import add_pipeline_commands

    add_pipeline_commands(commands)
    return parser


def _serve(argv: Sequence[str]) -> int:
    try:
        from pairscore_server.main import main as serve_main
    except ImportError as exc:
        print(
            f"pairscore serve needs the server extra ({exc.name or exc} is missing): "
            "install it with  pip install 'pairscore[server]'",
            file=sys.stderr,
        )
        return 2
    return serve_main(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pairscore`` command; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        return _serve(args_list[1:])
    parser = _make_parser()
    args = parser.parse_args(args_list)
    if hasattr(args, "run"):  # score, filter, report
        return args.run(args, parser)

    from pairscore.client import ScoringClient
    from pairscore.errors import ConnectionFailedError, ScoringError
    from pairscore.types import Pair, TokenizationMode

    if args.command == "query" and args.candidates and len(args.texts) < 2:
        parser.error("query --candidates takes PROMPT RESPONSE [RESPONSE ...]: give at least two texts")
    if args.command == "query" and not args.candidates and len(args.texts) % 2:
        parser.error("query takes PROMPT RESPONSE pairs: give an even number of texts")
    if args.command == "query" and args.top_k < 0:
        parser.error(f"--top-k must be >= 0, got {args.top_k}")
    target = target_of(args)
    try:
        with ScoringClient(target, **client_kwargs(args)) as client:
            if args.command == "info":
                info = _jsonable(client.model_info())
                info.pop("max_token_text_bytes", None)  # server-side only, never sent
                print(json.dumps(info, indent=2))
            elif args.command == "health":
                print(client.health(""))
            else:
                mode = TokenizationMode.JOINT if args.joint else TokenizationMode.SEPARATE
                options = {
                    "tokenization": mode,
                    "return_tokens": args.tokens,
                    "unconditional": args.unconditional,
                    "greedy": args.greedy,
                    "top_k": args.top_k,
                }
                if args.candidates:
                    results = client.score_responses(args.texts[0], args.texts[1:], **options)
                else:
                    pairs = [
                        Pair(prompt=args.texts[i], response=args.texts[i + 1])
                        for i in range(0, len(args.texts), 2)
                    ]
                    results = client.score(pairs, **options)
                tokens = args.tokens or args.top_k > 0
                for index, result in enumerate(results):
                    print(json.dumps(_result_record(index, result, tokens=tokens), ensure_ascii=False))
    except ConnectionFailedError as exc:
        print(
            f"pairscore: cannot reach {target}: {exc.cause}. {exc.hint[:1].upper()}{exc.hint[1:]}.",
            file=sys.stderr,
        )
        return 1
    except ScoringError as exc:
        print(f"pairscore: {target}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # an unreadable --token-file or certificate
        print(f"pairscore: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
