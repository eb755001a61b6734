"""The EventBus: typed publishing, shared durable subscriptions, and routing.

How an event travels::

    publish(event) --XADD--> P{all}                 the event log (queue pair "all")
                               | router group: competing consumers, any process
                               v
                  route a batch: one pipeline, one script per subscription
                  |- look up subscribers of each event_type (+ "*") in Redis
                  |- copy into each P{sub:NAME} once (dedup by event_id)
                  '- acknowledge in the log (kept for retention, trimmed later)

Subscriptions live in Redis (hash ``Psubscriptions``), so every EventBus on the same
server and prefix routes by the same table, in any process. Routing needs no event
classes: it reads the event type from the entry. Every started EventBus runs one
router thread; any number of them route concurrently, and a router killed mid-batch
has its events taken over by another after ``visibility_timeout``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import redis

from .codec import Message
from .errors import BrokerError, RelaybusError
from .events import Event, event_type_name, serialize_event
from .keys import GROUP, QueueKeys, subscriptions_key, validate_name
from .queue import DEFAULT_DEDUP_WINDOW, MessageQueue, Queue

__all__ = ["EventBus", "ALL_EVENTS", "EVENTS_QUEUE", "subscription_queue_name"]

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
#: Seconds between two retention trims of the log.
TRIM_INTERVAL = 5.0


def subscription_queue_name(service_name: str) -> str:
    """The queue-pair name of a service's subscription: ``sub:<service_name>``."""
    return f"sub:{validate_name(service_name, 'service name')}"


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _plan(messages: Sequence[Message], table: Mapping[str, Sequence[str]]
          ) -> tuple[dict[str, list[Message]], list[Message], list[Message]]:
    """Decide where each event goes (pure): ``(per-queue copies, unrouted, unroutable)``.

    ``table`` maps a subscription queue name to its event types (``*`` for all).
    """
    wildcard = [q for q, types in table.items() if ALL_EVENTS in types]
    by_type: dict[str, list[str]] = {}
    for q, types in table.items():
        for t in types:
            if t != ALL_EVENTS:
                by_type.setdefault(t, []).append(q)
    copies: dict[str, list[Message]] = {}
    unrouted: list[Message] = []
    unroutable: list[Message] = []
    for m in messages:
        etype = m.fields.get("e")
        etype = _text(etype) if etype is not None else m.data.get("event_type")
        if not isinstance(etype, str) or not etype:
            unroutable.append(m)
            continue
        targets = set(by_type.get(etype, ())) | set(wildcard)
        if not targets:
            unrouted.append(m)
        for q in targets:
            copies.setdefault(q, []).append(m)
    return copies, unrouted, unroutable


class EventBus:
    """Central event bus for publishing and subscribing to events.

    ``EventBus(redis_host=..., redis_port=..., redis_db=..., prefix="events:")`` as in
    the seed, or ``EventBus(url)``. Publishing works without :meth:`start`; a started
    bus also routes (one background thread). Thread-safe; a context manager.

    ``visibility_timeout``: seconds before another router takes over a batch a dead
    router held. ``dedup_window``: seconds during which an event id is copied into a
    subscription at most once (re-publishing the same event is suppressed).
    ``retention_max_len`` / ``retention_seconds``: how much routed history the log
    keeps for inspection and replay; unrouted events are never trimmed.
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
        self.mq = mq or MessageQueue(url, redis_host=redis_host, redis_port=redis_port,
                                     redis_db=redis_db, redis_password=redis_password,
                                     prefix=prefix, dedup_window=dedup_window, **mq_options)
        self._owns_mq = mq is None
        self.prefix = self.mq.prefix
        self.visibility_timeout = float(visibility_timeout)
        self.dedup_window = float(dedup_window)
        self.retention_max_len = int(retention_max_len)
        self.retention_seconds = retention_seconds
        self.batch_size = int(batch_size)
        self.events_queue, self.events_dlq = self.mq.create_queue_pair(
            EVENTS_QUEUE, visibility_timeout=visibility_timeout)
        self.events_queue.delete_on_ack = False
        self._stats_key = QueueKeys(self.prefix, EVENTS_QUEUE).tag + ":stats"
        self.running = False
        self.processor_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_trim = 0.0
        #: What this bus's router did: routed, copies, unrouted, unroutable, batches.
        self.stats: dict[str, int] = {}

    # -- publishing ---------------------------------------------------------------

    def _fields(self, event: Event) -> dict[str, str | int]:
        if not isinstance(event, Event):
            raise TypeError(f"publish takes an Event, not {type(event).__name__}")
        return self.mq._encode(serialize_event(event), dedup_key=event.event_id,
                               routing_key=event.event_type)

    def publish(self, event: Event) -> str:
        """Publish an event; return its id in the event log.

        Validation happened when the event was built. Publishing the same event (same
        ``event_id``) again within ``dedup_window`` reaches each subscriber once.
        """
        fields = self._fields(event)
        msg_id = self.mq._call(lambda: self.mq.client.xadd(self.events_queue.key,
                                                           fields))  # type: ignore[arg-type]
        logger.debug("published %s %s as %s", event.event_type, event.event_id, _text(msg_id))
        return _text(msg_id)

    def publish_many(self, events: Iterable[Event]) -> list[str]:
        """Publish several events in one round trip; all are encoded before any is sent."""
        encoded = [self._fields(e) for e in events]
        if not encoded:
            return []

        def run() -> list[Any]:
            pipe = self.mq.client.pipeline(transaction=False)
            for fields in encoded:
                pipe.xadd(self.events_queue.key, fields)  # type: ignore[arg-type]
            return pipe.execute()

        return [_text(i) for i in self.mq._call(run)]

    # -- subscriptions --------------------------------------------------------------

    def subscribe(self, service_name: str, event_types: Iterable[str | type[Event]] | None = None,
                  *, visibility_timeout: float | None = None) -> str:
        """Subscribe a service to event types (None: every type, including later ones).

        Creates the subscription queue pair ``sub:<service_name>`` and records the
        subscription in Redis, where every EventBus on this prefix sees it. Calling it
        again replaces the service's types. Returns the subscription queue name.
        """
        queue_name = subscription_queue_name(service_name)
        if event_types is None or isinstance(event_types, str):
            types = [ALL_EVENTS] if event_types is None else [event_type_name(event_types)]
        else:
            types = sorted({event_type_name(t) for t in event_types})
        if not types:
            raise ValueError("event_types is empty: pass None to subscribe to every type")
        self.mq.create_queue_pair(queue_name, visibility_timeout=visibility_timeout)
        self.mq._call(lambda: self.mq.client.hset(subscriptions_key(self.prefix),
                                                  service_name, json.dumps(types)))
        logger.info("service %r subscribed to %s", service_name,
                    "all events" if types == [ALL_EVENTS] else ", ".join(types))
        return queue_name

    def unsubscribe(self, service_name: str) -> bool:
        """Stop routing to a service (its queue and what waits there are kept)."""
        validate_name(service_name, "service name")
        return bool(self.mq._call(lambda: self.mq.client.hdel(subscriptions_key(self.prefix),
                                                              service_name)))

    def subscriptions(self) -> dict[str, list[str]]:
        """Every subscription under this prefix: service name -> event types (``*`` = all)."""
        raw = self.mq._call(lambda: self.mq.client.hgetall(subscriptions_key(self.prefix)))
        out: dict[str, list[str]] = {}
        for name, value in raw.items():
            try:
                types = json.loads(value)
            except ValueError:
                types = []
            out[_text(name)] = [str(t) for t in types] if isinstance(types, list) else []
        return dict(sorted(out.items()))

    def subscription_queue(self, service_name: str) -> tuple[Queue, Queue]:
        """The (queue, dlq) of a service's subscription (created if missing)."""
        return self.mq.create_queue_pair(subscription_queue_name(service_name))

    # -- routing --------------------------------------------------------------------

    def route_once(self, block_for_seconds: float | None = None) -> int:
        """Route one batch from the log; return how many events it settled.

        Every event ends acknowledged in the log and copied once into each matching
        subscription, or (unroutable) in the bus DLQ with the reason. Costs a constant
        number of round trips whatever the batch and the number of subscriptions.
        """
        messages = self.events_queue.get_messages(count=self.batch_size,
                                                  block_for_seconds=block_for_seconds)
        if messages:
            self._route(messages)
        self._maybe_trim()
        return len(messages)

    def _route(self, messages: list[Message]) -> None:
        table = {subscription_queue_name(service): types
                 for service, types in self.subscriptions().items()}
        copies, unrouted, unroutable = _plan(messages, table)
        if unroutable:
            self.events_queue.move_to_dlq([m.id for m in unroutable],
                                          "unroutable: entry has no event_type")
        now_ms = int(time.time() * 1000)
        window_ms = int(self.dedup_window * 1000)
        bad = {m.id for m in unroutable}
        routed = [m for m in messages if m.id not in bad]

        def run() -> list[Any]:
            pipe = self.mq.client.pipeline(transaction=False)
            for qname, batch in copies.items():
                keys = QueueKeys(self.prefix, qname)
                args: list[Any] = [now_ms, window_ms]
                for m in batch:
                    flat = [x for kv in m.fields.items() for x in kv]
                    args += [m.dedup_key or _text(m.data.get("event_id", m.id)), len(flat), *flat]
                self.mq.scripts("route", [keys.stream, keys.routed], args, client=pipe)
            if routed:
                pipe.xack(self.events_queue.key, GROUP, *[m.id for m in routed])
                pipe.hincrby(self._stats_key, "routed", len(routed))
                if unrouted:
                    pipe.hincrby(self._stats_key, "unrouted", len(unrouted))
            return pipe.execute()

        res = self.mq._call(run)
        n_copies = sum(int(r) for r in res[: len(copies)])
        for key, n in (("routed", len(routed)), ("copies", n_copies),
                       ("unrouted", len(unrouted)), ("unroutable", len(unroutable)),
                       ("batches", 1)):
            self.stats[key] = self.stats.get(key, 0) + n
        if unrouted:
            logger.debug("%d events had no subscriber (acknowledged)", len(unrouted))

    def _maybe_trim(self, force: bool = False) -> int:
        now = time.time()
        if not force and now - self._last_trim < TRIM_INTERVAL:
            return 0
        self._last_trim = now
        return self.trim()

    def trim(self) -> int:
        """Apply the log's retention now; return how many routed events were trimmed."""
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
        """Bus-wide counters kept in Redis by every router (routed, unrouted)."""
        raw = self.mq._call(lambda: self.mq.client.hgetall(self._stats_key))
        return {_text(k): int(v) for k, v in raw.items()}

    # -- the processor thread ---------------------------------------------------------

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
        """Stop routing; the batch in progress finishes first (idempotent)."""
        if not self.running:
            return
        self.running = False
        self._stop.set()
        if self.processor_thread and self.processor_thread.is_alive():
            self.processor_thread.join(timeout=timeout)
        logger.info("event bus stopped")

    def run(self) -> None:
        """Route in the calling thread until :meth:`stop` (the ``relaybus router`` loop)."""
        self.running = True
        self._stop.clear()
        self._process_events()

    def _process_events(self) -> None:
        outage_since: float | None = None
        delay = 0.1
        while not self._stop.is_set():
            try:
                self.route_once(block_for_seconds=1.0)
                if outage_since is not None:
                    logger.warning("broker is back after %.1fs; routing resumed",
                                   time.monotonic() - outage_since)
                    outage_since = None
                    delay = 0.1
            except (BrokerError, RelaybusError, redis.RedisError, OSError) as exc:
                if outage_since is None:
                    outage_since = time.monotonic()
                    logger.error("routing paused: %s (retrying with backoff)", exc)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
            except Exception:  # a bug must not kill the router thread silently
                logger.exception("unexpected error in the router loop; continuing")
                self._stop.wait(1.0)

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

