"""Microservice: typed handlers over a durable subscription, with retries and shutdown.

Two ways to write a service; both run the same way::

    svc = Microservice("billing")

    @svc.on(OrderCreated)
    def charge(event: OrderCreated) -> None:
        ...                         # return (anything but False): handled

    class Shipping(Microservice):
        def handle_event(self, event: Event) -> bool:
            ...                     # the seed's form: return False to dead-letter

What happens to an event (the three outcomes of :mod:`relaybus.retry`):

- the handler returns anything but ``False``: acknowledged, and its ``event_id`` is
  recorded as done in the same atomic step; a copy of the same event that arrives
  later within the dedup window (``dedup_window``, 600 s by default: a re-publish, a
  DLQ requeue, a redelivery after a crash) is dropped, not handled again;
- it raises: retried after exponential backoff with full jitter (``retry_backoff``
  is the ceiling of the first delay, ``retry_backoff_max`` of every delay) until
  ``max_attempts`` runs, then dead-lettered with the exception type, message,
  traceback, attempt count, service name and timestamps. A waiting retry leaves the
  queue, so it does not hold back the events behind it;
- it raises :class:`~relaybus.errors.Retry`: retried after ``delay`` (or the
  backoff), counted as an attempt; :class:`~relaybus.errors.Reject`: dead-lettered
  at once with its reason; it returns ``False``: dead-lettered at once with reason
  ``handler returned False``;
- the entry is not a valid event (unknown type, failed validation): dead-lettered
  with the reason. An event of a type with no handler is dead-lettered too
  (``no handler for event type ...``). Nothing is acknowledged and forgotten.

Delivery is at least once: an event is redelivered when its instance dies before
settling it (after ``visibility_timeout``), so handlers should tolerate a repeat in
that rare case. A live instance extends its leases while handlers run, so a handler
may run far longer than ``visibility_timeout`` without being redelivered. Such
unsettled deliveries count as attempts: an event delivered more than ``max_attempts``
times (one that kills every instance that runs it, say) is dead-lettered without
running its handler again.

Connecting is lazy: constructing a service (at import time, say) talks to no server;
:meth:`Microservice.start` (or the first use of ``event_bus``, ``mq`` or the queues)
connects.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

from .bus import ALL_EVENTS, EventBus, subscription_queue_name
from .codec import Message
from .errors import (
    ConfigurationError,
    EventValidationError,
    HandlerOutcome,
    Reject,
    RelaybusError,
    SerializationError,
    UnknownEventTypeError,
)
from .events import Event, deserialize_event_strict, event_type_name
from .keys import validate_name
from .queue import MessageQueue, Queue
from .retry import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RETRY_BACKOFF,
    DEFAULT_RETRY_BACKOFF_MAX,
    Action,
    Decision,
    RetryPolicy,
)
from .worker import DEFAULT_BLOCK_FOR_SECONDS, Counters, Outcome, Worker

__all__ = ["Microservice", "WILDCARD", "STAT_NAMES"]

logger = logging.getLogger("relaybus.service")

F = TypeVar("F", bound=Callable[..., Any])

#: ``@svc.on(WILDCARD)`` handles every event type that has no handler of its own.
WILDCARD = ALL_EVENTS
#: The counters in :attr:`Microservice.stats`.
STAT_NAMES = ("received", "handled", "failed", "retried", "dead_lettered", "invalid",
              "duplicates", "errors")
#: Longest traceback kept in a failure record, in characters (the end is kept).
MAX_TRACEBACK_CHARS = 8000
#: Longest exception message kept in a failure record, in characters.
MAX_MESSAGE_CHARS = 2000


def _clip(text: str, limit: int, keep_end: bool = False) -> str:
    if len(text) <= limit:
        return text
    return "..." + text[-limit:] if keep_end else text[:limit] + "..."


def _qualname(obj: object) -> str:
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
    module = getattr(obj, "__module__", None)
    return f"{module}.{name}" if module else str(name)


class Microservice:
    """A service consuming its own durable subscription ``sub:<service_name>``.

    Connection: ``url`` (``redis://``, ``rediss://``, ``unix://``, ``embedded``), else
    ``$RELAYBUS_URL``, else ``redis_host``/``redis_port``/``redis_db``; or pass an
    existing ``event_bus`` (then ``url``, the host options, ``prefix`` and
    ``bus_options`` are ignored, and :meth:`close` leaves that bus open).
    ``bus_options`` go to :class:`~relaybus.bus.EventBus` (for instance
    ``dedup_window``, ``retry_timeout``; ``consumer_id`` also names this instance's
    consumer, which must then be unique per running instance: by default each
    :meth:`start` picks ``<service>@<host>-<pid>-<random>``).

    Subscription: ``event_types`` if given; else the types of the ``@on`` handlers
    (every type if one of them is ``"*"``); else every type.

    Work: ``concurrency`` handler threads; at most ``prefetch`` events (default
    ``2 * concurrency``) held at once by this instance, counting running ones.
    ``visibility_timeout`` (seconds): how long after this instance dies its events
    are taken over by another instance. ``block_for_seconds``: longest blocking read
    (an idle instance sends about two commands per period, plus its router's).

    Retries: ``max_attempts`` runs in all, ``retry_backoff`` / ``retry_backoff_max``
    (seconds) shape the backoff (see :mod:`relaybus.retry`).

    Lifecycle: :meth:`start` subscribes, starts the worker threads and, with
    ``run_router`` (the seed's behaviour), the bus's router thread; :meth:`stop`
    shuts down gracefully within ``shutdown_timeout``; :meth:`close` also releases
    the connection. Thread-safe; a context manager (``with`` closes, it does not
    start).

    Attributes as in the seed: ``service_name``, ``event_bus``, ``mq``,
    ``subscription_queue_name``, ``subscription_queue``, ``subscription_dlq``,
    ``running``; plus ``stats`` (counters: see :data:`STAT_NAMES`), ``retry_policy``
    and ``consumer_id`` (this instance's consumer name, set by :meth:`start`).
    """

    def __init__(
        self,
        service_name: str,
        redis_host: str = "localhost",
        redis_port: int = 6379,
        redis_db: int = 0,
        event_types: Iterable[str | type[Event]] | None = None,
        *,
        url: str | None = None,
        prefix: str = "events:",
        concurrency: int = 1,
        prefetch: int | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_backoff: float = DEFAULT_RETRY_BACKOFF,
        retry_backoff_max: float = DEFAULT_RETRY_BACKOFF_MAX,
        visibility_timeout: float = 30.0,
        shutdown_timeout: float = 30.0,
        run_router: bool = True,
        block_for_seconds: float = DEFAULT_BLOCK_FOR_SECONDS,
        event_bus: EventBus | None = None,
        **bus_options: Any,
    ) -> None:
        self.service_name = validate_name(service_name, "service name")
        self.subscription_queue_name = subscription_queue_name(service_name)
        if event_types is None:
            self.event_types: list[str] | None = None
        elif isinstance(event_types, (str, type)):
            self.event_types = [event_type_name(event_types)]
        else:
            self.event_types = [event_type_name(t) for t in event_types]
            if not self.event_types:
                raise ConfigurationError("event_types is empty: pass None to subscribe to "
                                         "every type")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be an integer >= 1, not {concurrency!r}")
        if prefetch is None:
            prefetch = 2 * concurrency
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < concurrency:
            raise ConfigurationError(f"prefetch must be an integer >= concurrency ({concurrency}),"
                                     f" not {prefetch!r}")
        for name, value, low in (("visibility_timeout", visibility_timeout, 0.0),
                                 ("block_for_seconds", block_for_seconds, 0.0)):
            if not isinstance(value, (int, float)) or not value > low:
                raise ConfigurationError(f"{name} must be a positive number of seconds, "
                                         f"not {value!r}")
        if not isinstance(shutdown_timeout, (int, float)) or not shutdown_timeout >= 0:
            raise ConfigurationError(f"shutdown_timeout must be a number of seconds >= 0, "
                                     f"not {shutdown_timeout!r}")
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.retry_policy = RetryPolicy(max_attempts, float(retry_backoff),
                                        float(retry_backoff_max))
        self.max_attempts = max_attempts
        self.visibility_timeout = float(visibility_timeout)
        self.shutdown_timeout = float(shutdown_timeout)
        self.run_router = bool(run_router)
        self.block_for_seconds = float(block_for_seconds)
        self.prefix = event_bus.prefix if event_bus is not None else prefix
        #: True between :meth:`start` and :meth:`stop`.
        self.running = False
        #: This instance's consumer name in the subscription's group (set by :meth:`start`).
        self.consumer_id: str | None = None

        self._url = url
        self._redis = (redis_host, int(redis_port), int(redis_db))
        self._bus_options = dict(bus_options)
        self._event_bus = event_bus
        self._owns_bus = event_bus is None
        self._pair: tuple[Queue, Queue] | None = None
        self._handlers: dict[str, Callable[[Any], Any]] = {}
        self._counters = Counters(STAT_NAMES)
        self._worker: Worker | None = None
        self._started_router = False
        self._closed = False
        self._lifecycle = threading.RLock()
        self._connect_lock = threading.Lock()
        self._stop_requested = threading.Event()
        # Plain flags: signal handlers may set them (they never take a lock).
        self._signal_stop = False
        self._force = False
        self._forever_thread: int | None = None
        self._in_forever_wait = False

    def __repr__(self) -> str:
        state = "running" if self.running else "closed" if self._closed else "stopped"
        return f"<{type(self).__name__} {self.service_name!r} {state}>"

    # -- connection (lazy) ------------------------------------------------------------

    @property
    def event_bus(self) -> EventBus:
        """The service's :class:`~relaybus.bus.EventBus` (created, and connected, on first use)."""
        with self._connect_lock:
            if self._event_bus is None:
                if self._closed:
                    raise RelaybusError(f"service {self.service_name!r} is closed")
                host, port, db = self._redis
                self._event_bus = EventBus(self._url, redis_host=host, redis_port=port,
                                           redis_db=db, prefix=self.prefix, **self._bus_options)
            return self._event_bus

    @property
    def mq(self) -> MessageQueue:
        """The :class:`~relaybus.queue.MessageQueue` under the event bus."""
        return self.event_bus.mq

    @property
    def subscription_queue(self) -> Queue:
        """The service's subscription queue ``sub:<service_name>`` (created if missing)."""
        return self._queues()[0]

    @property
    def subscription_dlq(self) -> Queue:
        """The service's dead-letter queue ``sub:<service_name>:dlq``."""
        return self._queues()[1]

    def _queues(self) -> tuple[Queue, Queue]:
        pair = self._pair
        if pair is None:
            pair = self.mq.create_queue_pair(self.subscription_queue_name,
                                             visibility_timeout=self.visibility_timeout)
            self._pair = pair
        return pair

    def _apply_url(self, url: str) -> None:
        """Point a service that has not connected yet at ``url`` (the runner's ``--url``)."""
        with self._connect_lock:
            if self._event_bus is not None:
                raise ConfigurationError(
                    f"service {self.service_name!r} is already connected (or was given an "
                    "event_bus); it cannot be pointed at another URL")
            self._url = url

    @property
    def stats(self) -> dict[str, int]:
        """A snapshot of this instance's counters (see :data:`STAT_NAMES`).

        ``received``: events delivered here; ``handled``: acknowledged after success;
        ``failed``: handler runs that raised (``Retry``/``Reject`` excluded);
        ``retried``: scheduled again; ``dead_lettered``: moved to the DLQ;
        ``invalid``: unknown type or failed validation (also dead-lettered);
        ``duplicates``: copies dropped because the event was already handled;
        ``errors``: unexpected errors in relaybus or service code outside handlers.
        """
        return self._counters.snapshot()

    # -- handlers ---------------------------------------------------------------------

    def on(self, *event_types: str | type[Event]) -> Callable[[F], F]:
        """Register the decorated function as the handler of ``event_types``.

        ``handler(event) -> Any``: returning ``False`` dead-letters the event,
        returning anything else acknowledges it, raising retries it (see the module
        docstring). ``"*"`` handles every type without a handler of its own. One
        handler per type; register before :meth:`start`. Returns the function as is.
        """
        if not event_types:
            raise TypeError("on() needs at least one event type (or '*' for every type)")
        names = [event_type_name(t) for t in event_types]

        def register(fn: F) -> F:
            if not callable(fn):
                raise TypeError(f"on() decorates a callable, not {fn!r}")
            with self._lifecycle:
                if self.running:
                    raise ConfigurationError("register handlers before start()")
                for name in names:
                    existing = self._handlers.get(name)
                    if existing is not None and existing is not fn:
                        raise ConfigurationError(
                            f"event type {name!r} already has a handler in service "
                            f"{self.service_name!r}: {_qualname(existing)}")
                for name in names:
                    self._handlers[name] = fn
            return fn

        return register

    @property
    def handlers(self) -> Mapping[str, Callable[[Any], Any]]:
        """The registered handlers: event type name (or ``"*"``) -> function (a copy)."""
        return dict(self._handlers)

    def handle_event(self, event: Event) -> bool:
        """Handle one event; return False to dead-letter it, raise to retry it.

        The default calls the ``@on`` handler of ``event.event_type`` (or the ``"*"``
        handler) and returns False only when it returned False. Without a handler it
        raises :class:`~relaybus.errors.Reject` (dead-letter: ``no handler for event
        type ...``). Subclasses override this (the seed's form). Runs in a handler
        thread: with ``concurrency > 1``, concurrently with itself.
        """
        handler = self._handlers.get(event.event_type) or self._handlers.get(WILDCARD)
        if handler is None:
            raise Reject(f"no handler for event type {event.event_type!r} in service "
                         f"{self.service_name!r}")
        return handler(event) is not False

    def _handler_name(self, event_type: str) -> str:
        if type(self).handle_event is not Microservice.handle_event:
            return f"{_qualname(type(self))}.handle_event"
        handler = self._handlers.get(event_type) or self._handlers.get(WILDCARD)
        return _qualname(handler) if handler is not None else "<none>"

    def publish_event(self, event: Event) -> str:
        """Publish ``event`` on the bus; return its id in the event log."""
        return self.event_bus.publish(event)

    def _subscription_types(self) -> list[str] | None:
        if self.event_types is not None:
            return list(self.event_types)
        if self._handlers and WILDCARD not in self._handlers:
            return sorted(self._handlers)
        return None

    # -- processing (runs in handler threads) -------------------------------------------

    def _process(self, message: Message) -> Outcome:
        base: dict[str, Any] = {"service": self.service_name, "consumer": self.consumer_id,
                                "enqueued_at": message.timestamp}
        try:
            event = deserialize_event_strict(message.data)
        except (UnknownEventTypeError, EventValidationError, SerializationError) as exc:
            self._counters.incr("invalid")
            details = dict(base, error_type=type(exc).__name__,
                           event_type=str(message.data.get("event_type", "")),
                           event_id=str(message.data.get("event_id", "")))
            if isinstance(exc, EventValidationError):
                details["errors"] = [{"loc": ".".join(str(p) for p in e.get("loc", ())),
                                      "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                                     for e in exc.errors]
            logger.error("service %s: dead-lettering message %s: %s", self.service_name,
                         message.id, exc)
            return Outcome(Decision(Action.DEAD_LETTER, reason=str(exc)), details=details)

        attempt = message.attempts
        if attempt > self.max_attempts:
            # earlier deliveries were never settled: their instances died (a poison event?)
            reason = (f"max attempts ({self.max_attempts}) reached: delivered {attempt} times, "
                      "earlier deliveries unsettled (their consumer died or lost its lease)")
            logger.error("service %s: dead-lettering %s %s: %s", self.service_name,
                         event.event_type, event.event_id, reason)
            return Outcome(Decision(Action.DEAD_LETTER, reason=reason),
                           details=dict(base, event_type=event.event_type,
                                        event_id=event.event_id, published_at=event.timestamp,
                                        max_attempts=self.max_attempts))
        started = time.time()
        result: object = None
        error: BaseException | None = None
        try:
            result = self.handle_event(event)
        except BaseException as exc:  # noqa: B036 - handlers run in worker threads
            error = exc
        finished = time.time()
        decision = self.retry_policy.decide(attempt, result=result, error=error)
        label = f"{event.event_type} {event.event_id} (attempt {attempt}/{self.max_attempts})"
        if decision.action is Action.ACK:
            logger.debug("service %s: handled %s", self.service_name, label)
            return Outcome(decision, done_key=message.dedup_key or event.event_id)

        details = dict(base, handler=self._handler_name(event.event_type),
                       event_type=event.event_type, event_id=event.event_id,
                       published_at=event.timestamp, started_at=started, finished_at=finished,
                       max_attempts=self.max_attempts)
        if error is not None and not isinstance(error, HandlerOutcome):
            self._counters.incr("failed")
            details["exception_type"] = _qualname(type(error))
            details["exception_message"] = _clip(str(error), MAX_MESSAGE_CHARS)
            details["traceback"] = _clip("".join(traceback.format_exception(
                type(error), error, error.__traceback__)), MAX_TRACEBACK_CHARS, keep_end=True)
        elif error is not None:
            details["outcome"] = type(error).__name__
        if decision.action is Action.RETRY:
            details["retry_delay"] = decision.delay
            logger.warning("service %s: %s failed: %s; retrying in %.2fs", self.service_name,
                           label, decision.reason, decision.delay)
        else:
            logger.error("service %s: dead-lettering %s: %s", self.service_name, label,
                         decision.reason)
        return Outcome(decision, details=details)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe, start the handler threads and (``run_router``) the bus router.

        Idempotent while running. Raises :class:`~relaybus.errors.ConfigurationError`
        for a service with neither ``@on`` handlers nor its own ``handle_event``.
        Connects on first use: raises
        :class:`~relaybus.errors.BrokerUnavailableError` when the server cannot be
        reached within the retry bound. The subscription's event types are replaced
        by this service's (see the class docstring).
        """
        with self._lifecycle:
            if self.running:
                return
            if self._closed:
                raise RelaybusError(f"service {self.service_name!r} is closed")
            if not self._handlers and type(self).handle_event is Microservice.handle_event:
                raise ConfigurationError(
                    f"service {self.service_name!r} has no handlers: decorate functions with "
                    "@service.on(EventType) or override handle_event")
            self._stop_requested.clear()
            self._signal_stop = False
            self._force = False
            bus = self.event_bus
            types = self._subscription_types()
            bus.subscribe(self.service_name, types, visibility_timeout=self.visibility_timeout)
            self._pair = None  # reopen with the stored settings
            queue = self.subscription_queue
            self.consumer_id = str(self._bus_options.get("consumer_id") or
                                   f"{self.service_name}@{socket.gethostname()}-{os.getpid()}-"
                                   f"{uuid.uuid4().hex[:6]}")
            worker = Worker(queue, self._process, consumer_id=self.consumer_id,
                            concurrency=self.concurrency, prefetch=self.prefetch,
                            block_for_seconds=self.block_for_seconds, name=self.service_name,
                            counters=self._counters)
            worker.start()
            self._worker = worker
            if self.run_router and not bus.running:
                bus.start()
                self._started_router = True
            self.running = True
            logger.info("service %s started: %s, %d handler thread(s), prefetch %d, "
                        "consumer %s%s", self.service_name,
                        "all events" if types is None else "events " + ", ".join(types),
                        self.concurrency, self.prefetch, self.consumer_id,
                        ", routing" if self._started_router else "")

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully: no new fetches, in-flight handlers finish and are settled.

        Waits up to ``timeout`` (default ``shutdown_timeout``) seconds for running
        handlers; events fetched but not started stay pending and are redelivered
        (to any instance) after ``visibility_timeout``; handlers still running after
        the timeout are abandoned the same way. Stops the router if :meth:`start`
        started it. Idempotent; callable from any thread and from a signal handler
        (during :meth:`run_forever` it then only asks that loop to stop).
        """
        if self._in_forever_wait and threading.get_ident() == self._forever_thread:
            # In a signal handler: no locks. Start nothing new now; run_forever stops.
            self._signal_stop = True
            worker = self._worker
            if worker is not None:
                worker.halt()
            return
        worker = self._worker
        if worker is not None and worker.owns_current_thread():
            # From a handler: waiting here would wait for ourselves. Stop from elsewhere.
            threading.Thread(target=self.stop, args=(timeout,), daemon=True,
                             name=f"relaybus-{self.service_name}-stop").start()
            return
        with self._lifecycle:
            self._stop_requested.set()
            if not self.running:
                return
            self.running = False
            worker = self._worker
            self._worker = None
            if worker is not None:
                worker.request_stop()
            if self._started_router:
                self._started_router = False
                self.event_bus.stop()
            if worker is None:
                return
            report = worker.join(self.shutdown_timeout if timeout is None else timeout,
                                 abandon=lambda: self._force)
            logger.info("service %s stopped: %d in-flight event(s) finished, %d abandoned, "
                        "%d left pending for redelivery", self.service_name, report.finished,
                        report.abandoned, report.left_pending)

    def _force_stop(self) -> None:
        """Cut a graceful stop short (a second signal): safe in a signal handler."""
        self._force = True
        self._signal_stop = True

    def close(self) -> None:
        """Stop, then release the connection (a given ``event_bus`` is left open). Idempotent."""
        self.stop()
        with self._lifecycle:
            if self._closed:
                return
            self._closed = True
            with self._connect_lock:
                bus, self._event_bus = self._event_bus, None
            if bus is not None and self._owns_bus:
                bus.close()

    def run_forever(self) -> None:
        """Start, then block until :meth:`stop` is called (another thread, a signal handler).

        Returns once the service has stopped gracefully.
        """
        self._forever_thread = threading.get_ident()
        try:
            self.start()
            self._in_forever_wait = True
            while not self._signal_stop and not self._stop_requested.wait(0.25):
                pass
            if self._signal_stop:
                logger.info("service %s: stop requested; stopping gracefully (within %.0fs)",
                            self.service_name, self.shutdown_timeout)
        finally:
            self._in_forever_wait = False
            self._forever_thread = None
            self.stop()

    def __enter__(self) -> Microservice:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
