"""What happens to an event after its handler ran: pure decisions, no IO.

A handler run ends in exactly one of three ways (see ``architecture.md``):

=====================================  ===========================================
handler outcome                        decision
=====================================  ===========================================
returns anything but ``False``         ``ACK`` (handled; recorded as done)
returns ``False``                      ``DEAD_LETTER``, reason ``handler returned False``
raises :class:`~relaybus.errors.Reject`  ``DEAD_LETTER`` with the reject's reason
raises :class:`~relaybus.errors.Retry`   ``RETRY`` after its ``delay`` (or the backoff)
raises any other exception             ``RETRY`` after the backoff
either retry, attempts exhausted       ``DEAD_LETTER``, reason ``max attempts (N) reached: ...``
=====================================  ===========================================

Backoff is exponential with *full jitter* (AWS architecture blog, "Exponential
Backoff And Jitter"): the delay before attempt ``n + 1`` is drawn uniformly from
``[0, min(backoff_max, backoff * 2 ** (n - 1))]``, so the first retry waits at most
``backoff`` seconds and no retry waits more than ``backoff_max``. Jitter spreads the
retries of many events that failed together (a dependency outage) instead of
sending them back in one wave.

An explicit ``Retry`` counts as an attempt like any failure, so a handler that keeps
asking for retries still ends in the DLQ after ``max_attempts``: nothing waits forever.

This module does no IO; the worker (and a future asyncio front) call it.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ConfigurationError, Reject, Retry

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_RETRY_BACKOFF",
    "DEFAULT_RETRY_BACKOFF_MAX",
    "FALSE_REASON",
    "MAX_EXPLICIT_DELAY",
    "Action",
    "Decision",
    "RetryPolicy",
    "backoff_ceiling",
    "compute_backoff",
]

#: Attempts (first delivery included) before a failing event is dead-lettered.
DEFAULT_MAX_ATTEMPTS = 5
#: Ceiling of the first retry's delay, in seconds.
DEFAULT_RETRY_BACKOFF = 0.5
#: Largest delay between two attempts, in seconds.
DEFAULT_RETRY_BACKOFF_MAX = 60.0
#: Longest delay, in seconds, an explicit ``Retry(delay=...)`` is honoured for (30 days).
MAX_EXPLICIT_DELAY = 30 * 24 * 3600.0
#: Dead-letter reason when a handler returns ``False`` (the subclassing form's rule).
FALSE_REASON = "handler returned False"


def backoff_ceiling(attempt: int, base: float, cap: float) -> float:
    """The largest delay after failed attempt ``attempt`` (1-based): ``min(cap, base * 2**(attempt-1))``.

    Never overflows: large attempt numbers give ``cap``.
    """
    if attempt < 1:
        attempt = 1
    exponent = attempt - 1
    if base <= 0:
        return 0.0
    # 2**exponent overflows a float near 1024; past the cap it no longer matters
    if exponent >= 1023 or base * math.pow(2.0, min(exponent, 1022)) >= cap:
        return float(cap)
    return float(base * 2.0**exponent)


def compute_backoff(attempt: int, base: float, cap: float,
                    rand: Callable[[], float] = random.random) -> float:
    """Delay in seconds before retrying after failed attempt ``attempt`` (full jitter).

    ``rand`` returns a float in ``[0, 1)`` (pass a seeded generator's ``random`` for
    reproducible delays). The result lies in ``[0, backoff_ceiling(attempt, base, cap)]``.
    """
    return backoff_ceiling(attempt, base, cap) * rand()


class Action(str, enum.Enum):
    """What the worker does with an event after its handler ran."""

    #: Acknowledge it and record its event id as done (duplicate suppression).
    ACK = "ack"
    #: Take it out of the queue and deliver it again after ``Decision.delay`` seconds.
    RETRY = "retry"
    #: Move it to the service's dead-letter queue with ``Decision.reason``.
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True)
class Decision:
    """The outcome of one handler run: an :class:`Action`, a delay (retries) and a reason."""

    action: Action
    delay: float = 0.0
    reason: str = ""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True)
class RetryPolicy:
    """How a service retries: attempts and backoff, validated at construction.

    ``max_attempts`` counts every run of the handler, the first included
    (``max_attempts=1``: never retry). ``backoff`` is the ceiling of the first
    retry's delay and ``backoff_max`` the ceiling of every delay, in seconds.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff: float = DEFAULT_RETRY_BACKOFF
    backoff_max: float = DEFAULT_RETRY_BACKOFF_MAX

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) \
                or self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be an integer >= 1, not {self.max_attempts!r}")
        for name in ("backoff", "backoff_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or math.isnan(value) or math.isinf(value) or value < 0:
                raise ConfigurationError(f"{name} must be a finite number of seconds >= 0, "
                                         f"not {value!r}")
        if self.backoff_max < self.backoff:
            raise ConfigurationError(f"retry_backoff_max ({self.backoff_max}) is smaller than "
                                     f"retry_backoff ({self.backoff})")

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Backoff delay after failed attempt ``attempt`` (see :func:`compute_backoff`)."""
        return compute_backoff(attempt, self.backoff, self.backoff_max, rand)

    def decide(self, attempt: int, *, result: object = None, error: BaseException | None = None,
               rand: Callable[[], float] = random.random) -> Decision:
        """Decide what happens to an event whose handler ran for the ``attempt``-th time.

        Pass the handler's return value as ``result``, or the exception it raised as
        ``error`` (which wins when both are given). Pure: the same inputs (and the
        same ``rand``) give the same decision.
        """
        if error is None:
            if result is False:
                return Decision(Action.DEAD_LETTER, reason=FALSE_REASON)
            return Decision(Action.ACK)
        if isinstance(error, Reject):
            return Decision(Action.DEAD_LETTER, reason=error.reason)
        if isinstance(error, Retry):
            what = f"retry requested: {error.reason}"
            delay = self.delay(attempt, rand) if error.delay is None else _clean_delay(error.delay)
        else:
            what = _describe(error)
            delay = self.delay(attempt, rand)
        if attempt >= self.max_attempts:
            return Decision(Action.DEAD_LETTER,
                            reason=f"max attempts ({self.max_attempts}) reached: {what}")
        return Decision(Action.RETRY, delay=delay, reason=what)


def _clean_delay(delay: float) -> float:
    """An explicit ``Retry(delay=...)`` made usable: NaN or negative -> 0, capped at 30 days."""
    try:
        value = float(delay)
    except (TypeError, ValueError):
        return 0.0
    if math.isnan(value) or value < 0:
        return 0.0
    return min(value, MAX_EXPLICIT_DELAY)
