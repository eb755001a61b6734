"""The queue layer: queue pairs (main + dead-letter) on Redis Streams, sync front.

The shape follows LeanMQ's API, so code written for LeanMQ runs on it (``create_queue_pair``,
``send_message``, ``get_messages``, ``acknowledge_messages``, ``move_to_dlq``,
``get_queue``), with what it lacked: acknowledged messages leave the stream, crashed
consumers' messages are reclaimed after the visibility timeout, undecodable and
expired entries are dead-lettered with a reason, and every state change is one
atomic command or script. :mod:`relaybus.aio` has the same calls, awaited.

Round trips: ``get_messages`` costs one script call (plus one blocking wait when it
waits), ``send_messages`` one pipeline, ``acknowledge_messages`` one script call,
whatever the number of messages. The steps themselves are built in
:mod:`relaybus._core.queue`; this module only runs them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import redis

from ._core import queue as core
from ._core.bases import MessageQueueBase, QueueBase, check_count
from ._core.queue import (
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_VISIBILITY_TIMEOUT,
    IDLE_RECHECK_MAX,
    ConsumerInfo,
    QueueInfo,
    Settlement,
)
from ._core.replies import ids
from ._core.steps import Flow, Step, T
from ._sync.driver import Driver
from .codec import Message
from .connection import ConnectionSettings
from .keys import validate_name

__all__ = ["MessageQueue", "LeanMQ", "Queue", "QueueInfo", "ConsumerInfo", "Transaction",
           "Message", "DEFAULT_VISIBILITY_TIMEOUT", "DEFAULT_MAX_DELIVERIES",
           "DEFAULT_DEDUP_WINDOW", "IDLE_RECHECK_MAX"]

logger = logging.getLogger("relaybus.queue")


class Queue(QueueBase["MessageQueue"]):
    """One stream of a queue pair: the main queue or its dead-letter queue.

    Get queues from :meth:`MessageQueue.create_queue_pair` or
    :meth:`MessageQueue.get_queue`. Methods are thread-safe, except that one
    ``Queue`` object remembers where its reader left off: give each consuming thread
    its own (``mq.get_queue(name)``).
    """

    def _run(self, step: Step[T]) -> T:
        return self.mq.driver.run(step)

    def _drive(self, flow: Flow[T]) -> T:
        return self.mq.driver.drive(flow)

    def _settle(self, batch: Settlement, dlq: Queue | None = None) -> core.Settled:
        return self._drive(core.settle(self._ref, self.mq.consumer_id, batch,
                                       dlq.key if dlq is not None else None,
                                       ordered=self._ref.log is not None))  # keys handed on

    # -- sending ------------------------------------------------------------------

    def send_message(self, data: Mapping[str, Any], *, ttl: float | None = None,
                     message_id: str | None = None, headers: Mapping[str, str] | None = None,
                     dedup_key: str | None = None) -> str:
        """Append one message; return its stream id.

        ``ttl`` (seconds) makes it expire: once passed, it is dead-lettered with
        reason ``expired`` instead of being delivered. ``message_id`` sets an explicit
        stream id (it must be greater than the last one). ``dedup_key`` marks it so
        that once a message with the same key has been acknowledged with
        ``record_done``, later copies are dropped (see :meth:`acknowledge_messages`).
        """
        fields = self.mq._encode(data, ttl=ttl, headers=headers, dedup_key=dedup_key)
        return self._run(core.send(self._ref, fields, message_id))

    def send_messages(self, messages: Sequence[Mapping[str, Any]], *,
                      ttl: float | None = None) -> list[str]:
        """Append many messages in one round trip, all or none (one MULTI/EXEC).

        All are encoded before any is sent; when the server refuses one (out of
        memory), none is written.
        """
        encoded = [(self.key, self.mq._encode(m, ttl=ttl)) for m in messages]
        return self._run(core.send_many(encoded)) if encoded else []

    # -- receiving ----------------------------------------------------------------

    def get_messages(self, count: int = 1, block_for_seconds: float | None = None,
                     consumer_id: str | None = None) -> list[Message]:
        """Deliver up to ``count`` messages to this consumer.

        First come due retries and messages whose consumer has held them longer than
        the visibility timeout (a crashed consumer's), then new ones. When none is
        there, waits up to ``block_for_seconds`` (None or 0: do not wait). Entries that
        cannot be decoded, have expired, or were delivered more than ``max_deliveries``
        times are moved to the dead-letter queue with a reason, never returned and
        never left pending.
        """
        check_count(count)
        return self._drive(core.get_messages(
            self._ref, self._read, consumer_id or self.mq.consumer_id, count,
            block_for_seconds, time.monotonic, self.mq._counts))

    def peek(self, count: int = 10, start_id: str | None = None) -> list[Message]:
        """Read up to ``count`` messages from ``start_id`` on, without consuming them."""
        return self._run(core.peek(self._ref, count, start_id))

    def follow(self, after_id: str = "$", *, count: int = 100,
               block_for_seconds: float | None = None) -> tuple[str, list[Message]]:
        """Read messages added after ``after_id`` without consuming them; for tailing.

        A plain XREAD: no consumer group is involved, so nothing is delivered, claimed
        or acknowledged. ``"$"`` means after the newest message now in the stream.
        Returns ``(cursor, messages)``; pass the cursor back to read on from there.
        When nothing is new, waits up to ``block_for_seconds`` (None or 0: do not wait;
        one call waits at most a few seconds so the socket never times out).
        """
        return self._drive(core.follow(self._ref, after_id, count, block_for_seconds))

    # -- settling -----------------------------------------------------------------

    def acknowledge_messages(self, ids: str | Iterable[str], *,
                             record_done: Iterable[str] = ()) -> int:
        """Acknowledge messages; return how many were pending.

        Acknowledged messages leave the stream (except on the event log, which keeps
        them for its retention). The keys in ``record_done`` are recorded, in the same
        atomic step, as handled for the dedup window: later messages carrying one of
        them as ``dedup_key`` are dropped instead of delivered (an event's key is its
        dedup identity, :func:`relaybus.codec.dedup_identity` of its type and id).
        """
        batch = self._acks(ids, record_done)
        return self._settle(batch).acknowledged if batch else 0

    def move_to_dlq(self, ids: str | Iterable[str], reason: str, dlq: Queue | None = None,
                    *, details: Mapping[str, Any] | None = None) -> int:
        """Move messages to the dead-letter queue atomically; return how many moved.

        The DLQ entry keeps the payload and headers and gains a failure record
        (``reason``, ``timestamp``, ``queue``, ``message_id``, ``attempt`` and
        ``details``). ``dlq`` defaults to this queue's own DLQ.
        """
        batch = self._dead(ids, reason, details)
        return self._settle(batch, dlq).dead_lettered if batch else 0

    def schedule_retry(self, ids: str | Iterable[str], delay: float, reason: str, *,
                       details: Mapping[str, Any] | None = None) -> int:
        """Take messages out of the stream and re-deliver them after ``delay`` seconds.

        Atomic per message: the entry leaves the stream and waits in the queue's
        delayed set with a failure record added; it comes back through
        :meth:`get_messages` once due (by the server's clock). Returns how many were
        scheduled.
        """
        batch = self._retries(ids, delay, reason, details, time.monotonic())
        return self._settle(batch).retried if batch else 0

    def requeue_messages(self, ids: str | Iterable[str], destination: Queue | None = None) -> int:
        """Move messages (usually from a DLQ) to ``destination`` atomically, history kept.

        ``destination`` defaults to the main queue of this queue's pair. Returns how
        many moved; ids that are not in this queue are skipped.
        """
        id_list = _id_list(ids)
        dest = destination.key if destination is not None else self.keys.stream
        return self._drive(core.requeue(self._ref, id_list, dest)) if id_list else 0

    def requeue_where(self, predicate: Callable[[Message], bool] | None = None,
                      destination: Queue | None = None, *, batch_size: int = 500) -> int:
        """Requeue every message that ``predicate`` accepts (all when None); return how many.

        Scans this queue (usually a DLQ) page by page without consuming, and moves each
        page's matches with :meth:`requeue_messages`: each page moves atomically, the
        whole scan does not. Messages that arrive after the call started are left
        alone, so a requeued message that fails again is not looped.
        """
        dest = destination.key if destination is not None else self.keys.stream
        return self._drive(core.requeue_where(self._ref, predicate, dest, batch_size))

    def extend_lease(self, ids: str | Iterable[str], consumer_id: str | None = None) -> int:
        """Reset the idle time of messages this consumer still holds; return how many.

        A worker calls this while handlers run, so that only a dead consumer's messages
        pass the visibility timeout and are taken over. Messages another consumer has
        already taken over are left alone.
        """
        batch = Settlement(extend=_id_list(ids))
        if not batch:
            return 0
        return self._drive(core.settle(self._ref, consumer_id or self.mq.consumer_id,
                                       batch)).extended

    def release(self, ids: str | Iterable[str], consumer_id: str | None = None
                ) -> tuple[int, bool]:
        """Hand back messages this consumer fetched but will not handle; forget it if idle.

        The messages become reclaimable at once by any other consumer's next
        :meth:`get_messages` (their delivery count is unchanged), instead of after the
        visibility timeout. Then, if the consumer holds no message at all, it is removed
        from the group. Returns ``(messages released, consumer removed)``.
        """
        done = self._drive(core.settle(self._ref, consumer_id or self.mq.consumer_id,
                                       Settlement(release=_id_list(ids), forget=True)))
        return done.released, done.removed

    def delete_messages(self, ids: str | Iterable[str]) -> int:
        """Delete messages (pending or not) without dead-lettering; return how many."""
        id_list = _id_list(ids)
        return self._run(core.delete(self._ref, id_list)) if id_list else 0

    def purge(self) -> int:
        """Remove every message (waiting, pending and delayed retries); return how many."""
        return self._drive(core.purge(self._ref))

    # -- inspecting ---------------------------------------------------------------

    def get_info(self) -> QueueInfo:
        """A :class:`QueueInfo` snapshot (two round trips)."""
        return self._drive(core.infos([self._ref]))[0]


#: Ids given as one string or many, as a list (the calls' parameter is named ``ids``).
_id_list = ids


class Transaction:
    """Messages to send all together or not at all (see :meth:`MessageQueue.transaction`).

    Nothing is sent until the ``with`` block ends without an exception; then every
    message is written in one MULTI/EXEC. ``ids`` holds the stream ids afterwards.
    """

    def __init__(self, mq: MessageQueue) -> None:
        self._mq = mq
        self._pending: list[tuple[str, dict[str, str | int]]] = []
        self.ids: list[str] = []

    def send_message(self, queue: Queue, data: Mapping[str, Any], *,
                     ttl: float | None = None, headers: Mapping[str, str] | None = None) -> None:
        """Add one message for ``queue`` (validated and encoded now, sent at commit)."""
        self._pending.append((queue.key, self._mq._encode(data, ttl=ttl, headers=headers)))

    def commit(self) -> list[str]:
        """Send every added message atomically; return their ids."""
        if not self._pending:
            return []
        self.ids = self._mq.driver.run(core.send_many(self._pending))
        self._pending = []
        return self.ids

    def discard(self) -> None:
        """Drop every added message."""
        self._pending = []

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


class MessageQueue(MessageQueueBase[redis.Redis, Driver]):
    """A connection to a server and the queue pairs under one key prefix (sync front).

    ``url`` takes ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://`` or
    ``embedded[:///dir]``; without it, ``RELAYBUS_URL`` wins over
    ``redis_host``/``redis_port``/``redis_db``.
    ``consumer_id`` names this consumer (default: unique per process). Connecting is
    lazy; operations retry an unreachable server for ``retry_timeout`` seconds, then
    raise :class:`BrokerUnavailableError`. Thread-safe; usable as a context manager.
    """

    def _new_client(self, settings: ConnectionSettings) -> redis.Redis:
        return settings.sync_client()

    def _new_driver(self, client: redis.Redis, settings: ConnectionSettings) -> Driver:
        return Driver(client, retry_timeout=settings.retry_timeout, url=settings.url,
                      replication=settings.replication)

    # -- queue pairs ------------------------------------------------------------

    def _queue(self, name: str, *, is_dlq: bool = False, visibility_timeout: float) -> Queue:
        return Queue(self, self._ref(name, is_dlq=is_dlq, visibility_timeout=visibility_timeout))

    def create_queue_pair(self, name: str, *, visibility_timeout: float | None = None,
                          ) -> tuple[Queue, Queue]:
        """Create (or open) the queue ``name`` and its DLQ; return ``(queue, dlq)``.

        Idempotent. ``visibility_timeout`` (seconds), when given, updates the stored
        setting; otherwise the stored one applies (30 s for a new queue).
        """
        name = validate_name(name)
        self._check_visibility(visibility_timeout)
        vt = self.driver.drive(core.ensure_pair(self._ref(name), visibility_timeout,
                                                now=time.time()))
        return (self._queue(name, visibility_timeout=vt),
                self._queue(name, is_dlq=True, visibility_timeout=vt))

    def get_queue(self, name: str) -> Queue | None:
        """The queue ``name`` (a ``NAME:dlq`` name gives a DLQ), or None if it does not exist."""
        pair, is_dlq = self._split_dlq(name)
        vt = self.driver.run(core.visibility(self._ref(pair)))
        return self._queue(pair, is_dlq=is_dlq, visibility_timeout=vt) if vt is not None else None

    def get_dead_letter_queue(self, name: str) -> Queue | None:
        """The DLQ of queue ``name``, or None if the queue does not exist."""
        return self.get_queue(validate_name(name) + ":dlq")

    def require_queue(self, name: str) -> Queue:
        """Like :meth:`get_queue` but raises :class:`QueueNotFoundError`."""
        queue = self.get_queue(name)
        if queue is None:
            raise self._not_found(name)
        return queue

    def queue_names(self) -> list[str]:
        """Names of every queue pair under this prefix, sorted."""
        return self.driver.run(core.queue_names(self.prefix))

    def list_queues(self, names: Iterable[str] | None = None) -> list[QueueInfo]:
        """Info on every queue under this prefix (or the pairs ``names``), main queues and
        DLQs (constant round trips)."""
        return self.driver.drive(core.infos(
            self._pair_refs(names, given=True) if names is not None
            else self._pair_refs(self.queue_names(), given=False)))

    def entries_added(self, names: Iterable[str]) -> dict[str, int | None]:
        """How many entries each named queue (``NAME`` or ``NAME:dlq``) ever received.

        XINFO STREAM's ``entries-added`` (Redis >= 7.0), in one round trip; None for a
        stream that does not exist or a server that does not count. Rates come from the
        difference between two calls (``relaybus top``).
        """
        names = list(names)
        return self.driver.run(core.entries_added(self.prefix, names)) if names else {}

    def consumers(self, names: Iterable[str]) -> dict[str, list[ConsumerInfo]]:
        """The consumers of each named main queue (XINFO CONSUMERS), in one round trip.

        A subscription's consumers read both its own stream and the event log (through
        its group there): each is listed once, holding the messages of both, idle since
        it last touched either. A queue without consumers (or that does not exist, or
        the event log, read by no group of its own) has an empty list.
        """
        refs = [self._ref(validate_name(n)) for n in names]
        return self.driver.run(core.consumers(refs)) if refs else {}

    def delete_queue(self, name: str, delete_dlq: bool = True) -> bool:
        """Delete the queue pair ``name`` (and its DLQ unless ``delete_dlq`` is False)."""
        return self.driver.run(core.delete_pair(self._ref(validate_name(name)),
                                                keep_dlq=not delete_dlq))

    def transaction(self) -> Transaction:
        """A :class:`Transaction`: ``with mq.transaction() as tx: tx.send_message(q, data)``."""
        return Transaction(self)

    def ping(self) -> bool:
        """True when the server answers (within the retry bound)."""
        return self.driver.run(core.ping())

    def close(self) -> None:
        """Release the connection pool."""
        self.driver.close()

    def __enter__(self) -> MessageQueue:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


#: LeanMQ's name for :class:`MessageQueue`: ``LeanMQ(redis_host=..., prefix=...)`` works.
LeanMQ = MessageQueue
