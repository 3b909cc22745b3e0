"""Live progress on stderr: a redrawn bar on a terminal, periodic log lines elsewhere.

The bar shows percent done (when the input's size is known), rows, pairs/s
and tokens/s over the last few seconds, the ETA and the error count::

    42.0% |████████████▋                 | 420,000 rows  1,850 pairs/s  97.1k tok/s  ETA 5m13s  errors 3

When stderr is not a terminal (a pipeline, a CI log), one plain line is
written every ``log_every`` seconds instead.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

MODES = ("auto", "bar", "log", "none")
#: Seconds between "waiting for the server" notes while no row is written.
WAIT_NOTE_S = 5.0
_BAR_REDRAW_S = 0.2
_RATE_WINDOW_S = 10.0


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


class Progress:
    """Tracks rows, tokens and errors and shows them.

    ``fraction`` returns how much of the input is done (0..1) or ``None``
    when unknown; ``mode`` is ``auto`` (bar on a terminal, log lines
    otherwise), ``bar``, ``log`` or ``none``.
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
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, got {mode!r}")
        self._stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if self._stream.isatty() else "log"
        self.mode = mode
        self._label = label
        self._fraction = fraction
        self._log_every = log_every
        self._clock = clock
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
        self._lock = threading.Lock()

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
            note = f"waiting for the server for {now - self._waiting_since:.0f}s: {reason}"
            if self.mode == "bar":
                self._draw(now)
            else:
                self._stream.write(f"pairscore {self._label}: {note}\n")
                self._stream.flush()

    def update(self, *, rows: int = 0, tokens: int = 0, errors: int = 0) -> None:
        """Count finished rows and maybe redraw."""
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

    def status(self, now: float | None = None) -> str:
        """One line: percent, rows, rates, ETA, errors."""
        now = self._clock() if now is None else now
        pairs_s, tokens_s = self.rates(now)
        parts = []
        fraction = self._fraction()
        if fraction is not None:
            parts.append(f"{fraction * 100:.1f}%")
        parts.append(f"{self.rows:,} rows")
        parts.append(f"{human_count(pairs_s)} pairs/s")
        parts.append(f"{human_count(tokens_s)} tok/s")
        eta = self.eta(now)
        if eta is not None:
            parts.append(f"ETA {human_duration(eta)}")
        parts.append(f"errors {self.errors:,}")
        if self._waiting is not None:
            parts.append(f"waiting for the server {now - self._waiting_since:.0f}s: {self._waiting}")
        return "  ".join(parts)

    def _draw(self, now: float) -> None:
        self._last_draw = now
        status = self.status(now)
        width = shutil.get_terminal_size((100, 20)).columns
        fraction = self._fraction()
        room = width - len(status) - 4
        if fraction is not None and room >= 10:
            bar_width = min(40, room)
            filled = fraction * bar_width
            full = int(filled)
            partial = " ▏▎▍▌▋▊▉"[int((filled - full) * 8)] if full < bar_width else ""
            bar = ("█" * full + partial).ljust(bar_width)
            status = status.replace("%", f"% |{bar}|", 1)
        self._stream.write("\r" + status[: width - 1].ljust(width - 1))
        self._stream.flush()

    def close(self) -> None:
        """Finish the bar's line (a no-op for log lines)."""
        if self.mode == "bar":
            self._draw(self._clock())
            self._stream.write("\n")
            self._stream.flush()
