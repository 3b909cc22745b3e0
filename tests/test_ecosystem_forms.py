"""Issue 14, ecosystem side: pairscore.hf (datasets) and pairscore.ray (ServiceScorer,
EngineScorer) read a ``messages`` column (conversations) and token-id columns.

Against the real in-process server on the tiny GPT-2-style engine (its tokenizer given a
ChatML template); Ray runs on the session's one local instance (conftest ``ray_session``).
Good rows score as the same Pair sent with the client; bad rows get ``invalid_row`` naming
the field, and the other rows are scored.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pairscore import ChatMessage, Pair, PairScore
from pairscore import ray as pairscore_ray

from harness.models import make_engine
from harness.servers import ServerThread

np = pytest.importorskip("numpy")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
CHAT = [{"role": "user", "content": "Capital of France?"}]
PROMPT_IDS = [5, 6, 7, 8]
RESPONSE_IDS = [9, 10, 11]


@pytest.fixture(scope="module")
def chat_tokenizer(gpt2_family) -> Any:
    tokenizer = copy.deepcopy(gpt2_family[1])
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def eco_server(gpt2_family, chat_tokenizer) -> Iterator[ServerThread]:
    st = ServerThread(make_engine(gpt2_family[0], chat_tokenizer)).start()
    yield st
    st.stop()


def client_scores(server: ServerThread, pairs: list[Pair]) -> list[PairScore]:
    with server.client() as client:
        out = client.score(pairs)
    assert all(isinstance(o, PairScore) for o in out), out
    return out  # type: ignore[return-value]


def require_chat(server: ServerThread) -> None:
    with server.client() as client:
        if not client.model_info().chat_template:
            pytest.skip("the engine does not render chat templates yet (branch inputs: chat support)")


def require_ids(server: ServerThread) -> None:
    with server.client() as client:
        [out] = client.score([Pair(prompt_ids=tuple(PROMPT_IDS), response_ids=tuple(RESPONSE_IDS))])
    if not isinstance(out, PairScore) or out.prompt_tokens != len(PROMPT_IDS):
        pytest.skip("the engine does not score Pair.prompt_ids/response_ids yet (branch inputs)")


def test_hf_add_scores_reads_messages_and_flags_bad_conversations(eco_server: ServerThread) -> None:
    datasets = pytest.importorskip("datasets")
    from pairscore.hf import add_scores

    rows = [
        {"messages": CHAT, "response": " Paris."},
        {"messages": [{"role": "robot", "content": "hi"}], "response": " x"},
        {"messages": [], "response": " x"},
        {"messages": CHAT, "response": " Rome."},
    ]
    scored = add_scores(
        datasets.Dataset.from_list(rows),
        eco_server.target,
        messages_field="messages",
        load_from_cache_file=False,
        client_options={"timeout": 20},
    )
    errors = scored["error"]
    assert errors[1] == "invalid_row" and "role 'robot'" in scored["error_message"][1]
    assert errors[2] == "invalid_row" and "empty conversation" in scored["error_message"][2]
    require_chat(eco_server)
    chat = tuple(ChatMessage(**m) for m in CHAT)
    want = client_scores(
        eco_server,
        [Pair(prompt_messages=chat, response=" Paris."), Pair(prompt_messages=chat, response=" Rome.")],
    )
    assert errors[0] is None and errors[3] is None
    assert scored["conditional_logprob"][0] == pytest.approx(want[0].conditional_logprob, abs=1e-9)
    assert scored["conditional_logprob"][3] == pytest.approx(want[1].conditional_logprob, abs=1e-9)


def test_hf_add_scores_reads_token_ids(eco_server: ServerThread) -> None:
    datasets = pytest.importorskip("datasets")
    from pairscore.hf import add_scores

    rows = [{"p": PROMPT_IDS, "r": RESPONSE_IDS}, {"p": [1, 2], "r": None}, {"p": [3], "r": [4]}]
    scored = add_scores(
        datasets.Dataset.from_list(rows),
        eco_server.target,
        prompt_ids_field="p",
        response_ids_field="r",
        load_from_cache_file=False,
        client_options={"timeout": 20},
    )
    assert scored["error"][1] == "invalid_row" and scored["error_message"][1] == "field 'r' is missing"
    require_ids(eco_server)
    want = client_scores(
        eco_server,
        [
            Pair(prompt_ids=tuple(PROMPT_IDS), response_ids=tuple(RESPONSE_IDS)),
            Pair(prompt_ids=(3,), response_ids=(4,)),
        ],
    )
    assert scored["prompt_tokens"][0] == len(PROMPT_IDS)
    assert scored["conditional_logprob"][0] == pytest.approx(want[0].conditional_logprob, abs=1e-9)
    assert scored["conditional_logprob"][2] == pytest.approx(want[1].conditional_logprob, abs=1e-9)


def test_ray_service_scorer_reads_numpy_batches_of_messages_and_ids(eco_server: ServerThread) -> None:
    """Ray hands batches as numpy object arrays (of dicts / of int arrays): both are read."""
    scorer = pairscore_ray.ServiceScorer(eco_server.target, messages_field="messages", timeout=20)
    batch = {
        "messages": np.array([CHAT, [{"role": "user", "content": 3}]], dtype=object),
        "response": np.array([" Paris.", " x"], dtype=object),
    }
    out = scorer(batch)
    scorer.client.close()
    assert out["error"][1] == "invalid_row" and out["error_message"][1] == (
        "field 'messages' message 0 (user) has no text content"
    )
    ids_scorer = pairscore_ray.ServiceScorer(
        eco_server.target, prompt_ids_field="p", response_ids_field="r", timeout=20
    )
    ids_batch = {
        "p": np.array([np.array(PROMPT_IDS), np.array([1, 2])], dtype=object),
        "r": np.array([np.array(RESPONSE_IDS), np.array([0.5])], dtype=object),
    }
    ids_out = ids_scorer(ids_batch)
    ids_scorer.client.close()
    assert ids_out["error"][1] == "invalid_row" and "item 0 is 0.5" in ids_out["error_message"][1]
    require_ids(eco_server)
    [want] = client_scores(eco_server, [Pair(prompt_ids=tuple(PROMPT_IDS), response_ids=tuple(RESPONSE_IDS))])
    assert ids_out["conditional_logprob"][0] == pytest.approx(want.conditional_logprob, abs=1e-9)
    require_chat(eco_server)
    [chat_want] = client_scores(
        eco_server, [Pair(prompt_messages=tuple(ChatMessage(**m) for m in CHAT), response=" Paris.")]
    )
    assert out["conditional_logprob"][0] == pytest.approx(chat_want.conditional_logprob, abs=1e-9)


def test_ray_engine_scorer_reads_token_ids(
    eco_server: ServerThread, gpt2_family, chat_tokenizer, tmp_path: Path
) -> None:
    """EngineScorer runs the engine in the actor: the same ids score as through the server."""
    model_dir = tmp_path / "tiny"
    gpt2_family[0].save_pretrained(model_dir)
    chat_tokenizer.save_pretrained(model_dir)
    scorer = pairscore_ray.EngineScorer(
        str(model_dir), device="cpu", dtype="float32", prompt_ids_field="p", response_ids_field="r"
    )
    out = scorer({"p": [PROMPT_IDS, "not ids"], "r": [RESPONSE_IDS, [1]]})
    assert (
        out["error"][1] == "invalid_row"
        and "'p' is a str, not a list of token ids" in out["error_message"][1]
    )
    require_ids(eco_server)
    [want] = client_scores(eco_server, [Pair(prompt_ids=tuple(PROMPT_IDS), response_ids=tuple(RESPONSE_IDS))])
    assert out["conditional_logprob"][0] == pytest.approx(want.conditional_logprob, abs=1e-5)


def test_score_dataset_on_ray_with_a_messages_column(eco_server: ServerThread, ray_session: Any) -> None:
    data = ray_session.data.from_items(
        [
            {"messages": CHAT, "response": " Paris."},
            {"messages": [{"role": "bot", "content": "x"}], "response": " y"},
        ]
    )
    rows = pairscore_ray.score_dataset(
        data, target=eco_server.target, messages_field="messages", actors=1, batch_size=8
    ).take_all()
    assert len(rows) == 2
    assert rows[1]["error"] == "invalid_row" and "role 'bot'" in rows[1]["error_message"]
    require_chat(eco_server)
    [want] = client_scores(
        eco_server, [Pair(prompt_messages=tuple(ChatMessage(**m) for m in CHAT), response=" Paris.")]
    )
    assert rows[0]["error"] is None
    assert rows[0]["conditional_logprob"] == pytest.approx(want.conditional_logprob, abs=1e-9)
