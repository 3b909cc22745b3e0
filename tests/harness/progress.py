"""A line of progress at least every minute, however long one test or one file runs.

pytest prints a line per test file and a dot per test; a slow file (or one
slow test) keeps that line open for minutes, and CI logs show nothing until
it ends. :class:`ProgressLines` (registered by ``tests/conftest.py``) writes
``[progress 7m05s] 640 of 1246 tests done; running tests/test_x.py::test_y for 1m02s``
whenever no line was started for ``every_s`` seconds: between tests through
pytest's own terminal writer, and during a long test from a watcher thread
that writes to a copy of the terminal's file descriptor (pytest captures
the test's own output on fd 1 meanwhile) and then starts the file's line
again for pytest's next dots.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import pytest

#: At most this long without a new line (the watcher looks every CHECK_S).
EVERY_S = 50.0
CHECK_S = 5.0


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


class ProgressLines:
    """pytest plugin: a progress line when the terminal has had no new line for ``every_s``."""

    def __init__(self, config: pytest.Config, *, every_s: float = EVERY_S, check_s: float = CHECK_S) -> None:
        self.config = config
        self.every_s = every_s
        self.check_s = check_s
        self.started = time.monotonic()
        self.last_line = self.started
        self.total = 0
        self.done = 0
        self.running: dict[str, float] = {}  # test id -> start (several under pytest-xdist)
        self.last_file: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._fd: int | None = None
        self._thread: threading.Thread | None = None

    @property
    def _xdist(self) -> bool:
        """Whether this is pytest-xdist's controller (tests run in workers)."""
        return self.config.pluginmanager.hasplugin("dsession")

    def _reporter(self) -> Any:
        return self.config.pluginmanager.get_plugin("terminalreporter")

    def _line(self, now: float) -> str:
        text = f"[progress {_clock(now - self.started)}] {self.done} of {self.total} tests done"
        if self.running:
            nodeid, since = min(self.running.items(), key=lambda run: run[1])
            text += f"; running {nodeid} for {_clock(now - since)}"
            if len(self.running) > 1:
                text += f" (and {len(self.running) - 1} more)"
        return text

    @pytest.hookimpl
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        reporter = self._reporter()
        if reporter is None:  # -p no:terminal: nothing to keep alive
            return
        try:
            sys.stdout.flush()
            self._fd = os.dup(sys.stdout.fileno())  # the terminal, before any test captures fd 1
        except (OSError, ValueError, AttributeError):  # no real stdout: between-test lines only
            self._fd = None
        if self._fd is not None:
            self._thread = threading.Thread(target=self._watch, name="pytest-progress", daemon=True)
            self._thread.start()

    @pytest.hookimpl
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.total = len(session.items)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        """Under pytest-xdist the workers collect; each reports the whole list."""
        self.total = len(ids)

    @pytest.hookimpl
    def pytest_runtest_logstart(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        now = time.monotonic()
        with self._lock:
            # pytest starts a new line for each file (not under xdist: dots, 72 a line)
            if location[0] != self.last_file and not self._xdist:
                self.last_file = location[0]
                self.last_line = now
            self.running[nodeid] = now

    @pytest.hookimpl
    def pytest_runtest_logfinish(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        now = time.monotonic()
        with self._lock:
            self.done += 1
            self.running.pop(nodeid, None)
            due = now - self.last_line >= self.every_s
            if due:
                self.last_line = now
        reporter = self._reporter()
        if due and reporter is not None:
            reporter.write_line(self._line(now))

    def _watch(self) -> None:
        while not self._stop.wait(self.check_s):
            now = time.monotonic()
            with self._lock:
                if not self.running or now - self.last_line < self.every_s:
                    continue
                self.last_line = now
                # pytest goes on where the line ends: start one for it, with what pytest
                # wrote at the test's start (the file's name, or with -v the test's id;
                # under pytest-xdist, nothing: its dots carry no file name).
                nodeid = max(self.running.items(), key=lambda run: run[1])[0]
                verbose = self.config.get_verbosity() > 0
                resume = "" if self._xdist else (nodeid if verbose else nodeid.split("::")[0]) + " "
                text = f"\n{self._line(now)}\n{resume}"
            if self._fd is not None:
                try:
                    os.write(self._fd, text.encode())
                except OSError:
                    return

    @pytest.hookimpl
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.check_s + 1)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
