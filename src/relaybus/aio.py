"""The asyncio front: the queue layer, the event bus and services, awaited.

The same classes as the sync front, on ``redis.asyncio``, over the same core (every
step, flow and rule is :mod:`relaybus._core`'s, so both fronts behave alike)::

    bus = AsyncEventBus("embedded")
    svc = AsyncMicroservice("billing", url="embedded")

    @svc.on(OrderCreated)
    async def charge(event: OrderCreated) -> None:   # awaited on the loop
        ...

    @svc.on(OrderCancelled)
    def refund(event: OrderCancelled) -> None:        # plain def: run in a worker thread
        ...

    async with bus, svc:          # starts the service; stops it gracefully on exit
        await bus.publish(OrderCreated(order_id="A-1", amount=9.5))

``AsyncMicroservice.run()`` runs until cancelled, SIGINT or SIGTERM (a second signal
stops at once). Cancelling the task that runs a service never loses or acknowledges
an unfinished event: it is handed back, as in a graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

import redis.asyncio

from ._async.driver import AsyncDriver
from ._async.worker import AsyncWorker, AsyncWorkers, StillRunning
from ._core import bus as core_bus
from ._core import queue as core
from ._core.bases import EventBusBase, MessageQueueBase, QueueBase, check_count
from ._core.bus import (
    ALL_EVENTS,
    EVENTS_QUEUE,
    ScheduledEntry,
    subscription_queue_name,
)
from ._core.consumer import Outcome
from ._core.incidents import Incident
from ._core.queue import (
    ConsumerInfo,
    QueueInfo,
    Settlement,
)
from ._core.replies import ids as _id_list
from ._core.service import (
    DEFAULT_START_TIMEOUT,
    WILDCARD,
    HandleResult,
    ServiceBase,
    returns_awaitable,
)
from ._core.steps import Flow, Step, T
from .codec import Message
from .connection import ConnectionSettings
from .errors import BrokerError, Reject, RelaybusError
from .events import Event
from .keys import validate_name

__all__ = ["AsyncMessageQueue", "AsyncQueue", "AsyncTransaction", "AsyncEventBus",
           "AsyncMicroservice"]

logger = logging.getLogger("relaybus.aio")


# -- the queue layer -----------------------------------------------------------------------


class AsyncQueue(QueueBase["AsyncMessageQueue"]):
    """One stream of a queue pair, awaited: the calls of :class:`relaybus.Queue`.

    Get queues from :meth:`AsyncMessageQueue.create_queue_pair` or
    :meth:`AsyncMessageQueue.get_queue`.
    """

    async def _run(self, step: Step[T]) -> T:
        return await self.mq.driver.run(step)

    async def _drive(self, flow: Flow[T]) -> T:
        return await self.mq.driver.drive(flow)

    async def _settle(self, batch: Settlement, dlq: AsyncQueue | None = None) -> core.Settled:
        return await self._drive(core.settle(self._ref, self.mq.consumer_id, batch,
                                             dlq.key if dlq is not None else None,
                                             ordered=self._ref.log is not None))  # keys handed on

    async def send_message(self, data: Mapping[str, Any], *, ttl: float | None = None,
                           message_id: str | None = None,
                           headers: Mapping[str, str] | None = None,
                           dedup_key: str | None = None) -> str:
        """Append one message; return its stream id (see :meth:`relaybus.Queue.send_message`)."""
        fields = self.mq._encode(data, ttl=ttl, headers=headers, dedup_key=dedup_key)
        return await self._run(core.send(self._ref, fields, message_id))

    async def send_messages(self, messages: Sequence[Mapping[str, Any]], *,
                            ttl: float | None = None) -> list[str]:
        """Append many messages in one round trip, all or none."""
        encoded = [(self.key, self.mq._encode(m, ttl=ttl)) for m in messages]
        return await self._run(core.send_many(encoded)) if encoded else []

    async def get_messages(self, count: int = 1, block_for_seconds: float | None = None,
                           consumer_id: str | None = None) -> list[Message]:
        """Deliver up to ``count`` messages (see :meth:`relaybus.Queue.get_messages`)."""
        check_count(count)
        return await self.mq.driver.drive(core.get_messages(
            self._ref, self._read, consumer_id or self.mq.consumer_id, count,
            block_for_seconds, time.monotonic, self.mq._counts))

    async def peek(self, count: int = 10, start_id: str | None = None) -> list[Message]:
        """Read up to ``count`` messages from ``start_id`` on, without consuming them."""
        return await self._run(core.peek(self._ref, count, start_id))

    async def follow(self, after_id: str = "$", *, count: int = 100,
                     block_for_seconds: float | None = None) -> tuple[str, list[Message]]:
        """Read messages added after ``after_id`` without consuming them; for tailing."""
        return await self.mq.driver.drive(core.follow(self._ref, after_id, count,
                                                      block_for_seconds))

    async def acknowledge_messages(self, ids: str | Iterable[str], *,
                                   record_done: Iterable[str] = ()) -> int:
        """Acknowledge messages; return how many were pending."""
        batch = self._acks(ids, record_done)
        return (await self._settle(batch)).acknowledged if batch else 0

    async def move_to_dlq(self, ids: str | Iterable[str], reason: str,
                          dlq: AsyncQueue | None = None, *,
                          details: Mapping[str, Any] | None = None) -> int:
        """Move messages to the dead-letter queue atomically; return how many moved."""
        batch = self._dead(ids, reason, details)
        return (await self._settle(batch, dlq)).dead_lettered if batch else 0

    async def schedule_retry(self, ids: str | Iterable[str], delay: float, reason: str, *,
                             details: Mapping[str, Any] | None = None) -> int:
        """Re-deliver messages after ``delay`` seconds; return how many were scheduled."""
        batch = self._retries(ids, delay, reason, details, time.monotonic())
        return (await self._settle(batch)).retried if batch else 0

    async def requeue_messages(self, ids: str | Iterable[str],
                               destination: AsyncQueue | None = None) -> int:
        """Move messages (usually from a DLQ) to ``destination``, history kept."""
        id_list = _id_list(ids)
        dest = destination.key if destination is not None else self.keys.stream
        return await self._drive(core.requeue(self._ref, id_list, dest)) if id_list else 0

    async def requeue_where(self, predicate: Callable[[Message], bool] | None = None,
                            destination: AsyncQueue | None = None, *,
                            batch_size: int = 500) -> int:
        """Requeue every message ``predicate`` accepts (all when None); return how many."""
        dest = destination.key if destination is not None else self.keys.stream
        return await self.mq.driver.drive(core.requeue_where(self._ref, predicate, dest,
                                                             batch_size))

    async def extend_lease(self, ids: str | Iterable[str], consumer_id: str | None = None
                           ) -> int:
        """Reset the idle time of messages this consumer still holds; return how many."""
        batch = Settlement(extend=_id_list(ids))
        if not batch:
            return 0
        return (await self._drive(core.settle(self._ref, consumer_id or self.mq.consumer_id,
                                              batch))).extended

    async def release(self, ids: str | Iterable[str], consumer_id: str | None = None
                      ) -> tuple[int, bool]:
        """Hand back fetched messages at once; forget the consumer if it holds nothing."""
        done = await self._drive(core.settle(self._ref, consumer_id or self.mq.consumer_id,
                                             Settlement(release=_id_list(ids), forget=True)))
        return done.released, done.removed

    async def delete_messages(self, ids: str | Iterable[str]) -> int:
        """Delete messages (pending or not) without dead-lettering; return how many."""
        id_list = _id_list(ids)
        return await self._run(core.delete(self._ref, id_list)) if id_list else 0

    async def purge(self) -> int:
        """Remove every message (waiting, pending and delayed retries); return how many."""
        return await self.mq.driver.drive(core.purge(self._ref))

    async def get_info(self) -> QueueInfo:
        """A :class:`QueueInfo` snapshot (two round trips)."""
        return (await self.mq.driver.drive(core.infos([self._ref])))[0]


class AsyncTransaction:
    """Messages to send all together or not at all: ``async with mq.transaction() as tx``."""

    def __init__(self, mq: AsyncMessageQueue) -> None:
        self._mq = mq
        self._pending: list[tuple[str, dict[str, str | int]]] = []
        self.ids: list[str] = []

    def send_message(self, queue: AsyncQueue, data: Mapping[str, Any], *,
                     ttl: float | None = None, headers: Mapping[str, str] | None = None) -> None:
        """Add one message for ``queue`` (validated and encoded now, sent at commit)."""
        self._pending.append((queue.key, self._mq._encode(data, ttl=ttl, headers=headers)))

    async def commit(self) -> list[str]:
        """Send every added message atomically; return their ids."""
        if not self._pending:
            return []
        self.ids = await self._mq.driver.run(core.send_many(self._pending))
        self._pending = []
        return self.ids

    def discard(self) -> None:
        """Drop every added message."""
        self._pending = []

    async def __aenter__(self) -> AsyncTransaction:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc_type is None:
            await self.commit()
        else:
            self.discard()


class AsyncMessageQueue(MessageQueueBase[redis.asyncio.Redis, AsyncDriver]):
    """A connection to a server and the queue pairs under one prefix, awaited.

    The arguments of :class:`relaybus.MessageQueue` (``client`` takes a
    ``redis.asyncio.Redis``). Connecting is lazy; ``async with`` closes it.
    """

    def _new_client(self, settings: ConnectionSettings) -> redis.asyncio.Redis:
        return settings.async_client()

    def _new_driver(self, client: redis.asyncio.Redis, settings: ConnectionSettings
                    ) -> AsyncDriver:
        return AsyncDriver(client, retry_timeout=settings.retry_timeout, url=settings.url,
                           replication=settings.replication)

    def _queue(self, name: str, *, is_dlq: bool = False, visibility_timeout: float
               ) -> AsyncQueue:
        return AsyncQueue(self, self._ref(name, is_dlq=is_dlq,
                                          visibility_timeout=visibility_timeout))

    async def create_queue_pair(self, name: str, *, visibility_timeout: float | None = None,
                                ) -> tuple[AsyncQueue, AsyncQueue]:
        """Create (or open) the queue ``name`` and its DLQ; return ``(queue, dlq)``."""
        name = validate_name(name)
        self._check_visibility(visibility_timeout)
        vt = await self.driver.drive(core.ensure_pair(self._ref(name), visibility_timeout,
                                                      now=time.time()))
        return (self._queue(name, visibility_timeout=vt),
                self._queue(name, is_dlq=True, visibility_timeout=vt))

    async def get_queue(self, name: str) -> AsyncQueue | None:
        """The queue ``name`` (``NAME:dlq`` gives a DLQ), or None if it does not exist."""
        pair, is_dlq = self._split_dlq(name)
        vt = await self.driver.run(core.visibility(self._ref(pair)))
        return self._queue(pair, is_dlq=is_dlq, visibility_timeout=vt) if vt is not None \
            else None

    async def get_dead_letter_queue(self, name: str) -> AsyncQueue | None:
        """The DLQ of queue ``name``, or None if the queue does not exist."""
        return await self.get_queue(validate_name(name) + ":dlq")

    async def require_queue(self, name: str) -> AsyncQueue:
        """Like :meth:`get_queue` but raises :class:`QueueNotFoundError`."""
        queue = await self.get_queue(name)
        if queue is None:
            raise self._not_found(name)
        return queue

    async def queue_names(self) -> list[str]:
        """Names of every queue pair under this prefix, sorted."""
        return await self.driver.run(core.queue_names(self.prefix))

    async def list_queues(self, names: Iterable[str] | None = None) -> list[QueueInfo]:
        """Info on every queue under this prefix (or the pairs ``names``), main queues
        and DLQs."""
        return await self.driver.drive(core.infos(
            self._pair_refs(names, given=True) if names is not None
            else self._pair_refs(await self.queue_names(), given=False)))

    async def consumers(self, names: Iterable[str]) -> dict[str, list[ConsumerInfo]]:
        """The consumers of each named main queue, in one round trip (see
        :meth:`relaybus.MessageQueue.consumers`)."""
        refs = [self._ref(validate_name(n)) for n in names]
        return await self.driver.run(core.consumers(refs)) if refs else {}

    async def entries_added(self, names: Iterable[str]) -> dict[str, int | None]:
        """How many entries each named queue ever received (one round trip)."""
        names = list(names)
        return await self.driver.run(core.entries_added(self.prefix, names)) if names else {}

    async def delete_queue(self, name: str, delete_dlq: bool = True) -> bool:
        """Delete the queue pair ``name`` (and its DLQ unless ``delete_dlq`` is False)."""
        return await self.driver.run(core.delete_pair(self._ref(validate_name(name)),
                                                      keep_dlq=not delete_dlq))

    def transaction(self) -> AsyncTransaction:
        """An :class:`AsyncTransaction`."""
        return AsyncTransaction(self)

    async def ping(self) -> bool:
        """True when the server answers (within the retry bound)."""
        return await self.driver.run(core.ping())

    async def close(self) -> None:
        """Release the connections."""
        await self.driver.close()

    async def __aenter__(self) -> AsyncMessageQueue:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


# -- the event bus ---------------------------------------------------------------------


class AsyncEventBus(EventBusBase[AsyncMessageQueue]):
    """The event bus, awaited: the constructor arguments of :class:`relaybus.EventBus`.

    The event log is opened on first use (``async with``, :meth:`start`, or the first
    call); :meth:`start` also starts the maintenance task (the log's retention).
    """

    def _init_front(self) -> None:
        log = self._log_ref()
        #: The event log (``all``) and the bus's dead-letter queue (``all:dlq``).
        self.events_queue = AsyncQueue(self.mq, log)
        self.events_dlq = AsyncQueue(self.mq, self.mq._ref(EVENTS_QUEUE, is_dlq=True,
                                                           visibility_timeout=log.visibility_timeout))
        self._opened = False
        self._task: asyncio.Task[None] | None = None
        # set to run a maintenance round now (this bus scheduled an event)
        self._wake: asyncio.Event | None = None
        self._due_in: float | None = None

    def _new_mq(self, url: str | None, **options: Any) -> AsyncMessageQueue:
        return AsyncMessageQueue(url, **options)

    async def _open(self) -> None:
        if not self._opened:  # also checked before each call: no coroutine per publish
            await self.mq.driver.drive(self._open_flow())
            self._opened = True

    async def publish(self, event: Event, *, delay: float | timedelta | None = None,
                      at: datetime | None = None) -> str:
        """Publish an event; return its id in the event log, or (``delay``, ``at``) its
        schedule id (see :meth:`relaybus.EventBus.publish`)."""
        due = core_bus.due_of(delay, at)
        if not self._opened:
            await self._open()
        with self._sending([event]) as encoded:
            [msg_id] = await self.mq.driver.run(self._publish_step(encoded, due))
        if due is not None and self._wake is not None:
            self._wake.set()  # this bus's maintenance learns its time
        return msg_id

    async def publish_many(self, events: Iterable[Event], *,
                           delay: float | timedelta | None = None,
                           at: datetime | None = None) -> list[str]:
        """Publish several events in one round trip, all or none (per partition);
        ``delay`` / ``at`` schedule them all."""
        due = core_bus.due_of(delay, at)
        if not self._opened:
            await self._open()
        with self._sending(events) as encoded:
            ids = await self.mq.driver.run(self._publish_step(encoded, due)) if encoded else []
        if due is not None and self._wake is not None:
            self._wake.set()  # this bus's maintenance learns their time
        return ids

    async def cancel_scheduled(self, schedule_id: str) -> bool:
        """Cancel a scheduled event; True when it was still waiting."""
        return await self.mq.driver.run(core_bus.cancel_scheduled(self.prefix, schedule_id))

    async def scheduled(self, limit: int = 100) -> list[ScheduledEntry]:
        """The scheduled events still waiting (up to ``limit`` per partition), soonest first."""
        if not self._opened:
            await self._open()
        return await self.mq.driver.drive(core_bus.scheduled(self.prefix, self.partitions, limit))

    async def publish_raw(self, event_type: str, data: Mapping[str, Any], *,
                          delay: float | timedelta | None = None,
                          at: datetime | None = None) -> str:
        """Publish ``data`` as an event of ``event_type`` with no event class (see
        :meth:`relaybus.EventBus.publish_raw`)."""
        due = core_bus.due_of(delay, at)
        if not self._opened:
            await self._open()
        [msg_id] = await self.mq.driver.run(
            self._publish_step([self._raw_fields(event_type, data)], due))
        if due is not None and self._wake is not None:
            self._wake.set()  # this bus's maintenance learns its time
        return msg_id

    async def subscribe(self, service_name: str,
                        event_types: Iterable[str | type[Event]] | str | type[Event] | None = None,
                        *, visibility_timeout: float | None = None,
                        ordered: bool | None = None) -> str:
        """Subscribe a service to event types (None: every type); return its queue name
        (``ordered`` as in :meth:`relaybus.EventBus.subscribe`)."""
        types = core_bus.subscription_types(event_types)
        ref = self._sub_ref(service_name, visibility_timeout)
        if not self._opened:
            await self._open()
        await self.mq.driver.drive(core_bus.subscribe(ref, service_name, types,
                                                      visibility_timeout, time.time(), ordered,
                                                      self.partitions))
        logger.info("service %r subscribed to %s", service_name,
                    "all events" if types == [ALL_EVENTS] else ", ".join(types))
        return ref.pair_name

    async def unsubscribe(self, service_name: str) -> bool:
        """Stop delivering new events to a service; what was meant for it is kept."""
        validate_name(service_name, "service name")
        if not self._opened:
            await self._open()
        return await self.mq.driver.drive(core_bus.unsubscribe(
            self._sub_ref(service_name, None), service_name, self.partitions))

    async def remove_subscription(self, service_name: str) -> bool:
        """Delete a retired service's subscription and all that was kept for it."""
        return await self.mq.driver.drive(core_bus.remove_subscription(self.mq.settings,
                                                                       service_name))

    async def subscriptions(self) -> dict[str, list[str]]:
        """Every subscription under this prefix: service name -> event types."""
        return await self.mq.driver.run(core_bus.read_subscriptions(self.prefix))

    async def subscription_queue(self, service_name: str) -> tuple[AsyncQueue, AsyncQueue]:
        """The (queue, dlq) of a service's subscription (created if missing)."""
        return await self.mq.create_queue_pair(subscription_queue_name(service_name))

    async def trim(self) -> int:
        """Apply the log's retention now (after publishing the scheduled events that are
        due); return how many events were trimmed."""
        if not self._opened:
            await self._open()
        done = await self.mq.driver.run(self._trim())
        self._due_in = done.due_in
        return done.trimmed

    async def start(self) -> None:
        """Open the log and start the maintenance task (idempotent)."""
        if not self._opened:
            await self._open()
        if self._task is None or self._task.done():
            self.running = True
            self._task = asyncio.create_task(self._maintain(), name="relaybus-maintenance")

    async def _maintain(self) -> None:
        incident = Incident("event bus maintenance", logger)
        wake = self._wake = asyncio.Event()
        pause, next_trim = 0.0, 0.0
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), pause)
            wake.clear()
            now = time.monotonic()
            try:
                if now >= next_trim:  # a round: what is due is published, then the trim
                    await self.trim()
                    due_in = self._due_in
                    next_trim = now + self.maintenance_interval
                else:  # woken early: a scheduled event is due, or this bus scheduled one
                    due_in = await self.mq.driver.run(self._promote())
            except Exception as exc:  # nothing may end the loop
                pause = incident.failed(exc, time.monotonic(),
                                        expected=isinstance(exc, BrokerError))
                continue
            incident.succeeded(time.monotonic())
            pause = core_bus.maintenance_pause(time.monotonic(), next_trim, due_in)

    async def stop(self) -> None:
        """Stop the maintenance task (idempotent)."""
        self.running = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        """Stop, then release the connection (unless given an ``mq``)."""
        await self.stop()
        if self._owns_mq:
            await self.mq.close()

    async def __aenter__(self) -> AsyncEventBus:
        if not self._opened:
            await self._open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


# -- services ------------------------------------------------------------------------------


class AsyncMicroservice(ServiceBase[AsyncEventBus]):
    """A service on asyncio: the constructor arguments of :class:`relaybus.Microservice`.

    ``@svc.on(T)`` takes ``async def`` handlers (awaited on the loop, up to
    ``concurrency`` at once) and plain ``def`` handlers (run in a worker thread of its
    own pool of ``concurrency`` threads, so the loop is never blocked). The outcomes
    are the sync service's: retries with backoff, :class:`~relaybus.Retry`,
    :class:`~relaybus.Reject`, ``False``, dead letters with their record,
    duplicates dropped, leases extended, a graceful stop.

    :meth:`start` / :meth:`stop`, ``async with svc:`` (starts, then stops), or
    :meth:`run` (until cancelled, SIGINT or SIGTERM). Pass ``event_bus`` (an
    :class:`AsyncEventBus`) to share one; otherwise the service makes its own.
    """

    _awaits_handlers = True

    def _init_front(self) -> None:
        self._worker: AsyncWorkers | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._awaited: dict[Callable[..., Any], bool] = {}
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signalled: signal.Signals | None = None

    def _new_bus(self, url: str | None, **options: Any) -> AsyncEventBus:
        return AsyncEventBus(url, **options)

    @property
    def mq(self) -> AsyncMessageQueue:
        """The :class:`AsyncMessageQueue` under the event bus."""
        return self.event_bus.mq

    async def subscription_queues(self) -> tuple[AsyncQueue, AsyncQueue]:
        """The service's ``(queue, dlq)`` (created if missing)."""
        return await self.mq.create_queue_pair(self.subscription_queue_name,
                                               visibility_timeout=self.visibility_timeout)

    async def handle_event(self, event: Event) -> bool:
        """Handle one event; return False to dead-letter it, raise to retry it.

        The default awaits (or runs in a thread) the ``@on`` handler of the type. A
        subclass may override it with an ``async def`` (the subclassing form).
        """
        handler = self._handlers.get(event.event_type) or self._handlers.get(WILDCARD)
        if handler is None:
            raise Reject(f"no handler for event type {event.event_type!r} in service "
                         f"{self.service_name!r}")
        return await self._call(handler, event) is not False

    async def publish_event(self, event: Event) -> str:
        """Publish ``event`` on the bus; return its id in the event log."""
        return await self.event_bus.publish(event)

    async def _call(self, handler: Callable[[Any], Any], event: Event) -> Any:
        awaited = self._awaited.get(handler)
        if awaited is None:
            awaited = self._awaited[handler] = returns_awaitable(handler)
        if awaited:
            return await handler(event)
        assert self._executor is not None
        try:
            # in the caller's context: the handler's spans and publishes are the process
            # span's children
            run = functools.partial(contextvars.copy_context().run, handler, event)
            result = await asyncio.get_running_loop().run_in_executor(self._executor, run)
        except asyncio.CancelledError:
            raise StillRunning() from None  # its thread runs on: leave its message pending
        if inspect.isawaitable(result):  # a plain function that returned a coroutine
            result = await result
        return result

    async def _process(self, message: Message) -> Outcome:
        prepared = self._prepare(message)
        if isinstance(prepared, Outcome):
            return prepared
        event, handler = prepared
        started = time.time()
        result: object = None
        error: BaseException | None = None
        with self._processing(message, event) as traced:
            try:
                if self._awaited.get(handler):  # the hot path: one coroutine less
                    result = await handler(event)
                else:
                    result = await self._call(handler, event)
            except asyncio.CancelledError:
                raise  # not an outcome: the message is handed back
            except BaseException as exc:  # noqa: B036 - SystemExit too, as in the sync front
                error = exc
            return self._conclude(message, event, result, error, started, time.time(), traced)

    # -- testing ----------------------------------------------------------------------

    async def handle(self, event: Event | Mapping[str, Any], *,
                     attempt: int = 1) -> HandleResult:
        """Run ``event`` through this service's handler as the worker would; no server.

        As :meth:`relaybus.Microservice.handle`: ``async def`` handlers are awaited,
        plain ones run in a thread (the service's pool once started).
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
                if self._executor is None and not returns_awaitable(handler):
                    result = await asyncio.to_thread(handler, received)  # not started
                    if inspect.isawaitable(result):
                        result = await result
                else:
                    result = await self._call(handler, received)
            except Exception as exc:
                error = exc
        return self._unit_conclude(message, received, result, error, started)

    async def wait_until_handled(self, count: int | None = None,
                                 event_ids: str | Event | Iterable[str | Event] | None = None,
                                 timeout: float = 10.0) -> None:
        """Wait (the loop runs meanwhile) until this instance has handled ``count``
        events in all and each of ``event_ids``: as
        :meth:`relaybus.Microservice.wait_until_handled`."""
        from .testing import wait_for_async

        goal = self._handled_goal(count, event_ids)
        await wait_for_async(goal.reached, timeout, what=goal.describe)

    def _unsettled(self, message_ids: list[str]) -> bool:
        worker = self._worker
        return worker is not None and any(m in w.core.held for w in worker.workers
                                          for m in message_ids)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, *, start_timeout: float | None = DEFAULT_START_TIMEOUT) -> None:
        """Subscribe and start handling (and, with ``maintenance``, the bus's maintenance).

        Idempotent while running; raises like :meth:`relaybus.Microservice.start`. A
        broker that does not answer is waited for in the same way: one warning naming
        it, then retries for ``start_timeout`` seconds (10 by default; None: until it
        answers) before :class:`~relaybus.errors.BrokerUnavailableError`.
        """
        bound = self._start_timeout(start_timeout)
        if self.running:
            return
        if self._closed:
            raise RelaybusError(f"service {self.service_name!r} is closed")
        self._check_startable()
        bus = self.event_bus
        stopping = self._stopping
        driver = bus.mq.driver  # the async bus talks to the server on first use: now
        if not await driver.reach(bound, self._on_broker_wait(driver, bound),
                                  abandon=stopping.is_set if stopping else None):
            self._not_started(driver)
            return
        types = self._subscription_types()
        await bus.subscribe(self.service_name, types, visibility_timeout=self.visibility_timeout,
                            ordered=self.ordered)
        queue, _ = await self.subscription_queues()
        self.consumer_id = self._new_consumer_id()
        self._executor = ThreadPoolExecutor(self.concurrency,
                                            thread_name_prefix=f"relaybus-{self.service_name}")
        process = self._process
        if bus.partitions > 1:  # one worker per partition, `concurrency` handlers in all
            gate = asyncio.Semaphore(self.concurrency)

            async def process(message: Message) -> Outcome:
                async with gate:
                    return await self._process(message)
        self._worker = AsyncWorkers([
            AsyncWorker(self.mq.driver, consumer, process, concurrency=self.concurrency,
                        recover=self._resubscribe)
            for consumer in self._consumers(queue.ref, bus.partitions, self.mq._counts)])
        self._worker.start()
        if self.maintenance and not bus.running:
            await bus.start()
            self._started_maintenance = True
        self.running = True
        self._force = False
        self._serve_metrics()
        logger.info("service %s started on %s: %s, %d handler task(s), prefetch %d, "
                    "consumer %s%s", self.service_name, self._where(),
                    "all events" if types is None else "events " + ", ".join(types),
                    self.concurrency, self.prefetch, self.consumer_id,
                    ", maintenance" if self._started_maintenance else "")

    async def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully: running handlers finish (up to ``timeout``, default
        ``shutdown_timeout``) and are settled; what is unstarted, and what is still
        running after the timeout (cancelled), is handed back. Idempotent."""
        await self._stop(cancelled=False, timeout=timeout)

    async def _stop(self, *, cancelled: bool, timeout: float | None = None) -> None:
        worker, self._worker = self._worker, None
        if not self.running or worker is None:
            return
        self.running = False
        started = time.monotonic()
        if cancelled:
            report = await worker.cancel()
        else:
            report = await worker.join(self.shutdown_timeout if timeout is None else timeout,
                                       abandon=lambda: self._force)
        if self._started_maintenance:
            self._started_maintenance = False
            await self.event_bus.stop()
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        logger.info("service %s stopped after %.1fs%s: %d in-flight event(s) finished, "
                    "%d cancelled, %d handed back for redelivery", self.service_name,
                    time.monotonic() - started,
                    " (cancelled)" if cancelled else " (forced)" if self._force else "",
                    report.finished, report.abandoned, report.left_pending + report.abandoned)

    async def close(self) -> None:
        """Stop, then release the connection (a given ``event_bus`` is left open)."""
        await self.stop()
        if self._closed:
            return
        self._closed = True
        self._close_metrics()
        bus, self._event_bus = self._event_bus, None
        if bus is not None and self._owns_bus:
            await bus.close()

    async def run(self, *, install_signals: bool = True,
                  start_timeout: float | None = None) -> None:
        """Start, then run until cancelled, SIGINT or SIGTERM; then stop and close.

        A broker that does not answer yet is waited for as in :meth:`start`, but by
        default until it answers (``start_timeout``: seconds to give up after, raising
        :class:`~relaybus.errors.BrokerUnavailableError`; it goes to the :meth:`start`
        this calls, also through a subclass's override that awaits ``super().start()``);
        a signal or :meth:`request_stop` meanwhile ends the wait. The first signal stops
        gracefully, a second stops at once (running handlers cancelled, their events
        handed back). Cancelling the task that awaits this hands every unfinished
        event back and re-raises. Signal handlers are installed only in the main
        thread (and ``install_signals``) and removed on return.
        """
        self._run_start_timeout = (self._start_bound(start_timeout),)  # for start()
        self._stopping = asyncio.Event()
        self._signalled = None
        loop = self._loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, self._on_signal, sig)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError):  # no signals on this loop
                    break
        try:
            await self.start()
            await self._stopping.wait()
            if self.running:  # not when the stop came while it waited for the broker
                logger.info("service %s: stop requested%s; stopping gracefully (within "
                            "%.0fs)", self.service_name,
                            f" ({self._signalled.name})" if self._signalled else "",
                            self.shutdown_timeout)
            await self.stop()
            if self._signalled is not None:
                logger.info("service %s: stopped on %s%s", self.service_name,
                            self._signalled.name, " (forced)" if self._force else "")
        except asyncio.CancelledError:
            await self._stop(cancelled=True)
            raise
        finally:
            self._run_start_timeout = None
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.close()

    def _on_signal(self, signum: signal.Signals) -> None:
        stopping = self._stopping
        if stopping is None:
            return
        if stopping.is_set():
            self._force = True  # the second signal: stop at once
        else:
            self._signalled = signum
        stopping.set()

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop gracefully; callable from any thread."""
        stopping, loop = self._stopping, self._loop
        if stopping is None or loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            stopping.set()
        else:
            loop.call_soon_threadsafe(stopping.set)

    async def __aenter__(self) -> AsyncMicroservice:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            await self._stop(cancelled=True)
        await self.close()


AsyncMicroservice._default_handle_event = AsyncMicroservice.handle_event
