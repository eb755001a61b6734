"""The EventBus: typed publishing, shared durable subscriptions, and routing.

How an event travels::

    publish(event) --XADD--> P{all}                 the event log (queue pair "all")
                               | router group: competing consumers, any process
                               v
                  route a batch, three round trips whatever its size:
                  1. fetch: reclaim a dead router's entries + read new ones, and read
                     the subscription table (one pipeline)
                  2. copy: one route.lua call per subscription queue, each copying an
                     event id at most once per dedup window (sent back to back: the
                     server runs one call while the client builds the next)
                  3. settle, only once every copy succeeded: acknowledge in the log
                     (kept there for retention), dead-letter the unroutable (one pipeline)

Subscriptions live in Redis (hash ``Psubscriptions``), so every EventBus on the same
server and prefix routes by the same table, in any process. Routing needs no event
classes: it reads the event type from the entry's routing field (``e``), and parses the
JSON payload only for an entry without one. Every started EventBus runs one router
thread; any number of them route concurrently, and a router killed mid-batch has its
events taken over by another after ``visibility_timeout``; the dedup set makes the
second routing of a batch add no copy.

Scripts go out as EVAL (the server caches them by hash), not EVALSHA: redis-py checks
a pipeline's scripts with an extra SCRIPT EXISTS round trip, and a NOSCRIPT reply in
the middle of a batch would need a retry path of its own.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from types import TracebackType
from typing import Any, NamedTuple

import redis

from .errors import (
    BrokerError,
    BrokerOutOfMemoryError,
    BrokerUnavailableError,
    EventValidationError,
    InvalidNameError,
    RelaybusError,
)
from .events import Event, event_type_name, serialize_event
from .keys import GROUP, MAX_NAME_LENGTH, QueueKeys, subscriptions_key, validate_name
from .queue import _MAX_BLOCK, DEFAULT_DEDUP_WINDOW, IDLE_RECHECK_MAX, MessageQueue, Queue
from .scripts import source

__all__ = ["EventBus", "ALL_EVENTS", "EVENTS_QUEUE", "read_subscriptions",
           "subscription_queue_name"]

logger = logging.getLogger("relaybus.bus")

#: Queue pair holding the event log.
EVENTS_QUEUE = "all"
#: Marker stored for a subscription to every event type.
ALL_EVENTS = "*"
#: Events the log keeps after routing (0: no count limit).
DEFAULT_RETENTION_MAX_LEN = 100_000
#: Seconds the log keeps routed events (None: no age limit).
DEFAULT_RETENTION_SECONDS: float | None = 24 * 3600.0
#: Events a router takes per batch.
DEFAULT_BATCH_SIZE = 500
#: Seconds between two retention trims of the log by a router.
TRIM_INTERVAL = 5.0
#: Longest blocking read of the router loop, in seconds: an idle router sends one
#: command per period (plus a reclaim check every quarter visibility timeout, 10 s at
#: most); stopping may wait this long.
ROUTER_BLOCK_FOR_SECONDS = 2.0
#: Longest pause, in seconds, between two attempts of a failing router.
MAX_BACKOFF = 5.0


def subscription_queue_name(service_name: str) -> str:
    """The queue-pair name of a service's subscription: ``sub:<service_name>``.

    Raises InvalidNameError for a name :func:`~relaybus.keys.validate_name` refuses,
    or one too long to leave room for the ``sub:`` in front of it.
    """
    name = validate_name(service_name, "service name")
    if len(name) > MAX_NAME_LENGTH - len("sub:"):
        raise InvalidNameError(f"service name is {len(name)} characters; the limit is "
                               f"{MAX_NAME_LENGTH - len('sub:')} (its queue is 'sub:<name>')")
    return f"sub:{name}"


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _parse_subscriptions(raw: Mapping[Any, Any]) -> dict[str, list[str]]:
    """The subscriptions hash as ``{service: [types]}``, sorted by service."""
    out: dict[str, list[str]] = {}
    for name, value in raw.items():
        try:
            types = json.loads(value)
        except ValueError:
            types = []
        out[_text(name)] = [str(t) for t in types] if isinstance(types, list) else []
    return dict(sorted(out.items()))


def read_subscriptions(mq: MessageQueue) -> dict[str, list[str]]:
    """Every subscription under ``mq``'s prefix, as :meth:`EventBus.subscriptions` gives it.

    For readers that must not construct an :class:`EventBus` (which creates the event
    log and rewrites its stored visibility timeout), such as ``relaybus subscriptions``.
    """
    return _parse_subscriptions(mq._call(lambda: mq.client.hgetall(subscriptions_key(mq.prefix))))


class _Entry(NamedTuple):
    """A routable log entry, kept as the server sent it (no payload decoding)."""

    id: bytes
    event_type: bytes
    #: This event's part of route.lua's ARGV: event id, then N and N fields, or 0 and
    #: the values of publish's d, t, e (see route.lua).
    chunk: tuple[Any, ...]


def _screen(entries: Iterable[Sequence[Any]], now_ms: int, max_deliveries: int
            ) -> tuple[list[_Entry], dict[str, list[bytes]]]:
    """Sort fetched entries into routable ones and ``{reason: ids}`` to dead-letter (pure).

    ``entries`` are ``(id, fields, deliveries)`` with ``fields`` a flat ``[k, v, ...]``
    list or a dict. An entry written by :meth:`EventBus.publish` carries its type and
    event id as fields, so its JSON payload is not parsed here: validating it is the
    receiving service's job. Others are parsed to find ``event_type`` and
    ``event_id``; undecodable ones are "malformed", typeless ones "unroutable".
    """
    good: list[_Entry] = []
    bad: dict[str, list[bytes]] = {}
    for entry_id, raw, deliveries in entries:
        if type(raw) is list and len(raw) == 8 and raw[0] == b"d" and raw[2] == b"t" \
                and raw[4] == b"k" and raw[6] == b"e" and raw[5] and raw[7] \
                and int(deliveries) <= max_deliveries:  # as publish writes it: no parsing
            good.append(_Entry(entry_id, raw[7], (raw[5], 0, raw[1], raw[3], raw[7])))
            continue
        checked = _screen_one(entry_id, raw, int(deliveries), now_ms, max_deliveries)
        if isinstance(checked, str):
            bad.setdefault(checked, []).append(entry_id)
        else:
            good.append(checked)
    return good, bad


def _screen_one(entry_id: bytes, raw: Any, deliveries: int, now_ms: int,
                max_deliveries: int) -> _Entry | str:
    """One entry of another shape than publish's: the entry, or why it cannot be routed."""
    pairs = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=False)
    fields: dict[bytes, Any] = {(k.encode() if isinstance(k, str) else k): v for k, v in pairs}
    if deliveries > max_deliveries:
        return f"max deliveries exceeded: delivered {deliveries} times without acknowledgement"
    if b"x" in fields:
        try:
            if int(fields[b"x"]) <= now_ms:
                return "expired"
        except (TypeError, ValueError):
            return f"malformed entry {_text(entry_id)}: bad expiry {fields[b'x']!r}"
    payload = fields.get(b"d")
    if payload is None:
        return f"malformed entry {_text(entry_id)}: no payload field 'd'"
    etype, event_id = fields.get(b"e"), fields.get(b"k")
    if not etype or not event_id:
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError) as exc:
            return f"malformed entry {_text(entry_id)}: {exc}"
        if not isinstance(data, dict):
            return f"malformed entry {_text(entry_id)}: payload is not a JSON object"
        if not etype:
            found = data.get("event_type")
            if not isinstance(found, str) or not found:
                return "unroutable: entry has no event_type"
            etype = found
        if not event_id:
            found_id = data.get("event_id")
            event_id = str(found_id) if found_id not in (None, "") else entry_id
    # _plan matches bytes; text from JSON may hold lone surrogates, which strict UTF-8
    # refuses (the whole batch would fail): keep them as they are
    etype = etype.encode("utf-8", "surrogatepass") if isinstance(etype, str) else etype
    if isinstance(event_id, str):
        event_id = event_id.encode("utf-8", "surrogatepass")
    flat = [x for kv in fields.items() for x in kv]
    if flat[0::2] == [b"d", b"t", b"k", b"e"]:
        return _Entry(entry_id, etype, (event_id, 0, flat[1], flat[3], flat[7]))
    return _Entry(entry_id, etype, (event_id, len(flat), *flat))


def _take_connection(pool: Any) -> Any:
    """A connection of the pool for our own use (release it after)."""
    try:
        return pool.get_connection()
    except TypeError:  # redis-py < 5.3 wants a command name
        return pool.get_connection("EVAL")


def _plan(entries: Sequence[_Entry], table: Mapping[str, Sequence[str]]
          ) -> tuple[dict[str, list[_Entry]], list[_Entry]]:
    """Decide where each event goes (pure): ``(per-queue copies, unrouted)``.

    ``table`` maps a subscription queue name to its event types (``*`` for all). A
    queue matching an event twice (its type and ``*``) gets one copy.
    """
    wildcard = {q for q, types in table.items() if ALL_EVENTS in types}
    by_type: dict[bytes, set[str]] = {}
    for q, types in table.items():
        for t in types:
            if t != ALL_EVENTS:
                by_type.setdefault(t.encode(), set()).add(q)
    targets: dict[bytes, list[str]] = {}
    copies: dict[str, list[_Entry]] = {}
    unrouted: list[_Entry] = []
    for entry in entries:
        queues = targets.get(entry.event_type)
        if queues is None:
            queues = targets[entry.event_type] = sorted(
                by_type.get(entry.event_type, set()) | wildcard)
        if not queues:
            unrouted.append(entry)
        for q in queues:
            copies.setdefault(q, []).append(entry)
    return copies, unrouted


class EventBus:
    """Central event bus for publishing and subscribing to events.

    ``EventBus(redis_host=..., redis_port=..., redis_db=..., prefix="events:")`` as in
    the seed, or ``EventBus(url)``. Publishing works without :meth:`start`; a started
    bus also routes (one background thread), and :meth:`run` routes in the calling
    thread. Thread-safe; a context manager.

    ``visibility_timeout``: seconds before another router takes over a batch a dead
    router held. ``dedup_window``: seconds during which an event id is copied into a
    subscription at most once (re-publishing the same event is suppressed); it must
    be longer than ``visibility_timeout`` for a taken-over batch to add no copy.
    ``retention_max_len`` / ``retention_seconds``: how much routed history the log
    keeps for inspection and replay; unrouted events are never trimmed.
    ``batch_size``: events a router takes per round. Other keyword arguments go to
    :class:`~relaybus.queue.MessageQueue` (``retry_timeout``, ``consumer_id``, ``client``).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        redis_host: str = "localhost",
        redis_port: int = 6379,
        redis_db: int = 0,
        redis_password: str | None = None,
        prefix: str = "events:",
        visibility_timeout: float = 30.0,
        dedup_window: float = DEFAULT_DEDUP_WINDOW,
        retention_max_len: int = DEFAULT_RETENTION_MAX_LEN,
        retention_seconds: float | None = DEFAULT_RETENTION_SECONDS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        mq: MessageQueue | None = None,
        **mq_options: Any,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        self.mq = mq or MessageQueue(url, redis_host=redis_host, redis_port=redis_port,
                                     redis_db=redis_db, redis_password=redis_password,
                                     prefix=prefix, dedup_window=dedup_window, **mq_options)
        self._owns_mq = mq is None
        self.prefix = self.mq.prefix
        self.visibility_timeout = float(visibility_timeout)
        self.dedup_window = float(dedup_window)
        self.retention_max_len = int(retention_max_len)
        self.retention_seconds = retention_seconds
        self.batch_size = batch_size
        #: Seconds between two automatic retention trims by this bus's router.
        self.trim_interval = TRIM_INTERVAL
        if self.dedup_window < self.visibility_timeout:
            logger.warning("dedup_window (%gs) is shorter than visibility_timeout (%gs): a "
                           "batch taken over from a dead router may be copied twice",
                           self.dedup_window, self.visibility_timeout)
        self.events_queue, self.events_dlq = self.mq.create_queue_pair(
            EVENTS_QUEUE, visibility_timeout=visibility_timeout)
        self.events_queue.delete_on_ack = False
        self._stats_key = QueueKeys(self.prefix, EVENTS_QUEUE).tag + ":stats"
        self._subs_key = subscriptions_key(self.prefix)
        self.running = False
        self.processor_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_trim = 0.0
        self._claim_cursor = "0-0"  # where the next reclaim scan of the log's pending list starts
        self._interrupted: list[Any] = []  # a batch a broker failure stopped half-way
        # an idle router blocks on new events and runs the fetch script (which takes over
        # a dead router's batches) only every _recheck seconds
        self._quiet_until = 0.0
        self._recheck = max(0.05, min(self.visibility_timeout / 4, IDLE_RECHECK_MAX))
        self._routed_since_trim = True
        #: What this bus's router did: routed, copies, unrouted, dead_lettered, batches,
        #: errors (failed rounds; during an outage one per attempt).
        self.stats: dict[str, int] = {}

    # -- publishing ---------------------------------------------------------------

    def _fields(self, event: Event) -> dict[str, str | int]:
        if not isinstance(event, Event):
            raise TypeError(f"publish takes an Event, not {type(event).__name__}")
        return self.mq._encode(serialize_event(event), dedup_key=event.event_id,
                               routing_key=event.event_type)

    def _append(self, fields: dict[str, str | int]) -> str:
        msg_id = self.mq._call(lambda: self.mq.client.xadd(self.events_queue.key,
                                                           fields))  # type: ignore[arg-type]
        return _text(msg_id)

    def publish(self, event: Event) -> str:
        """Publish an event; return its id in the event log.

        Validation happened when the event was built. Publishing the same event (same
        ``event_id``) again within ``dedup_window`` reaches each subscriber once.
        """
        msg_id = self._append(self._fields(event))
        logger.debug("published %s %s as %s", event.event_type, event.event_id, msg_id)
        return msg_id

    def publish_many(self, events: Iterable[Event]) -> list[str]:
        """Publish several events in one round trip, all or none.

        All are encoded before any is sent, and written in one MULTI/EXEC: when the
        server refuses one (out of memory), none is written.
        """
        encoded = [self._fields(e) for e in events]
        if not encoded:
            return []

        def run() -> list[Any]:
            pipe = self.mq.client.pipeline(transaction=True)
            for fields in encoded:
                pipe.xadd(self.events_queue.key, fields)  # type: ignore[arg-type]
            return pipe.execute()

        return [_text(i) for i in self.mq._call(run)]

    def publish_raw(self, event_type: str, data: Mapping[str, Any]) -> str:
        """Publish ``data`` as an event of ``event_type`` with no event class; return its log id.

        For tools and bridges that have no class for the type (``relaybus publish``).
        ``event_id`` (a new uuid4) and ``timestamp`` (now) are filled in when absent; an
        ``event_type`` in ``data`` must equal ``event_type``. The fields are not validated
        here: a subscriber with a class for the type validates them on receipt and
        dead-letters what does not fit. Deduplicated by ``event_id`` like :meth:`publish`.
        """
        payload = dict(data)
        given = payload.setdefault("event_type", event_type)
        if not isinstance(event_type, str) or not event_type or given != event_type:
            msg = (f"event_type {given!r} does not match {event_type!r}" if event_type
                   else "event_type must be a non-empty string")
            raise EventValidationError(str(event_type), [{
                "type": "event_type_mismatch", "loc": ("event_type",), "msg": msg,
                "input": given}])
        payload.setdefault("event_id", str(uuid.uuid4()))
        payload.setdefault("timestamp", time.time())
        return self._append(self.mq._encode(payload, dedup_key=str(payload["event_id"]),
                                            routing_key=event_type))

    # -- subscriptions --------------------------------------------------------------

    def subscribe(self, service_name: str,
                  event_types: Iterable[str | type[Event]] | str | type[Event] | None = None,
                  *, visibility_timeout: float | None = None) -> str:
        """Subscribe a service to event types (None: every type, including later ones).

        ``event_types`` takes type names and :class:`Event` classes (or one of either).
        Creates the subscription queue pair ``sub:<service_name>`` and records the
        subscription in Redis, where every EventBus on this prefix sees it. Calling it
        again replaces the service's types. Returns the subscription queue name.
        """
        queue_name = subscription_queue_name(service_name)
        if event_types is None:
            types = [ALL_EVENTS]
        elif isinstance(event_types, (str, type)):
            types = [event_type_name(event_types)]
        else:
            types = sorted({event_type_name(t) for t in event_types})
        if not types:
            raise ValueError("event_types is empty: pass None to subscribe to every type")
        self.mq.create_queue_pair(queue_name, visibility_timeout=visibility_timeout)
        self.mq._call(lambda: self.mq.client.hset(self._subs_key, service_name,
                                                  json.dumps(types)))
        logger.info("service %r subscribed to %s", service_name,
                    "all events" if types == [ALL_EVENTS] else ", ".join(types))
        return queue_name

    def unsubscribe(self, service_name: str) -> bool:
        """Stop routing to a service (its queue and what waits there are kept)."""
        validate_name(service_name, "service name")
        return bool(self.mq._call(lambda: self.mq.client.hdel(self._subs_key, service_name)))

    def subscriptions(self) -> dict[str, list[str]]:
        """Every subscription under this prefix: service name -> event types (``*`` = all)."""
        return read_subscriptions(self.mq)

    def subscription_queue(self, service_name: str) -> tuple[Queue, Queue]:
        """The (queue, dlq) of a service's subscription (created if missing)."""
        return self.mq.create_queue_pair(subscription_queue_name(service_name))

    # -- routing --------------------------------------------------------------------

    def route_once(self, block_for_seconds: float | None = None) -> int:
        """Route one batch from the log; return how many log entries it settled.

        Every entry ends acknowledged in the log, copied once into each matching
        subscription (none: counted as unrouted), or in the bus DLQ with the reason
        (undecodable, no ``event_type``). When nothing is waiting, waits up to
        ``block_for_seconds`` for new events (None or 0: do not wait). Costs three
        round trips whatever the batch and the number of subscriptions (plus the
        blocking read when it waits, and a retention trim every ``trim_interval``).
        If a copy fails, nothing of the batch is acknowledged and the error is raised;
        the batch is routed again, adding no duplicate: by the next call when the server
        was unavailable or out of memory, else after ``visibility_timeout`` (by any
        router, counting a delivery: a batch that keeps failing ends in the bus DLQ).
        """
        if self._interrupted:  # still pending for us: route it now, not after the timeout
            entries, self._interrupted = self._interrupted, []
            table = self.subscriptions()
        else:
            blocking = block_for_seconds is not None and block_for_seconds > 0
            if blocking and time.monotonic() < self._quiet_until:
                # idle: only the blocking read, until the next reclaim check is due
                entries, table = [], {}
            else:
                entries, table = self._fetch()
                self._quiet_until = 0.0 if entries else time.monotonic() + self._recheck
            if not entries and blocking:
                assert block_for_seconds is not None
                entries = self.events_queue._block(self.mq.consumer_id, self.batch_size,
                                                   min(block_for_seconds, _MAX_BLOCK))
                if entries:  # the table read before blocking may predate these events
                    self._quiet_until = 0.0
                    table = self.subscriptions()
        try:
            settled = self._route(entries, table) if entries else 0
            self._routed_since_trim = self._routed_since_trim or settled > 0
        except (BrokerUnavailableError, BrokerOutOfMemoryError):
            # the server failed, not the batch: try it again next round (another router
            # taking it over meanwhile adds no copy)
            self._interrupted = entries
            raise
        self._maybe_trim()
        return settled

    def _fetch(self) -> tuple[list[Any], dict[str, list[str]]]:
        """Take a batch (a dead router's entries first) and read the table: one round trip.

        The table is read after the batch, so every subscription made before one of
        its events was published is in it.
        """
        q = self.events_queue
        args: list[Any] = [GROUP, self.mq.consumer_id, self.batch_size,
                           int(q.visibility_timeout * 1000), int(time.time() * 1000), 0,
                           self._claim_cursor]

        def run() -> list[Any]:
            pipe = self.mq.client.pipeline(transaction=False)
            pipe.eval(_FETCH, 3, q.key, q.keys.delayed, q.keys.done, *args)
            pipe.hgetall(self._subs_key)
            return pipe.execute()

        (entries, gone, _, _, cursor), raw_table = self.mq._group_call(q, run)
        self._claim_cursor = _text(cursor)  # the next reclaim scan resumes there
        if gone:
            self.mq._count("gone", int(gone))
            logger.warning("event log: %d pending entries had lost their payload; "
                           "acknowledged", gone)
        return entries, _parse_subscriptions(raw_table)

    def _route(self, entries: list[Any], subscriptions: Mapping[str, Sequence[str]]) -> int:
        now_ms = int(time.time() * 1000)
        good, bad = _screen(entries, now_ms, self.mq.max_deliveries)
        table = {subscription_queue_name(s): types for s, types in subscriptions.items()}
        copies, unrouted = _plan(good, table)
        n_copies = self._copy(copies, now_ms) if copies else 0
        self._settle(good, bad, n_copies, len(unrouted))
        n_bad = sum(len(ids) for ids in bad.values())
        for key, n in (("routed", len(good)), ("copies", n_copies), ("unrouted", len(unrouted)),
                       ("dead_lettered", n_bad), ("batches", 1)):
            self.stats[key] = self.stats.get(key, 0) + n
        for reason, ids in bad.items():
            logger.warning("event log: dead-lettered %d entries: %s", len(ids), reason)
        if unrouted:
            logger.debug("%d events had no subscriber (acknowledged)", len(unrouted))
        return len(good) + n_bad

    def _copy(self, copies: Mapping[str, Sequence[_Entry]], now_ms: int) -> int:
        """Copy each queue's events into it; raise if any copy failed.

        One round trip, like a pipeline, but each route.lua call is written to the
        socket as soon as its arguments are built, so the server runs the first while
        the client prepares the next; the replies are read once all are sent.
        """
        window_ms = int(self.dedup_window * 1000)
        pool = self.mq.client.connection_pool

        def run() -> int:
            conn = _take_connection(pool)
            try:
                for i, (qname, batch) in enumerate(copies.items()):
                    keys = QueueKeys(self.prefix, qname)
                    # a health-check PING between two sends would read the wrong reply
                    conn.send_packed_command(conn.pack_command(
                        "EVAL", _ROUTE, 2, keys.stream, keys.routed, now_ms, window_ms,
                        *chain.from_iterable(e.chunk for e in batch)), check_health=i == 0)
                replies: list[Any] = []
                for _ in copies:
                    try:
                        replies.append(conn.read_response())
                    except redis.ResponseError as exc:  # read on: keep the connection in step
                        replies.append(exc)
            except BaseException:
                conn.disconnect()  # replies may be left unread: never reuse it
                raise
            finally:
                pool.release(conn)
            for r in replies:
                if isinstance(r, Exception):
                    raise r  # nothing of the batch gets acknowledged
            return sum(int(r) for r in replies)

        return int(self.mq._call(run))

    def _settle(self, good: Sequence[_Entry], bad: Mapping[str, list[bytes]],
                n_copies: int, n_unrouted: int) -> None:
        """Acknowledge the routed, dead-letter the rest, count: one pipeline."""
        q = self.events_queue

        def run() -> list[Any]:
            pipe = self.mq.client.pipeline(transaction=False)
            for reason, ids in bad.items():
                pipe.eval(_DEAD_LETTER, 2, q.key, q.keys.dlq, GROUP, q._record(reason, None),
                          "", *ids)
            if good:
                pipe.xack(q.key, GROUP, *[e.id for e in good])
            for name, n in (("routed", len(good)), ("copies", n_copies),
                            ("unrouted", n_unrouted),
                            ("dead_lettered", sum(len(ids) for ids in bad.values()))):
                if n:
                    pipe.hincrby(self._stats_key, name, n)
            res = pipe.execute(raise_on_error=False)
            for r in res[: len(bad) + (1 if good else 0)]:  # a refused counter is no failure
                if isinstance(r, Exception):
                    raise r
            return res

        self.mq._call(run)

    def _maybe_trim(self) -> int:
        """Trim every ``trim_interval`` while routing; when idle, once a minute at most."""
        since = time.time() - self._last_trim
        if since < self.trim_interval or (not self._routed_since_trim and since < 60.0):
            return 0
        self._routed_since_trim = False
        return self.trim()

    def trim(self) -> int:
        """Apply the log's retention now; return how many routed events were trimmed."""
        self._last_trim = time.time()
        if not self.retention_max_len and self.retention_seconds is None:
            return 0
        age_cut = ""
        if self.retention_seconds is not None:
            age_cut = f"{int((time.time() - self.retention_seconds) * 1000)}-0"
        res = self.mq._call(lambda: self.mq.scripts(
            "trim", [self.events_queue.key], [self.retention_max_len, age_cut]))
        if res[1]:
            logger.debug("log trim held back by group %s", _text(res[1]))
        return int(res[0])

    def stats_counters(self) -> dict[str, int]:
        """Bus-wide counters kept in Redis by every router.

        ``routed`` (taken off the log by routing, unrouted ones included), ``copies``,
        ``unrouted`` (no subscriber), ``dead_lettered`` (into the bus DLQ).
        """
        raw = self.mq._call(lambda: self.mq.client.hgetall(self._stats_key))
        return {_text(k): int(v) for k, v in raw.items()}

    # -- the processor ------------------------------------------------------------------

    def start(self) -> None:
        """Start routing in a background thread (idempotent)."""
        if self.running:
            return
        self.running = True
        self._stop.clear()
        self.processor_thread = threading.Thread(target=self._process_events,
                                                 name="relaybus-router", daemon=True)
        self.processor_thread.start()
        logger.info("event bus started (prefix %r)", self.prefix)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop routing; the batch in progress is settled first (idempotent).

        Safe to call from a signal handler (it does not log) and from any thread.
        """
        if not self.running:
            return
        self.running = False
        self._stop.set()
        thread = self.processor_thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout=timeout)

    def run(self) -> None:
        """Route in the calling thread until :meth:`stop` (the ``relaybus router`` loop)."""
        self.running = True
        self._stop.clear()
        try:
            self._process_events()
        finally:
            self.running = False

    def _process_events(self) -> None:
        """The router loop: route, and on failure back off, logging once per incident.

        An incident (an outage, a refused write) is logged when it starts, again only
        if the kind of error changes, and once more when routing resumes.
        """
        failing_since: float | None = None
        failures = 0
        last_kind = ""
        delay = 0.1
        while not self._stop.is_set():
            try:
                self.route_once(block_for_seconds=ROUTER_BLOCK_FOR_SECONDS)
            except Exception as exc:  # nothing may end the router thread
                failures += 1
                self.stats["errors"] = self.stats.get("errors", 0) + 1
                kind = type(exc).__name__
                expected = isinstance(exc, (BrokerError, RelaybusError, redis.RedisError, OSError))
                if failing_since is None or kind != last_kind:
                    failing_since = failing_since or time.monotonic()
                    logger.error("routing paused: %s (retrying with backoff)", exc,
                                 exc_info=not expected)
                last_kind = kind
                self._stop.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            if failing_since is not None:
                logger.warning("routing resumed after %.1fs (%d failed attempts)",
                               time.monotonic() - failing_since, failures)
                failing_since, failures, last_kind, delay = None, 0, "", 0.1
        if failing_since is None:  # leave the router group if it holds nothing
            try:
                self.events_queue.release([], self.mq.consumer_id)
            except Exception as exc:  # noqa: BLE001 - best effort: stopping must not fail
                logger.debug("router could not leave the group: %s", exc)
        logger.info("event bus router stopped (prefix %r)", self.prefix)

    def close(self) -> None:
        """Stop routing and release the connection."""
        self.stop()
        if self._owns_mq:
            self.mq.close()

    def __enter__(self) -> EventBus:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


_FETCH = source("fetch")
_ROUTE = source("route")
_DEAD_LETTER = source("dead_letter")
