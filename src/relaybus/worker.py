"""The consume loop of one service instance: fetch, hand out, settle, keep leases.

A :class:`Worker` runs three kinds of threads over one subscription queue:

- one **fetcher**, which asks the queue for messages only while fewer than
  ``prefetch`` are held (buffered or running) by this instance: backpressure, so a
  slow service never pulls the backlog into memory. Each call is one fetch script
  plus, when nothing is there, one blocking read of up to ``block_for_seconds``: an
  idle worker sends about two commands per ``block_for_seconds`` and never polls;
- ``concurrency`` **handler threads**, each running one message at a time through
  the ``process`` callable and settling it with the :class:`Outcome` it returns
  (acknowledge and record done, schedule a retry, or dead-letter);
- one **lease keeper**, which every ``visibility_timeout / 3`` extends the lease of
  every held message. It never waits on a handler, so a handler that runs far longer
  than the visibility timeout keeps its message, while a dead instance's messages
  lapse and are taken over by another instance.

Failures of the broker never end a loop: the fetcher backs off (up to 5 s), logs
once per outage and once on recovery, and resumes; a handler thread retries
settling until it succeeds or the worker is abandoned at shutdown (the message then
stays pending and is redelivered). A bug in ``process`` is logged and leaves the
message pending for redelivery; the thread goes on.

Stopping (:meth:`Worker.request_stop`, then :meth:`Worker.join`): the fetcher stops
asking for messages, handler threads finish the message they run (and settle it)
but start no new one; messages fetched but not started are handed back
(:meth:`Queue.release`), so another instance reclaims them at once instead of after
the visibility timeout, and a consumer left holding nothing leaves the group. If
the broker is unreachable then, they stay pending and lapse as after a crash.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from .codec import Message
from .errors import BrokerError, RelaybusError, SerializationError
from .queue import Queue
from .retry import Action, Decision

__all__ = ["Counters", "Outcome", "StopReport", "Worker", "DEFAULT_BLOCK_FOR_SECONDS"]

logger = logging.getLogger("relaybus.worker")

#: Longest blocking read of the fetcher, in seconds: an idle worker sends about two
#: commands per period, and stopping may wait this long for the fetcher to return.
DEFAULT_BLOCK_FOR_SECONDS = 2.0
#: Longest blocking read, in seconds, while handlers run (one of them may schedule a
#: retry due sooner than an idle-length read would notice).
BUSY_BLOCK_FOR_SECONDS = 0.1
#: Longest pause, in seconds, between two attempts while the broker is unreachable.
MAX_OUTAGE_BACKOFF = 5.0
#: First pause, in seconds, after a failed attempt during an outage.
MIN_OUTAGE_BACKOFF = 0.1

_OUTAGE_ERRORS = (RelaybusError, redis.RedisError, OSError)


def _refused(exc: BaseException) -> bool:
    """The server ran the command and refused it (a script error): no outage, no retry.

    Broker errors (unreachable, out of memory) and connection errors are outages.
    """
    return isinstance(exc, RelaybusError) and not isinstance(exc, BrokerError)


@dataclass(frozen=True)
class Outcome:
    """What to do with one message after processing it.

    ``done_key`` (an event id) is recorded as done with the acknowledgement, so later
    copies are dropped; ``details`` go into the failure record of a retry or a
    dead-letter (JSON-compatible values only).
    """

    decision: Decision
    done_key: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StopReport:
    """How a worker's shutdown went.

    ``finished``: messages settled while stopping; ``abandoned``: handlers still
    running when the timeout passed (their messages stay pending, their threads run
    on); ``left_pending``: messages fetched but never started (they stay pending and
    are redelivered after the visibility timeout).
    """

    finished: int
    abandoned: int
    left_pending: int


class Counters:
    """Thread-safe named counters (a snapshot is a plain dict)."""

    def __init__(self, names: tuple[str, ...] = ()) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(names, 0)

    def incr(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (created at 0)."""
        with self._lock:
            self._values[name] = self._values.get(name, 0) + n

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter."""
        with self._lock:
            return dict(self._values)


class _Outage:
    """Logs a broker outage once when it starts and once when it ends."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None
        self.delay = MIN_OUTAGE_BACKOFF

    def failed(self, exc: BaseException) -> float:
        """Record a failure; return how long to wait before the next attempt."""
        if self.since is None:
            self.since = time.monotonic()
            logger.error("%s: broker unavailable (%s); retrying with backoff", self.what, exc)
        else:
            logger.debug("%s: still failing: %s", self.what, exc)
        delay = self.delay
        self.delay = min(self.delay * 2, MAX_OUTAGE_BACKOFF)
        return delay

    def succeeded(self) -> None:
        """Record a success (logs the recovery after an outage)."""
        if self.since is not None:
            logger.warning("%s: broker is back after %.1fs; resumed", self.what,
                           time.monotonic() - self.since)
            self.since = None
            self.delay = MIN_OUTAGE_BACKOFF


class Worker:
    """Consumes one queue with ``concurrency`` handler threads (see the module docstring).

    ``process`` turns a message into an :class:`Outcome`; it runs in handler threads,
    so it must be thread-safe when ``concurrency > 1``. ``counters`` receives
    ``received``, ``handled``, ``retried``, ``dead_lettered``, ``duplicates`` and
    ``errors``. A worker runs once: create a new one to start again.
    """

    def __init__(
        self,
        queue: Queue,
        process: Callable[[Message], Outcome],
        *,
        consumer_id: str,
        concurrency: int = 1,
        prefetch: int | None = None,
        block_for_seconds: float = DEFAULT_BLOCK_FOR_SECONDS,
        name: str = "worker",
        counters: Counters | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.queue = queue
        self.process = process
        self.consumer_id = consumer_id
        self.concurrency = concurrency
        self.prefetch = prefetch if prefetch is not None else 2 * concurrency
        if self.prefetch < concurrency:
            raise ValueError("prefetch must be >= concurrency")
        self.block_for_seconds = block_for_seconds
        self.name = name
        self.counters = counters or Counters()
        #: Seconds between two lease extensions (a third of the visibility timeout).
        self.lease_interval = max(0.05, queue.visibility_timeout / 3)
        self._lock = threading.Lock()
        self._has_room = threading.Condition(self._lock)
        self._has_work = threading.Condition(self._lock)
        self._settled = threading.Condition(self._lock)
        self._held: dict[str, Message] = {}  # fetched and not yet settled (buffered + running)
        self._buffer: collections.deque[Message] = collections.deque()
        self._running: set[str] = set()
        self._stopping = threading.Event()
        self._halted = False  # set without a lock by halt() (signal handlers)
        self._abandon = threading.Event()
        self._lease_stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._fetcher: threading.Thread | None = None
        self._lease_keeper: threading.Thread | None = None
        self._settled_while_stopping = 0

    # -- state ----------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Messages held by this worker: fetched and not yet settled."""
        with self._lock:
            return len(self._held)

    @property
    def busy(self) -> int:
        """Messages whose handler is running now."""
        with self._lock:
            return len(self._running)

    def owns_current_thread(self) -> bool:
        """True when called from one of this worker's threads (a handler, say)."""
        current = threading.current_thread()
        return current in self._threads or current in (self._fetcher, self._lease_keeper)

    def held_ids(self) -> list[str]:
        """Stream ids of the held messages (a snapshot)."""
        with self._lock:
            return list(self._held)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the fetcher, the handler threads and the lease keeper."""
        if self._fetcher is not None:
            raise RuntimeError("a worker runs once; create a new one")
        self._fetcher = threading.Thread(target=self._fetch_loop, daemon=True,
                                         name=f"relaybus-{self.name}-fetch")
        self._lease_keeper = threading.Thread(target=self._lease_loop, daemon=True,
                                              name=f"relaybus-{self.name}-lease")
        self._threads = [threading.Thread(target=self._handler_loop, daemon=True,
                                          name=f"relaybus-{self.name}-handler-{i}")
                         for i in range(self.concurrency)]
        self._lease_keeper.start()
        for t in self._threads:
            t.start()
        self._fetcher.start()

    def request_stop(self) -> None:
        """Stop fetching and starting handlers; running handlers go on. Returns at once."""
        with self._lock:
            self._stopping.set()
            self._has_room.notify_all()
            self._has_work.notify_all()

    def halt(self) -> None:
        """Start no new handler and no new fetch from now on. Safe in a signal handler.

        Takes no lock (a signal handler may interrupt a thread holding one); threads
        that wait are not woken, :meth:`request_stop` does that later.
        """
        self._halted = True

    def join(self, timeout: float, abandon: Callable[[], bool] | None = None) -> StopReport:
        """Wait up to ``timeout`` seconds for running handlers, then stop every thread.

        Call :meth:`request_stop` first. ``abandon``, polled while waiting, cuts the
        wait short when it returns True (a second signal). Handlers still running
        afterwards are abandoned: their messages stay pending (their lease is no
        longer extended) and their threads, which are daemons, run on.
        """
        self.request_stop()
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            while self._running:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (abandon is not None and abandon()):
                    break
                self._settled.wait(min(remaining, 0.1))
            abandoned = len(self._running)
        if abandoned:
            self._abandon.set()
            logger.warning("%s: %d handlers still running after %.1fs; their events stay pending "
                           "and will be redelivered", self.name, abandoned, timeout)
        self._lease_stop.set()
        for t in self._threads:
            t.join(timeout=0.0 if abandoned else 1.0)
        if self._lease_keeper is not None:
            self._lease_keeper.join(timeout=1.0)
        if self._fetcher is not None:
            self._fetcher.join(timeout=self.block_for_seconds + 1.0)
            if self._fetcher.is_alive():
                logger.warning("%s: the fetcher did not return in time (broker unreachable?)",
                               self.name)
        with self._lock:
            unstarted = [i for i in self._held if i not in self._running]
            finished = self._settled_while_stopping
        self._release(unstarted, fetcher_done=self._fetcher is None or
                      not self._fetcher.is_alive())
        return StopReport(finished=finished, abandoned=abandoned, left_pending=len(unstarted))

    def _release(self, ids: list[str], *, fetcher_done: bool) -> None:
        """Hand fetched-but-unstarted messages back at once; drop the consumer if idle.

        Best effort: if the broker cannot be reached, the messages simply stay pending
        and are reclaimed after the visibility timeout, as after a crash.
        """
        if not ids and not fetcher_done:
            return
        try:
            released, removed = self.queue.release(ids, self.consumer_id)
        except _OUTAGE_ERRORS as exc:
            logger.warning("%s: could not hand back %d unstarted events (%s); they will be "
                           "redelivered after the visibility timeout", self.name, len(ids), exc)
            return
        if released:
            logger.info("%s: handed back %d fetched but unstarted events", self.name, released)
        if removed:
            logger.debug("%s: consumer %s left the group", self.name, self.consumer_id)

    # -- fetching -------------------------------------------------------------------

    def _fetch_loop(self) -> None:
        outage = _Outage(f"{self.name}: fetching")
        mq_stats = self.queue.mq.stats
        while True:
            with self._lock:
                while len(self._held) >= self.prefetch and not self._stopping.is_set():
                    self._has_room.wait()
                if self._stopping.is_set() or self._halted:
                    return
                room = self.prefetch - len(self._held)
                # a running handler may schedule a retry due before a long blocking read
                # would end: wait briefly while busy, fully only when idle
                block = self.block_for_seconds if not self._held else \
                    min(self.block_for_seconds, BUSY_BLOCK_FOR_SECONDS)
            try:
                dups_before = mq_stats.get("duplicates", 0)
                messages = self.queue.get_messages(count=room, block_for_seconds=block,
                                                   consumer_id=self.consumer_id)
                dups = mq_stats.get("duplicates", 0) - dups_before
            except _OUTAGE_ERRORS as exc:
                self._stopping.wait(outage.failed(exc))
                continue
            except Exception:  # a bug must not end the loop
                logger.exception("%s: unexpected error while fetching; continuing", self.name)
                self._stopping.wait(1.0)
                continue
            outage.succeeded()
            if dups > 0:
                self.counters.incr("duplicates", dups)
            if messages:
                self._hand_out(messages)

    def _hand_out(self, messages: list[Message]) -> None:
        with self._lock:
            for m in messages:
                if m.id in self._held:  # our own lease lapsed and we reclaimed it: keep one
                    logger.debug("%s: message %s is already held here", self.name, m.id)
                    continue
                self._held[m.id] = m
                self._buffer.append(m)
                self.counters.incr("received")
            self._has_work.notify_all()

    # -- handling -------------------------------------------------------------------

    def _handler_loop(self) -> None:
        while True:
            with self._lock:
                while not self._buffer and not self._stopping.is_set():
                    self._has_work.wait()
                if self._stopping.is_set() or self._halted:
                    return
                message = self._buffer.popleft()
                self._running.add(message.id)
            try:
                self._handle(message)
            except BaseException:  # a bug (even SystemExit) must not end the thread
                self.counters.incr("errors")
                logger.exception("%s: unexpected error handling message %s; it stays pending and "
                                 "will be redelivered after the visibility timeout", self.name,
                                 message.id)
            finally:
                with self._lock:
                    self._running.discard(message.id)
                    self._held.pop(message.id, None)
                    if self._stopping.is_set():
                        self._settled_while_stopping += 1
                    self._has_room.notify()
                    self._settled.notify_all()

    def _handle(self, message: Message) -> None:
        self._settle(message, self.process(message))

    def _settle(self, message: Message, outcome: Outcome) -> None:
        decision = outcome.decision
        details: Mapping[str, Any] | None = outcome.details or None
        outage = _Outage(f"{self.name}: settling {message.id}")
        while True:
            try:
                self._apply(message, decision, outcome.done_key, details)
                outage.succeeded()
                return
            except SerializationError:
                if details is None:
                    raise
                logger.exception("%s: failure details of %s cannot be encoded; recording "
                                 "the reason only", self.name, message.id)
                details = None
                continue
            except _OUTAGE_ERRORS as exc:
                if _refused(exc):  # not an outage: the same command would fail again
                    if details is None:
                        raise
                    logger.error("%s: settling %s failed (%s); recording the reason only",
                                 self.name, message.id, exc)
                    details = None
                    continue
                wait = outage.failed(exc)
            if self._abandon.is_set():
                logger.error("%s: gave up settling message %s (%s) at shutdown; it stays pending "
                             "and will be redelivered", self.name, message.id,
                             decision.action.value)
                return
            self._abandon.wait(wait)

    def _apply(self, message: Message, decision: Decision, done_key: str | None,
               details: Mapping[str, Any] | None) -> None:
        q = self.queue
        if decision.action is Action.ACK:
            q.acknowledge_messages([message.id], record_done=[done_key] if done_key else [])
            self.counters.incr("handled")
            return
        if decision.action is Action.RETRY:
            moved = q.schedule_retry([message.id], decision.delay, decision.reason,
                                     details=details)
            what = "retried"
        else:
            moved = q.move_to_dlq([message.id], decision.reason, details=details)
            what = "dead_lettered"
        if moved:
            self.counters.incr(what)
        else:
            logger.warning("%s: message %s was no longer in the queue (taken over and settled "
                           "elsewhere?); not %s", self.name, message.id, what.replace("_", "-"))

    # -- leases ---------------------------------------------------------------------

    def _lease_loop(self) -> None:
        outage = _Outage(f"{self.name}: extending leases")
        while not self._lease_stop.wait(self.lease_interval):
            ids = self.held_ids()
            if not ids:
                continue
            try:
                extended = self.queue.extend_lease(ids, self.consumer_id)
            except _OUTAGE_ERRORS as exc:
                outage.failed(exc)
                continue
            except Exception:  # a bug must not end the loop
                logger.exception("%s: unexpected error extending leases; continuing", self.name)
                continue
            outage.succeeded()
            if extended < len(ids):
                # settled meanwhile, or taken over after a lapse (GIL-starved, outage)
                logger.debug("%s: extended %d of %d leases", self.name, extended, len(ids))
