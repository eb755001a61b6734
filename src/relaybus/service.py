"""Microservice: typed handlers over a durable subscription, with retries and shutdown.

Two ways to write a service; both run the same way::

    svc = Microservice("billing")

    @svc.on(OrderCreated)
    def charge(event: OrderCreated) -> None:
        ...                         # return (anything but False): handled

    class Shipping(Microservice):
        def handle_event(self, event: Event) -> bool:
            ...                     # the subclassing form: return False to dead-letter

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

Handlers are plain functions here, run in ``concurrency`` handler threads; an
``async def`` handler is refused at registration (a ``TypeError``): it belongs in an
:class:`~relaybus.aio.AsyncMicroservice`, which awaits it.

Delivery is at least once: an event is redelivered when its instance dies before
settling it (after ``visibility_timeout``), so handlers should tolerate a repeat in
that rare case. A live instance extends its leases while handlers run, so a handler
may run far longer than ``visibility_timeout`` without being redelivered. Such
unsettled deliveries count as attempts: an event delivered more than ``max_attempts``
times (one that kills every instance that runs it, say) is dead-lettered without
running its handler again.

Connecting is lazy: constructing a service (at import time, say) talks to no server;
:meth:`Microservice.start` (or the first use of ``event_bus``, ``mq`` or the queues)
connects. A service started before its broker (normal in containers) logs once which
server it waits for and keeps trying: :meth:`Microservice.run_forever` (and
``relaybus run``) until the broker answers unless given a ``start_timeout``,
:meth:`Microservice.start` for 10 s by default.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

from ._core.consumer import Outcome
from ._core.service import DEFAULT_START_TIMEOUT, STAT_NAMES, WILDCARD, HandleResult, ServiceBase
from ._sync.worker import Worker, Workers
from .bus import EventBus
from .codec import Message
from .errors import Reject, RelaybusError
from .events import Event
from .queue import MessageQueue, Queue

__all__ = ["Microservice", "WILDCARD", "STAT_NAMES"]

logger = logging.getLogger("relaybus.service")


class _Abandoned(Exception):
    """A stop ended ``start()``'s wait for the broker (the bus being built is dropped)."""


class Microservice(ServiceBase[EventBus]):
    """A service consuming its own durable subscription ``sub:<service_name>``.

    Connection: ``url`` (``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://``,
    ``embedded``), else ``$RELAYBUS_URL``, else ``redis_host``/``redis_port``/``redis_db``;
    or pass an existing ``event_bus`` (then ``url``, the host options, ``prefix`` and
    ``bus_options`` are ignored, and :meth:`close` leaves that bus open).
    ``bus_options`` go to :class:`~relaybus.bus.EventBus` (for instance
    ``dedup_window``, ``retry_timeout``; ``consumer_id`` also names this instance's
    consumer, which must then be unique per running instance: by default each
    :meth:`start` picks ``<service>@<host>-<pid>-<random>``).

    Subscription: ``event_types`` if given; else the types of the ``@on`` handlers
    (every type if one of them is ``"*"``); else every type.

    Work: ``concurrency`` handler threads; at most ``prefetch`` events (default
    ``max(200, 2 * concurrency)``) held at once by this instance, counting running
    ones and those waiting to be acknowledged. ``visibility_timeout`` (seconds): how
    long after this instance dies its events are taken over by another instance.
    ``block_for_seconds``: longest blocking wait when idle (an idle instance sends
    about one command per period).

    Retries: ``max_attempts`` runs in all, ``retry_backoff`` / ``retry_backoff_max``
    (seconds) shape the backoff (see :mod:`relaybus.retry`).

    Order: with ``ordered=True`` the events of one ``partition_key`` are handled one at
    a time, in publish order, across every instance, retries and crashes included (a
    retry holds back the later events of its key, not those of other keys); events
    without a key are not held back. See docs/design.md, "Ordered delivery".

    Metrics: with ``metrics_port`` (extra ``relaybus[metrics]``), :meth:`start` serves
    Prometheus metrics on ``metrics_host:metrics_port`` at ``/metrics``, with
    ``/healthz`` and ``/readyz`` (see :mod:`relaybus.metrics`); :meth:`close` closes it.

    Lifecycle: :meth:`start` subscribes, starts the worker threads and, with
    ``maintenance`` (default), the bus's maintenance thread (the event log's
    retention); :meth:`stop` shuts down gracefully within ``shutdown_timeout``;
    :meth:`close` also releases the connection. Thread-safe; a context manager
    (``with`` closes, it does not start).

    Attributes: ``service_name``, ``event_bus``, ``mq``,
    ``subscription_queue_name``, ``subscription_queue``, ``subscription_dlq``,
    ``running``; plus ``stats`` (counters: see :data:`STAT_NAMES`), ``retry_policy``
    and ``consumer_id`` (this instance's consumer name, set by :meth:`start`).
    """

    def _init_front(self) -> None:
        self._pair: tuple[Queue, Queue] | None = None
        self._worker: Workers | None = None
        self._lifecycle = threading.RLock()
        self._stop_requested = threading.Event()
        # Plain flags: signal handlers may set them (they never take a lock).
        self._signal_stop = False
        self._forever_thread: int | None = None
        self._in_forever_wait = False

    def _new_bus(self, url: str | None, **options: Any) -> EventBus:
        return EventBus(url, **options)

    # -- connection (lazy) ------------------------------------------------------------

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

    # -- handlers ---------------------------------------------------------------------

    def handle_event(self, event: Event) -> bool:
        """Handle one event; return False to dead-letter it, raise to retry it.

        The default calls the ``@on`` handler of ``event.event_type`` (or the ``"*"``
        handler) and returns False only when it returned False. Without a handler it
        raises :class:`~relaybus.errors.Reject` (dead-letter: ``no handler for event
        type ...``). Subclasses override this (the subclassing form). Runs in a handler
        thread: with ``concurrency > 1``, concurrently with itself.
        """
        handler = self._handlers.get(event.event_type) or self._handlers.get(WILDCARD)
        if handler is None:
            raise Reject(f"no handler for event type {event.event_type!r} in service "
                         f"{self.service_name!r}")
        return handler(event) is not False

    def publish_event(self, event: Event) -> str:
        """Publish ``event`` on the bus; return its id in the event log."""
        return self.event_bus.publish(event)

    # -- processing (runs in handler threads) -------------------------------------------

    def _process(self, message: Message) -> Outcome:
        prepared = self._prepare(message)
        if isinstance(prepared, Outcome):
            return prepared
        event, handler = prepared
        started = time.time()
        result: object = None
        error: BaseException | None = None
        with self._processing(message, event) as traced:
            try:
                result = handler(event)
            except BaseException as exc:  # noqa: B036 - handlers run in worker threads
                error = exc
            return self._conclude(message, event, result, error, started, time.time(), traced)

    # -- testing ----------------------------------------------------------------------

    def handle(self, event: Event | Mapping[str, Any], *, attempt: int = 1) -> HandleResult:
        """Run ``event`` through this service's handler as the worker would; no server.

        The event is encoded as the bus publishes it and validated as it arrives (a
        dict is taken as the payload on the wire: an unknown type or invalid data is
        ``invalid``), then handled as delivery number ``attempt``: the result says
        handled, retried (with the retry policy's delay), dead-lettered (with the
        reason) or invalid. Nothing is acknowledged or stored; ``stats`` count the
        run's ``failed`` or ``invalid`` as the worker does. Exceptions that are not
        :class:`Exception` (``KeyboardInterrupt``, ``pytest.fail``) propagate.
        """
        prepared = self._unit_prepare(event, attempt)
        if isinstance(prepared, HandleResult):
            return prepared
        message, received, handler = prepared
        started = time.time()
        result: object = None
        error: Exception | None = None
        with self._processing(message, received):
            try:
                result = handler(received)
            except Exception as exc:
                error = exc
        return self._unit_conclude(message, received, result, error, started)

    def wait_until_handled(self, count: int | None = None,
                           event_ids: str | Event | Iterable[str | Event] | None = None,
                           timeout: float = 10.0) -> None:
        """Block until this instance has handled ``count`` events in all (``stats
        ["handled"]``) and each of ``event_ids`` (``Event.event_id`` values or events,
        not the log ids ``publish`` returns), acknowledged; an ``AssertionError`` naming
        what is missing after ``timeout`` seconds."""
        from .testing import wait_for

        goal = self._handled_goal(count, event_ids)
        wait_for(goal.reached, timeout, what=goal.describe)

    def _unsettled(self, message_ids: list[str]) -> bool:
        worker = self._worker
        if worker is None:
            return False
        for w in worker.workers:
            with w._lock:  # the settler takes settled messages out under it
                if any(m in w.core.held for m in message_ids):
                    return True
        return False

    # -- lifecycle --------------------------------------------------------------------

    def start(self, *, start_timeout: float | None = DEFAULT_START_TIMEOUT) -> None:
        """Subscribe, start the handler threads and (``maintenance``) the bus's maintenance.

        Idempotent while running. Raises :class:`~relaybus.errors.ConfigurationError`
        for a service with neither ``@on`` handlers nor its own ``handle_event``.
        The subscription's event types are replaced by this service's (see the class
        docstring).

        Connects on first use. A broker that does not answer (connection refused,
        unknown host, timeout, still loading) is waited for: one warning names it
        (password redacted), then it is tried again with backoff for ``start_timeout``
        seconds (10 by default; None: until it answers), after which
        :class:`~relaybus.errors.BrokerUnavailableError` names its URL. Refused
        credentials (:class:`~relaybus.errors.BrokerAuthenticationError`) or a database
        the server does not have (:class:`~relaybus.errors.ConfigurationError`) raise
        at once. A :meth:`stop` meanwhile (a signal during :meth:`run_forever`) ends the
        wait: the service then returns without starting.
        """
        bound = self._start_timeout(start_timeout)
        with self._lifecycle:
            if self.running:
                return
            if self._closed:
                raise RelaybusError(f"service {self.service_name!r} is closed")
            self._check_startable()
            self._stop_requested.clear()
            self._force = False
            reached = self._reach(bound)
            if reached is None:
                return
            bus = reached
            types = self._subscription_types()
            bus.subscribe(self.service_name, types, visibility_timeout=self.visibility_timeout,
                          ordered=self.ordered)
            self._pair = None  # reopen with the stored settings
            queue = self.subscription_queue
            self.consumer_id = self._new_consumer_id()
            process = self._process
            if bus.partitions > 1:  # one worker per partition, `concurrency` handlers in all
                gate = threading.BoundedSemaphore(self.concurrency)

                def process(message: Message) -> Outcome:
                    with gate:
                        return self._process(message)
            worker = Workers([Worker(self.mq.driver, consumer, process,
                                     concurrency=self.concurrency, recover=self._resubscribe)
                              for consumer in self._consumers(queue.ref, bus.partitions,
                                                              self.mq._counts)])
            worker.start()
            self._worker = worker
            if self.maintenance and not bus.running:
                bus.start()
                self._started_maintenance = True
            self.running = True
            self._serve_metrics()
            logger.info("service %s started on %s: %s, %d handler thread(s), prefetch %d, "
                        "consumer %s%s%s", self.service_name, self._where(),
                        "all events" if types is None else "events " + ", ".join(types),
                        self.concurrency, self.prefetch, self.consumer_id,
                        f", {bus.partitions} partitions" if bus.partitions > 1 else "",
                        ", maintenance" if self._started_maintenance else "")

    def _reach(self, bound: float | None) -> EventBus | None:
        """The event bus once the broker answers (see :meth:`start`); None when a stop
        ended the wait. A new bus waits before it opens its log (its first command)."""
        made: list[MessageQueue] = []

        def reach(mq: MessageQueue) -> None:
            driver = mq.driver
            try:
                answered = driver.reach(bound, self._on_broker_wait(driver, bound),
                                        abandon=self._stopping)
            except BaseException:
                if made:
                    mq.close()  # the bus being built is dropped: release its queue layer
                raise
            if not answered:
                self._not_started(driver)
                if made:
                    mq.close()
                raise _Abandoned

        def reach_new(mq: MessageQueue) -> None:
            made.append(mq)
            reach(mq)

        try:
            bus = self._bus(before_open=reach_new)
            if not made:  # an existing bus (given, or made before start)
                reach(bus.mq)
        except _Abandoned:
            return None
        return bus

    def _stopping(self) -> bool:
        """A stop was asked for: by :meth:`stop`, or by a signal during :meth:`run_forever`."""
        return self._stop_requested.is_set() or self._signal_stop

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully: no new fetches, in-flight handlers finish and are settled.

        Waits up to ``timeout`` (default ``shutdown_timeout``) seconds for running
        handlers; events fetched but not started are handed back at once (any
        instance takes them), as are those of handlers still running after the
        timeout. Stops the bus's maintenance if :meth:`start` started it. Idempotent;
        callable from any thread and from a signal handler (during :meth:`run_forever`
        it then only asks that loop to stop).
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
        self._stop_requested.set()  # before the lock: it ends a start() waiting for the broker
        with self._lifecycle:
            if not self.running:
                return
            self.running = False
            worker = self._worker
            if self._started_maintenance:
                self._started_maintenance = False
                self.event_bus.stop()
            if worker is None:
                return
            started = time.monotonic()
            report = worker.join(self.shutdown_timeout if timeout is None else timeout,
                                 abandon=lambda: self._force)
            self._worker = None
            logger.info("service %s stopped after %.1fs%s: %d in-flight event(s) finished, "
                        "%d abandoned, %d handed back for redelivery", self.service_name,
                        time.monotonic() - started, " (forced)" if self._force else "",
                        report.finished, report.abandoned,
                        report.left_pending + report.abandoned)

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
            self._close_metrics()
            with self._connect_lock:
                bus, self._event_bus = self._event_bus, None
            if bus is not None and self._owns_bus:
                bus.close()

    def run_forever(self, *, start_timeout: float | None = None) -> None:
        """Start, then block until :meth:`stop` is called (another thread, a signal handler).

        A broker that does not answer yet is waited for as in :meth:`start`, but by
        default until it answers (``start_timeout``: seconds to give up after, raising
        :class:`~relaybus.errors.BrokerUnavailableError`; it goes to the :meth:`start`
        this calls, also through a subclass's override that calls ``super().start()``);
        a stop meanwhile ends the wait. Returns once the service has stopped gracefully.
        """
        self._run_start_timeout = (self._start_bound(start_timeout),)  # for start()
        self._forever_thread = threading.get_ident()
        self._signal_stop = False
        # from here a signal only asks for the stop, during start() too: a stop run inside
        # a signal handler that interrupted start() would wait for in-flight handlers there
        self._in_forever_wait = True
        try:
            self.start()
            while not self._signal_stop and not self._stop_requested.wait(0.25):
                pass
            if self._signal_stop:
                logger.info("service %s: stop requested; stopping gracefully (within %.0fs)",
                            self.service_name, self.shutdown_timeout)
        finally:
            self._run_start_timeout = None
            self._in_forever_wait = False
            self._forever_thread = None
            self.stop()

    def __enter__(self) -> Microservice:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


Microservice._default_handle_event = Microservice.handle_event
