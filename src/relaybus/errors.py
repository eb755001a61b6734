"""The relaybus exception tree.

Every error relaybus raises derives from :class:`RelaybusError`::

    RelaybusError
    ├── BrokerError                      the server said no, or could not be reached
    │   ├── BrokerUnavailableError       no answer within the retry bound (names the address)
    │   ├── BrokerOutOfMemoryError       the server refused a write (maxmemory reached)
    │   ├── BrokerCommandError           the server refused a command (repeating it fails again)
    │   ├── BrokerAuthenticationError    the server refused the credentials (not retried)
    │   ├── ReplicationTimeoutError      durability="replicated": too few replicas in time
    │   └── UnsupportedServerError       the server is older than Redis 6.2 / Valkey 7.2
    ├── ConfigurationError (ValueError)  a bad option or URL
    │   ├── InvalidNameError (ValueError)  a queue or service name relaybus cannot use
    │   └── CrossSlotError               on Redis Cluster, one step across queue pairs' slots
    ├── QueueNotFoundError (LookupError) the queue does not exist
    ├── SerializationError (ValueError)  a payload JSON cannot carry, or an undecodable entry
    │   └── MessageTooLargeError         an encoded payload above the size limit
    ├── EventError                       typed events
    │   ├── UnknownEventTypeError (LookupError)
    │   ├── EventValidationError (ValueError)
    │   └── DuplicateEventTypeError (TypeError)
    ├── EmbeddedServerError              the local Valkey server could not be started
    └── HandlerOutcome                   control flow raised by handlers (not failures)
        ├── Retry                        retry this event later (optionally after ``delay``)
        └── Reject                       dead-letter this event now with ``reason``

Builtins are mixed in where callers already catch them (``InvalidNameError`` is a
``ValueError``), so code that catches the built-in exceptions keeps working.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BrokerAuthenticationError",
    "BrokerCommandError",
    "BrokerError",
    "BrokerOutOfMemoryError",
    "BrokerUnavailableError",
    "ConfigurationError",
    "CrossSlotError",
    "DuplicateEventTypeError",
    "EmbeddedServerError",
    "EventError",
    "EventValidationError",
    "NewerEventVersionError",
    "HandlerOutcome",
    "InvalidNameError",
    "MessageTooLargeError",
    "QueueNotFoundError",
    "Reject",
    "RelaybusError",
    "ReplicationTimeoutError",
    "Retry",
    "SerializationError",
    "UnknownEventTypeError",
    "UnsupportedServerError",
]


class RelaybusError(Exception):
    """Root of every exception relaybus raises."""


class BrokerError(RelaybusError):
    """The Redis/Valkey server refused a command or could not be reached."""


class BrokerUnavailableError(BrokerError, ConnectionError):
    """The server did not answer within the retry bound.

    ``address`` names the server that was tried (``host:port`` or a socket path).
    A service that gave up waiting for its broker at start also sets ``url`` (the
    server's URL, password redacted), which the message then names, and ``waited``
    (the seconds it waited); both are None otherwise.
    """

    def __init__(self, address: str, cause: BaseException | None = None, *,
                 url: str | None = None, waited: float | None = None) -> None:
        self.address = address
        self.url = url
        self.waited = waited
        detail = f": {cause}" if cause is not None else ""
        after = f" after waiting {waited:.1f}s" if waited is not None else ""
        super().__init__(f"broker at {url or address} is unavailable{after}{detail}")


class BrokerOutOfMemoryError(BrokerError):
    """The server refused a write because it reached ``maxmemory`` (nothing was written)."""


class BrokerCommandError(BrokerError):
    """The server ran a command and refused it (a script error, a key of the wrong type).

    Not an outage: the same command would fail again, so nothing retries it.
    """


class BrokerRequestTooLargeError(BrokerCommandError):
    """The server refused a request for its size: its ``proto-max-bulk-len`` or
    ``client-query-buffer-limit`` is below it. Not retried (it would be refused again):
    lower ``max_message_size`` below the server's limits, or raise them."""


class BrokerAuthenticationError(BrokerError):
    """The server refused the password or user name: not an outage, so not retried.

    ``address`` names the server (``host:port`` or a socket path); the message never
    holds the password.
    """

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        super().__init__(f"the server at {address} refused the credentials: {reason}")


class ReplicationTimeoutError(BrokerError):
    """``durability="replicated"``: the primary applied the write, but fewer replicas
    than asked acknowledged it in time, so a failover could still lose it. Retrying is
    safe: a publish with the same event (its id) is appended once, a settle repeats
    harmlessly."""

    def __init__(self, acknowledged: int, wanted: int, timeout: float) -> None:
        self.acknowledged, self.wanted, self.timeout = acknowledged, wanted, timeout
        super().__init__(f"the write reached {acknowledged} of the {wanted} replica(s) "
                         f"durability='replicated' waits for within {timeout:g} s: the "
                         "primary has it, a failover could lose it; retrying is safe")


class UnsupportedServerError(BrokerError):
    """The server is too old: relaybus needs Redis >= 6.2 or Valkey >= 7.2."""


class ConfigurationError(RelaybusError, ValueError):
    """An option, URL or combination of options relaybus cannot use."""


class CrossSlotError(ConfigurationError):
    """On Redis Cluster, one command or transaction would touch keys in several slots
    (several queue pairs): nothing was sent. Do the work per queue pair instead."""


class InvalidNameError(ConfigurationError):
    """A queue or service name that is empty, too long, or has forbidden characters."""


class QueueNotFoundError(RelaybusError, LookupError):
    """The named queue does not exist."""


class SerializationError(RelaybusError, ValueError):
    """A payload that JSON cannot carry, or a stream entry that cannot be decoded."""


class MessageTooLargeError(SerializationError):
    """The encoded payload and headers are larger than the configured limit (nothing was
    written)."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"message of {size} bytes exceeds the limit of {limit} bytes")


class EventError(RelaybusError):
    """Base of the typed-event errors."""


class UnknownEventTypeError(EventError, LookupError):
    """No event class is registered under ``event_type``."""

    def __init__(self, event_type: str) -> None:
        self.event_type = event_type
        super().__init__(f"unknown event type {event_type!r}")

    def __str__(self) -> str:  # LookupError would quote the message again
        return f"unknown event type {self.event_type!r}"


class EventValidationError(EventError, ValueError):
    """The data does not validate against the event class of ``event_type``.

    ``errors`` is pydantic's list of error dicts (``loc``, ``msg``, ``type``).
    """

    def __init__(self, event_type: str, errors: list[dict[str, Any]]) -> None:
        self.event_type = event_type
        self.errors = errors
        parts = []
        for err in errors:
            loc = ".".join(str(p) for p in err.get("loc", ())) or "<root>"
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        super().__init__(f"invalid {event_type!r} event: " + "; ".join(parts))


class NewerEventVersionError(EventValidationError):
    """A payload of a newer version than its class that does not validate as it.

    ``version`` is the payload's, ``known_version`` the class's.
    """

    def __init__(self, event_type: str, version: int, known_version: int,
                 errors: list[dict[str, Any]]) -> None:
        super().__init__(event_type, errors)
        self.version = version
        self.known_version = known_version
        details = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or '<root>'}: "
                            f"{e.get('msg', 'invalid')}" for e in errors)
        self.args = (f"{event_type} version {version} is newer than this consumer's version "
                     f"{known_version} and does not validate: {details}",)


class DuplicateEventTypeError(EventError, TypeError):
    """A second, different class was defined under an event type that is taken."""


class EmbeddedServerError(RelaybusError):
    """The embedded Valkey server could not be found, started or reached."""


class HandlerOutcome(RelaybusError):
    """Base of the exceptions a handler raises to choose what happens to its event.

    These are decisions, not failures: the worker does not log them as errors.
    """


class Retry(HandlerOutcome):
    """Retry this event later: after ``delay`` seconds, or the service's backoff if None."""

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        self.delay = delay
        self.reason = reason
        super().__init__(reason if delay is None else f"{reason} (in {delay:g}s)")


class Reject(HandlerOutcome):
    """Dead-letter this event now, recording ``reason``."""

    def __init__(self, reason: str = "rejected by handler") -> None:
        self.reason = reason
        super().__init__(reason)
