"""The EventBus: typed publishing and shared durable subscriptions, sync front.

How an event travels is drawn in :mod:`relaybus._core.bus`: ``publish`` appends it to
the event log ``P{all}``; each subscription ``sub:NAME`` reads the log through a
consumer group of its own, keeping its event types on the server, so no process
copies events around. Subscriptions live in Redis (the hash ``Psubscriptions`` and
each subscription's meta), so every EventBus on the same server and prefix sees the
same ones, in any process.

A started bus runs one *maintenance* thread, which applies the log's retention every
few seconds. :mod:`relaybus.aio` has the same bus, awaited.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

from ._core import bus as core
from ._core.bases import EventBusBase
from ._core.bus import (
    ALL_EVENTS,
    DEFAULT_RETENTION_MAX_LEN,
    DEFAULT_RETENTION_SECONDS,
    EVENTS_QUEUE,
    ScheduledEntry,
    subscription_queue_name,
)
from ._core.incidents import Incident
from .errors import BrokerError
from .events import Event
from .keys import validate_name
from .queue import MessageQueue, Queue

__all__ = ["EventBus", "ALL_EVENTS", "EVENTS_QUEUE", "read_subscriptions",
           "subscription_queue_name", "DEFAULT_RETENTION_MAX_LEN", "DEFAULT_RETENTION_SECONDS"]

logger = logging.getLogger("relaybus.bus")


def read_subscriptions(mq: MessageQueue) -> dict[str, list[str]]:
    """Every subscription under ``mq``'s prefix, as :meth:`EventBus.subscriptions` gives it.

    For readers that must not construct an :class:`EventBus` (which creates the event
    log and rewrites its stored visibility timeout), such as ``relaybus subscriptions``.
    """
    return mq.driver.run(core.read_subscriptions(mq.prefix))


class EventBus(EventBusBase[MessageQueue]):
    """Central event bus for publishing and subscribing to events (sync front).

    ``EventBus(redis_host=..., redis_port=..., redis_db=..., prefix="events:")``
    (LeanMQ-style keywords), or ``EventBus(url)``; the arguments are described on
    :class:`relaybus._core.bases.EventBusBase`. Publishing and subscribing work without
    :meth:`start`; a started bus also runs its maintenance thread (the log's retention),
    and :meth:`run` runs it in the calling thread. Thread-safe; a context manager.
    """

    def _init_front(self) -> None:
        if self._before_open is not None:
            self._before_open(self.mq)  # a service waiting for its broker
        log = self._log_ref()
        vt = self.mq.driver.drive(self._open_flow())
        #: The event log (``all``) and the bus's dead-letter queue (``all:dlq``).
        self.events_queue = Queue(self.mq, log.with_settings(vt))
        self.events_dlq = Queue(self.mq, self.mq._ref(EVENTS_QUEUE, is_dlq=True,
                                                      visibility_timeout=vt))
        self._stop = threading.Event()
        # set to run a maintenance round now (this bus scheduled an event; a stop)
        self._wake = threading.Event()
        self._due_in: float | None = None
        self.processor_thread: threading.Thread | None = None

    def _new_mq(self, url: str | None, **options: Any) -> MessageQueue:
        return MessageQueue(url, **options)

    # -- publishing ---------------------------------------------------------------

    def publish(self, event: Event, *, delay: float | timedelta | None = None,
                at: datetime | None = None) -> str:
        """Publish an event; return its id in the event log.

        Validation happened when the event was built. Publishing the same event (same
        ``event_id``) again within ``dedup_window`` reaches each subscriber once.

        ``delay`` (seconds, or a timedelta, by the server's clock) or ``at`` (an aware
        datetime) schedules it instead: it waits on the server (durably) and is
        published, deduplicated as above, not before its time, by the bus's maintenance
        (any service's, by default, or ``relaybus maintain``): at its time when a
        maintainer knows of it (this bus runs maintenance, or it was scheduled a round
        ahead), else at the next round (``maintenance_interval``); see docs/design.md.
        The value is then its schedule id, for :meth:`cancel_scheduled`; scheduling an
        event id again replaces it.
        """
        due = core.due_of(delay, at)
        with self._sending([event]) as encoded:
            [msg_id] = self.mq.driver.run(self._publish_step(encoded, due))
        if due is not None:
            self._wake.set()  # this bus's maintenance (if it runs) learns its time
        logger.debug("published %s %s as %s", event.event_type, event.event_id, msg_id)
        return msg_id

    def publish_many(self, events: Iterable[Event], *, delay: float | timedelta | None = None,
                     at: datetime | None = None) -> list[str]:
        """Publish several events in one round trip, all or none (per partition).

        All are encoded before any is sent, and written by one script call per
        partition: when the server refuses one (out of memory), none of that call is
        written (publishing them again is safe: repeats are dropped by ``event_id``).
        ``delay`` / ``at`` schedule them all, as in :meth:`publish`.
        """
        due = core.due_of(delay, at)
        with self._sending(events) as encoded:
            ids = self.mq.driver.run(self._publish_step(encoded, due)) if encoded else []
        if due is not None:
            self._wake.set()  # this bus's maintenance (if it runs) learns their time
        return ids

    def cancel_scheduled(self, schedule_id: str) -> bool:
        """Cancel a scheduled event; True when it was still waiting (False: published
        already, cancelled before, or never scheduled)."""
        return self.mq.driver.run(core.cancel_scheduled(self.prefix, schedule_id))

    def scheduled(self, limit: int = 100) -> list[ScheduledEntry]:
        """The scheduled events still waiting (up to ``limit`` per partition), soonest
        first, with their due times by the server's clock."""
        return self.mq.driver.drive(core.scheduled(self.prefix, self.partitions, limit))

    def publish_raw(self, event_type: str, data: Mapping[str, Any], *,
                    delay: float | timedelta | None = None, at: datetime | None = None) -> str:
        """Publish ``data`` as an event of ``event_type`` with no event class; return its log id.

        For tools and bridges that have no class for the type (``relaybus publish``).
        ``event_id`` (a new uuid4) and ``timestamp`` (now) are filled in when absent; an
        ``event_type`` in ``data`` must equal ``event_type``. The fields are not validated
        here: a subscriber with a class for the type validates them on receipt and
        dead-letters what does not fit. Deduplicated by ``event_id`` like :meth:`publish`;
        ``delay`` / ``at`` schedule it as there (the value is then its schedule id).
        """
        due = core.due_of(delay, at)
        [msg_id] = self.mq.driver.run(self._publish_step([self._raw_fields(event_type, data)],
                                                         due))
        if due is not None:
            self._wake.set()  # this bus's maintenance (if it runs) learns its time
        return msg_id

    # -- subscriptions --------------------------------------------------------------

    def subscribe(self, service_name: str,
                  event_types: Iterable[str | type[Event]] | str | type[Event] | None = None,
                  *, visibility_timeout: float | None = None,
                  ordered: bool | None = None) -> str:
        """Subscribe a service to event types (None: every type, including later ones).

        ``event_types`` takes type names and :class:`Event` classes (or one of either).
        Creates the subscription queue pair ``sub:<service_name>`` and records the
        subscription in Redis, where every EventBus on this prefix sees it. The
        subscription receives every event published after this returns; calling it
        again replaces the service's types. ``ordered`` True makes the subscription
        ordered (see ``Microservice(ordered=True)``), False not; None keeps the stored
        setting. Returns the subscription queue name.
        """
        types = core.subscription_types(event_types)
        ref = self._sub_ref(service_name, visibility_timeout)
        self.mq.driver.drive(core.subscribe(ref, service_name, types, visibility_timeout,
                                            time.time(), ordered, self.partitions))
        logger.info("service %r subscribed to %s", service_name,
                    "all events" if types == [ALL_EVENTS] else ", ".join(types))
        return ref.pair_name

    def unsubscribe(self, service_name: str) -> bool:
        """Stop delivering new events to a service; return whether it was subscribed.

        What was already meant for it (delivered but not settled, or published before
        this call and of its types) is kept: it waits in its queue ``sub:<name>``.
        """
        validate_name(service_name, "service name")
        return self.mq.driver.drive(core.unsubscribe(self._sub_ref(service_name, None),
                                                     service_name, self.partitions))

    def remove_subscription(self, service_name: str) -> bool:
        """Delete a retired service's subscription and all that was kept for it (its
        queue, retries, dead letters, done records, its place in the log); return
        whether there was any. Stop its instances first: a running one subscribes again.
        """
        return self.mq.driver.drive(core.remove_subscription(self.mq.settings, service_name))

    def subscriptions(self) -> dict[str, list[str]]:
        """Every subscription under this prefix: service name -> event types (``*`` = all)."""
        return read_subscriptions(self.mq)

    def subscription_queue(self, service_name: str) -> tuple[Queue, Queue]:
        """The (queue, dlq) of a service's subscription (created if missing)."""
        return self.mq.create_queue_pair(subscription_queue_name(service_name))

    # -- maintenance ----------------------------------------------------------------

    def trim(self) -> int:
        """Apply the log's retention now (after publishing the scheduled events that are
        due); return how many events were trimmed.

        Never past an event some subscription has not read and acknowledged yet.
        """
        done = self.mq.driver.run(self._trim())
        if done.held:
            logger.debug("log trim held back by subscription %s", done.held)
        self._due_in = done.due_in
        return done.trimmed

    def start(self) -> None:
        """Start the maintenance thread (idempotent)."""
        if self.running:
            return
        self.running = True
        self._stop.clear()
        self.processor_thread = threading.Thread(target=self._maintain,
                                                 name="relaybus-maintenance", daemon=True)
        self.processor_thread.start()
        logger.info("event bus started (prefix %r)", self.prefix)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the maintenance thread (idempotent; safe in a signal handler)."""
        if not self.running:
            return
        self.running = False
        self._stop.set()
        self._wake.set()
        thread = self.processor_thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout=timeout)

    def run(self) -> None:
        """Run the maintenance loop in the calling thread until :meth:`stop`."""
        self.running = True
        self._stop.clear()
        try:
            self._maintain()
        finally:
            self.running = False

    def _maintain(self) -> None:
        incident = Incident("event bus maintenance", logger)
        pause, next_trim = 0.0, 0.0
        while True:
            self._wake.wait(pause)
            self._wake.clear()
            if self._stop.is_set():
                break
            now = time.monotonic()
            try:
                if now >= next_trim:  # a round: what is due is published, then the trim
                    self.trim()
                    due_in = self._due_in
                    next_trim = now + self.maintenance_interval
                else:  # woken early: a scheduled event is due, or this bus scheduled one
                    due_in = self.mq.driver.run(self._promote())
            except Exception as exc:  # nothing may end the loop
                pause = incident.failed(exc, time.monotonic(),
                                        expected=isinstance(exc, BrokerError))
                continue
            incident.succeeded(time.monotonic())
            pause = core.maintenance_pause(time.monotonic(), next_trim, due_in)
        logger.info("event bus maintenance stopped (prefix %r)", self.prefix)

    def close(self) -> None:
        """Stop the maintenance thread and release the connection."""
        self.stop()
        if self._owns_mq:
            self.mq.close()

    def __enter__(self) -> EventBus:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
