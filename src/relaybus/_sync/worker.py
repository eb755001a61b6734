"""The sync consume loop: the core's :class:`~relaybus._core.consumer.Consumer` on threads.

Threads over one subscription queue, all sharing one lock around the consumer state:

- one **fetcher**, which fetches while the consumer wants more (backpressure:
  at most ``prefetch`` held) and otherwise waits on the server (``XREAD BLOCK``,
  which consumes nothing);
- ``concurrency`` **handler threads**, each running one message at a time through
  ``process`` and handing its :class:`~relaybus._core.consumer.Outcome` back; with
  ``concurrency`` 1 there is none: the fetcher runs what it fetched itself (one
  thread hand-off less per batch), then fetches again (so a long-running handler
  holds only what was fetched with it: the rest waits for any instance);
- one **settler**, which sends every finished message since its last call as one
  script call (and the lease extensions when due): the hot path has no round trip per
  message. Its lease extension never waits on a handler.

Failures of the broker never end a loop: each backs off, logs once per incident and
once on recovery (:mod:`relaybus._core.incidents`), and resumes. A bug in ``process``
is logged and leaves the message pending for redelivery; the thread goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .._core.consumer import Consumer, Outcome, StopReport
from .._core.incidents import Incident
from .._core.queue import QueueRef
from .._core.steps import Flow
from ..codec import Message
from ..errors import BrokerError
from .driver import Driver

__all__ = ["Worker", "Workers"]

logger = logging.getLogger("relaybus.worker")

#: A handling thread lets go of the GIL once it has run this long (seconds) since it
#: last did, so that a fetch or settle reply that came meanwhile is read within about
#: this time, not after the interpreter's switch interval (5 ms). Not after every
#: message: each hand-off of the GIL costs a thread switch (a third of the sync
#: front's fan-out throughput when it was done per message).
YIELD_AFTER = 0.001


def _yield_if_due(mark: float) -> float:
    """Let go of the GIL when ``YIELD_AFTER`` has passed since ``mark``; the new mark."""
    now = time.monotonic()
    if now - mark < YIELD_AFTER:
        return mark
    time.sleep(0)
    return time.monotonic()


class Worker:
    """Consumes one queue with ``concurrency`` handler threads (see the module docstring).

    ``process`` turns a message into an :class:`Outcome`; it runs in handler threads,
    so it must be thread-safe when ``concurrency > 1``. ``recover``, when given,
    recreates what a flushed server lost before fetching again. A worker runs once.
    """

    def __init__(self, driver: Driver, consumer: Consumer,
                 process: Callable[[Message], Outcome], *, concurrency: int = 1,
                 recover: Callable[[QueueRef], Flow[Any]] | None = None) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.driver = driver
        self.core = consumer
        self.process = process
        self.concurrency = concurrency
        self.recover = recover
        self.name = consumer.name
        self._lock = threading.Lock()
        # one lock, a condition per kind of waiter (notify only who can go on)
        self._work = threading.Condition(self._lock)  # handlers: a message is buffered
        self._room = threading.Condition(self._lock)  # the fetcher: room to fetch into
        self._to_settle = threading.Condition(self._lock)  # the settler: something finished
        self._idle = threading.Condition(self._lock)  # join: a settle completed
        self._threads: list[threading.Thread] = []
        self._halted = False  # set without a lock by halt() (signal handlers)
        #: Concurrency 1: handlers run on the fetcher's thread (one hand-off less).
        self._inline = concurrency == 1

    @property
    def in_flight(self) -> int:
        """Messages held by this worker: fetched and not yet settled."""
        with self._lock:
            return len(self.core.held)

    def owns_current_thread(self) -> bool:
        """True when called from one of this worker's threads (a handler, say)."""
        return threading.current_thread() in self._threads

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the fetcher, the settler and the handler threads."""
        if self._threads:
            raise RuntimeError("a worker runs once; create a new one")
        targets = [(self._fetch_loop, "fetch"), (self._settle_loop, "settle")] + \
            [(self._handler_loop, f"handler-{i}") for i in range(self.concurrency)
             if not self._inline]
        self._threads = [threading.Thread(target=t, daemon=True,
                                          name=f"relaybus-{self.name}-{label}")
                         for t, label in targets]
        for t in self._threads:
            t.start()

    def halt(self) -> None:
        """Start no new handler and no new fetch from now on. Safe in a signal handler
        (takes no lock); :meth:`join` does the rest later."""
        self._halted = True

    def join(self, timeout: float, abandon: Callable[[], bool] | None = None) -> StopReport:
        """Stop: wait up to ``timeout`` seconds for running handlers and their settling.

        ``abandon``, polled while waiting, cuts the wait short when it returns True (a
        second signal). Then every fetched-but-unstarted message is handed back at once
        (another instance takes them without waiting for their lease), and the consumer
        leaves its group if it holds nothing. Handlers still running are abandoned: their
        threads (daemons) run on, their messages stay pending; one that finishes later
        settles its message itself, else it is redelivered after the visibility timeout.
        """
        started = time.monotonic()
        deadline = started + max(0.0, timeout)
        with self._lock:
            self.core.stop()
            self._wake_all()
            while not self.core.idle():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (abandon is not None and abandon()):
                    break
                self._idle.wait(min(remaining, 0.1))
            abandoned = self.core.abandon()
            unstarted = len(self.core.buffer)
            finished = self.core.settled_while_stopping
            self._wake_all()
            batch = self.core.hand_back()
        if abandoned:
            logger.warning("%s: %d events still with running handlers after %.1fs; they "
                           "stay pending (settled if they finish, else redelivered after the "
                           "visibility timeout)", self.name, abandoned,
                           time.monotonic() - started)
        try:
            done = self.driver.drive(self.core.settle_flow_for(batch), retry_timeout=1.0)
        except Exception as exc:  # best effort: they lapse as after a crash
            logger.warning("%s: could not hand back %d events (%s); they will be redelivered "
                           "after the visibility timeout", self.name, len(batch.release), exc)
        else:
            if done.released:
                logger.info("%s: handed back %d events", self.name, done.released)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=0.0 if abandoned else 0.5)
        return StopReport(finished=finished, abandoned=abandoned, left_pending=unstarted)

    @property
    def _stopping(self) -> bool:
        return self.core.stopping or self._halted

    def _wake_all(self) -> None:
        for cond in (self._work, self._room, self._to_settle, self._idle):
            cond.notify_all()

    # -- fetching -------------------------------------------------------------------

    def _fetch_loop(self) -> None:
        incident = Incident(f"{self.name}: fetching", logger)
        while True:
            with self._lock:
                while not self._stopping and self.core.fetch_count() == 0:
                    self._room.wait()
                if self._stopping:
                    return
                flow = self.core.fetch(self.core.fetch_count(), time.monotonic, self.recover)
            try:
                messages = self.driver.drive(flow)
            except Exception as exc:  # a broker outage, or a bug: the loop goes on
                pause = incident.failed(exc, time.monotonic(),
                                        expected=isinstance(exc, BrokerError))
                with self._lock:
                    self._room.wait_for(lambda: self._stopping, pause)
                continue
            incident.succeeded(time.monotonic())
            with self._lock:
                late = self.core.late(messages) if self._stopping else None
            if late is not None:
                self._hand_back_late(late)
                return
            with self._lock:
                now = time.monotonic()
                new = self.core.fetched(messages, now)
                if new and not self._inline:
                    self._work.notify(new)
                # the settler: a lease schedule begins (it held nothing), a lease
                # extension is due, or skipped entries wait to be acknowledged
                if (new and new == len(self.core.held)) or self.core.skipped \
                        or self.core.lease_due(now):
                    self._to_settle.notify()
            if new and self._inline:
                self._handle_buffered()
            elif new:
                time.sleep(0)  # let go of the GIL: a woken handler starts before the next fetch

    def _hand_back_late(self, batch: Any) -> None:
        """A blocking read that was waiting when the stop came brought messages: hand
        them back at once (else they would wait a visibility timeout for another
        instance)."""
        if not batch:
            return
        try:
            done = self.driver.drive(self.core.settle_flow_for(batch), retry_timeout=1.0)
        except Exception as exc:  # best effort: they lapse as after a crash
            logger.warning("%s: could not hand back %d events fetched while stopping (%s); "
                           "they will be redelivered after the visibility timeout", self.name,
                           len(batch.release), exc)
        else:
            if done.released:
                logger.info("%s: handed back %d events fetched while stopping", self.name,
                            done.released)

    # -- handling -------------------------------------------------------------------

    def _handler_loop(self) -> None:
        mark = time.monotonic()
        while True:
            with self._lock:
                taken: list[Message] = []
                while not self._stopping and not (taken := self.core.take_some(self.concurrency)):
                    self._work.wait()
                if not taken:
                    return
                if not self.core.buffer:
                    self._room.notify()  # nothing buffered now: the fetcher may refill
            self._handle(taken)
            mark = _yield_if_due(mark)

    def _handle_buffered(self) -> None:
        """Concurrency 1: the fetcher runs what it fetched itself (no hand-off to a
        handler thread), chunk by chunk, then fetches again."""
        mark = time.monotonic()
        while True:
            with self._lock:
                taken = self.core.take_some(1)
            if not taken:
                return
            self._handle(taken)
            mark = _yield_if_due(mark)

    def _handle(self, taken: list[Message]) -> None:
        """Run ``taken`` through ``process`` and hand the outcomes to the settler."""
        done: list[tuple[Message, Outcome]] = []
        failed: list[Message] = []
        for message in taken:
            if self._stopping:  # stopping: start nothing more, hand the rest back
                break
            try:
                done.append((message, self.process(message)))
            except BaseException:  # a bug (even SystemExit) must not end the thread
                logger.exception("%s: unexpected error handling message %s; it stays "
                                 "pending and will be redelivered after the visibility "
                                 "timeout", self.name, message.id)
                failed.append(message)
        with self._lock:
            now = time.monotonic()
            waiting = len(self.core.finished)
            for message, outcome in done:
                self.core.finish(message, outcome, now)
            for message in failed:
                self.core.counters.incr("errors")
                self.core.dropped(message)
            for message in taken[len(done) + len(failed):]:  # stopping: never started
                self.core.unfinished(message)
            # wake only who can go on: the settler when a batch is due or its delay
            # starts, the fetcher when it is another thread, a stop that waits
            if waiting == 0 or self.core.wants_settle(now) or failed:
                self._to_settle.notify()
            if not self._inline:
                self._room.notify()
            if self.core.stopping:
                self._idle.notify_all()
            late = self.core.settle_batch(time.monotonic()) if self.core.abandoned else None
        if late is not None:  # finished after the stop gave up waiting: settle it here
            self._settle_late(late)

    # -- settling -------------------------------------------------------------------

    def _settle_late(self, batch: Any) -> None:
        result: Any
        try:
            result = self.driver.drive(self.core.settle_flow(batch))
        except Exception as exc:  # best effort: the messages stay pending, redelivered
            result = exc
        with self._lock:
            self.core.settled(batch, result, time.monotonic())

    def _settle_loop(self) -> None:
        incident = Incident(f"{self.name}: settling", logger)
        while True:
            with self._lock:
                while True:
                    now = time.monotonic()
                    batch = self.core.settle_batch(now)
                    if batch is not None or (self.core.abandoned and not self.core.finished):
                        break
                    self._to_settle.wait(self.core.next_settle_in(now))
                if batch is None:
                    return
            result: Any
            try:
                result = self.driver.drive(self.core.settle_flow(batch))
            except Exception as exc:
                result = exc
            with self._lock:
                pause = self.core.settled(batch, result, time.monotonic())
                self._room.notify()
                if self.core.stopping:
                    self._idle.notify_all()
            if isinstance(result, Exception) and pause is not None:
                wait = incident.failed(result, time.monotonic(),
                                       expected=isinstance(result, BrokerError))
                with self._lock:
                    self._to_settle.wait_for(lambda: self.core.abandoned, wait)
            elif not isinstance(result, Exception):
                incident.succeeded(time.monotonic())


class Workers:
    """Workers run as one: a service over the partitions of its subscription (one
    worker each). Same calls as :class:`Worker`; a stop halts them all first, then
    waits for each within one shared timeout."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers

    @property
    def in_flight(self) -> int:
        """Messages held by the workers: fetched and not yet settled."""
        return sum(w.in_flight for w in self.workers)

    def owns_current_thread(self) -> bool:
        """True when called from one of the workers' threads."""
        return any(w.owns_current_thread() for w in self.workers)

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def halt(self) -> None:
        """As :meth:`Worker.halt`, for every worker (safe in a signal handler)."""
        for w in self.workers:
            w.halt()

    def join(self, timeout: float, abandon: Callable[[], bool] | None = None) -> StopReport:
        """As :meth:`Worker.join`: every worker halts at once, then each is joined
        within what is left of ``timeout``."""
        self.halt()
        deadline = time.monotonic() + max(0.0, timeout)
        reports = [w.join(max(0.0, deadline - time.monotonic()), abandon)
                   for w in self.workers]
        return StopReport.total(reports)
