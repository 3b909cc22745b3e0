"""Issue 16 item 2, done when: lm-evaluation-harness's own ``local-completions`` model,
pointed at the OpenAI port, gets the log-likelihoods its ``hf`` backend computes.

The shared local task (harness.lmeval: few-shot multiple choice and rolling
perplexity with a multi-window text) runs twice in-process on the tiny
GPT-2-style model: once with lm-eval's ``hf`` backend on the model saved with
save_pretrained, once with ``local-completions`` over real HTTP to a real
server scoring the same weights. lm-eval tokenizes and sends token ids
(``tokenized_requests=True``, its default) and reads
``token_logprobs[ctxlen:-1]``; every request's log-likelihood must agree
within 1e-3 nats, and its is_greedy flag exactly. The same run is then compared
with pairscore's own lm-eval model type (pairscore.lmeval) on the same server.
"""

from __future__ import annotations

import math

import pytest

from harness.lmeval import MC_TASK, ROLLING_TASK, run_lmeval, save_model_dir, write_tasks
from harness.openai_http import openai_base

pytest.importorskip("lm_eval")
pytest.importorskip("tenacity", reason="lm-eval's local-completions needs tenacity (the test extra has it)")

TOL = 1e-3  # nats per request, the bound
TASKS = [MC_TASK, ROLLING_TASK]
#: Rolling windows of this many predicted tokens in both backends: lm-eval's API models
#: make them max_length - 2 long (one token kept for the generated token, one for the
#: context), its hf backend max_length long. Each window then goes to the endpoint as
#: WINDOW + 1 ids, and with the probe for max_tokens 1 fills the tiny model's 128 positions.
WINDOW = 126


@pytest.fixture(scope="module")
def model_dir(gpt2_family, tmp_path_factory):
    model, tokenizer = gpt2_family
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lmeval-tasks"))


@pytest.fixture(scope="module")
def hf_run(model_dir, task_dir):
    args = {"pretrained": str(model_dir), "dtype": "float32", "device": "cpu", "max_length": WINDOW}
    return run_lmeval("hf", args, task_dir, TASKS, batch_size=8)


def test_local_completions_against_the_endpoint_matches_the_hf_backend(
    start_server, tiny_engine, model_dir, task_dir, hf_run
):
    server = start_server(tiny_engine, openai_port=0)
    args = {
        "model": "tiny",
        "base_url": f"{openai_base(server)}/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": str(model_dir),
        "tokenized_requests": True,
        "max_length": WINDOW + 2,
        "max_retries": 1,
    }
    run = run_lmeval("local-completions", args, task_dir, TASKS, batch_size=8)
    assert len(run.requests) == len(hf_run.requests) == 100  # 24 x 4 choices + 4 texts
    worst = 0.0
    for ours, theirs in zip(run.requests, hf_run.requests, strict=True):
        assert (ours.task, ours.doc_id, ours.index, ours.arguments) == (
            theirs.task,
            theirs.doc_id,
            theirs.index,
            theirs.arguments,
        )
        assert math.isfinite(ours.logprob)
        worst = max(worst, abs(ours.logprob - theirs.logprob))
        assert ours.logprob == pytest.approx(theirs.logprob, abs=TOL), ours
        assert ours.is_greedy == theirs.is_greedy, ours
    print(f"worst |local-completions - hf| over {len(run.requests)} requests: {worst:.2e} nats")
    assert run.accuracy(MC_TASK) == hf_run.accuracy(MC_TASK)
    # the rolling task's long text took several windows, each one request to the endpoint
    assert len(run.for_task(ROLLING_TASK)) == len(hf_run.for_task(ROLLING_TASK))

    # and directly against pairscore's own lm-eval model type, over the same server's gRPC port
    from pairscore.lmeval import PairscoreLM

    native = run_lmeval(PairscoreLM(server.target, max_length=WINDOW), None, task_dir, TASKS)
    for ours, theirs in zip(run.requests, native.requests, strict=True):
        assert ours.arguments == theirs.arguments
        assert ours.logprob == pytest.approx(theirs.logprob, abs=TOL), ours
        assert ours.is_greedy == theirs.is_greedy, ours
    print(
        "worst |local-completions - pairscore model type|: "
        f"{max(abs(a.logprob - b.logprob) for a, b in zip(run.requests, native.requests, strict=True)):.2e} nats"
    )
