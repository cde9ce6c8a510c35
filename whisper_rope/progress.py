"""Progress of a long phase: a bar on a terminal, else a log line at least every minute.

A bar is only useful where someone watches it: with ``--no-progress``, or with stderr sent to a file or a pipe (a
batch job, CI), a phase of minutes (the teacher's targets, an evaluation) would otherwise print nothing until it
ends. `PhaseProgress` then logs what is done and about how long is left, at most `LOG_INTERVAL_S` apart.
"""

import logging
import sys
import time
from typing import Callable, Optional

from tqdm import tqdm

logger = logging.getLogger("whisper_rope")

#: The longest a phase without a bar goes without a log line, in seconds.
LOG_INTERVAL_S = 60.0


class PhaseProgress:
    """Progress over ``total`` units of one phase (``description``, e.g. "teacher targets"; ``unit``, e.g. "clip").

    With ``bar`` true and stderr a terminal: a tqdm bar. Otherwise: an INFO log line when the phase starts and at
    least every `LOG_INTERVAL_S` seconds while it runs: "DESCRIPTION: DONE of TOTAL UNITs (P %), about T left".
    ``clock``: seconds, monotonic (a test's own clock).
    """

    def __init__(
        self,
        total: int,
        description: str,
        unit: str,
        bar: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.description, self.unit = total, description, unit
        self.done = 0
        self._clock = clock
        self._bar: Optional[tqdm] = None
        if bar and sys.stderr.isatty():
            self._bar = tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True)
            return
        self._started = self._last = clock()
        logger.info("%s: %d %ss to go", description, total, unit)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self._clock()
        if now - self._last >= LOG_INTERVAL_S and self.done < self.total:
            self._last = now
            logger.info("%s", self.line(now - self._started))

    def line(self, elapsed: float) -> str:
        """What is done and, from the rate so far, about how long is left (``elapsed`` seconds since the start)."""
        share = self.done / self.total if self.total else 1.0
        left = elapsed * (self.total - self.done) / self.done if self.done else None
        eta = "" if left is None else f", about {_duration(left)} left"
        return f"{self.description}: {self.done} of {self.total} {self.unit}s ({100 * share:.0f} %){eta}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _duration(seconds: float) -> str:
    """``seconds`` in words a log reader takes in at a glance: 45 s, 12 min, 2 h 05 min."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"
