"""Progress of long phases: a bar in a terminal, periodic log lines otherwise.

:class:`Progress` counts the steps of a phase (v*/z steps, sampled template groups, ...). When
standard error is a terminal it draws a ``tqdm`` bar (removed when the phase ends, like the
evaluation's bars); otherwise (a log file, a batch job) it writes a log line at most every
``interval`` seconds (30 by default) with the count, the rate and any details passed to
:meth:`Progress.update`, and a closing line for a phase that wrote any. A phase shorter than
``interval`` therefore writes nothing to a log file.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional

__all__ = ["Progress"]


class Progress:
    """Count of a phase's steps, shown as a bar (terminal) or periodic log lines (no terminal).

    Args:
        total: number of steps expected (``None`` if unknown).
        desc: what is counted, e.g. ``"v*/z steps"``; starts every line.
        logger: where the periodic lines go (``lit_edit.progress`` by default).
        interval: seconds between two log lines when standard error is not a terminal.
        enabled: ``False`` shows and logs nothing.
    """

    def __init__(
        self,
        total: Optional[int],
        desc: str,
        logger: Optional[logging.Logger] = None,
        interval: float = 30.0,
        enabled: bool = True,
    ):
        self.total, self.desc, self.interval, self.enabled = total, desc, float(interval), enabled
        self.log = logger or logging.getLogger(__name__)
        self.n = 0
        self.info: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._lines = 0
        self.bar = None
        if enabled and _is_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False)

    def update(self, n: int = 1, **info: Any) -> None:
        """Count ``n`` more steps; ``info`` (e.g. ``active=12, loss=0.8``) is shown beside the count."""
        self.n += n
        self.info = info
        if not self.enabled:
            return
        if self.bar is not None:
            if info:
                self.bar.set_postfix(info, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._lines += 1
            self.log.info("%s", self._line(now))

    def _line(self, now: float) -> str:
        elapsed = now - self._start
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        details = "".join(f", {k} {_fmt(v)}" for k, v in self.info.items())
        rate = f"{elapsed / self.n:.2f} s each" if self.n else "no step yet"
        return f"{self.desc}: {count} after {elapsed:.0f} s ({rate}){details}"

    def close(self) -> None:
        """Remove the bar, or write the closing line of a phase that wrote periodic ones."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self._lines:
            self.log.info("%s (done)", self._line(time.monotonic()))
            self._lines = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _is_terminal() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
