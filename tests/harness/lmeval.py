"""A small local lm-evaluation-harness task, and a way to run lm-eval on it in-process.

Everything is written to a directory: task YAMLs plus JSON Lines data, loaded by
lm-eval through ``datasets``' local ``json`` builder, so nothing touches the Hub.
Two tasks:

* ``pairscore_mc``: multiple choice, 4 choices, few-shot exemplars drawn from a
  train split. Questions are short arithmetic in words ("what is two plus
  three?"), so a prompt with the exemplars fits the tiny test models' 128-token
  context. ``trailing_space=True`` writes the variant whose context ends in a
  space (``"Answer: "`` with an empty target delimiter), which exercises
  lm-eval's move of trailing context spaces onto the continuation.
  ``sentences=True`` makes each choice a short sentence (several tokens)
  instead of one word.
* ``pairscore_rolling``: ``loglikelihood_rolling`` (perplexity) over a few
  texts, one of them longer than ``long_chars`` characters so that a
  128-token model needs several windows.

:func:`run_lmeval` runs ``lm_eval.simple_evaluate`` with ``log_samples`` and
returns the metrics and every request's result, in the order (task, doc_id,
request index): the same order for any model, so two runs compare item by item.

Usage::

    task_dir = write_tasks(tmp_path / "tasks")
    run = run_lmeval("hf", {"pretrained": str(model_dir)}, task_dir, [MC_TASK])
    run.accuracy(MC_TASK), [r.logprob for r in run.requests]
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MC_TASK = "pairscore_mc"
ROLLING_TASK = "pairscore_rolling"

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}

ROLLING_TEXTS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello world! How are you today? I am fine, thank you.",
    "Question: what is two plus two? Answer: four.",
]


def _mc_docs(rng: random.Random, n: int, sentences: bool = False) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    while len(docs) < n:
        op = rng.choice(sorted(OPERATIONS))
        a, b = rng.randrange(10), rng.randrange(10)
        value = OPERATIONS[op](a, b)
        if not 0 <= value <= 9:
            continue
        wrong = rng.sample([i for i in range(10) if i != value], 3)
        choices = [NUMBERS[i] for i in [value, *wrong]]
        rng.shuffle(choices)
        answer = NUMBERS[value]
        if sentences:  # several tokens per choice: lm-eval's hf backend then runs the context per choice
            choices = [f"{c}, because {NUMBERS[a]} {op} {NUMBERS[b]} is {c}" for c in choices]
            answer = f"{answer}, because {NUMBERS[a]} {op} {NUMBERS[b]} is {answer}"
        docs.append(
            {
                "question": f"what is {NUMBERS[a]} {op} {NUMBERS[b]}?",
                "choices": choices,
                "label": choices.index(answer),
            }
        )
    return docs


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_tasks(
    directory: Path,
    *,
    seed: int = 0,
    n_test: int = 24,
    n_train: int = 10,
    num_fewshot: int = 3,
    trailing_space: bool = False,
    long_chars: int = 1500,
    sentences: bool = False,
    first_n: bool = False,
) -> Path:
    """Write the two tasks (:data:`MC_TASK`, :data:`ROLLING_TASK`) and their data
    into ``directory``; returns it, for ``TaskManager(include_path=...)``.

    The data are a pure function of the arguments (seeded), so two runs, or two
    engineers, get the same documents and the same few-shot exemplars. lm-eval
    samples each document's exemplars from the train split on its own; with
    ``first_n`` every document gets the first ``num_fewshot`` (lm-eval's
    ``first_n`` sampler, as MMLU's 5-shot prompts take the dev split's first five).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train, test = _mc_docs(rng, n_train, sentences), _mc_docs(rng, n_test, sentences)
    _write_jsonl(directory / "mc_train.jsonl", train)
    _write_jsonl(directory / "mc_test.jsonl", test)
    if trailing_space:
        # The context ends in a space; lm-eval moves it onto the continuation.
        doc_to_text, delimiter = "Question: {{question}}\\nAnswer: ", ""
    else:
        doc_to_text, delimiter = "Question: {{question}}\\nAnswer:", " "
    (directory / f"{MC_TASK}.yaml").write_text(
        f"""task: {MC_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {json.dumps(str(directory / "mc_train.jsonl"))}
    test: {json.dumps(str(directory / "mc_test.jsonl"))}
output_type: multiple_choice
training_split: train
test_split: test
fewshot_split: train
num_fewshot: {num_fewshot}
{"fewshot_config:" + chr(10) + "  sampler: first_n" + chr(10) if first_n else ""}doc_to_text: "{doc_to_text}"
target_delimiter: {json.dumps(delimiter)}
fewshot_delimiter: "\\n\\n"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
        encoding="utf-8",
    )

    long_rng = random.Random(seed + 1)
    words = " ".join(ROLLING_TEXTS).split()
    long_text = ""
    while len(long_text) < long_chars:
        long_text += long_rng.choice(words) + " "
    rolling = [{"text": t} for t in [*ROLLING_TEXTS, long_text.strip()]]
    _write_jsonl(directory / "rolling_test.jsonl", rolling)
    (directory / f"{ROLLING_TASK}.yaml").write_text(
        f"""task: {ROLLING_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(directory / "rolling_test.jsonl"))}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""",
        encoding="utf-8",
    )
    return directory


@dataclass(frozen=True)
class RequestResult:
    """One lm-eval request and what the model returned for it."""

    task: str
    doc_id: int
    index: int  # the request's index within its document (the choice, for multiple choice)
    arguments: tuple  # (context, continuation) for loglikelihood, (text,) for rolling
    logprob: float
    is_greedy: bool | None  # None for loglikelihood_rolling


@dataclass
class LmevalRun:
    """The outcome of :func:`run_lmeval`."""

    metrics: dict[str, dict[str, Any]]  # task -> lm-eval's results[task]
    requests: list[RequestResult] = field(default_factory=list)
    seconds: float = 0.0  # wall time of simple_evaluate (model construction included)

    def accuracy(self, task: str = MC_TASK) -> float:
        return float(self.metrics[task]["acc,none"])

    def for_task(self, task: str) -> list[RequestResult]:
        return [r for r in self.requests if r.task == task]


def run_lmeval(
    model: Any,
    model_args: dict[str, Any] | str | None,
    task_dir: Path,
    tasks: list[str],
    *,
    batch_size: int | str = 16,
    **kwargs: Any,
) -> LmevalRun:
    """Run ``lm_eval.simple_evaluate`` on ``tasks`` from ``task_dir`` (see
    :func:`write_tasks`) with ``model`` (a registered name such as ``"hf"`` or
    ``"pairscore"``, or an ``lm_eval.api.model.LM``) and return its metrics and
    per-request results, sorted by (task, doc_id, index). No bootstrap, fixed
    seeds (lm-eval's defaults); ``kwargs`` go to ``simple_evaluate``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(tasks),
        batch_size=batch_size,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
        **kwargs,
    )
    seconds = time.perf_counter() - start
    assert out is not None, "lm-eval returned no results (not rank 0?)"
    requests: list[RequestResult] = []
    for task in tasks:
        for sample in out["samples"][task]:
            for index, (args, resp) in enumerate(zip(sample["arguments"], sample["resps"], strict=True)):
                value = resp[0]
                if isinstance(value, (tuple, list)):
                    logprob, greedy = float(value[0]), bool(value[1])
                else:
                    logprob, greedy = float(value), None
                requests.append(
                    RequestResult(task, int(sample["doc_id"]), index, tuple(args), logprob, greedy)
                )
    requests.sort(key=lambda r: (r.task, r.doc_id, r.index))
    return LmevalRun(metrics={t: dict(out["results"][t]) for t in tasks}, requests=requests, seconds=seconds)


def save_model_dir(model: Any, tokenizer: Any, directory: Path) -> Path:
    """Save a (model, tokenizer) pair with ``save_pretrained`` so that lm-eval's
    ``hf`` backend and a pairscore server can both load it from ``directory``."""
    directory = Path(directory)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory
