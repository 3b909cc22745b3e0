"""Issue 14: the proto stays backward compatible. A client built from the stubs of the
proto as it was before the new input forms (commit 2ff2465) calls Score, ScoreStream and
GetModelInfo on a server built from today's code, and gets the same answers as today's
client.

The old stubs are generated with grpcio-tools into a temporary directory and used in a
child process: its own interpreter and descriptor pool, with no trace of today's
``pairscore`` package (the child checks that it imported the old one).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pairscore import Pair, PairScore

from harness.servers import ROOT, clean_env

OLD_COMMIT = "2ff2465"
PROTO = "proto/pairscore/v1/scoring.proto"

PAIRS = [
    ("The capital of France is", " Paris."),
    ("", " an empty prompt"),
    ("def add(x, y):", "\n    return x + y"),
    ("naïve café 😀", ""),
]

_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import grpc
    import pairscore
    from pairscore.v1 import scoring_pb2 as pb, scoring_pb2_grpc as pb_grpc

    # only the old stubs: no fields or methods added since
    assert pairscore.__file__.startswith(sys.argv[1]), pairscore.__file__
    assert "ScoreCandidatesRequest" not in pb.DESCRIPTOR.message_types_by_name
    assert "prompt_ids" not in pb.Pair.DESCRIPTOR.fields_by_name

    pairs = [pb.Pair(id=f"p{i}", prompt=x, response=y) for i, (x, y) in enumerate(json.loads(sys.argv[3]))]
    out = {}
    with grpc.insecure_channel(sys.argv[2]) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        out["info"] = {
            f.name: getattr(info, f.name) for f in pb.GetModelInfoResponse.DESCRIPTOR.fields
            if f.name != "prefix_policy" and f.name != "default_tokenization"
        }
        out["info"]["prefix_policy"] = pb.PrefixPolicy.Name(info.prefix_policy)

        def read(response):
            rows = []
            for r in response.results:
                which = r.WhichOneof("outcome")
                if which == "error":
                    rows.append({"id": r.id, "index": r.index, "error": r.error.message})
                    continue
                s = r.scores
                rows.append({
                    "id": r.id, "index": r.index,
                    "joint": s.joint_logprob, "prompt": s.prompt_logprob, "conditional": s.conditional_logprob,
                    "prompt_tokens": s.prompt_tokens, "response_tokens": s.response_tokens,
                    "unconditional": s.unconditional_logprob if s.HasField("unconditional_logprob") else None,
                    "greedy": s.response_is_greedy if s.HasField("response_is_greedy") else None,
                    "tokens": [(t.token_id, t.logprob, pb.Side.Name(t.side), t.char_start, t.char_end)
                               for t in s.tokens],
                })
            return rows

        options = pb.ScoreOptions(return_tokens=True, unconditional=True, greedy=True)
        out["score"] = read(stub.Score(pb.ScoreRequest(pairs=pairs, options=options), timeout=30))
        stream = stub.ScoreStream(
            iter([pb.ScoreRequest(pairs=pairs[:2]), pb.ScoreRequest(pairs=pairs[2:])]), timeout=30
        )
        out["stream"] = [read(r) for r in stream]
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def old_stubs(tmp_path_factory) -> Path:
    """The Python stubs of the proto at OLD_COMMIT, as a ``pairscore.v1`` package in a temp dir."""
    from grpc_tools import protoc

    root = tmp_path_factory.mktemp("old-stubs")
    source = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:{PROTO}"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if source.returncode != 0:
        pytest.skip(f"this checkout has no commit {OLD_COMMIT} (a shallow clone?): {source.stderr.strip()}")
    proto_dir = root / "proto"
    (proto_dir / "pairscore/v1").mkdir(parents=True)
    (proto_dir / "pairscore/v1/scoring.proto").write_text(source.stdout)
    out = root / "stubs"
    (out / "pairscore/v1").mkdir(parents=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}"]
    assert protoc.main([*args, "pairscore/v1/scoring.proto"]) == 0
    (out / "pairscore/__init__.py").write_text("")
    (out / "pairscore/v1/__init__.py").write_text("")
    return out


def test_old_client_gets_todays_answers(old_stubs: Path, start_server, tiny_engine) -> None:
    st = start_server(tiny_engine)
    env = clean_env()
    env.pop("PYTHONPATH", None)
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(old_stubs), st.target, json.dumps(PAIRS)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=old_stubs,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    old = json.loads(child.stdout)

    with st.client() as client:
        info = client.model_info()
        new = client.score(
            [Pair(x, y, id=f"p{i}") for i, (x, y) in enumerate(PAIRS)],
            return_tokens=True,
            unconditional=True,
            greedy=True,
        )
        plain = client.score([Pair(x, y, id=f"p{i}") for i, (x, y) in enumerate(PAIRS)])

    assert old["info"]["model_name"] == info.model_name
    assert old["info"]["vocab_size"] == info.vocab_size
    assert old["info"]["max_context_tokens"] == info.max_context_tokens
    assert old["info"]["prefix_token_id"] == info.prefix_token_id
    assert old["info"]["max_pairs_per_request"] == info.max_pairs_per_request
    assert old["info"]["prefix_policy"] == "PREFIX_POLICY_" + info.prefix_policy.name

    assert [r["id"] for r in old["score"]] == [f"p{i}" for i in range(len(PAIRS))]
    for got, want in zip(old["score"], new, strict=True):
        assert isinstance(want, PairScore)
        # the same server, the same pairs: the same numbers, bit for bit
        assert (got["joint"], got["prompt"], got["conditional"]) == (
            want.joint_logprob,
            want.prompt_logprob,
            want.conditional_logprob,
        )
        assert (got["prompt_tokens"], got["response_tokens"]) == (want.prompt_tokens, want.response_tokens)
        assert got["unconditional"] == want.unconditional_logprob
        assert got["greedy"] == want.response_is_greedy
        assert [tuple(t) for t in got["tokens"]] == [
            (t.token_id, t.logprob, "SIDE_" + t.side.name, t.char_start, t.char_end) for t in want.tokens
        ]

    streamed = [r for batch in old["stream"] for r in batch]
    assert [len(b) for b in old["stream"]] == [2, 2]
    assert [r["index"] for r in streamed] == [0, 1, 0, 1]
    for got, want in zip(streamed, plain, strict=True):
        assert isinstance(want, PairScore)
        assert got["id"] == want.id
        assert got["conditional"] == pytest.approx(want.conditional_logprob, abs=1e-5)
        assert got["joint"] == pytest.approx(want.prompt_logprob + want.conditional_logprob, abs=1e-5)
        assert got["unconditional"] is None and got["greedy"] is None
