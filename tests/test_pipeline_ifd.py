"""IFD selection and empty prompts (issue 23): a pair without a prompt is never selected by IFD.

IFD measures how much the instruction helps the response; with no prompt
token (m = 0) the conditional and unconditional scores are the same numbers
and IFD is exactly 1, the largest value ``--max ifd=1`` lets through, so the
docs/scores.md recipe used to pick such a row first. The pipeline's ``ifd``
column is null for it (like an empty response's), so it passes no IFD bound
and takes no part in ``--by ifd``. Through the real CLI and server, tiny model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pairscore import cli

from harness.models import make_engine
from harness.scoring import mixed_pairs
from harness.servers import ServerThread

#: The recipe of docs/scores.md, word for word.
RECIPE = ["--max", "ifd=1", "--top-among", "passing", "--top-fraction", "0.1", "--by", "ifd"]


@pytest.fixture(scope="module")
def server(gpt2_family: Any) -> Iterator[ServerThread]:
    model, tokenizer = gpt2_family
    st = ServerThread(make_engine(model, tokenizer)).start()
    yield st
    st.stop()


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_docs_recipe_matches_the_docs() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "scores.md").read_text()
    assert " ".join(RECIPE) in text


def test_an_empty_prompt_is_never_selected_by_ifd(server: ServerThread, tmp_path: Path) -> None:
    rows = [
        {"id": i, "prompt": p.prompt, "response": p.response} for i, p in enumerate(mixed_pairs(40, seed=3))
    ]
    rows = [r for r in rows if r["response"]]
    rows[2:2] = [{"id": 100, "prompt": "", "response": rows[0]["response"]}]
    rows.append({"id": 101, "prompt": "", "response": " and yet another answer"})
    src, scored, kept = tmp_path / "in.jsonl", tmp_path / "scored.jsonl", tmp_path / "kept.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--target", server.target, "--progress", "none", "--timeout", "30"]
    assert cli.main(["score", str(src), "-o", str(scored), "--scores", "unconditional", *common]) == 0
    out = {r["id"]: r for r in read(scored)}
    for empty in (100, 101):
        assert out[empty]["prompt_tokens"] == 0 and out[empty]["response_tokens"] > 0
        assert out[empty]["conditional_logprob"] == out[empty]["unconditional_logprob"]  # IFD would be 1
        assert out[empty]["ifd"] is None
        assert out[empty]["pmi"] == 0.0  # the other columns keep their values
    assert all((r["ifd"] is None) == (r["prompt_tokens"] == 0) for r in out.values())

    assert cli.main(["filter", str(src), "-o", str(kept), *RECIPE, *common]) == 0
    candidates = [r for r in out.values() if r["ifd"] is not None and r["ifd"] <= 1]
    k = math.ceil(0.1 * len(candidates))
    want = sorted(r["id"] for r in sorted(candidates, key=lambda r: (-r["ifd"], r["id"]))[:k])
    got = [r["id"] for r in read(kept)]
    assert got == want and 100 not in got and 101 not in got
    assert all(r["prompt"] for r in read(kept))
