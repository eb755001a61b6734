"""The queue layer: queue pairs (main + dead-letter) on Redis Streams.

The shape follows LeanMQ, which the seed's EventBus calls (``create_queue_pair``,
``send_message``, ``get_messages``, ``acknowledge_messages``, ``move_to_dlq``,
``get_queue``), with what it lacked: acknowledged messages leave the stream, crashed
consumers' messages are reclaimed after the visibility timeout, undecodable and
expired entries are dead-lettered with a reason, and every state change is one
atomic command or script.

Round trips: ``get_messages`` costs one script call (plus one blocking read when
it waits), ``send_messages`` one pipeline, ``acknowledge_messages`` one script call,
whatever the number of messages.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import redis

from . import codec
from .codec import Message
from .connection import Connection, is_nogroup, resolve_url
from .errors import InvalidNameError, QueueNotFoundError, RelaybusError, SerializationError
from .keys import DLQ_SUFFIX, GROUP, QueueKeys, registry_key, validate_name
from .scripts import Scripts

__all__ = ["MessageQueue", "LeanMQ", "Queue", "QueueInfo", "Transaction", "Message"]

logger = logging.getLogger("relaybus.queue")
T = TypeVar("T")

#: Visibility timeout of a new queue, in seconds.
DEFAULT_VISIBILITY_TIMEOUT = 30.0
#: Deliveries of one entry after which it is dead-lettered (a message that keeps
#: killing its consumers must not be redelivered forever).
DEFAULT_MAX_DELIVERIES = 10
#: How long, in seconds, a dedup key stays recorded after its message was acknowledged.
DEFAULT_DEDUP_WINDOW = 600.0
#: Longest time, in seconds, an idle blocking consumer goes without running the fetch
#: script (which reclaims a dead consumer's messages and promotes due retries); it is
#: also at most a quarter of the visibility timeout. Idle, a consumer sends one
#: blocking read per ``block_for_seconds`` and one script per this interval.
IDLE_RECHECK_MAX = 10.0
#: Longest single blocking read, in seconds (kept under the socket timeout).
_MAX_BLOCK = 5.0


@dataclass(frozen=True)
class QueueInfo:
    """A snapshot of one queue.

    ``message_count`` counts the entries in the stream; ``pending_messages`` those
    delivered but not yet acknowledged; ``waiting_messages`` those not yet delivered
    (the lag); ``oldest_waiting_age`` is the age in seconds of the oldest of those.
    """

    name: str
    is_dlq: bool
    message_count: int
    pending_messages: int
    waiting_messages: int
    consumer_group: str
    consumers: int
    created_at: float | None
    oldest_waiting_age: float | None
    visibility_timeout: float
    delayed_messages: int = 0
    dlq_messages: int = 0


def _ids(ids: str | Iterable[str]) -> list[str]:
    if isinstance(ids, str):
        return [ids]
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _id_order(stream_id: str) -> tuple[int, int]:
    """A stream id (``ms-seq``) as a tuple that sorts like the stream does."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class Queue:
    """One stream of a queue pair: the main queue or its dead-letter queue.

    Get queues from :meth:`MessageQueue.create_queue_pair` or
    :meth:`MessageQueue.get_queue`. Methods are thread-safe.
    """

    def __init__(self, mq: MessageQueue, name: str, *, is_dlq: bool = False,
                 visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
                 delete_on_ack: bool = True) -> None:
        self.mq = mq
        self.pair_name = name
        self.is_dlq = is_dlq
        self.name = name + DLQ_SUFFIX if is_dlq else name
        self.keys = QueueKeys(mq.prefix, name)
        self.key = self.keys.dlq if is_dlq else self.keys.stream
        self.visibility_timeout = float(visibility_timeout)
        #: Delete acknowledged entries (work queues); False keeps them (the event log).
        self.delete_on_ack = delete_on_ack
        self._claim_cursor = "0-0"
        self._quiet_until = 0.0  # monotonic; see _quiet()
        self._next_due: float | None = None  # earliest delayed retry the last fetch saw
        self._local_due: float | None = None  # earliest retry scheduled through this object

    def __repr__(self) -> str:
        return f"<Queue {self.name!r} key={self.key!r}>"

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
        sid = self.mq._call(lambda: self.mq.client.xadd(self.key, fields,  # type: ignore[arg-type]
                                                         id=message_id or "*"))
        return _text(sid)

    def send_messages(self, messages: Sequence[Mapping[str, Any]], *,
                      ttl: float | None = None) -> list[str]:
        """Append many messages in one round trip, all or none (one MULTI/EXEC).

        All are encoded before any is sent; when the server refuses one (out of
        memory), none is written.
        """
        encoded = [self.mq._encode(m, ttl=ttl) for m in messages]

        def run() -> list[Any]:
            pipe = self.mq.client.pipeline(transaction=True)
            for fields in encoded:
                pipe.xadd(self.key, fields)  # type: ignore[arg-type]
            return pipe.execute()

        return [_text(i) for i in self.mq._call(run)] if encoded else []

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
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive integer, not {count!r}")
        consumer = consumer_id or self.mq.consumer_id
        deadline = time.monotonic() + (block_for_seconds or 0.0)
        entries: list[tuple[Any, Any, int]]
        while True:
            if self._quiet(block_for_seconds):
                # nothing came last time: skip the reclaim/promote script and go straight
                # to the blocking read, until the next periodic check or a due retry
                entries, next_due = [], self._earliest_due()
            else:
                started = time.time()
                entries, next_due = self._fetch(consumer, count)
                self._next_due = next_due
                if self._local_due is not None and self._local_due <= started:
                    self._local_due = None  # that fetch promoted it
                next_due = self._earliest_due()
                # found nothing: blocking reads alone until the next periodic check
                self._quiet_until = 0.0 if entries else \
                    time.monotonic() + self._recheck_interval
            messages = self._screen(entries)
            if messages:
                return messages
            if entries:  # every one was dead-lettered: look again before reporting empty
                continue
            if block_for_seconds is None or block_for_seconds <= 0:
                return messages
            wait = deadline - time.monotonic()
            if next_due is not None:
                wait = min(wait, max(0.001, next_due - time.time()))
            if wait <= 0:
                return messages
            entries = self._block(consumer, count, min(wait, _MAX_BLOCK))
            if entries:
                self._quiet_until = 0.0
                messages = self._screen(self._drop_done(entries))
                if messages:
                    return messages
            if time.monotonic() >= deadline:
                return []

    @property
    def _recheck_interval(self) -> float:
        """Seconds an idle consumer goes without the fetch script (reclaim, promote)."""
        return max(0.05, min(self.visibility_timeout / 4, IDLE_RECHECK_MAX))

    def _earliest_due(self) -> float | None:
        dues = [d for d in (self._next_due, self._local_due) if d is not None]
        return min(dues) if dues else None

    def _quiet(self, block_for_seconds: float | None) -> bool:
        """True while a blocking consumer found nothing and no check or retry is due.

        Retries scheduled through this object are waited for exactly; those scheduled
        by other processes are seen at the next periodic check.
        """
        due = self._earliest_due()
        return bool(block_for_seconds) and time.monotonic() < self._quiet_until and (
            due is None or due > time.time())

    def _fetch(self, consumer: str, count: int) -> tuple[list[tuple[Any, Any, int]], float | None]:
        keys = [self.key, self.keys.delayed, self.keys.done]
        args = [GROUP, consumer, count, int(self.visibility_timeout * 1000),
                int(time.time() * 1000), 1, self._claim_cursor]
        res = self.mq._group_call(self, lambda: self.mq.scripts("fetch", keys, args))
        entries, gone, dups, next_due, cursor = res
        # resume the reclaim scan where it stopped, so entries behind many live leases
        # are reached too; the scan wraps to 0-0 once it has passed the end
        self._claim_cursor = _text(cursor)
        if gone:
            self.mq._count("gone", gone)
            logger.warning("queue %s: %d pending entries had lost their payload; acknowledged",
                           self.name, gone)
        if dups:
            self.mq._count("duplicates", dups)
            logger.info("queue %s: dropped %d already-handled duplicates", self.name, dups)
        due = float(next_due) / 1000 if int(next_due) >= 0 else None
        return [(e[0], e[1], int(e[2])) for e in entries], due

    def _block(self, consumer: str, count: int, wait: float) -> list[tuple[Any, Any, int]]:
        def run() -> Any:
            return self.mq.client.xreadgroup(GROUP, consumer, {self.key: ">"}, count=count,
                                             block=max(1, int(wait * 1000)))

        reply = self.mq._group_call(self, run)
        if not reply:
            return []
        # RESP2: [[stream, [(id, {fields})...]]]; RESP3: {stream: [[(id, fields)]]}
        streams = reply.values() if isinstance(reply, dict) else [s[1] for s in reply]
        out: list[tuple[Any, Any, int]] = []
        for stream_entries in streams:
            if stream_entries and isinstance(stream_entries[0], list) and \
                    stream_entries[0] and isinstance(stream_entries[0][0], (list, tuple)):
                stream_entries = stream_entries[0]
            out.extend((e[0], e[1], 1) for e in stream_entries)
        return out

    def _drop_done(self, entries: list[tuple[Any, Any, int]]) -> list[tuple[Any, Any, int]]:
        keyed = [(e, e[1].get(b"k")) for e in entries if isinstance(e[1], dict)]
        keyed = [(e, k) for e, k in keyed if k]
        if not keyed:
            return entries
        scores = self.mq._call(lambda: self.mq.client.zmscore(self.keys.done,
                                                              [_text(k) for _, k in keyed]))
        dup_ids = {_text(e[0]) for (e, _), s in zip(keyed, scores, strict=True) if s is not None}
        if not dup_ids:
            return entries
        self.delete_messages(dup_ids)
        self.mq._count("duplicates", len(dup_ids))
        return [e for e in entries if _text(e[0]) not in dup_ids]

    def _screen(self, entries: list[tuple[Any, Any, int]]) -> list[Message]:
        """Decode entries; dead-letter the malformed, expired and over-delivered."""
        good: list[Message] = []
        bad: dict[str, list[str]] = {}
        now = time.time()
        for entry_id, raw, deliveries in entries:
            try:
                msg = codec.decode_entry(entry_id, raw, deliveries, self.name)
            except SerializationError as exc:
                if self.is_dlq:  # nowhere further to send it: show it as it is
                    good.append(Message(_text(entry_id), {}, now, deliveries,
                                        failures=[{"reason": str(exc)}], queue=self.name))
                else:
                    bad.setdefault(str(exc), []).append(_text(entry_id))
                continue
            if not self.is_dlq and msg.is_expired(now):
                bad.setdefault("expired", []).append(msg.id)
            elif not self.is_dlq and msg.delivery_count > self.mq.max_deliveries:
                reason = (f"max deliveries exceeded: delivered {msg.delivery_count} times "
                          "without acknowledgement")
                bad.setdefault(reason, []).append(msg.id)
            else:
                good.append(msg)
        for reason, ids in bad.items():
            self.move_to_dlq(ids, reason)
            self.mq._count("dead_lettered", len(ids))
            logger.warning("queue %s: dead-lettered %d entries: %s", self.name, len(ids), reason)
        return good

    def peek(self, count: int = 10, start_id: str | None = None) -> list[Message]:
        """Read up to ``count`` messages from ``start_id`` on, without consuming them."""
        rows = self.mq._call(lambda: self.mq.client.xrange(self.key, min=start_id or "-",
                                                           count=count))
        return self._decode_rows(rows)

    def _decode_rows(self, rows: Iterable[Any]) -> list[Message]:
        """Decode read-only rows; an undecodable one is shown with its reason, not raised."""
        out = []
        for entry_id, raw in rows:
            try:
                out.append(codec.decode_entry(entry_id, raw, 0, self.name))
            except SerializationError as exc:
                out.append(Message(_text(entry_id), {}, 0.0, 0,
                                   failures=[{"reason": str(exc)}], queue=self.name))
        return out

    def follow(self, after_id: str = "$", *, count: int = 100,
               block_for_seconds: float | None = None) -> tuple[str, list[Message]]:
        """Read messages added after ``after_id`` without consuming them; for tailing.

        A plain XREAD: no consumer group is involved, so nothing is delivered, claimed
        or acknowledged. ``"$"`` means after the newest message now in the stream.
        Returns ``(cursor, messages)``; pass the cursor back to read on from there.
        When nothing is new, waits up to ``block_for_seconds`` (None or 0: do not wait;
        one call waits at most a few seconds so the socket never times out).
        """
        cursor = after_id
        if cursor == "$":
            last = self.mq._call(lambda: self.mq.client.xrevrange(self.key, count=1))
            cursor = _text(last[0][0]) if last else "0-0"
        block = None
        if block_for_seconds is not None and block_for_seconds > 0:
            block = max(1, int(min(block_for_seconds, _MAX_BLOCK) * 1000))
        reply = self.mq._call(lambda: self.mq.client.xread({self.key: cursor}, count=count,
                                                           block=block))
        if not reply:
            return cursor, []
        # RESP2: [[stream, [(id, {fields})...]]]; RESP3: {stream: [[(id, fields)...]]}
        rows: list[Any] = []
        for stream_rows in (reply.values() if isinstance(reply, dict) else [s[1] for s in reply]):
            if stream_rows and isinstance(stream_rows[0], list) and \
                    stream_rows[0] and isinstance(stream_rows[0][0], (list, tuple)):
                stream_rows = stream_rows[0]
            rows.extend(stream_rows)
        messages = self._decode_rows(rows)
        return (messages[-1].id if messages else cursor), messages

    # -- settling -----------------------------------------------------------------

    def acknowledge_messages(self, ids: str | Iterable[str], *,
                             record_done: Iterable[str] = ()) -> int:
        """Acknowledge messages; return how many were pending.

        Acknowledged messages leave the stream (except on the event log, which keeps
        them for its retention). The keys in ``record_done`` are recorded, in the same
        atomic step, as handled for the dedup window: later messages carrying one of
        them as ``dedup_key`` are dropped instead of delivered.
        """
        id_list = _ids(ids)
        # an event id read from a payload may hold a lone surrogate, which strict UTF-8
        # refuses: the acknowledgement would fail and the event be handled again
        done = [k.encode("utf-8", "surrogatepass") if isinstance(k, str) else k
                for k in record_done]
        if not id_list and not done:
            return 0
        args = [GROUP, "1" if self.delete_on_ack else "0", int(time.time() * 1000),
                int(self.mq.dedup_window * 1000), len(id_list), *id_list, *done]
        keys = [self.key, self.keys.done]
        return int(self.mq._call(lambda: self.mq.scripts("ack", keys, args)))

    def move_to_dlq(self, ids: str | Iterable[str], reason: str, dlq: Queue | None = None,
                    *, details: Mapping[str, Any] | None = None) -> int:
        """Move messages to the dead-letter queue atomically; return how many moved.

        The DLQ entry keeps the payload and headers and gains a failure record
        (``reason``, ``timestamp``, ``queue``, ``message_id``, ``attempt`` and
        ``details``). ``dlq`` defaults to this queue's own DLQ.
        """
        id_list = _ids(ids)
        if not id_list:
            return 0
        target = dlq.key if dlq is not None else self.keys.dlq
        record = self._record(reason, details)
        args = [GROUP, record, "", *id_list]
        return int(self.mq._call(lambda: self.mq.scripts("dead_letter", [self.key, target], args)))

    def schedule_retry(self, ids: str | Iterable[str], delay: float, reason: str, *,
                       details: Mapping[str, Any] | None = None) -> int:
        """Take messages out of the stream and re-deliver them after ``delay`` seconds.

        Atomic per message: the entry leaves the stream and waits in the queue's
        delayed set with a failure record added; it comes back through
        :meth:`get_messages` once due. Returns how many were scheduled.
        """
        id_list = _ids(ids)
        if not id_list:
            return 0
        due = int((time.time() + max(0.0, delay)) * 1000)
        if self._local_due is None or due / 1000 < self._local_due:
            self._local_due = due / 1000  # a consumer of this object wakes up for it
        args = [GROUP, self._record(reason, details), due, *id_list]
        keys = [self.key, self.keys.delayed]
        return int(self.mq._call(lambda: self.mq.scripts("dead_letter", keys, args)))

    def _record(self, reason: str, details: Mapping[str, Any] | None) -> str:
        record: dict[str, Any] = {"reason": str(reason), "timestamp": time.time(),
                                  "queue": self.name}
        if details:
            record.update(details)
        return codec.dumps(record, lossy=True)  # the scripts decode it with cjson

    def requeue_messages(self, ids: str | Iterable[str], destination: Queue | None = None) -> int:
        """Move messages (usually from a DLQ) to ``destination`` atomically, history kept.

        ``destination`` defaults to the main queue of this queue's pair. Returns how
        many moved; ids that are not in this queue are skipped.
        """
        id_list = _ids(ids)
        if not id_list:
            return 0
        dest = destination.key if destination is not None else self.keys.stream
        return int(self.mq._call(lambda: self.mq.scripts("requeue", [self.key, dest],
                                                         [GROUP, *id_list])))

    def requeue_where(self, predicate: Callable[[Message], bool] | None = None,
                      destination: Queue | None = None, *, batch_size: int = 500) -> int:
        """Requeue every message that ``predicate`` accepts (all when None); return how many.

        Scans this queue (usually a DLQ) page by page with :meth:`peek`, so nothing is
        consumed, and moves each page's matches with :meth:`requeue_messages`: each page
        moves atomically, the whole scan does not. Messages that arrive after the call
        started are left alone, so a requeued message that fails again is not looped.
        """
        last = self.mq._call(lambda: self.mq.client.xrevrange(self.key, count=1))
        if not last:
            return 0
        end = _id_order(_text(last[0][0]))
        start, moved = "-", 0
        while True:
            page = self.peek(count=batch_size, start_id=start)
            in_range = [m for m in page if _id_order(m.id) <= end]
            chosen = [m.id for m in in_range if predicate is None or predicate(m)]
            if chosen:
                moved += self.requeue_messages(chosen, destination)
            if len(page) < batch_size or len(in_range) < len(page):
                return moved
            start = "(" + page[-1].id

    def extend_lease(self, ids: str | Iterable[str], consumer_id: str | None = None) -> int:
        """Reset the idle time of messages this consumer still holds; return how many.

        A worker calls this while handlers run, so that only a dead consumer's messages
        pass the visibility timeout and are taken over. Messages another consumer has
        already taken over are left alone.
        """
        id_list = _ids(ids)
        if not id_list:
            return 0
        args = [GROUP, consumer_id or self.mq.consumer_id, *id_list]
        return int(self.mq._call(lambda: self.mq.scripts("extend", [self.key], args)))

    def release(self, ids: str | Iterable[str], consumer_id: str | None = None) -> tuple[int, bool]:
        """Hand back messages this consumer fetched but will not handle; forget it if idle.

        The messages become reclaimable at once by any other consumer's next
        :meth:`get_messages` (their delivery count is unchanged), instead of after the
        visibility timeout. Then, if the consumer holds no message at all, it is removed
        from the group. Returns ``(messages released, consumer removed)``.
        """
        id_list = _ids(ids)
        idle_ms = int(self.visibility_timeout * 1000) + 1
        args = [GROUP, consumer_id or self.mq.consumer_id, idle_ms, *id_list]
        released, deleted = self.mq._call(lambda: self.mq.scripts("release", [self.key], args))
        return int(released), bool(deleted)

    def delete_messages(self, ids: str | Iterable[str]) -> int:
        """Delete messages (pending or not) without dead-lettering; return how many."""
        id_list = _ids(ids)
        if not id_list:
            return 0

        def run() -> list[Any]:
            pipe = self.mq.client.pipeline(transaction=True)
            pipe.xack(self.key, GROUP, *id_list)
            pipe.xdel(self.key, *id_list)
            return pipe.execute()

        return int(self.mq._call(run)[1])

    def purge(self) -> int:
        """Remove every message (waiting, pending and delayed retries); return how many."""
        def run() -> list[Any]:
            pipe = self.mq.client.pipeline(transaction=True)
            pipe.xlen(self.key)
            pipe.delete(self.key)
            pipe.xgroup_create(self.key, GROUP, id="0", mkstream=True)
            if not self.is_dlq:
                pipe.zcard(self.keys.delayed)
                pipe.delete(self.keys.delayed)
            return pipe.execute()

        res = self.mq._call(run)
        return int(res[0]) + (int(res[3]) if not self.is_dlq else 0)

    # -- inspecting ---------------------------------------------------------------

    def get_info(self) -> QueueInfo:
        """A :class:`QueueInfo` snapshot (two round trips)."""
        return self.mq._infos([self])[0]


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

        def run() -> list[Any]:
            pipe = self._mq.client.pipeline(transaction=True)
            for key, fields in self._pending:
                pipe.xadd(key, fields)  # type: ignore[arg-type]
            return pipe.execute()

        self.ids = [_text(i) for i in self._mq._call(run)]
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


class MessageQueue:
    """A connection to a server and the queue pairs under one key prefix.

    ``url`` takes ``redis://``, ``rediss://``, ``unix://`` or ``embedded[:///dir]``;
    without it, ``RELAYBUS_URL`` wins over ``redis_host``/``redis_port``/``redis_db``.
    ``consumer_id`` names this consumer (default: unique per process). Connecting is
    lazy; operations retry an unreachable server for ``retry_timeout`` seconds, then
    raise :class:`BrokerUnavailableError`. Thread-safe; usable as a context manager.
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
        client: redis.Redis | None = None,
    ) -> None:
        if not isinstance(prefix, str) or any(c in "{}" or c.isspace() for c in prefix):
            raise InvalidNameError(f"prefix {prefix!r} must be a string without braces or spaces")
        self.prefix = prefix
        resolved = "client" if client is not None else resolve_url(
            url, redis_host=redis_host, redis_port=redis_port, redis_db=redis_db,
            redis_password=redis_password)
        kwargs: dict[str, Any] = {}
        if retry_timeout is not None:
            kwargs["retry_timeout"] = retry_timeout
        self.connection = Connection(resolved, client=client, **kwargs)
        self.client: redis.Redis = self.connection.client
        self.scripts = Scripts(self.client)
        self.max_message_size = int(max_message_size)
        self.max_deliveries = int(max_deliveries)
        self.dedup_window = float(dedup_window)
        self._consumer_id = consumer_id
        self._consumer_pid = -1
        self._generated_id = ""
        #: Counters of what the queue layer handled on its own (gone, duplicates, ...).
        self.stats: dict[str, int] = {}

    # -- plumbing ---------------------------------------------------------------

    @property
    def consumer_id(self) -> str:
        """This process's consumer name: given, or ``host-pid-random`` (new after fork)."""
        if self._consumer_id:
            return self._consumer_id
        if self._consumer_pid != os.getpid():
            self._consumer_pid = os.getpid()
            self._generated_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        return self._generated_id

    def _count(self, what: str, n: int = 1) -> None:
        self.stats[what] = self.stats.get(what, 0) + n

    def _call(self, fn: Any) -> Any:
        try:
            return self.connection.call(fn)
        except redis.ResponseError as exc:
            if is_nogroup(exc):
                raise
            raise RelaybusError(f"server error: {exc}") from exc

    def _group_call(self, queue: Queue, fn: Any) -> Any:
        """Run ``fn``; if the group vanished (FLUSHALL, restart without data), recreate it."""
        try:
            return self._call(fn)
        except redis.ResponseError as exc:
            if not is_nogroup(exc):
                raise
            self._count("groups_recreated")
            logger.warning("queue %s: consumer group missing (server flushed or restarted "
                           "empty?); recreating it", queue.name)
            self._ensure_group(queue.key)
            if not queue.is_dlq:
                self._ensure_pair_meta(queue.pair_name, None)
            return self._call(fn)

    def _ensure_group(self, key: str) -> None:
        try:
            self._call(lambda: self.client.xgroup_create(key, GROUP, id="0", mkstream=True))
        except RelaybusError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _encode(self, data: Mapping[str, Any], *, ttl: float | None = None,
                headers: Mapping[str, str] | None = None, dedup_key: str | None = None,
                routing_key: str | None = None) -> dict[str, str | int]:
        return codec.encode_entry(data, now=time.time(), headers=headers, ttl=ttl,
                                  dedup_key=dedup_key, routing_key=routing_key,
                                  max_size=self.max_message_size)

    def _ensure_pair_meta(self, name: str, visibility_timeout: float | None) -> float:
        keys = QueueKeys(self.prefix, name)

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.hsetnx(keys.meta, "created_at", repr(time.time()))
            if visibility_timeout is not None:
                pipe.hset(keys.meta, "visibility_timeout", repr(float(visibility_timeout)))
            else:
                pipe.hsetnx(keys.meta, "visibility_timeout", repr(DEFAULT_VISIBILITY_TIMEOUT))
            pipe.sadd(registry_key(self.prefix), name)
            pipe.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
            pipe.xgroup_create(keys.dlq, GROUP, id="0", mkstream=True)
            pipe.hget(keys.meta, "visibility_timeout")
            return pipe.execute(raise_on_error=False)

        res = self._call(run)
        for r in res:
            if isinstance(r, Exception) and "BUSYGROUP" not in str(r):
                raise RelaybusError(f"creating queue {name!r}: {r}")
        return float(res[-1])

    # -- queue pairs ------------------------------------------------------------

    def create_queue_pair(self, name: str, *, visibility_timeout: float | None = None,
                          ) -> tuple[Queue, Queue]:
        """Create (or open) the queue ``name`` and its DLQ; return ``(queue, dlq)``.

        Idempotent. ``visibility_timeout`` (seconds), when given, updates the stored
        setting; otherwise the stored one applies (30 s for a new queue).
        """
        validate_name(name)
        if visibility_timeout is not None and not visibility_timeout > 0:
            raise ValueError("visibility_timeout must be a positive number of seconds")
        vt = self._ensure_pair_meta(name, visibility_timeout)
        return (Queue(self, name, visibility_timeout=vt),
                Queue(self, name, is_dlq=True, visibility_timeout=vt))

    def _settings(self, name: str) -> float | None:
        raw = self._call(lambda: self.client.hget(QueueKeys(self.prefix, name).meta,
                                                  "visibility_timeout"))
        return float(raw) if raw is not None else None

    def get_queue(self, name: str) -> Queue | None:
        """The queue ``name`` (a ``NAME:dlq`` name gives a DLQ), or None if it does not exist."""
        if isinstance(name, str) and name.endswith(DLQ_SUFFIX):
            return self.get_dead_letter_queue(name[: -len(DLQ_SUFFIX)])
        validate_name(name)
        vt = self._settings(name)
        return Queue(self, name, visibility_timeout=vt) if vt is not None else None

    def get_dead_letter_queue(self, name: str) -> Queue | None:
        """The DLQ of queue ``name``, or None if the queue does not exist."""
        validate_name(name)
        vt = self._settings(name)
        return Queue(self, name, is_dlq=True, visibility_timeout=vt) if vt is not None else None

    def require_queue(self, name: str) -> Queue:
        """Like :meth:`get_queue` but raises :class:`QueueNotFoundError`."""
        queue = self.get_queue(name)
        if queue is None:
            raise QueueNotFoundError(f"no queue named {name!r} under prefix {self.prefix!r}")
        return queue

    def queue_names(self) -> list[str]:
        """Names of every queue pair under this prefix, sorted."""
        names = self._call(lambda: self.client.smembers(registry_key(self.prefix)))
        return sorted(_text(n) for n in names)

    def list_queues(self) -> list[QueueInfo]:
        """Info on every queue under this prefix, main queues and DLQs (constant round trips)."""
        queues: list[Queue] = []
        for name in self.queue_names():
            queues += [Queue(self, name), Queue(self, name, is_dlq=True)]
        return self._infos(queues)

    def entries_added(self, names: Iterable[str]) -> dict[str, int | None]:
        """How many entries each named queue (``NAME`` or ``NAME:dlq``) ever received.

        XINFO STREAM's ``entries-added`` (Redis >= 7.0), in one round trip; None for a
        stream that does not exist or a server that does not count. Rates come from the
        difference between two calls (``relaybus top``).
        """
        pairs = []
        for name in names:
            base = name[: -len(DLQ_SUFFIX)] if name.endswith(DLQ_SUFFIX) else name
            keys = QueueKeys(self.prefix, base)
            pairs.append((name, keys.dlq if name.endswith(DLQ_SUFFIX) else keys.stream))
        if not pairs:
            return {}

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for _, key in pairs:
                pipe.xinfo_stream(key)
            return pipe.execute(raise_on_error=False)

        out: dict[str, int | None] = {}
        for (name, _), info in zip(pairs, self._call(run), strict=True):
            added = info.get("entries-added") if isinstance(info, dict) else None
            out[name] = int(added) if added is not None else None
        return out

    def _infos(self, queues: list[Queue]) -> list[QueueInfo]:
        if not queues:
            return []

        def first() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for q in queues:
                pipe.xlen(q.key)
                pipe.xinfo_groups(q.key)
                pipe.hgetall(q.keys.meta)
                pipe.zcard(q.keys.delayed)
                pipe.xlen(q.keys.dlq)
            return pipe.execute(raise_on_error=False)

        res = self._call(first)
        rows = []
        for i, q in enumerate(queues):
            xlen, groups, meta, delayed, dlq_len = res[5 * i: 5 * i + 5]
            group: dict[str, Any] = {}
            if isinstance(groups, list):
                for g in groups:
                    if _text(g.get("name", b"")) == GROUP:
                        group = g
            rows.append((q, xlen if isinstance(xlen, int) else 0, group,
                         meta if isinstance(meta, dict) else {}, delayed, dlq_len))

        def second() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for q, _, group, *_ in rows:
                last = _text(group.get("last-delivered-id", b"0-0")) if group else "0-0"
                pipe.xrange(q.key, min="(" + last, count=1)
            return pipe.execute(raise_on_error=False)

        oldest = self._call(second)
        now = time.time()
        out = []
        for (q, xlen, group, meta, delayed, dlq_len), first_waiting in zip(rows, oldest, strict=True):
            pending = int(group.get("pending", 0)) if group else 0
            lag = group.get("lag") if group else None
            if lag is None:
                lag = max(0, xlen - pending) if q.delete_on_ack else 0
            age = None
            if isinstance(first_waiting, list) and first_waiting:
                age = max(0.0, now - int(_text(first_waiting[0][0]).split("-")[0]) / 1000)
            created = meta.get(b"created_at")
            vt = meta.get(b"visibility_timeout")
            out.append(QueueInfo(
                name=q.name, is_dlq=q.is_dlq, message_count=xlen, pending_messages=pending,
                waiting_messages=int(lag), consumer_group=GROUP,
                consumers=int(group.get("consumers", 0)) if group else 0,
                created_at=float(created) if created else None, oldest_waiting_age=age,
                visibility_timeout=float(vt) if vt else DEFAULT_VISIBILITY_TIMEOUT,
                delayed_messages=0 if q.is_dlq else int(delayed or 0),
                dlq_messages=0 if q.is_dlq else int(dlq_len or 0),
            ))
        return out

    def delete_queue(self, name: str, delete_dlq: bool = True) -> bool:
        """Delete the queue pair ``name`` (and its DLQ unless ``delete_dlq`` is False)."""
        validate_name(name)
        keys = QueueKeys(self.prefix, name)
        doomed = [k for k in keys.all() if delete_dlq or k != keys.dlq]

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(*doomed)
            pipe.srem(registry_key(self.prefix), name)
            return pipe.execute()

        return bool(self._call(run)[0])

    def transaction(self) -> Transaction:
        """A :class:`Transaction`: ``with mq.transaction() as tx: tx.send_message(q, data)``."""
        return Transaction(self)

    def ping(self) -> bool:
        """True when the server answers (within the retry bound)."""
        return bool(self._call(self.client.ping))

    def close(self) -> None:
        """Release the connection pool."""
        self.connection.close()

    def __enter__(self) -> MessageQueue:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


#: The seed's name for :class:`MessageQueue`: ``LeanMQ(redis_host=..., prefix=...)`` works.
LeanMQ = MessageQueue
