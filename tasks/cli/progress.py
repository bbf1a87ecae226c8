"""A one-line progress bar with rows/s, shared by `ampsync sync --wait` and `ampsync demo`.

On a terminal the line is redrawn in place; into a file or a pipe it is written as a new line
every few seconds (and once at the end), so a log stays readable. It goes to stderr: stdout is
the command's result (a JSON summary a script reads).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

MIN_RATE_SECONDS = 1.0


class Progress:
    def __init__(
        self,
        total: int,
        label: str = "",
        stream: TextIO | None = None,
        width: int = 30,
        every: float = 2.0,
    ) -> None:
        self.total = max(0, total)
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.every = every
        self.started = time.monotonic()
        self.done = 0
        self._last_line = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self, done: int, **counts: int) -> str:
        """`[#######.......]  120/300 rows  40%  85 rows/s  sent 118  failed 2  2.1 s`."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        share = done / self.total if self.total else 1.0
        filled = round(self.width * min(share, 1.0))
        parts = [
            f"[{'#' * filled}{'.' * (self.width - filled)}]",
            f"{done}/{self.total} rows",
            f"{share:4.0%}",
            # Over a second at least: rows done before the first reading would otherwise show
            # as tens of thousands of rows/s.
            f"{done / max(elapsed, MIN_RATE_SECONDS):.0f} rows/s",
            *(f"{name} {n}" for name, n in counts.items()),
            f"{elapsed:.1f} s",
        ]
        return "  ".join(([self.label] if self.label else []) + parts)

    def update(self, done: int, **counts: int) -> None:
        self.done = done
        now = time.monotonic()
        if self._tty:
            self.stream.write("\r" + self.line(done, **counts) + "  ")
        elif now - self._last_line >= self.every:
            self.stream.write(self.line(done, **counts) + "\n")
        else:
            return
        self._last_line = now
        self.stream.flush()

    def finish(self, done: int | None = None, **counts: int) -> None:
        """The final line, always written."""
        if done is not None:
            self.done = done
        prefix = "\r" if self._tty else ""
        self.stream.write(prefix + self.line(self.done, **counts) + "\n")
        self.stream.flush()
