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

A bus of N partitions (``EventBus(partitions=N)``) has N event logs: partition 0 is
``P{all}`` as above, partition ``i`` is the queue pair ``all@i`` (``P{all@i}``), and
each subscription has one pair per partition beside that partition's log:
``sub:SERVICE@i`` is ``P{all@i}:sub:SERVICE``. A name ending in ``@`` and digits is
therefore reserved for these partitions (see :func:`partition_name`).

Every key of one pair carries one hash tag, so each atomic step (a Lua script touching
a stream, its DLQ and its sorted sets) stays inside one Redis Cluster slot. Names are
validated by :func:`validate_name`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from .errors import InvalidNameError

__all__ = ["GROUP", "MAX_NAME_LENGTH", "QueueKeys", "DLQ_SUFFIX", "EVENTS_QUEUE", "SUB_PREFIX",
           "PARTITION_SEPARATOR", "validate_name", "partition_name", "split_partition",
           "is_event_log", "log_of",
           "registry_key", "subscriptions_key"]

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
#: Between a pair's name and its partition: ``sub:billing@2`` is partition 2 of ``sub:billing``.
PARTITION_SEPARATOR = "@"
_FORBIDDEN = set("{}*?[]")
_PARTITION = re.compile(r"^(.+)@([1-9][0-9]*)$")


def partition_name(name: str, partition: int) -> str:
    """The pair name of ``partition`` of the event log or a subscription (``name`` for 0)."""
    return name if partition == 0 else f"{name}{PARTITION_SEPARATOR}{partition}"


def split_partition(name: str) -> tuple[str, int]:
    """``("sub:billing", 2)`` for ``sub:billing@2``; ``(name, 0)`` for any other name."""
    match = _PARTITION.match(name)
    if match is None or not _partitioned(match.group(1)):
        return name, 0
    return match.group(1), int(match.group(2))


def is_event_log(name: str) -> bool:
    """True for the event log's pair name: ``all``, or a partition of it (``all@2``)."""
    return split_partition(name)[0] == EVENTS_QUEUE


def log_of(name: str) -> str:
    """The log partition a subscription's pair name reads (``all@2`` for ``sub:x@2``)."""
    return partition_name(EVENTS_QUEUE, split_partition(name)[1])


def _partitioned(base: str) -> bool:
    return base == EVENTS_QUEUE or base.startswith(SUB_PREFIX)


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
    base, at, digits = name.rpartition(PARTITION_SEPARATOR)
    if at and re.fullmatch("[0-9]+", digits) and (
            what != "queue name" or split_partition(name) == (name, 0)):
        raise InvalidNameError(f"{what} {name!r} must not end with {PARTITION_SEPARATOR!r} and "
                               f"digits: such names are kept for the partitions of the event "
                               f"log and of subscriptions (all@2, sub:NAME@2)")
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
        """The pair's base key: ``P{NAME}``, or ``P{all}:sub:SERVICE`` for a subscription
        (``P{all@i}:sub:SERVICE`` for its partition ``i``)."""
        if self.is_subscription:
            base, partition = split_partition(self.name)
            return f"{self.prefix}{{{partition_name(EVENTS_QUEUE, partition)}}}:{base}"
        return f"{self.prefix}{{{self.name}}}"

    @cached_property
    def partition(self) -> int:
        """The partition this pair belongs to (0 unless it is ``all@i`` or ``sub:NAME@i``)."""
        return split_partition(self.name)[1]

    @cached_property
    def is_subscription(self) -> bool:
        return self.name.startswith(SUB_PREFIX)

    @cached_property
    def log(self) -> QueueKeys | None:
        """The event log's keys for a subscription, else None."""
        if not self.is_subscription:
            return None
        return QueueKeys(self.prefix, partition_name(EVENTS_QUEUE, self.partition))

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
    def scheduled(self) -> str:
        """The event log's sorted set of scheduled events (event id -> due ms)."""
        return self.tag + ":scheduled"

    @cached_property
    def scheduled_events(self) -> str:
        """The event log's hash of scheduled events (event id -> the packed entry)."""
        return self.tag + ":scheduled:events"

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
