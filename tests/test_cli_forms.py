"""Issue 14, pipeline side: ``pairscore score|filter`` with the other input forms, against the
real in-process server on the tiny GPT-2-style engine, with real files.

* ``--responses-field``: a list of candidate responses per row, one output row per candidate;
* ``--messages-field``: the prompt as a conversation (rendered with the chat template);
* ``--prompt-ids-field`` / ``--response-ids-field``: token ids;
* ``--truncation left`` / ``--prefix none`` / ``--end-of-turn``: passed on as ScoreOptions.

Each good row must score exactly as the same Pair sent with the client; each bad row gets
a clear per-row error and the run goes on.
"""

from __future__ import annotations

import copy
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pairscore import ChatMessage, Pair, PairScore, cli
from pairscore.inputs import RowFields
from pairscore.pipeline import runner as runner_module
from pairscore.pipeline.row_batches import score_batch

from harness.models import make_engine
from harness.servers import ServerThread

# A ChatML template (what SmolLM2 and Qwen2 use), for a copy of the tiny tokenizer.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def forms_server(gpt2_family) -> Iterator[ServerThread]:
    model, tokenizer = gpt2_family
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = CHATML
    st = ServerThread(make_engine(model, chat_tokenizer)).start()
    yield st
    st.stop()


def run(server: ServerThread, *args: str) -> int:
    return cli.main([*args, "--target", server.target, "--progress", "none", "--timeout", "30"])


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def expected(server: ServerThread, pairs: list[Pair], **options: Any) -> list[PairScore]:
    with server.client() as client:
        out = client.score(pairs, **options)
    assert all(isinstance(o, PairScore) for o in out), out
    return out  # type: ignore[return-value]


def assert_row_scores(row: dict[str, Any], want: PairScore) -> None:
    assert row["error"] is None, row
    assert row["conditional_logprob"] == pytest.approx(want.conditional_logprob, abs=1e-9)
    assert row["prompt_logprob"] == pytest.approx(want.prompt_logprob, abs=1e-9)
    assert (row["prompt_tokens"], row["response_tokens"]) == (want.prompt_tokens, want.response_tokens)


def engine_supports(server: ServerThread, pair: Pair, **options: Any) -> bool:
    """Whether the served engine scores ``pair``'s input form (branch `inputs` adds ids, chat and
    truncation to the engine): ids sent as ids must come back as that many tokens."""
    with server.client() as client:
        try:
            [out] = client.score([pair], **options)
        except TypeError:  # the client does not have the option yet
            return False
    if not isinstance(out, PairScore):
        return False
    if pair.prompt_ids is not None:
        return out.prompt_tokens == len(pair.prompt_ids)
    return True


# --- candidates -----------------------------------------------------------------------------


def test_a_responses_list_gives_one_row_per_candidate(
    forms_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [
        {"id": "a", "prompt": "Question: 2+2?", "responses": [" 4", " four", " 5"]},
        {"id": "b", "prompt": "Say hi", "responses": "not a list"},
        {"id": "c", "prompt": "Empty", "responses": []},
        {"id": "d", "prompt": "Mixed", "responses": [" ok", 7]},
        {"id": "e", "prompt": "The end", "responses": [" bye"]},
    ]
    write_jsonl(src, rows)
    code = run(forms_server, "score", str(src), "-o", str(out), "--responses-field", "responses")
    assert code == 0, capsys.readouterr().err
    got = read_jsonl(out)
    assert [(r["id"], r.get("candidate_index")) for r in got] == [
        ("a", 0),
        ("a", 1),
        ("a", 2),
        ("b", None),
        ("c", None),
        ("d", None),
        ("e", 0),
    ]
    want = expected(
        forms_server,
        [Pair("Question: 2+2?", r) for r in (" 4", " four", " 5")] + [Pair("The end", " bye")],
    )
    for row, w in zip([got[0], got[1], got[2], got[6]], want, strict=True):
        assert_row_scores(row, w)
    assert [r["response"] for r in got[:3]] == [" 4", " four", " 5"]
    assert "responses" not in got[0]  # the list is replaced by the one candidate
    assert (
        got[3]["error"] == "invalid_row"
        and "'responses' is a str, not a list of responses" in (got[3]["error_message"])
    )
    assert got[4]["error"] == "invalid_row" and "empty list" in got[4]["error_message"]
    assert got[5]["error"] == "invalid_row" and "item 1 is a int, not text" in got[5]["error_message"]
    # the summary names rows (input) and pairs (one per candidate, one output row each) apart
    err = capsys.readouterr().err
    assert "pairscore score: 5 rows (7 pairs: one per candidate response) in" in err, err
    assert "  pairs scored 4, failed 3 (invalid_row 3)" in err, err
    assert f"  written: 7 pairs -> {out}" in err, err


def test_candidates_from_csv_json_text_and_filter(forms_server: ServerThread, tmp_path: Path) -> None:
    src, kept, rejected = tmp_path / "in.csv", tmp_path / "kept.csv", tmp_path / "rejected.csv"
    with src.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "responses"])
        writer.writerow(["Pick one:", json.dumps([" yes", " no", " maybe so"])])
    code = run(
        forms_server,
        "filter",
        str(src),
        "-o",
        str(kept),
        "--rejected",
        str(rejected),
        "--responses-field",
        "responses",
        "--top-fraction",
        "0.34",
        "--by",
        "conditional",
    )
    assert code == 0
    with kept.open(newline="", encoding="utf-8") as f:
        best = list(csv.DictReader(f))
    with rejected.open(newline="", encoding="utf-8") as f:
        rest = list(csv.DictReader(f))
    want = expected(forms_server, [Pair("Pick one:", r) for r in (" yes", " no", " maybe so")])
    ranked = sorted(range(3), key=lambda i: -want[i].conditional_logprob)
    kept_indices = sorted(int(r["candidate_index"]) for r in best)
    assert 1 <= len(kept_indices) < 3
    assert kept_indices == sorted(ranked[: len(kept_indices)])  # the best candidates by the metric
    assert sorted(int(r["candidate_index"]) for r in rest) == sorted(ranked[len(kept_indices) :])


def test_resume_after_a_crash_inside_a_candidate_list_writes_each_candidate_once(
    forms_server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--resume skips input rows: the state must record input rows, at a row's end."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": f"P{i}", "responses": [" a", " bb"]} for i in range(20)])
    calls = {"n": 0}
    original = runner_module.Runner._emit

    def crash(self: Any, *args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 30:  # the second candidate of row 14 (0-based)
            raise KeyboardInterrupt
        original(self, *args)

    monkeypatch.setattr(runner_module.Runner, "_emit", crash)
    monkeypatch.setattr(runner_module.Runner, "_checkpoint_due", lambda self: True)
    args = ["--responses-field", "responses", "--resume"]
    assert run(forms_server, "score", str(src), "-o", str(out), *args) == 130
    monkeypatch.undo()
    state = json.loads((tmp_path / "out.jsonl.pairscore-state.json").read_text())
    assert state["stats"]["rows"] == 14  # input rows, the last whole one before the crash
    assert run(forms_server, "score", str(src), "-o", str(out), *args) == 0
    got = read_jsonl(out)
    assert [(r["prompt"], r["candidate_index"]) for r in got] == [
        (f"P{i}", j) for i in range(20) for j in (0, 1)
    ]
    assert all(r["error"] is None for r in got)


# --- conversations --------------------------------------------------------------------------

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Capital of France?"},
]


def test_messages_rows_bad_ones_fail_alone(forms_server: ServerThread, tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [
        {"messages": CHAT, "response": " Paris."},
        {"messages": [{"role": "robot", "content": "beep"}], "response": " x"},
        {"messages": [], "response": " x"},
        {"messages": "Capital of France?", "response": " x"},
        {"messages": [{"role": "user"}], "response": " x"},
        {"messages": None, "response": " x"},
        {"messages": CHAT, "response": " Lyon."},
    ]
    write_jsonl(src, rows)
    assert run(forms_server, "score", str(src), "-o", str(out), "--messages-field", "messages") == 0
    got = read_jsonl(out)
    assert len(got) == len(rows)
    errors = [(r["error"], r["error_message"]) for r in got[1:6]]
    assert errors[0] == (
        "invalid_row",
        "field 'messages' message 0 has role 'robot'; roles are system, user, assistant, tool",
    )
    assert errors[1] == (
        "invalid_row",
        "field 'messages' is an empty conversation; give at least one message",
    )
    assert "not a list of messages" in errors[2][1]
    assert errors[3] == ("invalid_row", "field 'messages' message 0 (user) has no text content")
    assert errors[4] == ("invalid_row", "field 'messages' is missing")
    chat = tuple(ChatMessage(**m) for m in CHAT)
    with forms_server.client() as client:
        if not client.model_info().chat_template:
            pytest.skip("the engine does not render chat templates yet (branch inputs: chat support)")
    want = expected(
        forms_server,
        [Pair(prompt_messages=chat, response=" Paris."), Pair(prompt_messages=chat, response=" Lyon.")],
    )
    assert_row_scores(got[0], want[0])
    assert_row_scores(got[6], want[1])


def test_messages_with_candidates_and_end_of_turn(forms_server: ServerThread, tmp_path: Path) -> None:
    with forms_server.client() as client:
        if not client.model_info().chat_template:
            pytest.skip("the engine does not render chat templates yet (branch inputs: chat support)")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"messages": CHAT, "responses": [" Paris.", " Rome."]}])
    args = ["--messages-field", "messages", "--responses-field", "responses", "--end-of-turn", "excluded"]
    assert run(forms_server, "score", str(src), "-o", str(out), *args) == 0
    got = read_jsonl(out)
    chat = tuple(ChatMessage(**m) for m in CHAT)
    want = expected(
        forms_server,
        [Pair(prompt_messages=chat, response=r) for r in (" Paris.", " Rome.")],
        end_of_turn="excluded",
    )
    for row, w in zip(got, want, strict=True):
        assert_row_scores(row, w)


# --- token ids ------------------------------------------------------------------------------


def test_token_id_rows(forms_server: ServerThread, tmp_path: Path) -> None:
    src, out = tmp_path / "in.parquet", tmp_path / "out.jsonl"
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        {"p": [5, 6, 7, 8], "r": [9, 10]},
        {"p": [5, 6], "r": []},
        {"p": None, "r": [1]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), src)
    jsonl_src = tmp_path / "bad.jsonl"
    write_jsonl(jsonl_src, [{"p": [1, "x"], "r": [2]}, {"p": [1, 2.5], "r": [2]}, {"p": [3], "r": [4]}])
    args = ["--prompt-ids-field", "p", "--response-ids-field", "r"]
    assert run(forms_server, "score", str(src), "-o", str(out), *args) == 0
    assert run(forms_server, "score", str(jsonl_src), "-o", str(tmp_path / "bad.out.jsonl"), *args) == 0
    got, bad = read_jsonl(out), read_jsonl(tmp_path / "bad.out.jsonl")
    assert got[2]["error"] == "invalid_row" and got[2]["error_message"] == "field 'p' is missing"
    assert bad[0]["error_message"] == "field 'p' item 1 is 'x', not a token id (a whole number)"
    assert bad[1]["error_message"] == "field 'p' item 1 is 2.5, not a token id (a whole number)"
    if not engine_supports(forms_server, Pair(prompt_ids=(5, 6, 7, 8), response_ids=(9, 10))):
        pytest.skip("the engine does not score Pair.prompt_ids/response_ids yet (branch inputs)")
    want = expected(
        forms_server,
        [
            Pair(prompt_ids=(5, 6, 7, 8), response_ids=(9, 10)),
            Pair(prompt_ids=(5, 6), response_ids=()),
            Pair(prompt_ids=(3,), response_ids=(4,)),
        ],
    )
    assert_row_scores(got[0], want[0])
    assert_row_scores(got[1], want[1])
    assert_row_scores(bad[2], want[2])
    # an id outside the vocabulary: the server's item error, the other rows scored
    with forms_server.client() as client:
        vocab = client.model_info().vocab_size
    write_jsonl(jsonl_src, [{"p": [1, vocab + 3], "r": [2]}, {"p": [3], "r": [4]}])
    assert run(forms_server, "score", str(jsonl_src), "-o", str(tmp_path / "range.jsonl"), *args) == 0
    ranged = read_jsonl(tmp_path / "range.jsonl")
    assert ranged[0]["error"] == "invalid_argument" and str(vocab + 3) in ranged[0]["error_message"]
    assert_row_scores(ranged[1], want[2])


def test_truncation_left_and_prefix_none_are_passed_on(forms_server: ServerThread, tmp_path: Path) -> None:
    long_prompt = "the quick brown fox jumps over the lazy dog " * 6  # past the 128-token context
    if not engine_supports(forms_server, Pair(long_prompt, " ok"), truncation="left"):
        pytest.skip("the engine does not truncate yet (branch inputs)")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": long_prompt, "response": " ok"}, {"prompt": "x", "response": " word" * 200}])
    assert run(forms_server, "score", str(src), "-o", str(out), "--truncation", "left") == 0
    got = read_jsonl(out)
    [want] = expected(forms_server, [Pair(long_prompt, " ok")], truncation="left")
    assert_row_scores(got[0], want)
    assert got[1]["error"] in ("context_length_exceeded", "invalid_argument")  # cannot fit: fails alone
    write_jsonl(src, [{"prompt": "x", "response": " word" * 5}, {"prompt": "a b c", "response": " d"}])
    assert run(forms_server, "score", str(src), "-o", str(out), "--prefix", "none", "--overwrite") == 0
    got = read_jsonl(out)
    want = expected(forms_server, [Pair("x", " word" * 5), Pair("a b c", " d")], prefix="none")
    server_prefix = expected(forms_server, [Pair("a b c", " d")])
    assert want[0].prompt_tokens == 0  # the one prompt token is context only
    assert want[1].prompt_tokens == server_prefix[0].prompt_tokens - 1
    for row, w in zip(got, want, strict=True):
        assert_row_scores(row, w)


# --- flags that do not fit ------------------------------------------------------------------


def test_two_forms_of_one_side_and_missing_columns_are_explained(
    forms_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"messages": CHAT, "response": " Paris."}])
    out = str(tmp_path / "out.jsonl")
    with pytest.raises(SystemExit) as exited:
        run(forms_server, "score", str(src), "-o", out, "--messages-field", "m", "--prompt-ids-field", "p")
    assert exited.value.code == 2
    assert "--messages-field or as --prompt-ids-field, not both" in capsys.readouterr().err
    assert run(forms_server, "score", str(src), "-o", out) == 1
    err = capsys.readouterr().err
    assert "no column 'prompt'" in err and "pass --messages-field messages" in err, err


# --- the batch helpers' shared path (pairscore.hf, pairscore.ray) ---------------------------


def test_score_batch_reads_every_form_and_refuses_candidate_lists() -> None:
    seen: list[Pair] = []

    def fake_score(pairs: list[Pair]) -> list[PairScore]:
        seen.extend(pairs)
        return [PairScore(-1.0, -0.5, -0.5, 1, 1, id=p.id) for p in pairs]

    batch = {
        "messages": [CHAT, [{"role": "robot", "content": "x"}]],
        "response_ids": [[1, 2], [3]],
    }
    fields = RowFields(messages_field="messages", response_ids_field="response_ids")
    table = score_batch(fake_score, batch, fields)
    assert table["error"] == [None, "invalid_row"]
    assert seen == [Pair(prompt_messages=tuple(ChatMessage(**m) for m in CHAT), response_ids=(1, 2))]
    with pytest.raises(ValueError, match="score_candidates"):
        score_batch(
            fake_score, {"prompt": ["x"], "responses": [["a"]]}, RowFields(responses_field="responses")
        )
