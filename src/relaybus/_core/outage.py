"""Broker errors: which are outages (retried with backoff), which are refusals (raised).

One policy for every caller, both fronts:

- **outages** are retried with capped, jittered exponential backoff for at most the
  retry bound, then raised as :class:`~relaybus.errors.BrokerUnavailableError`:
  a lost or refused connection, a timeout, and the transient server states ``BUSY``
  (a long script), ``LOADING`` (a restart reading its data), ``READONLY`` (a replica
  after failover), ``NOREPLICAS`` (a primary short of ``min-replicas-to-write``, as a
  demoted one is), ``MASTERDOWN``, ``TRYAGAIN``, ``CLUSTERDOWN``, and a blocking read
  cut short because the server turned into a replica (``UNBLOCKED ... instance state
  changed``); after those that mean the server is no longer the primary
  (:func:`role_changed`) the driver drops the connection, so that the next one asks
  Sentinel again where the primary is;
- **out of memory** (``OOM``): :class:`~relaybus.errors.BrokerOutOfMemoryError`, not
  retried (nothing was written; the caller decides);
- refused credentials (a wrong password or user):
  :class:`~relaybus.errors.BrokerAuthenticationError` at once, not retried; a
  database number the server does not have: :class:`~relaybus.errors.ConfigurationError`
  naming the URL;
- a request too large for the server (it replies ``Protocol error: invalid bulk
  length``, or closes the connection on a request of a megabyte or more, twice in a
  row): :class:`~relaybus.errors.BrokerRequestTooLargeError`, not retried;
- ``NOSCRIPT``: the driver loads the script and sends the command again;
- ``NOGROUP``: :class:`GroupMissing`, for the flow to recreate the group;
- any other error reply: :class:`~relaybus.errors.BrokerCommandError` (repeating
  the command would fail again).

Nothing here sleeps or talks to a server; the clock is passed in.
"""

from __future__ import annotations

import enum
import random
import re
from collections.abc import Callable

import redis

from ..errors import (
    BrokerAuthenticationError,
    BrokerCommandError,
    BrokerOutOfMemoryError,
    BrokerRequestTooLargeError,
    BrokerUnavailableError,
    ConfigurationError,
    RelaybusError,
)

__all__ = ["Kind", "Backoff", "Retrying", "GroupMissing", "classify", "translate",
           "is_nogroup", "role_changed", "MIN_BACKOFF", "MAX_BACKOFF"]

#: First pause, in seconds, after a failed attempt during an outage.
MIN_BACKOFF = 0.05
#: Longest pause, in seconds, between two attempts during an outage.
MAX_BACKOFF = 1.0
#: Error-reply prefixes of transient server states: outages, not refusals.
TRANSIENT_PREFIXES = ("BUSY", "LOADING", "READONLY", "NOREPLICAS", "MASTERDOWN", "TRYAGAIN",
                      "CLUSTERDOWN")
#: Error-reply prefixes of a server that is not (or no longer) the primary.
_NOT_PRIMARY = ("READONLY", "NOREPLICAS", "MASTERDOWN")
#: How a server that turned into a replica ends the blocking reads of its clients.
_DEMOTED = "instance state changed"
#: Error replies of a request too large for the server (``proto-max-bulk-len``).
_TOO_LARGE = ("invalid bulk length", "invalid multibulk length", "exceeds maximum allowed size")
#: Size, in bytes, from which a request whose connection the server closes may have been
#: refused for its size: the smallest ``proto-max-bulk-len`` and
#: ``client-query-buffer-limit`` a server accepts (1 MiB).
LARGE_REQUEST = 1 << 20
#: How the connection broke when the server closed it on a request (not: could not connect).
_CLOSED = ("reset by peer", "closed by server", "broken pipe", "error 32 ", "error 104 ")
#: How Redis 6.2 reports the error of a call inside a script:
#: ``Error running script (call to f_...): @user_script:125: @user_script: 125: -OOM ...``.
_SCRIPT_ERROR = re.compile(r"^Error running script .*?@user_script: ?\d+: -([A-Z]+) ")
#: How a transaction refused at EXEC reports why (the server went over ``maxmemory``
#: between queueing and EXEC): ``EXECABORT Transaction discarded because of: OOM ...``.
_EXEC_ABORT = re.compile(r"Transaction discarded because of: -?([A-Z]+) ")


class GroupMissing(BrokerCommandError):
    """The consumer group (or its stream) is gone: the server was flushed or restarted empty."""


class Kind(enum.Enum):
    """What an error means for the caller."""

    OUTAGE = "outage"
    OOM = "oom"
    NOSCRIPT = "noscript"
    NOGROUP = "nogroup"
    REFUSED = "refused"
    AUTH = "auth"
    NO_DB = "no_db"
    TOO_LARGE = "too_large"
    OTHER = "other"


def is_nogroup(exc: BaseException) -> bool:
    """True when the server said the consumer group (or its stream) does not exist.

    That includes a blocking read cut short because its stream or group was deleted
    (Redis 7 replies ``UNBLOCKED the stream key no longer exists``).
    """
    if isinstance(exc, GroupMissing):
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    text = str(exc)
    return "NOGROUP" in text or (text.startswith("UNBLOCKED") and _DEMOTED not in text)


def role_changed(reply: object) -> bool:
    """True for an error reply saying the server is not (or no longer) the primary
    (``READONLY``, ``NOREPLICAS``, ``MASTERDOWN``, a blocking read ended by a demotion):
    its connection should be dropped, so that a Sentinel-managed one re-resolves."""
    if not isinstance(reply, redis.ResponseError):
        return False
    return _error_code(reply) in _NOT_PRIMARY or (
        str(reply).startswith("UNBLOCKED") and _DEMOTED in str(reply))


def _error_code(exc: BaseException) -> str:
    # redis-py strips some prefixes into exception classes; the rest stay in the text
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return "LOADING"
    if isinstance(exc, redis.exceptions.ReadOnlyError):
        return "READONLY"
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return "OOM"
    if isinstance(exc, redis.exceptions.NoScriptError):
        return "NOSCRIPT"
    text = str(exc).rpartition(" of pipeline caused error: ")[2]
    inner = _SCRIPT_ERROR.search(text) or _EXEC_ABORT.search(text)  # a wrapped error
    if inner:
        return inner.group(1).upper()
    return text.split(" ", 1)[0].upper() if text else ""


def classify(exc: BaseException) -> Kind:
    """The :class:`Kind` of an exception raised by a redis-py (sync or asyncio) call."""
    if isinstance(exc, RelaybusError):
        return Kind.NOGROUP if isinstance(exc, GroupMissing) else Kind.OTHER
    if isinstance(exc, redis.AuthenticationError):  # a ConnectionError, but no outage
        return Kind.AUTH
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
        return Kind.OUTAGE
    if not isinstance(exc, redis.ResponseError):
        return Kind.OTHER
    if role_changed(exc):
        return Kind.OUTAGE
    if is_nogroup(exc):
        return Kind.NOGROUP
    code = _error_code(exc)
    if code in ("WRONGPASS", "NOAUTH", "NOPERM") and "auth" in str(exc).lower():
        return Kind.AUTH
    if "DB index is out of range" in str(exc):
        return Kind.NO_DB
    if any(t in str(exc) for t in _TOO_LARGE):
        return Kind.TOO_LARGE
    if code in TRANSIENT_PREFIXES:
        return Kind.OUTAGE
    if code == "OOM":
        return Kind.OOM
    if code == "NOSCRIPT":
        return Kind.NOSCRIPT
    return Kind.REFUSED


def translate(exc: BaseException, address: str, url: str = "") -> BaseException:
    """The relaybus exception to raise for ``exc`` (an outage past its bound included);
    ``url``, with its password redacted, names the server in a configuration error."""
    kind = classify(exc)
    if kind is Kind.OUTAGE:
        return BrokerUnavailableError(address, exc)
    if kind is Kind.AUTH:
        return BrokerAuthenticationError(address, str(exc))
    if kind is Kind.NO_DB:
        return ConfigurationError(f"{url or address}: the server has no such database "
                                  f"({exc}); use a number below its 'databases' setting "
                                  "(16 unless configured)")
    if kind is Kind.OOM:
        reason = str(exc).rpartition(" of pipeline caused error: ")[2]
        return BrokerOutOfMemoryError(f"server at {address} is out of memory and refused the "
                                      f"write (nothing was written): {reason}")
    if kind is Kind.TOO_LARGE:
        return BrokerRequestTooLargeError(
            f"the server at {address} refused a request for its size ({exc}): lower "
            "max_message_size below its proto-max-bulk-len and client-query-buffer-limit, "
            "or raise them")
    if kind is Kind.NOGROUP and not isinstance(exc, GroupMissing):
        return GroupMissing(f"server error: {exc}")
    if kind is Kind.REFUSED or kind is Kind.NOSCRIPT:
        return BrokerCommandError(f"server error: {exc}")
    return exc


class Backoff:
    """Bounded retry of an outage: capped exponential delays with jitter.

    ``bound`` seconds after ``started`` (a monotonic time) no attempt is left:
    :meth:`delay` returns None and the caller raises.
    """

    def __init__(self, bound: float, started: float,
                 rand: Callable[[], float] = random.random) -> None:
        self.deadline = started + bound
        self._next = MIN_BACKOFF
        self._rand = rand

    def delay(self, now: float) -> float | None:
        """Seconds to wait before the next attempt, or None when the bound has passed."""
        if now >= self.deadline:
            return None
        wait = min(self._next * (0.5 + self._rand()), self.deadline - now)
        self._next = min(self._next * 2, MAX_BACKOFF)
        return max(0.0, wait)


class Retrying:
    """The retry state of one step: how long to pause after each failure, or what to raise.

    Drivers loop ``try: send; except Exception as exc: sleep(retrying.after(exc))``.
    """

    def __init__(self, bound: float, clock: Callable[[], float], address: str,
                 url: str = "") -> None:
        self._bound = bound
        self._clock = clock
        self._address = address
        self._url = url
        self._backoff: Backoff | None = None
        self._closed_on_large = 0

    def after(self, exc: Exception, size: int = 0) -> float:
        """The pause before the next attempt after ``exc``; raises when there is none.

        ``size``: bytes of the request. One of :data:`LARGE_REQUEST` or more whose
        connection the server closed twice in a row was refused for its size (a server
        going down refuses the next connection instead).
        """
        outage = classify(exc) is Kind.OUTAGE
        if size >= LARGE_REQUEST and outage and any(c in str(exc).lower() for c in _CLOSED):
            self._closed_on_large += 1
            if self._closed_on_large >= 2:
                raise BrokerRequestTooLargeError(
                    f"the server at {self._address} closed the connection twice on a request "
                    f"of {size:,} bytes ({exc}): it refuses requests that large (its "
                    "client-query-buffer-limit or proto-max-bulk-len is below that); lower "
                    "max_message_size below its limits, or raise them") from exc
        else:
            self._closed_on_large = 0
        if outage:
            if self._backoff is None:
                self._backoff = Backoff(self._bound, self._clock())
            delay = self._backoff.delay(self._clock())
            if delay is not None:
                return delay
        raised = translate(exc, self._address, self._url)
        if raised is exc:
            raise exc
        raise raised from exc
