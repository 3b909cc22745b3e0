"""Servers for the server, client and pipeline tests, all on 127.0.0.1.

* :class:`ServerThread` - the real pairscore server (``RunningServer``) on its own
  event loop in a daemon thread, that can be stopped and started again on the same port;
  :func:`make_config` is its configuration.
* :func:`server_process` - the same server with the fake engine in a child
  process, so that the test process's memory is the client's alone.
* :class:`StubServer` - a plain grpc server with a hand-written servicer, for
  what the real server does not do (yet): TLS, checking a bearer token,
  refusing items for overload.
* :func:`free_port`, :func:`clean_env` for servers in child processes, and
  :func:`metric_samples` to read a /metrics page.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from concurrent import futures
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc
from prometheus_client.parser import text_string_to_metric_families

from pairscore.client import ScoringClient
from pairscore.convert import model_info_to_pb, request_from_pb, response_to_pb
from pairscore.types import ItemError, ItemErrorCode
from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc
from pairscore_server.config import ServerConfig

from harness.fake_engine import FakeEngine, expected_score

T = TypeVar("T")
HARNESS = Path(__file__).resolve().parent
TESTS = HARNESS.parent
ROOT = TESTS.parent
#: ``python FAKE_ENGINE_SCRIPT [fake flags] -- SERVE FLAGS`` serves a FakeEngine
#: through the real ``pairscore serve`` entry point (see harness/fake_engine.py).
FAKE_ENGINE_SCRIPT = HARNESS / "fake_engine.py"


def make_config(**overrides: Any) -> ServerConfig:
    """A test server's configuration: 127.0.0.1, free ports, short batching wait."""
    settings: dict[str, Any] = dict(
        host="127.0.0.1", port=0, metrics_port=0, max_wait_ms=2.0, grace_period_s=5.0
    )
    settings.update(overrides)
    return ServerConfig(**settings)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    """This process's environment without PAIRSCORE_* settings, for child servers."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PAIRSCORE_")}


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus exposition text -> {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class ServerThread:
    """A RunningServer on ``engine`` on its own event loop in a daemon thread.

    ``config`` overrides :func:`make_config`'s settings. :meth:`start` opens
    the ports (and waits until the model is ready); :meth:`stop` shuts it down
    and keeps the port, so that a later :meth:`start` comes back on it.
    """

    def __init__(self, engine: Any, **config: Any) -> None:
        self.engine = engine
        self.config = config
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.server: Any = None
        self.port: int | None = None

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Schedule ``coro`` on the server's loop; returns a concurrent Future."""
        assert self.loop is not None, "start() first"
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the server's loop and wait for its result."""
        return self.submit(coro).result(timeout)

    def start(self, *, wait_ready: bool = True) -> ServerThread:
        """Start (again, on the same port once one was chosen)."""
        from pairscore_server.lifecycle import RunningServer

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        config = dict(self.config)
        if self.port is not None:
            config["port"] = self.port

        async def make() -> Any:
            return RunningServer(make_config(**config), engine=self.engine)

        self.server = self.call(make())
        deadline = time.monotonic() + 10
        while True:  # the old socket may linger for a moment after a stop
            try:
                self.call(self.server.start())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.port = self.server.port
        if wait_ready:
            self.call(self.server.wait_ready())
        return self

    @property
    def target(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> ScoringClient:
        """A sync client on this server (20 s timeout unless given)."""
        return ScoringClient(self.target, timeout=kwargs.pop("timeout", 20.0), **kwargs)

    def metrics_text(self) -> str:
        """The server's /metrics page."""
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def stop(self, grace: float = 0.0) -> None:
        """Stop the server and its loop (the port is kept for start())."""
        if self.loop is None:
            return
        try:
            self.call(self.server.stop(grace=grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            assert self._thread is not None
            self._thread.join(timeout=10)
            self.loop.close()
            self.loop = None


_SERVER_SCRIPT = """
import asyncio, sys
sys.path.insert(0, {tests!r})
from pairscore_server.lifecycle import RunningServer
from pairscore_server.config import ServerConfig
from harness.fake_engine import FakeEngine

async def main():
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=None, max_wait_ms=2.0)
    engine = FakeEngine(max_context={max_context}, forward_delay_s={delay})
    async with RunningServer(config, engine=engine) as server:
        print(server.port, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


def server_process(*, max_context: int = 4096, delay: float = 0.0) -> tuple[subprocess.Popen[str], str]:
    """Start the real server with the fake engine in a child process; (process, target)."""
    script = _SERVER_SCRIPT.format(tests=str(TESTS), max_context=max_context, delay=delay)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"the server process did not start: {line!r}")
    return proc, f"127.0.0.1:{line.strip()}"


def stop_process(proc: subprocess.Popen[str]) -> None:
    """Terminate a child started here, by its pid."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def cli_env() -> dict[str, str]:
    """Environment for running ``python -m pairscore.cli`` from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "client"), env.get("PYTHONPATH", "")])
    return env


# --- a stub server --------------------------------------------------------------------------


class StubServicer(pb_grpc.ScoringServiceServicer):
    """Scores like the fake engine (prompt -0.5/char, response -0.25/char) with hooks.

    ``before(context)`` may abort the call (e.g. to check metadata);
    ``overload(pair_id, attempt)`` says whether to refuse a pair with item
    error RESOURCE_EXHAUSTED on its ``attempt``-th sighting. Every call's
    metadata is recorded in ``seen_metadata``.
    """

    def __init__(
        self,
        *,
        before: Callable[[grpc.ServicerContext], None] | None = None,
        overload: Callable[[str, int], bool] | None = None,
    ) -> None:
        self.before = before
        self.overload = overload
        self.seen_metadata: list[dict[str, str]] = []
        self.sightings: dict[str, int] = {}
        self._lock = threading.Lock()

    def _outcomes(self, request: pb.ScoreRequest) -> pb.ScoreResponse:
        pairs, _ = request_from_pb(request)
        outcomes: list[Any] = []
        for pair in pairs:
            with self._lock:
                self.sightings[pair.id] = attempt = self.sightings.get(pair.id, 0) + 1
            if self.overload is not None and self.overload(pair.id, attempt):
                outcomes.append(ItemError(ItemErrorCode.RESOURCE_EXHAUSTED, "queue full; retry", id=pair.id))
            else:
                outcomes.append(expected_score(pair))
        return response_to_pb(outcomes)

    def _enter(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.seen_metadata.append(dict(context.invocation_metadata()))
        if self.before is not None:
            self.before(context)

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:  # noqa: N802
        self._enter(context)
        return self._outcomes(request)

    def ScoreStream(  # noqa: N802
        self, request_iterator: Iterator[pb.ScoreRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ScoreResponse]:
        self._enter(context)
        for request in request_iterator:
            yield self._outcomes(request)

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._enter(context)
        return model_info_to_pb(FakeEngine().info)


class StubServer:
    """A grpc.server on 127.0.0.1 serving a StubServicer, plaintext or TLS."""

    def __init__(
        self, servicer: StubServicer, *, server_credentials: grpc.ServerCredentials | None = None
    ) -> None:
        self.servicer = servicer
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_ScoringServiceServicer_to_server(servicer, self.server)
        if server_credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", server_credentials)
        self.server.start()

    @property
    def target(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop at once."""
        self.server.stop(grace=None).wait(10)
