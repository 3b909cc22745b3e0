"""Issue 5 chaos, with the server as a separate process: signals, grace, load failures.

The fake-engine servers run ``python tests/harness/fake_engine.py -- SERVE FLAGS``,
which goes through the real ``pairscore serve`` entry point (signal
handling, logging, exit codes) with a FakeEngine in place of the model. The
load-failure tests also run the real ``python -m pairscore_server serve``
on broken model directories.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc

from harness.servers import FAKE_ENGINE_SCRIPT, clean_env, free_port

OK, UNAVAILABLE = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise AssertionError(f"server did not exit within {timeout} s:\n{self.text()}") from None


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """spawn(*fake_args, serve_args=[...]) -> a fake-engine server process (killed at teardown)."""
    procs: list[Proc] = []

    def start(*fake_args: str, serve_args: tuple[str, ...] = ()) -> Proc:
        port = free_port()
        log = tmp_path / f"server-{len(procs)}.log"
        argv = [
            sys.executable, str(FAKE_ENGINE_SCRIPT), *fake_args, "--",
            "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "off", *serve_args,
        ]  # fmt: skip
        popen = subprocess.Popen(
            argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=clean_env(), cwd=tmp_path
        )
        proc = Proc(popen, port, log)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.popen.poll() is None:
            proc.popen.kill()
            proc.popen.wait(timeout=10)


def health(target: str, timeout: float = 2.0) -> str:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def wait_health(proc: Proc, want: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.popen.poll() is None, f"server exited early:\n{proc.text()}"
        try:
            if health(proc.target) == want:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"health never became {want}:\n{proc.text()}")


def logged_seconds(text: str, first: str, last: str) -> float:
    """Seconds between the server's log lines holding ``first`` and ``last``, on its own clock
    (the log's timestamps): what the server did, without the signal's delivery and the
    interpreter's exit around it."""

    def at(words: str) -> datetime:
        [line] = [line for line in text.splitlines() if words in line]
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")

    return (at(last) - at(first)).total_seconds()


#: Half of the 60 s that a forward pass, a load or a grace period lasts in the tests below: a
#: process that exits within it did not wait for them, however slow a loaded machine is.
NOT_WAITING_S = 30.0
#: SIGTERM sent to process gone, beyond the grace period: signal delivery and the
#: interpreter's exit. 0.02 s over a 2 s grace at load 10 (2 cores); the server's own part is
#: checked on its log's clock, to the original 0.35 s (it took grace + 2.7 s before issue 22).
EXIT_MARGIN_S = 1.5
STOPPED = "server stopped"
SIGTERM_SEEN = "SIGTERM received: shutting down"


def score_code(target: str, prompt: str, timeout: float = 15.0) -> grpc.StatusCode:
    """One Score call on a fresh channel; its final status code."""
    request = pb.ScoreRequest(pairs=[pb.Pair(id=prompt, prompt=prompt, response="!")])
    with grpc.insecure_channel(target) as channel:
        try:
            response = pb_grpc.ScoringServiceStub(channel).Score(request, timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code()
    assert response.results[0].HasField("scores")
    return OK


def in_background(fn: Callable[[], grpc.StatusCode]) -> tuple[threading.Thread, list[grpc.StatusCode]]:
    out: list[grpc.StatusCode] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


# --- SIGTERM -----------------------------------------------------------------------------------


def test_sigterm_under_load_finishes_in_flight_work_refuses_new_calls_and_exits_0(
    spawn: Callable[..., Proc],
) -> None:
    proc = spawn("--forward-delay", "0.4", serve_args=("--grace-period", "10"))
    wait_health(proc, "SERVING")
    stop_load = threading.Event()
    load_codes: list[grpc.StatusCode] = []

    def load() -> None:  # closed-loop background load until the server is gone
        i = 0
        while not stop_load.is_set():
            load_codes.append(score_code(proc.target, f"load{i}", timeout=10))
            i += 1

    loaders = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in loaders:
        t.start()
    time.sleep(0.5)
    in_flight = [in_background(lambda i=i: score_code(proc.target, f"inflight{i}")) for i in range(6)]
    time.sleep(0.15)  # the six calls have arrived: queued or in the model
    proc.signal(signal.SIGTERM)
    time.sleep(0.2)
    assert score_code(proc.target, "late", timeout=5) is UNAVAILABLE  # new calls: refused cleanly
    for thread, _ in in_flight:
        thread.join(timeout=15)
    assert [codes for _, codes in in_flight] == [[OK]] * 6  # every in-flight call completed
    assert proc.wait(timeout=15) == 0
    stop_load.set()
    for t in loaders:
        t.join(timeout=15)
        assert not t.is_alive(), "a load call hung"
    assert load_codes and set(load_codes) <= {OK, UNAVAILABLE}, load_codes
    assert OK in load_codes
    text = proc.text()
    assert "SIGTERM received: shutting down" in text and "server stopped" in text
    assert "Traceback" not in text


def test_a_second_signal_exits_at_once_even_with_a_busy_model_thread(
    spawn: Callable[..., Proc],
) -> None:
    # one 60 s forward chunk: the engine cannot stop it when its caller leaves
    proc = spawn("--forward-delay", "60", "--forward-chunk", "60", serve_args=("--grace-period", "60"))
    wait_health(proc, "SERVING")
    thread, codes = in_background(lambda: score_code(proc.target, "slow", timeout=60))
    time.sleep(0.3)  # the call is in the (60 s) forward pass
    proc.signal(signal.SIGTERM)
    time.sleep(0.3)
    assert proc.popen.poll() is None  # still draining: the grace period is 60 s
    proc.signal(signal.SIGTERM)
    # At once: not after the 60 s forward pass nor the 60 s grace (a bound of 5 s stood here).
    assert proc.wait(timeout=NOT_WAITING_S) == 1
    thread.join(timeout=10)
    assert codes and codes[0] in (grpc.StatusCode.CANCELLED, UNAVAILABLE)
    text = proc.text()
    assert "received again: cancelling running requests" in text
    assert "not waiting for 1 busy thread" in text


def test_when_the_grace_period_runs_out_the_process_exits_0_promptly(
    spawn: Callable[..., Proc],
) -> None:
    proc = spawn("--forward-delay", "60", serve_args=("--grace-period", "0.5"))
    wait_health(proc, "SERVING")
    thread, codes = in_background(lambda: score_code(proc.target, "slow", timeout=60))
    time.sleep(0.3)
    proc.signal(signal.SIGTERM)
    # Promptly: not after the 60 s forward pass (a bound of 6 s stood here), and on the
    # server's own clock the stop took the grace period, not more.
    assert proc.wait(timeout=NOT_WAITING_S) == 0
    thread.join(timeout=10)
    assert codes and codes[0] in (grpc.StatusCode.CANCELLED, UNAVAILABLE)
    assert "grace period of 0.5 s ran out" in proc.text()
    assert logged_seconds(proc.text(), SIGTERM_SEEN, STOPPED) <= 0.5 + 0.35, proc.text()


def test_sigterm_while_the_model_loads_exits_0_without_waiting_for_the_load(
    spawn: Callable[..., Proc],
) -> None:
    proc = spawn("--load-delay", "60")
    wait_health(proc, "NOT_SERVING")  # the port is open; the model is loading
    request = pb.ScoreRequest(pairs=[pb.Pair(prompt="x", response="y")])
    with grpc.insecure_channel(proc.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ScoringServiceStub(channel).Score(request, timeout=5)
    assert info.value.code() is UNAVAILABLE and "loading" in info.value.details()
    proc.signal(signal.SIGTERM)
    # Not after the 60 s load (a bound of 5 s stood here).
    assert proc.wait(timeout=NOT_WAITING_S) == 0


# --- a model that cannot be loaded ---------------------------------------------------------------


def test_a_model_that_cannot_be_loaded_exits_1_with_one_clear_line(
    spawn: Callable[..., Proc], tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")

    cases: list[tuple[Proc, str]] = [
        (spawn("--load-error", "oom"), "cannot load the model: out of memory during loading"),
        (spawn("--load-error", "crash"), "cannot load the model: loading the model failed: KeyError"),
    ]
    for model, expected in [(corrupt, "cannot load the model: cannot load model")]:
        port = free_port()
        log = tmp_path / f"{model.name}.log"
        popen = subprocess.Popen(
            [sys.executable, "-m", "pairscore_server", "serve", "--model", str(model),
             "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "off"],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=clean_env(), cwd=tmp_path,
        )  # fmt: skip
        cases.append((Proc(popen, port, log), expected))
    for proc, expected in cases:
        assert proc.wait(timeout=90) == 1, proc.text()
        text = proc.text()
        [error] = [line for line in text.splitlines() if " ERROR " in line]  # one line, no cascade
        assert expected in error, text
        assert "Traceback" not in text, text


@pytest.mark.parametrize("damage", ["truncated weights", "unknown architecture"])
def test_damaged_model_directories_are_load_errors(gpt2_family: Any, tmp_path: Path, damage: str) -> None:
    """In-process (the CLI path of a ModelLoadError is covered above)."""
    from pairscore_server.engine.loading import load_engine
    from pairscore_server.engine.spec import ModelLoadError, ModelSpec

    model, tokenizer = gpt2_family
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    if damage == "truncated weights":  # a download cut short
        weights = tmp_path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        config = json.loads((tmp_path / "config.json").read_text())
        config.update(model_type="no-such-architecture", architectures=["NoSuchForCausalLM"])
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_engine(ModelSpec(model=str(tmp_path), device="cpu"))


def test_the_whole_shutdown_fits_the_grace_period(spawn: Callable[..., Proc]) -> None:
    """Kubernetes sizes terminationGracePeriodSeconds from --grace-period: a stream that stays
    open and a forward pass still running when the grace runs out must not add the batcher's
    drain and a settle on top (it took grace + ~2.7 s)."""
    grace = 2.0
    proc = spawn("--forward-delay", "1.5", serve_args=("--grace-period", str(grace)))
    wait_health(proc, "SERVING")
    with grpc.insecure_channel(proc.target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        opened = threading.Event()

        def messages() -> Iterator[pb.ScoreRequest]:  # a stream that stays open
            for i in range(1000):
                yield pb.ScoreRequest(pairs=[pb.Pair(id=f"s{i}", prompt=f"s{i}", response="!")])
                opened.set()
                time.sleep(0.2)

        stream = stub.ScoreStream(messages(), timeout=60)
        ended: list[grpc.StatusCode] = []

        def read() -> None:
            try:
                for _ in stream:
                    pass
            except grpc.RpcError as exc:  # the server cuts the stream when the grace runs out
                ended.append(exc.code())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert opened.wait(10)
        time.sleep(0.6)  # a forward pass of 1.5 s is running now
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        took = time.monotonic() - started
        reader.join(10)
    assert ended and ended[0] is not OK
    text = proc.text()
    stopping = logged_seconds(text, SIGTERM_SEEN, STOPPED)  # 1.6 s at load 10
    assert stopping <= grace + 0.35, f"the stop took {stopping:.2f} s for a {grace} s grace period"
    assert took <= grace + EXIT_MARGIN_S, f"shutdown took {took:.2f} s for a {grace} s grace period"


def test_shutdown_fits_the_grace_period_during_a_long_tokenization(spawn: Callable[..., Proc]) -> None:
    """Tokenization runs in chunks that see the cancellation (issue 22): a request still being
    tokenized when the grace runs out does not hold the exit (it took 11.4 s for a 10 s grace)."""
    grace = 2.0
    proc = spawn(
        "--prepare-delay", "0.1", "--max-context", "16384", serve_args=("--grace-period", str(grace))
    )
    wait_health(proc, "SERVING")
    # 60 pairs of 10k characters: 6 s of tokenization, a few pairs per chunk
    request = pb.ScoreRequest(pairs=[pb.Pair(prompt=f"{i}" + "x" * 10_000, response="!") for i in range(60)])
    with grpc.insecure_channel(proc.target) as channel:
        call = pb_grpc.ScoringServiceStub(channel).Score.future(request, timeout=60)
        time.sleep(0.8)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        took = time.monotonic() - started
        with pytest.raises(grpc.RpcError):
            call.result(timeout=10)
    text = proc.text()
    stopping = logged_seconds(text, SIGTERM_SEEN, STOPPED)  # 1.6 s at load 10
    assert stopping <= grace + 0.6, f"the stop took {stopping:.2f} s for a {grace} s grace period"
    assert took <= grace + EXIT_MARGIN_S, f"shutdown took {took:.2f} s for a {grace} s grace period"
