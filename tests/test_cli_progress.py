"""What ``pairscore score`` shows while it runs: a tqdm bar on a terminal, plain lines in a log.

The CLI runs as a child process against the real server with the fake
engine (2 ms per forward pass, so a run lasts long enough to be redrawn);
its stderr is a pseudo-terminal in one test and a pipe in the other.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.fake_engine import FakeEngine
from harness.servers import ServerThread, cli_env

ROWS = 1200


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    st = ServerThread(FakeEngine(max_context=64, forward_delay_s=0.002)).start()
    yield st
    st.stop()


def command(target: str, tmp_path: Path, *extra: str) -> list[str]:
    src = tmp_path / "in.jsonl.gz"
    import gzip

    rows = "".join(
        json.dumps({"prompt": "q" * (i % 5), "response": "r" * (i % 7)}) + "\n" for i in range(ROWS)
    )
    src.write_bytes(gzip.compress(rows.encode()))
    return [
        sys.executable, "-m", "pairscore.cli", "score", str(src), "-o", str(tmp_path / "out.jsonl"),
        "--target", target, "--batch-size", "4", *extra,
    ]  # fmt: skip


def test_on_a_terminal_a_bar_is_redrawn_in_place(server: ServerThread, tmp_path: Path) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 140, 0, 0))
    proc = subprocess.Popen(
        command(server.target, tmp_path), env=cli_env(), stdout=subprocess.DEVNULL, stderr=slave
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(60) == 0
    shown = b"".join(chunks).decode("utf-8", errors="replace")
    frames = [f for f in shown.split("\r") if "rows scored" in f]
    assert len(frames) >= 3, shown[-2000:]  # redrawn as rows are scored
    last = frames[-1]
    assert "100.0%|" in last and "█" in last and f"{ROWS:,} rows scored" in last, last
    assert "pairs/s" in last and "tok/s" in last and "errors 0" in last
    assert any("ETA" in f for f in frames)
    assert f"pairscore score: {ROWS:,} rows" in shown  # the summary after the bar


def test_in_a_log_the_same_numbers_come_as_plain_lines(server: ServerThread, tmp_path: Path) -> None:
    result = subprocess.run(
        command(server.target, tmp_path, "--log-every", "0.2"),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "rows scored" in line]
    assert lines, result.stderr
    for line in lines:
        assert line.startswith("pairscore score: ") and "%" in line and "pairs/s" in line and "tok/s" in line
        assert "errors 0" in line
    percents = [float(line.split("pairscore score: ")[1].split("%")[0]) for line in lines]
    assert percents == sorted(percents)
    # the whole gzip file (a few KiB) is read at once: the share follows the rows written, not that
    assert percents[0] < 90, lines
