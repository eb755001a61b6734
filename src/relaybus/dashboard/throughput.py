"""The sampler behind the live charts: every queue sampled at most once a second,
whoever asks, and the rates between samples kept for a few minutes.

There is no polling loop: a sample is taken when a page or the page script asks for
one and the last is older than :data:`MIN_INTERVAL` (so several open tabs cost what
one does). Rates come from :func:`relaybus.inspection.rates`, as ``relaybus top``'s.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..inspection import Sample, rates
from ..keys import SUB_PREFIX, is_event_log
from ..queue import MessageQueue

__all__ = ["MIN_INTERVAL", "KEEP_SECONDS", "Point", "Throughput", "round_rate"]

#: Seconds between two samples at the least (a request sooner gets the last one).
MIN_INTERVAL = 1.0
#: Seconds of history the charts get.
KEEP_SECONDS = 180.0


@dataclass(frozen=True)
class Point:
    """The rates between two samples, at the time of the later one (epoch seconds).

    ``published``: events per second into the event log (all partitions);
    ``processed``: messages per second out of the subscriptions' backlogs (handled,
    skipped as of other types, or dead-lettered); ``queues``: each queue's rates in and
    out (None where unknown).
    """

    at: float
    published: float
    processed: float
    queues: dict[str, tuple[float | None, float | None]]

    def to_json(self) -> dict[str, Any]:
        """The point for the page script (time in epoch milliseconds)."""
        return {"t": int(self.at * 1000), "published": round_rate(self.published),
                "processed": round_rate(self.processed),
                "queues": {n: [round_rate(i), round_rate(o)] for n, (i, o) in self.queues.items()}}


def round_rate(value: float | None) -> float | None:
    """A rate as JSON gives it (to the thousandth)."""
    return None if value is None else round(value, 3)


class Throughput:
    """Samples of every queue under one prefix and the rates between them (thread-safe)."""

    def __init__(self, min_interval: float = MIN_INTERVAL,
                 keep_seconds: float = KEEP_SECONDS) -> None:
        self.min_interval = min_interval
        self.keep_seconds = keep_seconds
        self._lock = threading.Lock()
        self._last: Sample | None = None
        self._points: deque[Point] = deque()

    def sample(self, mq: MessageQueue) -> tuple[Sample, list[Point]]:
        """The latest sample (a new one if the last is older than ``min_interval``) and
        the rates kept, oldest first; the last point is between the latest two samples."""
        with self._lock:  # one sample at a time: concurrent requests share it
            last = self._last
            if last is not None and time.monotonic() - last.at < self.min_interval:
                return last, list(self._points)
            cur = Sample.take(mq)
            now = time.time()
            if last is not None:
                self._points.append(_point(last, cur, now))
            while self._points and self._points[0].at < now - self.keep_seconds:
                self._points.popleft()
            self._last = cur
            return cur, list(self._points)


def _point(prev: Sample, cur: Sample, at: float) -> Point:
    queues = {name: rates(prev, cur, name) for name in cur.infos}
    published = sum(i or 0.0 for n, (i, _) in queues.items() if is_event_log(n))
    processed = sum(o or 0.0 for n, (_, o) in queues.items() if n.startswith(SUB_PREFIX))
    return Point(at, published, processed, queues)
