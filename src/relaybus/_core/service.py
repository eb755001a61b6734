"""What both fronts' services share: settings, handlers, and an event's outcome.

:class:`ServiceBase` holds everything of ``Microservice`` and ``AsyncMicroservice``
that does no IO: validating the settings, registering handlers, choosing the
subscription's types, and the two halves around a handler run:

- :meth:`ServiceBase._prepare` turns a message into the event to handle, or into an
  :class:`~relaybus._core.consumer.Outcome` without running anything (not a valid
  event, no handler, earlier deliveries never settled);
- :meth:`ServiceBase._conclude` turns what the handler did (its return value or the
  exception it raised, and when) into the outcome: acknowledge, retry after backoff,
  or dead-letter with the failure record.

Each front only calls the handler its way in between (a thread, or the event loop).
``svc.handle(event)`` (tests) goes through the same two halves, on a message made as the
bus would deliver the event (:meth:`ServiceBase._unit_prepare`), and returns a
:class:`HandleResult`; :class:`HandledGoal` is what ``wait_until_handled`` waits for.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from ..codec import JsonText, Message, decode_entry, dedup_identity, encode_entry, payload_data
from ..connection import DEFAULT_RETRY_TIMEOUT, redact
from ..errors import (
    ConfigurationError,
    EventValidationError,
    HandlerOutcome,
    Reject,
    RelaybusError,
    SerializationError,
    UnknownEventTypeError,
)
from ..events import Event, deserialize_event_strict, event_from_json, event_type_name
from ..keys import validate_name
from ..retry import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RETRY_BACKOFF,
    DEFAULT_RETRY_BACKOFF_MAX,
    Action,
    Decision,
    RetryPolicy,
)
from . import tracing
from .bus import (
    ALL_EVENTS,
    event_fields,
    partition_refs,
    subscribe,
    subscription_queue_name,
    subscription_types,
)
from .consumer import DEFAULT_BLOCK_FOR_SECONDS, Consumer, Counters, Outcome, default_prefetch
from .queue import Counts, QueueRef
from .replies import text
from .steps import Flow
from .telemetry import Telemetry

__all__ = ["ServiceBase", "WILDCARD", "STAT_NAMES", "MAX_TRACEBACK_CHARS", "MAX_MESSAGE_CHARS",
           "DEFAULT_START_TIMEOUT", "HANDLED_IDS_KEPT", "HandleResult", "HandledGoal",
           "returns_awaitable"]

logger = logging.getLogger("relaybus.service")

F = TypeVar("F", bound=Callable[..., Any])

#: ``@svc.on(WILDCARD)`` handles every event type that has no handler of its own.
WILDCARD = ALL_EVENTS
#: The counters in a service's ``stats``.
STAT_NAMES = ("received", "handled", "failed", "retried", "dead_lettered", "invalid",
              "duplicates", "errors", "lease_lapsed")
#: Longest traceback kept in a failure record, in characters (the end is kept).
MAX_TRACEBACK_CHARS = 8000
#: Longest exception message kept in a failure record, in characters.
MAX_MESSAGE_CHARS = 2000
#: Seconds a plain ``start()`` waits for a broker that does not answer (as long as one
#: operation retries by default); ``run_forever``, ``run()`` and ``relaybus run`` wait
#: for ever unless given a ``start_timeout``.
DEFAULT_START_TIMEOUT = DEFAULT_RETRY_TIMEOUT
#: How many of the latest handled event ids an instance remembers (``wait_until_handled``).
HANDLED_IDS_KEPT = 10_000
#: Reason a sync service dead-letters an event whose handler returned an awaitable.
AWAITABLE_REASON = ("handler returned an awaitable, which a Microservice never awaits: "
                    "run async handlers in an AsyncMicroservice")


_ACK = Decision(Action.ACK)
_UNTRACED: AbstractContextManager[bool] = nullcontext(False)


def _clip(value: str, limit: int, keep_end: bool = False) -> str:
    if len(value) <= limit:
        return value
    return "..." + value[-limit:] if keep_end else value[:limit] + "..."


def qualname(obj: object) -> str:
    """``module.qualname`` of a function or class (for failure records and errors)."""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
    module = getattr(obj, "__module__", None)
    return f"{module}.{name}" if module else str(name)


def returns_awaitable(fn: Callable[..., Any]) -> bool:
    """True for an ``async def`` function (also behind ``functools.partial``) or an
    object whose ``__call__`` is one."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - a callable object's method
    return call is not None and inspect.iscoroutinefunction(call)


B = TypeVar("B")  # the front's event bus class


class ServiceBase(Generic[B]):
    """Settings, handlers and outcomes of a service (see the module docstring)."""

    #: Whether the front awaits ``async def`` handlers (the asyncio front does).
    _awaits_handlers = False

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
        maintenance: bool = True,
        block_for_seconds: float = DEFAULT_BLOCK_FOR_SECONDS,
        ordered: bool = False,
        event_bus: B | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "0.0.0.0",
        tracing: bool = True,
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
            prefetch = default_prefetch(concurrency)
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < concurrency:
            raise ConfigurationError(f"prefetch must be an integer >= concurrency ({concurrency}),"
                                     f" not {prefetch!r}")
        for name, value in (("visibility_timeout", visibility_timeout),
                            ("block_for_seconds", block_for_seconds)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigurationError(f"{name} must be a positive number of seconds, "
                                         f"not {value!r}")
        if not isinstance(shutdown_timeout, (int, float)) or not shutdown_timeout >= 0:
            raise ConfigurationError(f"shutdown_timeout must be a number of seconds >= 0, "
                                     f"not {shutdown_timeout!r}")
        self._metrics_server: Any = None
        self._apply_metrics(metrics_port, metrics_host)
        #: A ``process`` span per handler run when the application traces (its own bus
        #: gets the same setting; see docs/operating.md).
        self.tracing = bool(tracing)
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.retry_policy = RetryPolicy(max_attempts, float(retry_backoff),
                                        float(retry_backoff_max))
        self.max_attempts = max_attempts
        self.visibility_timeout = float(visibility_timeout)
        self.shutdown_timeout = float(shutdown_timeout)
        self.maintenance = bool(maintenance)
        self.block_for_seconds = float(block_for_seconds)
        #: Events of one ``partition_key`` are handled one at a time, in publish order,
        #: across every instance of the service (the subscription stores it).
        self.ordered = bool(ordered)
        self.prefix: str = getattr(event_bus, "prefix", prefix)
        #: True between ``start`` and ``stop``.
        self.running = False
        #: This instance's consumer name in the subscription's group (set by ``start``).
        self.consumer_id: str | None = None
        self._url = url
        self._redis = (redis_host, int(redis_port), int(redis_db))
        self._bus_options = dict(bus_options)
        self._handlers: dict[str, Callable[[Any], Any]] = {}
        self._dispatch: dict[str, Callable[[Any], Any] | None] = {}
        self._counters = Counters(STAT_NAMES)
        #: The latest event ids this instance handled -> their message ids (bounded).
        self._handled_ids: OrderedDict[str, str] = OrderedDict()
        #: Labelled counts for the metrics (:mod:`relaybus.metrics`).
        self._telemetry = Telemetry()
        self._closed = False
        self._event_bus = event_bus
        self._owns_bus = event_bus is None
        self._connect_lock = threading.Lock()
        self._started_maintenance = False
        self._force = False  # a second signal: stop at once (a plain flag: signal-safe)
        #: The start_timeout run() / run_forever() gave the start() they call (once).
        self._run_start_timeout: tuple[float | None] | None = None
        self._init_front()

    def _init_front(self) -> None:
        """What the front sets up after the settings (its worker's state)."""

    def _new_bus(self, url: str | None, **options: Any) -> B:
        raise NotImplementedError

    @property
    def event_bus(self) -> B:
        """The service's event bus (made, and connected, on first use)."""
        return self._bus()

    def _bus(self, before_open: Callable[[Any], object] | None = None) -> B:
        """The event bus; a new one calls ``before_open(mq)`` before it first talks to the
        server (the sync bus opens its log when built)."""
        with self._connect_lock:
            if self._event_bus is None:
                if self._closed:
                    raise RelaybusError(f"service {self.service_name!r} is closed")
                host, port, db = self._redis
                options = dict(self._bus_options)
                if before_open is not None:
                    options["_before_open"] = before_open
                self._event_bus = self._new_bus(self._url, redis_host=host, redis_port=port,
                                                redis_db=db, prefix=self.prefix,
                                                tracing=self.tracing, **options)
            return self._event_bus

    @staticmethod
    def _server(driver: Any) -> str:
        """The server a driver talks to: its URL with the password redacted (its address
        for a bus made on a client of one's own), for logs."""
        url = str(driver.url)
        return redact(url) if "://" in url else str(driver.address)

    def _where(self) -> str:
        """The server (password redacted) and prefix this service uses, for its logs."""
        bus: Any = self.event_bus
        return f"{self._server(bus.mq.connection)}, prefix {bus.prefix!r}"

    # -- waiting for the broker at start ------------------------------------------------

    @staticmethod
    def _start_bound(start_timeout: float | None) -> float | None:
        """``start_timeout`` checked: seconds >= 0, or None (wait for ever)."""
        if start_timeout is not None and (isinstance(start_timeout, bool) or
                                          not isinstance(start_timeout, (int, float)) or
                                          not start_timeout >= 0):
            raise ConfigurationError(f"start_timeout must be a number of seconds >= 0 or None "
                                     f"(wait for ever), not {start_timeout!r}")
        return None if start_timeout is None else float(start_timeout)

    def _start_timeout(self, given: float | None) -> float | None:
        """The bound of this start: what ``run()`` / ``run_forever()`` asked for, when
        they called it (so a ``start()`` overridden in a subclass that calls
        ``super().start()`` gets theirs too), else ``given``."""
        asked, self._run_start_timeout = self._run_start_timeout, None
        return self._start_bound(asked[0] if asked is not None else given)

    def _on_broker_wait(self, driver: Any, start_timeout: float | None
                        ) -> Callable[[BaseException], None]:
        """What ``driver.reach`` calls once when the broker does not answer at start: one
        warning naming the server (password redacted) and how long the service keeps
        trying."""
        def waiting(error: BaseException) -> None:
            logger.warning("service %s: waiting for the broker at %s (%s); retrying %s",
                           self.service_name, self._server(driver), " ".join(str(error).split()),
                           "until it answers" if start_timeout is None
                           else f"for up to {start_timeout:g}s")
        return waiting

    def _apply_metrics(self, port: int | None, host: str = "0.0.0.0") -> None:
        """Serve metrics on ``host:port`` from the next ``start`` (the runner's
        ``--metrics-port``); None: nowhere."""
        if port is not None:
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise ConfigurationError(f"metrics_port must be a port number (0 to 65535), "
                                         f"not {port!r}")
            try:
                import prometheus_client  # noqa: F401 - the extra is there
            except ImportError:
                raise ConfigurationError("metrics_port needs prometheus-client: pip install "
                                         "'relaybus[metrics]'") from None
        #: Where ``start`` serves ``/metrics``, ``/healthz`` and ``/readyz`` (None: nowhere).
        self.metrics_port = port
        self.metrics_host = host

    def _serve_metrics(self) -> None:
        """Open the metrics port (once; ``close`` closes it), when one was asked for."""
        if self.metrics_port is not None and self._metrics_server is None:
            from ..metrics import serve
            self._metrics_server = serve(self, port=self.metrics_port, host=self.metrics_host)

    def _close_metrics(self) -> None:
        server, self._metrics_server = self._metrics_server, None
        if server is not None:
            server.close()

    def _not_started(self, driver: Any) -> None:
        """Log that a stop requested while waiting for the broker ended the start."""
        logger.info("service %s: stop requested while waiting for the broker at %s; not "
                    "started", self.service_name, self._server(driver))

    def _apply_url(self, url: str) -> None:
        """Point a service that has not connected yet at ``url`` (the runner's ``--url``)."""
        with self._connect_lock:
            if self._event_bus is not None:
                raise ConfigurationError(
                    f"service {self.service_name!r} is already connected (or was given an "
                    "event_bus); it cannot be pointed at another URL")
            self._url = url

    def __repr__(self) -> str:
        state = "running" if self.running else "closed" if self._closed else "stopped"
        return f"<{type(self).__name__} {self.service_name!r} {state}>"

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

    def _new_consumer_id(self) -> str:
        return str(self._bus_options.get("consumer_id") or
                   f"{self.service_name}@{socket.gethostname()}-{os.getpid()}-"
                   f"{uuid.uuid4().hex[:6]}")

    # -- handlers ---------------------------------------------------------------------

    def on(self, *event_types: str | type[Event]) -> Callable[[F], F]:
        """Register the decorated function as the handler of ``event_types``.

        ``handler(event) -> Any``: returning ``False`` dead-letters the event,
        returning anything else acknowledges it, raising retries it (see the module
        docstring). ``"*"`` handles every type without a handler of its own. One
        handler per type; register before ``start``. Returns the function as is.
        """
        if not event_types:
            raise TypeError("on() needs at least one event type (or '*' for every type)")
        names = [event_type_name(t) for t in event_types]

        def register(fn: F) -> F:
            if not callable(fn):
                raise TypeError(f"on() decorates a callable, not {fn!r}")
            if returns_awaitable(fn) and not self._awaits_handlers:
                raise TypeError(f"{qualname(fn)} is an async function, which a {type(self).__name__}"
                                " would never await (its events would be acknowledged unhandled)"
                                ": use relaybus.AsyncMicroservice for async handlers")
            if self.running:
                raise ConfigurationError("register handlers before start()")
            for name in names:
                existing = self._handlers.get(name)
                if existing is not None and existing is not fn:
                    raise ConfigurationError(
                        f"event type {name!r} already has a handler in service "
                        f"{self.service_name!r}: {qualname(existing)}")
            for name in names:
                self._handlers[name] = fn
            self._dispatch.clear()
            return fn

        return register

    @property
    def handlers(self) -> Mapping[str, Callable[[Any], Any]]:
        """The registered handlers: event type name (or ``"*"``) -> function (a copy)."""
        return dict(self._handlers)

    #: The front's own ``handle_event`` (which dispatches to the ``@on`` handlers).
    _default_handle_event: Callable[..., Any] | None = None

    def _overrides_handle_event(self) -> bool:
        """True when a subclass wrote its own ``handle_event`` (the subclassing form)."""
        cls = type(self)
        own = getattr(cls, "handle_event", None)
        return own is not None and own is not cls._default_handle_event

    def _check_startable(self) -> None:
        if not self._handlers and not self._overrides_handle_event():
            raise ConfigurationError(
                f"service {self.service_name!r} has no handlers: decorate functions with "
                "@service.on(EventType) or override handle_event")
        own = getattr(type(self), "handle_event")  # noqa: B009 - not every front has one
        if self._overrides_handle_event() and returns_awaitable(own) and \
                not self._awaits_handlers:
            raise TypeError(f"{qualname(type(self))}.handle_event is async, which a "
                            f"{type(self).__name__} would never await: derive from "
                            "relaybus.AsyncMicroservice instead")

    def _handler_of(self, event_type: str) -> Callable[[Any], Any] | None:
        """The function that handles ``event_type``: ``handle_event`` when overridden,
        else the ``@on`` handler of the type (or ``"*"``); None when there is none."""
        handler = self._dispatch.get(event_type)
        if handler is None and event_type not in self._dispatch:
            if self._overrides_handle_event():
                handler = getattr(self, "handle_event")  # noqa: B009
            else:
                handler = self._handlers.get(event_type) or self._handlers.get(WILDCARD)
            self._dispatch[event_type] = handler  # handlers are fixed once started
        return handler

    def _handler_name(self, event_type: str) -> str:
        if self._overrides_handle_event():
            return f"{qualname(type(self))}.handle_event"
        handler = self._handlers.get(event_type) or self._handlers.get(WILDCARD)
        return qualname(handler) if handler is not None else "<none>"

    def _consumers(self, ref: QueueRef, partitions: int, counts: Counts) -> list[Consumer]:
        """One consumer per partition of the subscription ``ref`` (partition 0), sharing
        the prefetch (each at least 1) and the service's counters; ``counts``: the queue
        layer's (``mq.stats``)."""
        refs = partition_refs(ref, partitions)
        prefetch = max(1, -(-self.prefetch // len(refs)))
        assert self.consumer_id is not None
        return [Consumer(r, self.consumer_id, prefetch=prefetch,
                         block_for_seconds=self.block_for_seconds, counters=self._counters,
                         name=self.service_name if i == 0 else f"{self.service_name}@{i}",
                         queue_counts=Counts(parent=counts), telemetry=self._telemetry)
                for i, r in enumerate(refs)]

    def _resubscribe(self, ref: QueueRef) -> Flow[Any]:
        """After the server lost the subscription (flushed): subscribe again."""
        types = subscription_types(self._subscription_types())
        return subscribe(ref, self.service_name, types, self.visibility_timeout, time.time(),
                         self.ordered)

    def _subscription_types(self) -> list[str] | None:
        if self.event_types is not None:
            return list(self.event_types)
        if self._handlers and WILDCARD not in self._handlers and \
                not self._overrides_handle_event():
            return sorted(self._handlers)
        return None

    # -- an event's outcome (runs wherever handlers run) --------------------------------

    def _prepare(self, message: Message) -> tuple[Event, Callable[[Any], Any]] | Outcome:
        """The event and its handler, or the outcome when nothing is to run."""
        try:
            if message.data or not message.payload:
                event = deserialize_event_strict(message.data)
            else:  # straight from JSON: the entry's routing field names the class
                routing = message.fields.get(b"e")
                event = event_from_json(message.payload, text(routing) if routing else None)
        except (UnknownEventTypeError, EventValidationError, SerializationError) as exc:
            self._counters.incr("invalid")
            data = payload_data(message)
            details = dict(self._base_details(message), error_type=type(exc).__name__,
                           event_type=str(data.get("event_type", "")),
                           event_id=str(data.get("event_id", "")))
            if isinstance(exc, EventValidationError):
                details["errors"] = [{"loc": ".".join(str(p) for p in e.get("loc", ())),
                                      "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                                     for e in exc.errors]
            logger.error("service %s: dead-lettering message %s: %s", self.service_name,
                         message.id, exc)
            return Outcome(Decision(Action.DEAD_LETTER, reason=str(exc)), details=details,
                           invalid=True)
        attempt = message.attempts
        if attempt > self.max_attempts:
            # earlier deliveries were never settled: their instances died (a poison event?)
            reason = (f"max attempts ({self.max_attempts}) reached: delivered {attempt} times, "
                      "earlier deliveries unsettled (their consumer died or lost its lease)")
            logger.error("service %s: dead-lettering %s %s: %s", self.service_name,
                         event.event_type, event.event_id, reason)
            return Outcome(Decision(Action.DEAD_LETTER, reason=reason),
                           details=dict(self._base_details(message), event_type=event.event_type,
                                        event_id=event.event_id, published_at=event.timestamp,
                                        max_attempts=self.max_attempts))
        handler = self._handler_of(event.event_type)
        if handler is None:
            reason = (f"no handler for event type {event.event_type!r} in service "
                      f"{self.service_name!r}")
            return self._conclude(message, event, None, Reject(reason), time.time(), time.time())
        return event, handler

    def _processing(self, message: Message, event: Event) -> AbstractContextManager[bool]:
        """The ``process`` span of a handler run (see :mod:`._core.tracing`); it gives
        whether it traces, for :meth:`_conclude`."""
        if not tracing.active(self.tracing):
            return _UNTRACED  # the hot path when not tracing: no generator per event
        return tracing.processing(self.tracing, event.headers, event_id=event.event_id,
                                  event_type=event.event_type,
                                  subscription=self.subscription_queue_name,
                                  service=self.service_name, attempt=message.attempts)

    def _base_details(self, message: Message) -> dict[str, Any]:
        return {"service": self.service_name, "consumer": self.consumer_id,
                "enqueued_at": message.timestamp}

    def _conclude(self, message: Message, event: Event, result: object,
                  error: BaseException | None, started: float, finished: float,
                  traced: bool = False) -> Outcome:
        """The outcome of a handler run that returned ``result`` or raised ``error``
        (``traced``: inside a ``process`` span, which gets the outcome)."""
        took = max(0.0, finished - started)
        if error is None and result is not False and (result is None or
                                                      not inspect.isawaitable(result)):
            if traced:
                tracing.record_outcome("handled", None)
            if message.queue:  # read from the subscription (not one of handle()'s)
                self._note_handled(event.event_id, message.id)
            routing = message.fields.get(b"e")  # its dedup identity: type and id
            return Outcome(_ACK, done_key=dedup_identity(
                text(routing) if routing else event.event_type,
                message.dedup_key or event.event_id), took=took)
        attempt = message.attempts
        if error is None and inspect.isawaitable(result):
            close = getattr(result, "close", None)
            if callable(close):
                close()  # a never-awaited coroutine: no "never awaited" warning
            error = Reject(AWAITABLE_REASON)
        decision = self.retry_policy.decide(attempt, result=result, error=error)
        if traced:
            tracing.record_outcome("retried" if decision.action is Action.RETRY
                                   else "dead_lettered", error)
        label = f"{event.event_type} {event.event_id} (attempt {attempt}/{self.max_attempts})"
        details = dict(self._base_details(message), handler=self._handler_name(event.event_type),
                       event_type=event.event_type, event_id=event.event_id,
                       published_at=event.timestamp, started_at=started, finished_at=finished,
                       max_attempts=self.max_attempts)
        if error is not None and not isinstance(error, HandlerOutcome):
            self._counters.incr("failed")
            details["exception_type"] = qualname(type(error))
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
        return Outcome(decision, details=details, took=took)

    # -- testing: one event through the handler, waiting for handled events -------------

    def _note_handled(self, event_id: str, message_id: str) -> None:
        """Remember that ``event_id`` (message ``message_id``) was handled here."""
        handled = self._handled_ids
        handled[event_id] = message_id
        if len(handled) > HANDLED_IDS_KEPT:
            handled.popitem(last=False)

    def _unsettled(self, message_ids: list[str]) -> bool:
        """Whether this instance still holds any of ``message_ids`` (handled, not yet
        acknowledged); the front knows its workers."""
        return False

    def _unit_message(self, event: Event | Mapping[str, Any], attempt: int) -> Message:
        """``event`` as the worker reads it: encoded as the bus publishes it (a mapping:
        as the payload), then decoded as read from the subscription, at ``attempt``."""
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise ValueError(f"attempt must be an integer >= 1, not {attempt!r}")
        now = time.time()

        def encode(data: Mapping[str, Any] | JsonText, **keys: Any) -> dict[str, str | int]:
            return encode_entry(data, now=now, **keys)

        if isinstance(event, Event):
            fields = event_fields(encode, event)
        elif isinstance(event, Mapping):
            kind, key, part = (event.get(k) for k in ("event_type", "event_id", "partition_key"))
            fields = encode(event, dedup_key=str(key) if key else None,
                            routing_key=kind if isinstance(kind, str) and kind else None,
                            partition_key=part if isinstance(part, str) and part else None)
        else:
            raise TypeError(f"handle() takes an Event or a payload dict, not "
                            f"{type(event).__name__}")
        if attempt > 1:
            fields["n"] = attempt - 1  # the attempts before this one
        raw = {k.encode(): str(v).encode() for k, v in fields.items()}  # as the server replies
        # no queue: handle()'s messages are not remembered as handled (wait_until_handled)
        return decode_entry(f"{int(now * 1000)}-0", raw, 1, parse=False)

    def _unit_prepare(self, event: Event | Mapping[str, Any], attempt: int
                      ) -> tuple[Message, Event, Callable[[Any], Any]] | HandleResult:
        """What ``handle()`` runs (its message, the event and its handler), or its result
        when no handler is to run (an invalid event, none for its type)."""
        message = self._unit_message(event, attempt)
        prepared = self._prepare(message)
        if isinstance(prepared, Outcome):
            return HandleResult.of(prepared, attempt)
        return message, prepared[0], prepared[1]

    def _unit_conclude(self, message: Message, event: Event, result: object,
                       error: BaseException | None, started: float) -> HandleResult:
        """``handle()``'s result once the handler returned ``result`` or raised ``error``."""
        outcome = self._conclude(message, event, result, error, started, time.time())
        return HandleResult.of(outcome, message.attempts, event=event, result=result,
                               error=error)

    def _handled_goal(self, count: int | None,
                      event_ids: str | Event | Iterable[str | Event] | None) -> HandledGoal:
        return HandledGoal(self, count, event_ids)


#: What ``handle()`` found an event's outcome to be.
HandleOutcome = Literal["handled", "retried", "dead_lettered", "invalid"]


@dataclass(frozen=True)
class HandleResult:
    """The outcome of one event run through a service's handler by ``svc.handle(event)``.

    ``outcome``: ``"handled"`` (acknowledged), ``"retried"`` (after ``retry_delay``
    seconds), ``"dead_lettered"`` (``reason`` says why: a ``Reject``'s reason, ``handler
    returned False``, ``max attempts (N) reached: ...``, ``no handler for event type
    ...``) or ``"invalid"`` (not a valid event: unknown type, failed validation; also
    dead-lettered). ``error``: what the handler raised; ``result``: what it returned;
    ``event``: the event it was given (None when it did not run); ``details``: the
    failure record's details (empty when handled).
    """

    outcome: HandleOutcome
    reason: str | None = None
    retry_delay: float | None = None
    error: BaseException | None = None
    result: object = None
    event: Event | None = None
    attempt: int = 1
    details: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def handled(self) -> bool:
        """True when the event was handled (acknowledged)."""
        return self.outcome == "handled"

    @classmethod
    def of(cls, outcome: Outcome, attempt: int, *, event: Event | None = None,
           result: object = None, error: BaseException | None = None) -> HandleResult:
        """The result of the worker's ``outcome`` for an event at ``attempt``."""
        decision = outcome.decision
        kind: HandleOutcome = ("invalid" if outcome.invalid else
                               "handled" if decision.action is Action.ACK else
                               "retried" if decision.action is Action.RETRY else "dead_lettered")
        return cls(kind, reason=decision.reason or None,
                   retry_delay=decision.delay if decision.action is Action.RETRY else None,
                   error=error, result=result, event=event, attempt=attempt,
                   details=dict(outcome.details or {}))


class HandledGoal:
    """What ``wait_until_handled`` waits for: ``count`` events handled by a service
    instance in all (its ``stats["handled"]``), and each of ``event_ids`` handled
    there and acknowledged."""

    def __init__(self, service: ServiceBase[Any], count: int | None,
                 event_ids: str | Event | Iterable[str | Event] | None) -> None:
        if count is None and event_ids is None:
            raise TypeError("wait_until_handled() needs a count or event_ids")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                                  or count < 0):
            raise ValueError(f"count must be an integer >= 0, not {count!r}")
        if event_ids is None:
            ids: list[str] = []
        elif isinstance(event_ids, (str, Event)):
            ids = [_event_id(event_ids)]
        else:
            ids = [_event_id(i) for i in event_ids]
        self.service = service
        self.count = count
        self.event_ids = list(dict.fromkeys(ids))

    def _missing(self) -> list[str]:
        handled = self.service._handled_ids
        return [i for i in self.event_ids if i not in handled]

    def reached(self) -> bool:
        """True once every part of the goal is met."""
        svc = self.service
        if self.count is not None and svc.stats["handled"] < self.count:
            return False
        if not self.event_ids:
            return True
        if self._missing():
            return False
        handled = svc._handled_ids
        return not svc._unsettled([handled[i] for i in self.event_ids if i in handled])

    def describe(self) -> str:
        """The goal and how far it got (for the timeout's message)."""
        svc = self.service
        wanted = []
        if self.count is not None:
            wanted.append(f"{self.count} event(s) in all (handled so far: "
                          f"{svc.stats['handled']})")
        if self.event_ids:
            missing = self._missing()
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more"
                                              if len(missing) > 5 else "")
            wanted.append(f"{len(self.event_ids)} listed event(s) (" + (
                f"{len(self.event_ids) - len(missing)} handled; not handled: {shown}"
                if missing else "all handled, not yet acknowledged") + ")")
        state = "" if svc.running else "; the service is not running"
        return f"service {svc.service_name!r} to handle " + " and ".join(wanted) + state


def _event_id(value: str | Event) -> str:
    if isinstance(value, Event):
        return value.event_id
    if not isinstance(value, str):
        raise TypeError(f"event_ids takes event ids (str) or events, not {type(value).__name__}")
    return value
