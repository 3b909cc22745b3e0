"""Progress on stderr: a tqdm bar on a terminal or in a notebook, periodic plain lines in logs.

It counts rows *written* (scored, or failed with an error), never rows read
ahead and still at the server, and shows pairs/s and tokens/s over the last
few seconds, the ETA and the error count::

    42.0%|████████████▋                 | 420,000 rows scored  1.8k pairs/s  97.1k tok/s  ETA 5m13s  errors 3

While no row comes back because the server cannot be reached, the bar (or a
log line, at most every few seconds) says ``waiting for the server at
HOST:PORT for 12s: <why>``. When stderr is not a terminal (a pipeline, a CI
log), one plain line is written every ``log_every`` seconds instead of a bar.
The bar is tqdm's (``tqdm.auto``: a widget in Jupyter); only what it shows is
computed here, so that the same numbers appear in both modes.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

MODES = ("auto", "bar", "log", "none")
#: Seconds between "waiting for the server" notes while no row is written.
WAIT_NOTE_S = 5.0
_BAR_REDRAW_S = 0.2
_RATE_WINDOW_S = 10.0
#: The bar's resolution: it counts thousandths of the input.
_BAR_STEPS = 1000


def human_count(n: float) -> str:
    """12345 -> '12.3k'; small numbers stay exact."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale * 10:
            return f"{n / scale:.1f}{unit}"
    return f"{n:,.0f}"


def human_duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 73 -> '1m13s', 4.2 -> '4.2s'."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s"


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = getattr(shell, "get_ipython", lambda: None)()
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


class Progress:
    """Tracks rows, tokens and errors and shows them.

    ``fraction`` returns how much of the input is done (0..1) or ``None``
    when unknown; ``mode`` is ``auto`` (a bar on a terminal or in a
    notebook, log lines otherwise), ``bar``, ``log`` or ``none``.
    ``target`` names the server in the waiting note.
    """

    def __init__(
        self,
        *,
        label: str,
        fraction: Callable[[], float | None],
        stream: TextIO | None = None,
        mode: str = "auto",
        log_every: float = 30.0,
        start_rows: int = 0,
        clock: Callable[[], float] = time.monotonic,
        target: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, got {mode!r}")
        self._stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            tty = getattr(self._stream, "isatty", lambda: False)()
            mode = "bar" if tty or (self._stream is sys.stderr and _in_notebook()) else "log"
        self.mode = mode
        self._label = label
        self._fraction = fraction
        self._log_every = log_every
        self._clock = clock
        self._target = target
        self.started = clock()
        self.rows = start_rows
        self.tokens = 0
        self.errors = 0
        self._run_rows = 0
        self._window: deque[tuple[float, int, int]] = deque([(self.started, 0, 0)])
        self._last_draw = -1e9
        self._last_log = self.started
        self._waiting: str | None = None
        self._waiting_since = 0.0
        self._last_wait_note = -1e9
        self._lock = threading.RLock()
        self._bar: Any = None
        if self.mode == "bar":
            self._bar = self._make_bar()

    def _make_bar(self) -> Any:
        if self._stream is sys.stderr and _in_notebook():
            from tqdm.auto import tqdm  # a widget in Jupyter
        else:
            from tqdm import tqdm
        return tqdm(
            total=_BAR_STEPS,
            file=self._stream,
            bar_format="{desc}",
            dynamic_ncols=True,
            mininterval=0,  # redrawn here, on this class's clock
            leave=True,
            ascii=False,
        )

    def _server(self) -> str:
        return f" at {self._target}" if self._target else ""

    def waiting(self, reason: str) -> None:
        """Say that rows are held up (the server is unreachable) and why; at most every few seconds.

        It may be called from another thread; the note stays on the bar until the next row.
        """
        with self._lock:
            now = self._clock()
            if self._waiting is None:
                self._waiting_since = now
            self._waiting = reason
            if self.mode == "none" or now - self._last_wait_note < WAIT_NOTE_S:
                return
            self._last_wait_note = now
            if self.mode == "bar":
                self._draw(now)
            else:
                note = (
                    f"waiting for the server{self._server()} for {now - self._waiting_since:.0f}s: {reason}"
                )
                self._stream.write(f"pairscore {self._label}: {note}\n")
                self._stream.flush()

    def update(self, *, rows: int = 0, tokens: int = 0, errors: int = 0) -> None:
        """Count finished rows and maybe redraw."""
        with self._lock:
            if rows:
                self._waiting = None
            self.rows += rows
            self._run_rows += rows
            self.tokens += tokens
            self.errors += errors
            now = self._clock()
            if self.mode == "bar" and now - self._last_draw >= _BAR_REDRAW_S:
                self._draw(now)
            elif self.mode == "log" and now - self._last_log >= self._log_every:
                self._last_log = now
                self._stream.write(f"pairscore {self._label}: {self.status(now)}\n")
                self._stream.flush()

    def rates(self, now: float | None = None) -> tuple[float, float]:
        """Pairs/s and tokens/s over the last ~10 seconds."""
        now = self._clock() if now is None else now
        self._window.append((now, self._run_rows, self.tokens))
        while len(self._window) > 2 and now - self._window[1][0] > _RATE_WINDOW_S:
            self._window.popleft()
        t0, r0, k0 = self._window[0]
        elapsed = now - t0
        if elapsed <= 0:
            return 0.0, 0.0
        return (self._run_rows - r0) / elapsed, (self.tokens - k0) / elapsed

    def eta(self, now: float) -> float | None:
        """Seconds left, from the fraction done in this run; ``None`` when unknown."""
        fraction = self._fraction()
        elapsed = now - self.started
        if fraction is None or fraction <= 0 or elapsed <= 0 or self._run_rows == 0:
            return None
        return max(0.0, elapsed * (1 - fraction) / fraction) if fraction < 1 else 0.0

    def _details(self, now: float) -> str:
        """Rows, rates, ETA, errors and the waiting note: the bar's text after the bar."""
        pairs_s, tokens_s = self.rates(now)
        parts = [
            f"{self.rows:,} rows scored",
            f"{human_count(pairs_s)} pairs/s",
            f"{human_count(tokens_s)} tok/s",
        ]
        eta = self.eta(now)
        if eta is not None:
            parts.append(f"ETA {human_duration(eta)}")
        parts.append(f"errors {self.errors:,}")
        if self._waiting is not None:
            parts.append(
                f"waiting for the server{self._server()} for {now - self._waiting_since:.0f}s: {self._waiting}"
            )
        return "  ".join(parts)

    def status(self, now: float | None = None) -> str:
        """One line: percent, rows scored, rates, ETA, errors (and the waiting note)."""
        now = self._clock() if now is None else now
        fraction = self._fraction()
        details = self._details(now)
        return details if fraction is None else f"{fraction * 100:.1f}%  {details}"

    def _draw(self, now: float) -> None:
        self._last_draw = now
        fraction = self._fraction()
        bar = self._bar
        if fraction is None:
            bar.bar_format = "{desc}"
        else:
            bar.bar_format = "{percentage:5.1f}%|{bar}| {desc}"
            bar.n = min(_BAR_STEPS, round(fraction * _BAR_STEPS))
        bar.set_description_str(self._details(now), refresh=False)
        bar.refresh()

    def close(self) -> None:
        """Finish the bar (a no-op for log lines)."""
        with self._lock:
            if self.mode == "bar" and self._bar is not None:
                self._draw(self._clock())
                self._bar.close()
                self._bar = None
