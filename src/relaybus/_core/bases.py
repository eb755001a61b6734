"""What the queue layer's sync and asyncio classes share: settings, names, encoding.

:class:`MessageQueueBase` and :class:`QueueBase` hold everything of ``MessageQueue`` /
``AsyncMessageQueue`` and ``Queue`` / ``AsyncQueue`` that does no IO (validation,
key names, encoding, the per-reader state); the public classes add the calls, each
one line over a core step or flow.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any, Generic, TypeVar

from .. import codec
from ..connection import ConnectionSettings, host_url, is_host, redact
from ..errors import ConfigurationError, InvalidNameError, QueueNotFoundError
from ..events import Event
from ..keys import DLQ_SUFFIX, EVENTS_QUEUE, QueueKeys, validate_name
from . import bus, tracing
from .queue import (
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_VISIBILITY_TIMEOUT,
    Counts,
    QueueRef,
    QueueSettings,
    ReadState,
    Settlement,
    failure_record,
)
from .replies import ids
from .steps import Flow, Step
from .telemetry import Telemetry

__all__ = ["MessageQueueBase", "QueueBase", "EventBusBase", "validate_prefix", "check_count"]


def validate_prefix(prefix: object) -> str:
    """``prefix`` if relaybus can use it as a key prefix (no braces, no whitespace)."""
    if not isinstance(prefix, str) or any(c in "{}" or c.isspace() for c in prefix):
        raise InvalidNameError(f"prefix {prefix!r} must be a string without braces or spaces")
    return prefix


def check_count(count: object) -> int:
    """``count`` if it is a positive integer (ValueError otherwise)."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count must be a positive integer, not {count!r}")
    return count


C = TypeVar("C")  # the front's redis-py client class
D = TypeVar("D")  # the front's driver class


def _shown(url: str) -> str:
    """A queue layer's URL for its ``repr``: the password redacted (``client``: one's own)."""
    return "(own client)" if url == "client" else redact(url)


class MessageQueueBase(Generic[C, D]):
    """A connection to a server and the queue pairs under one key prefix.

    ``url`` takes ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://`` or
    ``embedded[:///dir]``; without it, ``RELAYBUS_URL`` wins over
    ``redis_host``/``redis_port``/``redis_db``.
    ``consumer_id`` names this consumer (default: unique per process). Connecting is
    lazy; operations retry an unreachable server for ``retry_timeout`` seconds, then
    raise :class:`~relaybus.errors.BrokerUnavailableError`. ``durability="replicated"``
    makes every publish, settle and move wait (``replication_timeout`` seconds at most,
    in the same round trip) until a replica has it too, else raise
    :class:`~relaybus.errors.ReplicationTimeoutError` (docs/reliability.md says what
    each setting guarantees). ``client`` brings a client of one's own (then the URL
    options are ignored).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        redis_host: str = "localhost",
        redis_port: int = 6379,
        redis_db: int = 0,
        redis_password: str | None = None,
        prefix: str = "mq:",
        consumer_id: str | None = None,
        max_message_size: int = codec.DEFAULT_MAX_MESSAGE_SIZE,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        dedup_window: float = DEFAULT_DEDUP_WINDOW,
        retry_timeout: float | None = None,
        durability: str = "primary",
        replication_timeout: float = 1.0,
        client: C | None = None,
    ) -> None:
        self.prefix = validate_prefix(prefix)
        self.settings = QueueSettings(self.prefix, int(max_message_size), int(max_deliveries),
                                      float(dedup_window))
        self._consumer_id = consumer_id
        self._consumer_pid = -1
        self._generated_id = ""
        self._counts = Counts()
        conn = ConnectionSettings.from_options(
            url, redis_host=redis_host, redis_port=redis_port, redis_db=redis_db,
            redis_password=redis_password, retry_timeout=retry_timeout, durability=durability,
            replication_timeout=replication_timeout, client=client is not None)
        self.url = conn.url
        self.client: C = client if client is not None else self._new_client(conn)
        #: Runs every command of this queue layer (outage retries, script loading).
        self.driver: D = self._new_driver(self.client, conn)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {_shown(self.url)} prefix={self.prefix!r}>"

    def _new_client(self, settings: ConnectionSettings) -> C:
        raise NotImplementedError

    def _new_driver(self, client: C, settings: ConnectionSettings) -> D:
        raise NotImplementedError

    @property
    def connection(self) -> D:
        """The driver (``address``, ``retry_timeout``, ``server_version()``)."""
        return self.driver

    @property
    def max_message_size(self) -> int:
        return self.settings.max_message_size

    @property
    def max_deliveries(self) -> int:
        return self.settings.max_deliveries

    @property
    def dedup_window(self) -> float:
        return self.settings.dedup_window

    @property
    def stats(self) -> dict[str, int]:
        """Counters of what the queue layer handled on its own: ``gone`` (pending entries
        whose payload was deleted), ``duplicates``, ``dead_lettered``, ``skipped`` (log
        entries of types a subscription does not take), ``groups_recreated``,
        ``publish_duplicates`` (events an event bus did not append: published again
        within the dedup window)."""
        return self._counts.values

    @property
    def consumer_id(self) -> str:
        """This process's consumer name: given, or ``host-pid-random`` (new after fork)."""
        if self._consumer_id:
            return self._consumer_id
        if self._consumer_pid != os.getpid():
            self._consumer_pid = os.getpid()
            self._generated_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        return self._generated_id

    def _encode(self, data: Mapping[str, Any] | codec.JsonText, *, ttl: float | None = None,
                headers: Mapping[str, str] | None = None, dedup_key: str | None = None,
                routing_key: str | None = None, partition_key: str | None = None
                ) -> dict[str, str | int]:
        return codec.encode_entry(data, now=time.time(), headers=headers, ttl=ttl,
                                  dedup_key=dedup_key, routing_key=routing_key,
                                  partition_key=partition_key, max_size=self.max_message_size)

    def _ref(self, name: str, *, is_dlq: bool = False, visibility_timeout: float | None = None,
             delete_on_ack: bool = True) -> QueueRef:
        vt = DEFAULT_VISIBILITY_TIMEOUT if visibility_timeout is None else visibility_timeout
        return QueueRef(self.settings, name, is_dlq, float(vt), delete_on_ack)

    def _pair_refs(self, names: Iterable[str], *, given: bool) -> list[QueueRef]:
        """The main queue's and the DLQ's ref of each pair name (validated when
        ``given`` by a caller; names the server listed are taken as they are)."""
        names = [validate_name(n) for n in names] if given else list(names)
        return [r for n in names for r in (self._ref(n), self._ref(n, is_dlq=True))]

    @staticmethod
    def _split_dlq(name: str) -> tuple[str, bool]:
        """``("orders", True)`` for ``orders:dlq``; validates the pair name."""
        if isinstance(name, str) and name.endswith(DLQ_SUFFIX):
            return validate_name(name[: -len(DLQ_SUFFIX)]), True
        return validate_name(name), False

    def _not_found(self, name: str) -> QueueNotFoundError:
        return QueueNotFoundError(f"no queue named {name!r} under prefix {self.prefix!r}")

    @staticmethod
    def _check_visibility(visibility_timeout: float | None) -> None:
        if visibility_timeout is not None and not visibility_timeout > 0:
            raise ValueError("visibility_timeout must be a positive number of seconds")


MQ = TypeVar("MQ", bound="MessageQueueBase[Any, Any]")


class QueueBase(Generic[MQ]):
    """One stream of a queue pair: the main queue or its dead-letter queue.

    Get queues from ``create_queue_pair`` or ``get_queue``. One object remembers where
    its reader left off (reclaim cursors, when it last found nothing): give each
    consuming thread or task its own.
    """

    def __init__(self, mq: MQ, name: str | QueueRef, *, is_dlq: bool = False,
                 visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
                 delete_on_ack: bool = True) -> None:
        self.mq = mq
        self._ref = name if isinstance(name, QueueRef) else mq._ref(
            name, is_dlq=is_dlq, visibility_timeout=visibility_timeout,
            delete_on_ack=delete_on_ack)
        self._read = ReadState()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} key={self.key!r}>"

    @property
    def ref(self) -> QueueRef:
        return self._ref

    @property
    def name(self) -> str:
        """``NAME`` for a main queue, ``NAME:dlq`` for a dead-letter queue."""
        return self._ref.name

    @property
    def pair_name(self) -> str:
        return self._ref.pair_name

    @property
    def is_dlq(self) -> bool:
        return self._ref.is_dlq

    @property
    def keys(self) -> QueueKeys:
        return self._ref.keys

    @property
    def key(self) -> str:
        """The stream's Redis key."""
        return self._ref.key

    @property
    def visibility_timeout(self) -> float:
        return self._ref.visibility_timeout

    @property
    def delete_on_ack(self) -> bool:
        """Acknowledged entries leave the stream (work queues); False keeps them (the log)."""
        return self._ref.delete_on_ack

    @delete_on_ack.setter
    def delete_on_ack(self, value: bool) -> None:
        self._ref = replace(self._ref, delete_on_ack=bool(value))

    # -- what the calls send (shared by both fronts) ----------------------------------

    def _acks(self, message_ids: str | Iterable[str], record_done: Iterable[str]) -> Settlement:
        return Settlement(acks=ids(message_ids), done=list(record_done))

    def _dead(self, message_ids: str | Iterable[str], reason: str,
              details: Mapping[str, Any] | None) -> Settlement:
        record = failure_record(self._ref, reason, details)
        return Settlement(dead=[(i, record) for i in ids(message_ids)])

    def _retries(self, message_ids: str | Iterable[str], delay: float, reason: str,
                 details: Mapping[str, Any] | None, clock: float) -> Settlement:
        record = failure_record(self._ref, reason, details)
        delay = max(0.0, float(delay))
        due = clock + delay
        if self._read.local_due is None or due < self._read.local_due:
            self._read.local_due = due  # a consumer of this object wakes up for it
        return Settlement(retries=[(i, delay, record) for i in ids(message_ids)])


class EventBusBase(Generic[MQ]):
    """Central event bus for publishing and subscribing to events.

    ``EventBus(url)``, or positionally: ``EventBus("localhost", 6379, 0, "events:")``
    (a first argument without a scheme is a host name) or ``EventBus(redis_host=...,
    redis_port=..., redis_db=..., prefix=...)``. ``visibility_timeout``: seconds before another
    instance takes over events a dead instance held (stored with the event log).
    ``dedup_window``: seconds during which an event id is published at most once (a
    repeat reaches each subscriber once) and a handled one is not handled again.
    ``retention_max_len`` / ``retention_seconds``: how much history the log keeps for
    inspection and replay (``retention_max_len`` per partition); an event a
    subscription has not read yet is never trimmed. ``partitions``: how many event
    logs the bus spreads events over (by partition key, see ``docs/design.md``);
    stored with the bus, so None (the default) takes the stored number (1 for a new
    bus); a larger number grows the bus, losing nothing; a smaller one raises
    :class:`~relaybus.errors.ConfigurationError`. ``tracing=False``: no
    OpenTelemetry spans for publishes (otherwise there are when the application has
    set a tracer provider; see docs/operating.md).
    Other keyword arguments go to the message queue (``retry_timeout``,
    ``consumer_id``, ``client``); or pass ``mq`` to share one. (``_before_open`` is
    internal: the sync bus, which opens its log when built, calls it with the message
    queue first; a service waits for its broker there.)
    """

    def __init__(
        self,
        url: str | None = None,
        redis_port: int = 6379,
        redis_db: int = 0,
        prefix: str = "events:",
        *,
        redis_host: str = "localhost",
        redis_password: str | None = None,
        visibility_timeout: float = 30.0,
        dedup_window: float = DEFAULT_DEDUP_WINDOW,
        retention_max_len: int = bus.DEFAULT_RETENTION_MAX_LEN,
        retention_seconds: float | None = bus.DEFAULT_RETENTION_SECONDS,
        partitions: int | None = None,
        tracing: bool = True,
        mq: MQ | None = None,
        _before_open: Callable[[MQ], object] | None = None,
        **mq_options: Any,
    ) -> None:
        if not isinstance(visibility_timeout, (int, float)) or not visibility_timeout > 0:
            raise ValueError(f"visibility_timeout must be a positive number of seconds, "
                             f"not {visibility_timeout!r}")
        self.visibility_timeout = float(visibility_timeout)
        self.dedup_window = float(dedup_window)
        self.retention_max_len = int(retention_max_len)
        self.retention_seconds = retention_seconds
        if partitions is not None and (not isinstance(partitions, int) or isinstance(
                partitions, bool) or not 1 <= partitions <= bus.MAX_PARTITIONS):
            raise ConfigurationError(f"partitions must be an int from 1 to "
                                     f"{bus.MAX_PARTITIONS} (or None), not {partitions!r}")
        self._wanted_partitions = partitions
        #: How many partitions the bus has (read from the server when it is opened).
        self.partitions: int = partitions or 1
        #: Seconds between two rounds of this bus's maintenance (the log's retention).
        self.maintenance_interval = bus.MAINTENANCE_INTERVAL
        self.running = False
        #: Spans for publishes when the application traces (see :mod:`._core.tracing`).
        self.tracing = bool(tracing)
        #: Labelled counts for the metrics (:mod:`relaybus.metrics`): events published.
        self._telemetry = Telemetry()
        if url is not None and is_host(url):  # EventBus(host, port, db, prefix)
            url = host_url(url, redis_port, redis_db, redis_password)
        self.mq: MQ = mq or self._new_mq(
            url, redis_host=redis_host, redis_port=redis_port, redis_db=redis_db,
            redis_password=redis_password, prefix=prefix, dedup_window=dedup_window,
            **mq_options)
        self._owns_mq = mq is None
        self.prefix: str = self.mq.prefix
        self._before_open = _before_open
        self._init_front()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {_shown(getattr(self.mq, 'url', 'client'))} "
                f"prefix={self.prefix!r}>")

    def _new_mq(self, url: str | None, **options: Any) -> MQ:
        raise NotImplementedError

    def _init_front(self) -> None:
        """What the front sets up after the settings (the sync bus opens the log)."""

    def _log_ref(self) -> QueueRef:
        ref = self.mq._ref(EVENTS_QUEUE, visibility_timeout=self.visibility_timeout)
        return replace(ref, delete_on_ack=False)

    def _sub_ref(self, service_name: str, visibility_timeout: float | None) -> QueueRef:
        return self.mq._ref(bus.subscription_queue_name(service_name),
                            visibility_timeout=visibility_timeout)

    def _publish(self, encoded: list[dict[str, str | int]]) -> Step[list[str]]:
        """The publish call of ``encoded`` events (repeats counted in ``mq.stats``)."""
        return bus.publish(self.prefix, encoded, self.dedup_window, self.mq._counts,
                           self.partitions, self._telemetry)

    def _publish_step(self, encoded: list[dict[str, str | int]],
                      due: tuple[str, int] | None) -> Step[list[str]]:
        """The publish call of ``encoded``, or (``due``) their scheduling."""
        if due is None:
            return self._publish(encoded)
        return bus.schedule(self.prefix, encoded, due, self.partitions)

    def _promote(self) -> Step[float | None]:
        """Promote the scheduled events that are due; the value: seconds until the next
        one is (None: none is scheduled)."""
        return bus.promote(self.prefix, self.dedup_window, self.partitions)

    def _sending(self, events: Iterable[Event]
                 ) -> contextlib.AbstractContextManager[list[dict[str, str | int]]]:
        """The log entries of ``events``; when tracing, each carries the context of its
        producer span, which ends with the block (see :mod:`._core.tracing`)."""
        events = list(events)
        if not tracing.active(self.tracing):  # the hot path: no generator per publish
            return contextlib.nullcontext([bus.event_fields(self.mq._encode, e)
                                           for e in events])
        return self._traced_sending(events)

    @contextlib.contextmanager
    def _traced_sending(self, events: list[Event]) -> Iterator[list[dict[str, str | int]]]:
        with tracing.sending(self.tracing, events, EVENTS_QUEUE) as carriers:
            yield [bus.event_fields(self.mq._encode, e, carriers[i] if carriers else None)
                   for i, e in enumerate(events)]

    def _raw_fields(self, event_type: str, data: Mapping[str, Any]) -> dict[str, str | int]:
        payload = bus.raw_event(event_type, data)
        key = payload.get("partition_key")
        return self.mq._encode(payload, dedup_key=str(payload["event_id"]),
                               routing_key=event_type,
                               partition_key=key if isinstance(key, str) else None)

    def _trim(self) -> Step[bus.TrimRound]:
        max_len = self.retention_max_len
        return bus.trim(self.prefix, max_len, self.retention_seconds, self.partitions,
                        self.dedup_window)

    def _open_flow(self) -> Flow[float]:
        """Open the log and its partitions (``self.partitions`` set); the value: the
        log's visibility timeout."""
        vt, self.partitions = yield from bus.open_partitions(
            self._log_ref(), self._wanted_partitions, time.time())
        return vt
