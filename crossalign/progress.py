"""Progress lines for long work, in the logs: what a flow run's logs in the Prefect UI show, where no bar does."""

from __future__ import annotations

import logging
import time

PROGRESS_LOG_SECONDS = 30.0


class ProgressLog:
    """Logs items done, items/s and the time left to `logger` every `PROGRESS_LOG_SECONDS` of long work.

    A line reads "`name`: 4096 of 35000 captions `verb`, 812.0/s, about 35 s left"; none comes for work
    shorter than the interval, nor once everything is done.
    """

    def __init__(self, logger: logging.Logger, name: str, unit: str, total: int, verb: str) -> None:
        self.logger, self.name, self.unit, self.total, self.verb, self.done = logger, name, unit, total, verb, 0
        self.start = self.last = time.perf_counter()

    def update(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self.last < PROGRESS_LOG_SECONDS or self.done >= self.total:
            return
        self.last = now
        rate = self.done / (now - self.start)
        left = (self.total - self.done) / rate if rate else float("inf")
        self.logger.info("%s: %d of %d %ss %s, %.1f/s, about %s left", self.name, self.done, self.total, self.unit,
                         self.verb, rate, _duration(left))


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "an unknown time"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
