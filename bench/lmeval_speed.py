"""lm-evaluation-harness's own command line: ``--model pairscore`` against ``--model hf``.

Runs the local few-shot multiple-choice task of tests/harness/lmeval.py (and
its rolling-perplexity task, unless ``--no-rolling``) through lm-eval's CLI
(``pairscore-lm-eval``: lm-eval's ``cli_evaluate`` with the ``pairscore``
model type registered), once per backend and repeat, in a
fresh process each, alternating the order: ``--model hf`` on the model
directory (``--batch_size 1`` by default, as issue 25 compares), and
``--model pairscore`` against ``pairscore serve`` on the same directory
(started once, and warmed by one untimed CLI run). Each CLI process carries a
timing hook that only reads the clock: the **request phase** is the time
spent inside the model's request methods (``loglikelihood``,
``loglikelihood_rolling``: tokenization and scoring), **start-up** the time
from the process's start to lm-eval's evaluation (imports, building the LM:
loading the weights for hf, connecting for pairscore), both reported
separately (``evaluate()``, also reported, adds lm-eval's own work: building
requests, metrics, bootstrap standard errors). ``--model hf`` runs through
lm-eval's own ``lm-eval`` entry point: with the pairscore model type
registered first, lm-eval 0.4.13's registry no longer finds its built-in
``hf``, so ``pairscore-lm-eval --model hf`` fails. Prints accuracy, the largest per-request difference (nats),
is_greedy mismatches, the median times and their ratios, with the load
average (the machine is shared)::

    python bench/lmeval_speed.py                       # the embedded SmolLM2, 40 docs, 5-shot
    python bench/lmeval_speed.py --docs 12 --repeats 1 --json out.json
    python bench/lmeval_speed.py --sentences           # several-token choices
    python bench/lmeval_speed.py --first-n             # the same exemplars for every question (MMLU-style)
    python bench/lmeval_speed.py --no-rolling          # the multiple-choice task alone
    python bench/lmeval_speed.py --model /models/my-model --hf-batch-size 32
    python bench/lmeval_speed.py --chat                # chat template, a shared system prompt

For SmolLM2-Instruct, lm-eval's hf backend conditions an empty context on
the tokenizer's BOS ``<|im_start|>``; pairscore's prefix token is
``<|endoftext|>``, so the script passes ``prefix_token=<|im_start|>``.

``--chat`` runs the multiple-choice task as a chat model is evaluated: both
CLIs get ``--apply_chat_template`` (lm-eval then also sets
``--fewshot_as_multiturn``: each exemplar is a user turn and an assistant
reply) and ``--system_instruction`` with :data:`SYSTEM_PROMPT` (~150
tokens, the same for every question), so every context is the model's chat
template around a shared system prompt and that document's exemplars. The
rolling task is left out (lm-eval does not template its texts). Rendering
the template is not part of the request phase: the hf backend renders in
its process, pairscore on the server (one ``RenderChat`` call per
document), and that time is reported apart (``chat rendering``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the task lives in the tests' harness

from bench_models import smollm2_dir  # noqa: E402  (bench/, the script's own directory)

from harness.lmeval import MC_TASK, ROLLING_TASK, write_tasks  # noqa: E402

#: The model methods whose time is the request phase.
REQUEST_METHODS = ("loglikelihood", "loglikelihood_rolling")

#: The shared system prompt of ``--chat`` (150 SmolLM2 tokens with its newlines).
SYSTEM_PROMPT = (
    "You are a careful assistant that answers short arithmetic questions written in words. "
    "Each question names two whole numbers from zero to nine and one operation: plus, minus "
    "or times. Work out the result exactly, then answer with the single English word for that "
    "number, in lower case, without digits, punctuation or any explanation.\n"
    "Rules: zero is a number like any other; the result of every question is between zero and "
    "nine; if two answers seem possible, give the one that the arithmetic in the question "
    "yields. Do not repeat the question, do not greet the user and do not add remarks about "
    "your reasoning. Keep the answer to one word, and make sure it is spelled correctly, since "
    "answers are compared letter by letter with the expected word."
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model_dir: str, log: Path, extra: Sequence[str] = ()) -> tuple[subprocess.Popen[bytes], str]:
    """``pairscore serve`` on ``model_dir`` (CPU, float32, then the ``extra`` flags) in a
    child process; waits until it serves."""
    from pairscore import ScoringClient

    port = free_port()
    cmd = [sys.executable, "-m", "pairscore_server", "serve", "--model", model_dir, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--metrics-port", "off", "--device", "cpu", "--dtype", "float32", *extra]
    proc = subprocess.Popen([*cmd, "--log-level", "WARNING"], stdout=log.open("w"), stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    with ScoringClient(target, timeout=5) as client:
        while True:
            try:
                if client.health() == "SERVING":
                    return proc, target
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + log.read_text())
            time.sleep(0.3)


def chat_tokens(target: str, text: str) -> tuple[int, ...]:
    """The ids of ``text`` as the server tokenizes it (to report the system prompt's size)."""
    from pairscore import ScoringClient

    with ScoringClient(target, timeout=30) as client:
        [ids] = client.tokenize([text], parse_special_tokens=True)
    return ids


def max_length(target: str) -> int:
    """lm-eval's ``max_length`` that the ``pairscore`` model type takes by default."""
    from pairscore import ScoringClient

    with ScoringClient(target, timeout=30) as client:
        info = client.model_info()
    limit = min(info.max_context_tokens, info.max_item_tokens or info.max_context_tokens)
    return limit - 1


# --- the CLI process (--cli-child) -----------------------------------------------------


def cli_child(timings_path: Path, cli_args: list[str]) -> None:
    """lm-eval's command line with a hook on ``lm_eval.evaluator.evaluate`` that times
    the model's request methods and keeps every request's result; writes them to
    ``timings_path``. ``--model pairscore`` runs ``pairscore-lm-eval``
    (``pairscore.lmeval.main``), any other model lm-eval's own ``lm-eval``: with the
    pairscore model registered first, lm-eval 0.4.13's registry no longer finds its
    built-in ``hf``."""
    started = time.perf_counter()
    import lm_eval.evaluator

    if cli_args[cli_args.index("--model") + 1] == "pairscore":
        from pairscore.lmeval import main
    else:
        from lm_eval.__main__ import cli_evaluate

        def main(argv: list[str]) -> None:
            sys.argv = ["lm-eval", *argv]
            cli_evaluate()

    inner = lm_eval.evaluator.evaluate
    record: dict = {"request_seconds": 0.0, "render_seconds": 0.0}

    def timed_evaluate(lm, *args, **kwargs):
        record["startup_seconds"] = time.perf_counter() - started
        timed_methods = [(name, "request_seconds") for name in REQUEST_METHODS]
        for name, key in [*timed_methods, ("apply_chat_template", "render_seconds")]:
            method = getattr(lm, name)

            def timed(*a, _method=method, _key=key, **kw):
                t0 = time.perf_counter()
                try:
                    return _method(*a, **kw)
                finally:
                    record[_key] += time.perf_counter() - t0

            setattr(lm, name, timed)
        t0 = time.perf_counter()
        out = inner(lm, *args, **kwargs)
        record["evaluate_seconds"] = time.perf_counter() - t0
        record["accuracy"] = {t: r.get("acc,none") for t, r in out["results"].items()}
        record["contexts"] = sorted(
            [task, sample["doc_id"], i, args[0]]
            for task, samples in out["samples"].items()
            for sample in samples
            for i, args in enumerate(sample["arguments"])
        )
        record["requests"] = sorted(
            [task, sample["doc_id"], i, _value(resp[0])]
            for task, samples in out["samples"].items()
            for sample in samples
            for i, resp in enumerate(sample["resps"])
        )
        return out

    lm_eval.evaluator.evaluate = timed_evaluate
    main(cli_args)
    timings_path.write_text(json.dumps(record))


def _value(value) -> list:
    """[logprob, is_greedy] (is_greedy None for rolling requests)."""
    if isinstance(value, (tuple, list)):
        return [float(value[0]), bool(value[1])]
    return [float(value), None]


# --- the parent ---------------------------------------------------------------------


def run_cli(
    name: str, model_args: str, batch_size: str, tasks: list[str], task_dir: Path, tmp: Path, extra=()
):
    """One lm-eval CLI run in its own process; returns its timings and results."""
    timings = tmp / f"{name}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, __file__, "--cli-child", str(timings), "--"]
    cmd += ["--model", name, "--model_args", model_args, "--tasks", ",".join(tasks)]
    cmd += ["--include_path", str(task_dir), "--batch_size", batch_size, "--log_samples"]
    cmd += ["--output_path", str(tmp / "lm-eval-out"), "--device", "cpu", *extra]
    wall = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - wall
    if proc.returncode != 0:
        raise RuntimeError(f"lm-eval --model {name} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(timings.read_text()), "wall_seconds": wall}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--cli-child"]:
        cli_child(Path(argv[1]), argv[3:])
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="smollm2 (embedded) or a model directory")
    parser.add_argument("--docs", type=int, default=40, help="test documents (4 requests each)")
    parser.add_argument("--fewshot", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs; medians reported")
    parser.add_argument(
        "--sentences", action="store_true", help="choices are short sentences (several tokens), not one word"
    )
    parser.add_argument(
        "--first-n",
        action="store_true",
        help="every document gets the same exemplars (lm-eval's first_n sampler, as MMLU); "
        "default: lm-eval samples each document's own",
    )
    parser.add_argument(
        "--no-rolling",
        action="store_true",
        help="the multiple-choice task alone (default: + rolling perplexity)",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="--apply_chat_template with a shared ~150-token --system_instruction (multiple choice only)",
    )
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="a flag for the pairscore server, e.g. --serve-arg=--max-batch-pairs=128 (repeatable)",
    )
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the untimed warm-up run (one lm-eval process less; the tests' smoke runs, "
        "whose timings are not figures)",
    )
    parser.add_argument("--hf-batch-size", default="1", help="lm-eval's --batch_size for hf (default 1)")
    parser.add_argument("--prefix-token", default=None, help="default: <|im_start|> for smollm2")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a killed run stops its server too
    threads = os.environ.get("BENCH_THREADS", "2")
    os.environ.update(OMP_NUM_THREADS=threads, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    model_dir = smollm2_dir() if args.model == "smollm2" else args.model
    prefix = args.prefix_token or ("<|im_start|>" if args.model == "smollm2" else None)
    tasks = [MC_TASK, *([] if args.no_rolling or args.chat else [ROLLING_TASK])]
    chat_args = ["--apply_chat_template", "--system_instruction", SYSTEM_PROMPT] if args.chat else []
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        task_dir = write_tasks(
            tmp / "tasks",
            n_test=args.docs,
            n_train=max(10, args.fewshot),
            num_fewshot=args.fewshot,
            sentences=args.sentences,
            first_n=args.first_n,
        )
        proc, target = start_server(model_dir, tmp / "server.log", args.serve_arg)
        try:
            # hf's max_length is the pairscore model type's default (the server's context less
            # one), so that long requests and rolling windows are cut the same way
            backends = {
                "hf": (
                    f"pretrained={model_dir},dtype=float32,max_length={max_length(target)}",
                    args.hf_batch_size,
                ),
                "pairscore": (f"target={target}" + (f",prefix_token={prefix}" if prefix else ""), "1"),
            }
            # warm-up, untimed: the server's first requests (the hf process starts cold every run)
            if not args.no_warmup:
                run_cli(
                    "pairscore",
                    *backends["pairscore"],
                    [MC_TASK],
                    task_dir,
                    tmp,
                    ["--limit", "2", *chat_args],
                )
            system_tokens = len(chat_tokens(target, SYSTEM_PROMPT)) if args.chat else 0
            runs: dict[str, list] = {"hf": [], "pairscore": []}
            for repeat in range(args.repeats):
                order = ["hf", "pairscore"] if repeat % 2 == 0 else ["pairscore", "hf"]
                for name in order:
                    runs[name].append(run_cli(name, *backends[name], tasks, task_dir, tmp, chat_args))
                    print(f"  {name}: request phase {runs[name][-1]['request_seconds']:.2f} s", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    hf, ps = runs["hf"][-1], runs["pairscore"][-1]
    pairs = list(zip(ps["requests"], hf["requests"], strict=True))
    if any(a[:3] != b[:3] for a, b in pairs):
        raise SystemExit("the two backends answered different requests")
    if ps["contexts"] != hf["contexts"]:
        raise SystemExit("the two backends built different contexts (chat templates rendered differently)")
    diffs = [abs(a[3][0] - b[3][0]) for a, b in pairs]
    by_task = {t: max(d for d, (a, _) in zip(diffs, pairs, strict=True) if a[0] == t) for t in tasks}
    greedy = sum(a[3][1] != b[3][1] for a, b in pairs)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    figures = {
        "model": args.model,
        "docs": args.docs,
        "fewshot": args.fewshot,
        "sentences": args.sentences,
        "chat": args.chat,
        "system_prompt_tokens": system_tokens,
        "first_n": args.first_n,
        "tasks": tasks,
        "requests": len(pairs),
        "accuracy_hf": hf["accuracy"][MC_TASK],
        "accuracy_pairscore": ps["accuracy"][MC_TASK],
        "max_abs_diff_nats": max(diffs),
        "max_abs_diff_nats_by_task": by_task,
        "is_greedy_mismatches": greedy,
        "hf_batch_size": args.hf_batch_size,
        "repeats": args.repeats,
        "threads": int(threads),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    for name in ("hf", "pairscore"):
        for key in (
            "request_seconds",
            "render_seconds",
            "startup_seconds",
            "evaluate_seconds",
            "wall_seconds",
        ):
            figures[f"{name}_{key}"] = median(name, key)
    figures["request_speedup"] = figures["hf_request_seconds"] / figures["pairscore_request_seconds"]
    figures["evaluate_speedup"] = figures["hf_evaluate_seconds"] / figures["pairscore_evaluate_seconds"]
    chat = f", chat template + {system_tokens}-token system prompt" if args.chat else ""
    print(
        f"{len(pairs)} requests ({args.docs} docs x 4 choices, {args.fewshot}-shot{chat}"
        f"{'' if ROLLING_TASK not in tasks else ', + rolling'}), lm-eval's CLI, "
        f"hf --batch_size {args.hf_batch_size}"
    )
    print(f"accuracy      hf {figures['accuracy_hf']:.4f}   pairscore {figures['accuracy_pairscore']:.4f}")
    per_task = ", ".join(f"{t} {d:.2e}" for t, d in by_task.items())
    print(f"largest |diff| {max(diffs):.2e} nats ({per_task}); is_greedy mismatches {greedy}")
    print(f"median of {args.repeats}    {'hf':>9} {'pairscore':>10} {'hf/pairscore':>13}")
    for key, label in (
        ("request_seconds", "request phase"),
        *([("render_seconds", "chat rendering")] if args.chat else []),
        ("evaluate_seconds", "evaluate()"),
        ("startup_seconds", "start-up"),
        ("wall_seconds", "whole CLI run"),
    ):
        a, b = figures[f"hf_{key}"], figures[f"pairscore_{key}"]
        print(f"{label:<16} {a:8.2f}s {b:9.2f}s {a / b:12.2f}x")
    print(
        "load average at start "
        + " ".join(f"{x:.2f}" for x in load_start)
        + ", at end "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
