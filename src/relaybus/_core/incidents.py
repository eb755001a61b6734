"""Loops that must not end: logging a failure once per incident, and backing off.

A loop (a consumer's fetch, its settling, a bus's maintenance) that fails records
it here; the first failure of an incident is logged as an error, later ones at debug
level (or again when the kind of error changes), and the recovery once, with how long
it took. The pause before the next attempt doubles up to a cap. Pure: the clock is an
argument, and sleeping is the caller's.
"""

from __future__ import annotations

import logging

__all__ = ["Incident", "MIN_PAUSE", "MAX_PAUSE"]

#: First pause, in seconds, after a failed attempt.
MIN_PAUSE = 0.1
#: Longest pause, in seconds, between two attempts while failing.
MAX_PAUSE = 5.0


class Incident:
    """The failure state of one loop (``what`` names it in log lines)."""

    def __init__(self, what: str, logger: logging.Logger) -> None:
        self.what = what
        self.logger = logger
        self.since: float | None = None
        self.failures = 0
        self._kind = ""
        self._pause = MIN_PAUSE

    @property
    def failing(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException, now: float, *, expected: bool = True) -> float:
        """Record a failure at ``now`` (monotonic); return the pause before the next try.

        ``expected`` failures (the broker's) are logged without a traceback, others (a
        bug) with one.
        """
        kind = type(exc).__name__
        self.failures += 1
        if self.since is None or kind != self._kind:
            if self.since is None:
                self.since = now
            if expected:
                self.logger.error("%s: broker unavailable (%s); retrying with backoff",
                                  self.what, exc)
            else:
                self.logger.error("%s: unexpected error: %s (retrying with backoff)", self.what,
                                  exc, exc_info=exc)
        else:
            self.logger.debug("%s: still failing: %s", self.what, exc)
        self._kind = kind
        pause = self._pause
        self._pause = min(self._pause * 2, MAX_PAUSE)
        return pause

    def succeeded(self, now: float) -> None:
        """Record a success (logs the recovery after an incident)."""
        if self.since is not None:
            self.logger.warning("%s: broker is back after %.1fs (%d failed attempts); resumed",
                                self.what, now - self.since, self.failures)
        self.since = None
        self.failures = 0
        self._kind = ""
        self._pause = MIN_PAUSE
