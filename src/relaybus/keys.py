"""Every Redis key relaybus uses, built in one place.

Layout for a queue pair named ``NAME`` under prefix ``P`` (default ``mq:``)::

    P{NAME}            stream: the queue's messages (consumer group ``relaybus``)
    P{NAME}:dlq        stream: its dead-letter queue (same group name)
    P{NAME}:meta       hash: settings (visibility_timeout, created_at, ...)
    P{NAME}:delayed    sorted set: retries waiting for their due time (score: due ms)
    P{NAME}:done       sorted set: dedup keys recently acknowledged (score: ms)
    P{NAME}:order      hash: an ordered subscription's keys in use -> their holder
    P{NAME}:held       sorted set: an ordered subscription's entries waiting for their key
    Pqueues            set: names of every queue pair under the prefix
    Psubscriptions     hash: service name -> JSON list of event types (EventBus)

A bus subscription ``sub:SERVICE`` reads the event log ``P{all}`` through a consumer
group of its own (named ``sub:SERVICE``), so its pair lives beside the log, under the
log's hash tag: ``P{all}:sub:SERVICE``, ``P{all}:sub:SERVICE:dlq``, ... One script then
settles messages of the log and of the subscription's own stream (retries, requeued
messages) together. The log also has ``P{all}:published`` (sorted set: event ids
published within the dedup window, score ms) and ``P{all}:published:ids`` (hash: event
id -> its log id).

Every key of one pair carries one hash tag, so each atomic step (a Lua script touching
a stream, its DLQ and its sorted sets) stays inside one Redis Cluster slot. Names are
validated by :func:`validate_name`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .errors import InvalidNameError

__all__ = ["GROUP", "MAX_NAME_LENGTH", "QueueKeys", "DLQ_SUFFIX", "EVENTS_QUEUE", "SUB_PREFIX",
           "validate_name", "registry_key", "subscriptions_key"]

#: The consumer group every relaybus queue uses.
GROUP = "relaybus"
#: Longest accepted queue or service name, in characters.
MAX_NAME_LENGTH = 200
#: Suffix of a dead-letter queue's name (``orders`` -> ``orders:dlq``).
DLQ_SUFFIX = ":dlq"
#: Queue pair of the event log.
EVENTS_QUEUE = "all"
#: Start of a bus subscription's queue name (``sub:billing``).
SUB_PREFIX = "sub:"
_FORBIDDEN = set("{}*?[]")


def validate_name(name: object, what: str = "queue name") -> str:
    """Return ``name`` if relaybus can use it as a queue or service name.

    Raises :class:`InvalidNameError` for a non-string, an empty name, one over
    :data:`MAX_NAME_LENGTH` characters, or one with whitespace, control characters,
    braces (they would break the hash tag) or glob characters.
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"{what} must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidNameError(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidNameError(f"{what} is {len(name)} characters; the limit is {MAX_NAME_LENGTH}")
    for ch in name:
        if ch.isspace() or not ch.isprintable():
            raise InvalidNameError(f"{what} {name!r} contains whitespace or a control character")
        if ch in _FORBIDDEN:
            raise InvalidNameError(f"{what} {name!r} contains the forbidden character {ch!r}")
    if name.endswith(DLQ_SUFFIX):
        raise InvalidNameError(f"{what} {name!r} must not end with {DLQ_SUFFIX!r}")
    return name


@dataclass(frozen=True)
class QueueKeys:
    """The keys of one queue pair (all share one hash tag).

    ``log`` is set for a bus subscription (a name starting with ``sub:``): the keys of
    the event log it reads through its own group, which share its hash tag.
    """

    prefix: str
    name: str

    @cached_property
    def tag(self) -> str:
        """The pair's base key: ``P{NAME}``, or ``P{all}:sub:SERVICE`` for a subscription."""
        if self.is_subscription:
            return f"{self.prefix}{{{EVENTS_QUEUE}}}:{self.name}"
        return f"{self.prefix}{{{self.name}}}"

    @cached_property
    def is_subscription(self) -> bool:
        return self.name.startswith(SUB_PREFIX)

    @cached_property
    def log(self) -> QueueKeys | None:
        """The event log's keys for a subscription, else None."""
        return QueueKeys(self.prefix, EVENTS_QUEUE) if self.is_subscription else None

    @cached_property
    def stream(self) -> str:
        return self.tag

    @cached_property
    def dlq(self) -> str:
        return self.tag + DLQ_SUFFIX

    @cached_property
    def meta(self) -> str:
        return self.tag + ":meta"

    @cached_property
    def delayed(self) -> str:
        return self.tag + ":delayed"

    @cached_property
    def done(self) -> str:
        return self.tag + ":done"

    @cached_property
    def published(self) -> str:
        return self.tag + ":published"

    @cached_property
    def published_ids(self) -> str:
        return self.tag + ":published:ids"

    @cached_property
    def leases(self) -> str:
        """The hash of each consumer's lease (its visibility timeout, ms) on the stream."""
        return self.tag + ":leases"

    @cached_property
    def dlq_leases(self) -> str:
        return self.dlq + ":leases"

    @cached_property
    def order(self) -> str:
        """An ordered subscription's hash: partition key -> the entry that holds it (the
        one being handled, retried or waiting to be; see ``lua/lib.lua``)."""
        return self.tag + ":order"

    @cached_property
    def held(self) -> str:
        """An ordered subscription's sorted set of entries held back until their key is
        free, in order (members ``key NUL sequence NUL holder fields``)."""
        return self.tag + ":held"

    def all(self) -> list[str]:
        """Every key of the pair (for deletion)."""
        return [self.stream, self.dlq, self.meta, self.delayed, self.done, self.published,
                self.published_ids, self.leases, self.dlq_leases, self.order, self.held]


def registry_key(prefix: str) -> str:
    """The set of queue-pair names under ``prefix``."""
    return f"{prefix}queues"


def subscriptions_key(prefix: str) -> str:
    """The hash of EventBus subscriptions under ``prefix``."""
    return f"{prefix}subscriptions"
