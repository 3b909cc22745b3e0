"""Shared fixtures: tiny models built locally (tier 1), engines on them, servers (tiers 2-3).

The helpers behind them live in the ``harness`` package; test modules import
from there, never from each other.
"""

from __future__ import annotations

import os

# torch's CPU threads (OpenMP) spin while they wait for work, by default: any other
# thread of the suite (a test server's, a client's, a child process) then competes
# with two spinning ones on the 2-core machine. Idle, they sleep here. It changes no
# result (the same two threads split the same work); it is set before torch loads
# OpenMP, and the suite's child processes inherit it. An OMP_WAIT_POLICY of the
# environment wins. Measured at load 4-5, on the same tests both ways:
# test_engine_math 72-132 s -> 15-18 s, three server and tokenizer files 67 -> 29 s.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from harness.models import (  # noqa: E402
    build_bpe_tokenizer,
    build_gpt2_model,
    build_llama_model,
    build_qwen2_model,
    build_qwen2_tokenizer,
    build_sentencepiece_tokenizer,
    make_engine,
)
from harness.progress import ProgressLines  # noqa: E402
from harness.servers import ServerThread  # noqa: E402

# Two threads keep test timings stable on the 2-core CI machine.
torch.set_num_threads(2)


def pytest_configure(config: pytest.Config) -> None:
    """A progress line at least every minute (harness.progress), so a CI log never goes
    quiet for minutes inside a slow file or a slow test. Under pytest-xdist only the
    controller, which writes the terminal, keeps it."""
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(ProgressLines(config), "pairscore-progress")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The ``slow`` tests (the real SmolLM2 model, lm-eval's CLI: 10-40 s each) first.

    ``make test`` runs the suite on two pytest-xdist workers. xdist first hands each
    worker a chunk of consecutive tests (a quarter of its share, ~175 here), so the
    slow ones all go to the first worker, which loads SmolLM2 and builds the float64
    references once, while the second runs short tests; the rest are handed out as
    the workers free up, and neither ends the run alone on a long test. (Grouping by
    ``xdist_group`` would say this outright, but xdist 3.8's groups do not take effect
    with pytest 9.2: pytest-xdist issue 1386.) Without xdist the order is the only
    change; it is stable otherwise."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    """GPT-2-style byte-level BPE tokenizer (no BOS)."""
    return build_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    """Llama-style SentencePiece tokenizer (BOS added, dummy prefix)."""
    return build_sentencepiece_tokenizer(tmp_path_factory.mktemp("sentencepiece"))


@pytest.fixture(scope="session")
def qwen2_tokenizer(tmp_path_factory):
    """Qwen2-style byte-level BPE tokenizer with an NFC normalizer (no BOS)."""
    return build_qwen2_tokenizer(tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session")
def gpt2_family(bpe_tokenizer):
    return build_gpt2_model(len(bpe_tokenizer)), bpe_tokenizer


@pytest.fixture(scope="session")
def llama_family(sp_tokenizer):
    return build_llama_model(len(sp_tokenizer)), sp_tokenizer


@pytest.fixture(scope="session")
def qwen2_family(qwen2_tokenizer):
    return build_qwen2_model(len(qwen2_tokenizer)), qwen2_tokenizer


@pytest.fixture(scope="session", params=["gpt2", "llama", "qwen2"])
def family(request):
    """(model, tokenizer) for each tokenizer family of the contract."""
    return request.getfixturevalue(f"{request.param}_family")


@pytest.fixture(scope="session", params=["packed", "padded"])
def engine(family, request):
    """A ScoringEngine on each tiny family, in each forward-pass layout: packed rows
    (the CPU default) and padded batches with a key/value cache per shared prompt."""
    model, tokenizer = family
    eng = make_engine(model, tokenizer, packing=request.param == "packed")
    assert eng.packing == (request.param == "packed")
    return eng


@pytest.fixture(scope="session")
def tiny_engine(gpt2_family):
    """A ScoringEngine on the tiny GPT-2-style model, for server tests."""
    model, tokenizer = gpt2_family
    return make_engine(model, tokenizer)


@pytest.fixture(scope="session")
def smol_cache_dir(tmp_path_factory):
    """A pairscore cache dir private to this test run (the slow tests share it), holding
    the embedded model's dequantised copy. pytest-xdist's workers share it too: the
    first to need it dequantises the GGUF (15-25 s on 2 busy cores) under a lock, the
    other waits and reuses the copy."""
    from filelock import FileLock

    from pairscore_server.engine.loading import load_engine
    from pairscore_server.engine.spec import ModelSpec

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base, above each worker's own
    cache = root / "pairscore-cache"
    with FileLock(str(root / "pairscore-cache.lock")):
        if not any(cache.glob("dequantised/*/config.json")):
            load_engine(ModelSpec(cache_dir=str(cache), device="cpu"))
    return cache


@pytest.fixture(scope="session")
def smol(smol_cache_dir):
    """The embedded SmolLM2-135M-Instruct engine (float32, CPU), loaded once for the
    session from the dequantised copy ``smol_cache_dir`` holds, and shared by the slow
    files that score on it (test_smollm2.py, test_chat_smollm2.py). A test that changes
    its model's dtype losslessly (float64) puts it back before it ends; one that needs
    bfloat16 works on a copy."""
    from pairscore_server.engine.loading import load_engine
    from pairscore_server.engine.spec import ModelSpec

    return load_engine(ModelSpec(cache_dir=str(smol_cache_dir), device="cpu"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (two CPUs, no dashboard) for the whole session, whose
    workers import this checkout and examples/. Ray does not come back reliably from
    a shutdown in the same process (a second init hung the next module's tests), so
    the modules that need Ray share this one."""
    import os

    from harness.servers import ROOT

    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    path = os.pathsep.join([str(ROOT / "examples"), str(ROOT / "client"), str(ROOT / "server")])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def start_server():
    """Factory: start_server(engine, wait_ready=True, **config) -> a running in-process
    server (harness.servers.ServerThread); every server started is stopped afterwards."""
    started: list[ServerThread] = []

    def start(engine, *, wait_ready: bool = True, **config) -> ServerThread:
        st = ServerThread(engine, **config)
        started.append(st)
        return st.start(wait_ready=wait_ready)

    yield start
    for st in reversed(started):
        st.stop()


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1 for the session (harness.storage.S3Server): a real
    S3 HTTP API on loopback; ``s3.env`` points s3fs at it."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from harness.storage import S3Server

    server = S3Server()
    yield server
    server.stop()
