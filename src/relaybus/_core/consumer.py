"""The consumer's state: what one service instance holds, and what to send next.

A :class:`Consumer` tracks every message from the moment it is fetched until it is
settled, and decides the next fetch and the next settle batch. The drivers run it:
the sync worker with threads (a fetcher, ``concurrency`` handler threads, a settler),
the asyncio worker with tasks. Both follow the same rules, written once here:

- **Backpressure.** At most ``prefetch`` messages are held (buffered, running or
  waiting to be settled). The fetcher refills in batches: when half the prefetch is
  free, or when nothing is buffered.
- **Batched settlement (group commit).** A finished message waits for the settler,
  which sends everything finished since its last call in one round trip
  (acknowledgements with their done records, retries, dead letters), and in the same
  call extends the lease of every other held message when one is due. While one
  settle is in flight the next batch gathers, so no message waits more than one round
  trip, and none is acknowledged before its handler returned. A batch goes out when it
  holds half the prefetch, when nothing else is to be handled, or when its first
  message has waited :data:`SETTLE_DELAY` (:data:`BUSY_SETTLE_DELAY` while messages
  wait to be handled).
- **Leases.** Every ``lease_interval`` (a third of the visibility timeout) the held
  messages' leases are extended, so only a dead instance's messages lapse. A handler
  that finishes more than a visibility timeout after its message's lease was last
  taken or extended (the process was frozen: a handler holding the GIL, a paused VM)
  is logged and counted (``lease_lapsed``): another instance may have run it too.
- **Outages.** A settle that fails for an outage is kept and sent again (with the
  messages finished meanwhile); one the server refuses because of its failure
  details is sent again without them.
- **Stopping.** No new fetch and no new handler start; running handlers finish and
  are settled; fetched but unstarted messages (and, when abandoned or cancelled,
  unfinished ones) are handed back at once for any instance to take, and the consumer
  leaves its group once it holds nothing.

The clock is an argument; nothing here sleeps, locks or talks to a server.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..codec import Message
from ..errors import BrokerCommandError, BrokerError, SerializationError
from ..retry import Action, Decision
from . import queue as q
from .steps import Flow
from .telemetry import OTHER, Labels, Telemetry, by_type, type_label

__all__ = ["Outcome", "Counters", "Consumer", "StopReport", "SettleBatch",
           "DEFAULT_BLOCK_FOR_SECONDS", "BUSY_BLOCK_FOR_SECONDS", "DEFAULT_PREFETCH_PER_HANDLER"]

logger = logging.getLogger("relaybus.worker")

#: Longest blocking wait of an idle fetcher, in seconds: an idle instance sends about
#: one command per period, and stopping may wait this long for the fetcher to return.
DEFAULT_BLOCK_FOR_SECONDS = 2.0
#: Longest blocking wait, in seconds, while messages are held (a running handler may
#: schedule a retry due sooner than an idle-length wait would notice).
BUSY_BLOCK_FOR_SECONDS = 0.1
#: Default prefetch per handler slot (``prefetch = max(200, 2 * concurrency)``): enough
#: to fetch and settle in batches, and still a bound on what a slow instance holds.
DEFAULT_PREFETCH_PER_HANDLER = 2
#: Smallest default prefetch.
DEFAULT_PREFETCH_MIN = 200
#: Longest time, in seconds, a finished message waits for its batch to fill before it
#: is settled (a batch also goes out at half the prefetch, or when nothing else is to
#: be handled).
SETTLE_DELAY = 0.002
#: The same while fetched messages wait to be handled (saturation): the batch fills
#: from them, and the fetch that refills their room waits for it anyway. Shorter, on an
#: event loop shared by several services, made the batches half size: twice the round
#: trips (``python bench/fanout_consume.py --front async``).
BUSY_SETTLE_DELAY = 0.02


def default_prefetch(concurrency: int) -> int:
    """The default prefetch for ``concurrency`` handler slots."""
    return max(DEFAULT_PREFETCH_MIN, DEFAULT_PREFETCH_PER_HANDLER * concurrency)


@dataclass(slots=True)
class Outcome:
    """What to do with one message after processing it.

    ``done_key`` (an event id) is recorded as done with the acknowledgement, so later
    copies are dropped; ``details`` go into the failure record of a retry or a
    dead-letter (JSON-compatible values only).
    """

    decision: Decision
    done_key: str | None = None
    details: Mapping[str, Any] | None = None
    #: The message could not be read as an event (counted as ``invalid``, not as
    #: ``dead_lettered``, in the metrics).
    invalid: bool = False
    #: Seconds the handler ran (None: it did not run), for the metrics' histogram.
    took: float | None = None


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


@dataclass(frozen=True)
class StopReport:
    """How a consumer's shutdown went.

    ``finished``: messages settled while stopping; ``abandoned``: handlers still
    running when it gave up waiting (their messages were handed back, their results
    are ignored); ``left_pending``: messages fetched but never started (handed back).
    """

    finished: int
    abandoned: int
    left_pending: int

    @classmethod
    def total(cls, reports: Iterable[StopReport]) -> StopReport:
        """The reports of several consumers (one per partition) as one."""
        reports = list(reports)
        return cls(finished=sum(r.finished for r in reports),
                   abandoned=sum(r.abandoned for r in reports),
                   left_pending=sum(r.left_pending for r in reports))


@dataclass
class SettleBatch:
    """One settle call's messages and what it asks of the server."""

    items: list[tuple[Message, Outcome]]
    settlement: q.Settlement
    #: When it was built (monotonic): the extended leases run from then.
    built_at: float = 0.0


class Consumer:
    """The state of one consumer of one queue (see the module docstring)."""

    def __init__(self, ref: q.QueueRef, consumer_id: str, *, prefetch: int,
                 block_for_seconds: float = DEFAULT_BLOCK_FOR_SECONDS,
                 counters: Counters | None = None, name: str = "worker",
                 queue_counts: q.Counts | None = None,
                 telemetry: Telemetry | None = None) -> None:
        if prefetch < 1:
            raise ValueError("prefetch must be >= 1")
        self.ref = ref
        self.consumer_id = consumer_id
        self.prefetch = prefetch
        self.block_for_seconds = block_for_seconds
        self.counters = counters or Counters()
        #: Labelled counts for the metrics (by event type and outcome).
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.name = name
        #: Seconds between two lease extensions (a third of the visibility timeout).
        self.lease_interval = max(0.05, ref.visibility_timeout / 3)
        self.read = q.ReadState()
        #: The queue layer's counters (``MessageQueue.stats``: gone, skipped, ...).
        self.queue_counts = queue_counts if queue_counts is not None else q.Counts()
        self._duplicates_seen = self.queue_counts.values.get("duplicates", 0)
        self.held: dict[str, Message] = {}
        #: When each held message's lease was last taken or extended (monotonic).
        self.leased: dict[str, float] = {}
        self.buffer: collections.deque[Message] = collections.deque()
        self.running: set[str] = set()
        self.finished: list[tuple[Message, Outcome]] = []
        #: Log entries of types this subscription does not take: acknowledged next batch.
        self.skipped: list[str] = []
        # where the fetch flow puts them (its thread); fetched() moves them to skipped
        self._skip_inbox: list[str] = []
        self.settling: SettleBatch | None = None
        self._first_finished: float | None = None
        self._batch_min = max(1, prefetch // 2)
        self.stopping = False
        self.abandoned = False
        self.settled_while_stopping = 0
        self._next_lease: float | None = None

    # -- fetching -------------------------------------------------------------------

    def fetch_count(self) -> int:
        """How many messages to fetch now (0: not now)."""
        if self.stopping:
            return 0
        room = self.prefetch - len(self.held)
        if room <= 0:
            return 0
        if room < max(1, self.prefetch // 2) and self.buffer:
            return 0  # refill in batches, while handlers have work
        return room

    def fetch(self, count: int, clock: Callable[[], float],
              recover: Callable[[q.QueueRef], Flow[Any]] | None = None) -> Flow[list[Message]]:
        """The fetch flow for ``count`` messages (waits while nothing comes)."""
        block = self.block_for_seconds if not self.held else \
            min(self.block_for_seconds, BUSY_BLOCK_FOR_SECONDS)
        return q.get_messages(self.ref, self.read, self.consumer_id, count, block, clock,
                              self.queue_counts, recover, parse=False,
                              skipped=self._skip_inbox.extend, stopped=lambda: self.stopping)

    def fetched(self, messages: list[Message], now: float) -> int:
        """Take fetched messages in; return how many are new here."""
        new = 0
        types: dict[Any, int] = {}  # by the entries' raw type (labelled once per batch)
        if self._next_lease is None:
            self._next_lease = now + self.lease_interval
        for m in messages:
            if m.id in self.held:  # our own lease lapsed and we reclaimed it: keep one
                logger.debug("%s: message %s is already held here", self.name, m.id)
                continue
            self.held[m.id] = m
            self.leased[m.id] = now
            self.buffer.append(m)
            kind = m.fields.get(b"e")
            types[kind] = types.get(kind, 0) + 1
            new += 1
        if self._skip_inbox:
            self.skipped += self._skip_inbox
            self._skip_inbox.clear()
        if new:
            self.counters.incr("received", new)
            self.telemetry.add("received", by_type(types))
        dups = self.queue_counts.values.get("duplicates", 0)
        if dups != self._duplicates_seen:  # copies of handled events the fetch dropped
            self.counters.incr("duplicates", dups - self._duplicates_seen)
            self.telemetry.count("outcomes", (OTHER, "duplicate"), dups - self._duplicates_seen)
            self._duplicates_seen = dups
        return new

    # -- handling -------------------------------------------------------------------

    def take(self) -> Message | None:
        """The next message to handle (None: none, or stopping)."""
        if self.stopping or not self.buffer:
            return None
        message = self.buffer.popleft()
        self.running.add(message.id)
        return message

    def take_some(self, share: int) -> list[Message]:
        """Up to a ``share`` of what is buffered (at least one, at most 16) to handle in a
        row: fewer hand-offs between threads than one at a time."""
        if self.stopping or not self.buffer:
            return []
        n = max(1, min(16, len(self.buffer) // max(1, share)))
        taken = [self.buffer.popleft() for _ in range(n)]
        self.running.update(m.id for m in taken)
        return taken

    def finish(self, message: Message, outcome: Outcome, now: float = 0.0) -> None:
        """A handler finished ``message`` (at ``now``): settle it with the next batch."""
        if message.id not in self.running:
            return  # handed back meanwhile: its result no longer counts
        self._check_lease(message.id, now)
        self.running.discard(message.id)
        if not self.finished:
            self._first_finished = now
        self.finished.append((message, outcome))

    def _check_lease(self, message_id: str, now: float) -> None:
        """Log and count a lease that lapsed: more than a visibility timeout since it was
        last taken or extended (checked when its handler finishes and before each
        extension, whichever comes first after the process was frozen)."""
        leased = self.leased.get(message_id)
        if leased is None or now - leased <= self.ref.visibility_timeout:
            return
        self.leased[message_id] = now  # one report per lapse
        self.counters.incr("lease_lapsed")
        logger.warning("%s: the lease of message %s lapsed while %s (%.1f s since it was "
                       "last taken or extended; visibility timeout %.1f s): another "
                       "instance may have handled it too. Leases are not extended while the "
                       "process cannot run Python (a handler holding the GIL, a paused "
                       "process); see docs/reliability.md", self.name, message_id,
                       "its handler ran" if message_id in self.running else "it was held here",
                       now - leased, self.ref.visibility_timeout)

    def dropped(self, message: Message) -> None:
        """Processing ``message`` failed unexpectedly (a bug): leave it pending, let it go."""
        self.running.discard(message.id)
        self._release_held(message.id)

    def unfinished(self, message: Message) -> None:
        """A handler was cancelled before it finished ``message``: hand it back."""
        self.running.discard(message.id)
        self.buffer.appendleft(message)

    # -- settling -------------------------------------------------------------------

    def lease_due(self, now: float) -> bool:
        return self._next_lease is not None and now >= self._next_lease and bool(self.held)

    def next_lease_in(self, now: float) -> float | None:
        """Seconds until the next lease extension (None: nothing held)."""
        if self._next_lease is None or not self.held:
            return None
        return max(0.0, self._next_lease - now)

    def wants_settle(self, now: float) -> bool:
        """Worth a round trip now: nothing in flight, and a lease extension is due, or a
        batch is full (half the prefetch), or nothing else is to be handled, or
        its first message has waited :data:`SETTLE_DELAY` (or we are stopping)."""
        if self.settling is not None:
            return False
        if self.lease_due(now):
            return True
        if not self.finished:
            return bool(self.skipped) and not self.buffer
        return (len(self.finished) >= self._batch_min or self.stopping
                or (not self.buffer and not self.running)
                or now - (self._first_finished or 0.0) >= self._settle_delay())

    def _settle_delay(self) -> float:
        return BUSY_SETTLE_DELAY if self.buffer else SETTLE_DELAY

    def next_settle_in(self, now: float) -> float | None:
        """Seconds until :meth:`wants_settle` turns true by time alone (None: never)."""
        waits = [w for w in (self.next_lease_in(now),
                             self._settle_delay() - (now - self._first_finished)
                             if self.finished and self._first_finished is not None else None,
                             SETTLE_DELAY if self.skipped else None) if w is not None]
        return max(0.0, min(waits)) if waits else None

    def settle_batch(self, now: float) -> SettleBatch | None:
        """The next batch to settle (None: nothing to do, or one is in flight)."""
        if not self.wants_settle(now):
            return None
        items, self.finished = self.finished, []
        batch = self._build(items)
        batch.built_at = now
        batch.settlement.acks += self.skipped
        self.skipped = []
        if self.lease_due(now):
            in_batch = {m.id for m, _ in items}
            batch.settlement.extend = [i for i in self.held if i not in in_batch]
            for mid in batch.settlement.extend:
                self._check_lease(mid, now)
            self._next_lease = now + self.lease_interval
        self.settling = batch
        return batch

    def _build(self, items: list[tuple[Message, Outcome]]) -> SettleBatch:
        s = q.Settlement()
        for m, o in items:
            d = o.decision
            if d.action is Action.ACK:
                s.acks.append(m.id)
                if o.done_key:
                    s.done.append(o.done_key)
            elif d.action is Action.RETRY:
                s.retries.append((m.id, d.delay, self._record(m, d, o.details)))
            else:
                s.dead.append((m.id, self._record(m, d, o.details)))
        return SettleBatch(items, s)

    def _record(self, message: Message, decision: Decision,
                details: Mapping[str, Any] | None) -> str:
        try:
            return q.failure_record(self.ref, decision.reason, details)
        except SerializationError:
            logger.exception("%s: failure details of %s cannot be encoded; recording the "
                             "reason only", self.name, message.id)
            return q.failure_record(self.ref, decision.reason, None)

    def settle_flow(self, batch: SettleBatch) -> Flow[q.Settled]:
        """The settle call of ``batch``."""
        return self.settle_flow_for(batch.settlement)

    def settle_flow_for(self, settlement: q.Settlement) -> Flow[q.Settled]:
        """The settle call of ``settlement`` (the hand-back at the end, say)."""
        return q.settle(self.ref, self.consumer_id, settlement, ordered=self.read.ordered)

    def settled(self, batch: SettleBatch, result: q.Settled | BaseException, now: float
                ) -> float | None:
        """Take a settle call's result in; return a pause before retrying it (None: done).

        On an outage the batch's messages go back to be settled with the next batch;
        on a refusal caused by failure details, once more without them; on any other
        refusal they are dropped from what is held (left pending: redelivered after the
        visibility timeout) and the error logged.
        """
        self.settling = None
        if isinstance(result, BaseException):
            refused = isinstance(result, BrokerCommandError) or not isinstance(result, BrokerError)
            if refused and any(o.details for _, o in batch.items):
                logger.error("%s: settling failed (%s); recording the reasons only", self.name,
                             result)
                self.finished = [(m, Outcome(o.decision, o.done_key)) for m, o in batch.items] \
                    + self.finished
                return 0.0
            if refused:
                logger.error("%s: settling %d messages failed: %s; they stay pending and will "
                             "be redelivered after the visibility timeout", self.name,
                             len(batch.items), result)
                for m, _ in batch.items:
                    self._release_held(m.id)
                self.counters.incr("errors")
                return None
            if self.abandoned and self.stopping:
                logger.error("%s: gave up settling %d messages at shutdown (%s); they stay "
                             "pending and will be redelivered", self.name, len(batch.items),
                             result)
                for m, _ in batch.items:
                    self._release_held(m.id)
                return None
            self.finished = batch.items + self.finished
            return 0.0
        for _, delay, _ in batch.settlement.retries:  # scheduled: the fetcher wakes for them
            due = now + delay
            if self.read.local_due is None or due < self.read.local_due:
                self.read.local_due = due
        missing = set(result.missing)
        held, leased = self.held, self.leased
        for mid in batch.settlement.extend:
            if mid in leased:
                leased[mid] = batch.built_at
        handled = 0
        # by the entries' raw type, labelled once per batch (the hot path)
        acked: dict[Any, int] = {}
        others: collections.Counter[Labels] = collections.Counter()
        durations: dict[Any, list[float]] = {}
        for m, o in batch.items:
            held.pop(m.id, None)
            leased.pop(m.id, None)
            action = o.decision.action
            kind = m.fields.get(b"e")
            if o.took is not None:
                took = durations.get(kind)
                if took is None:
                    durations[kind] = [o.took]
                else:
                    took.append(o.took)
            if action is Action.ACK:
                handled += 1
                acked[kind] = acked.get(kind, 0) + 1
            elif m.id in missing:
                logger.warning("%s: message %s was no longer in the queue (taken over and "
                               "settled elsewhere?); not %s", self.name, m.id,
                               "retried" if action is Action.RETRY else "dead-lettered")
            else:
                outcome = "retried" if action is Action.RETRY else "dead_lettered"
                self.counters.incr(outcome)
                others[(type_label(kind), "invalid" if o.invalid else outcome)] += 1
        others.update(by_type(acked, "handled"))
        self.telemetry.add("outcomes", others)
        runs: dict[Labels, list[float]] = {}
        for kind, took in durations.items():  # types without a class: all under "other"
            runs.setdefault((type_label(kind),), []).extend(took)
        self.telemetry.observe_groups("handler_seconds", runs)
        self.telemetry.count("settles")
        if handled:
            self.counters.incr("handled", handled)
        if self.stopping:
            self.settled_while_stopping += len(batch.items)
        return None

    def _release_held(self, message_id: str) -> None:
        self.held.pop(message_id, None)
        self.leased.pop(message_id, None)

    # -- stopping -------------------------------------------------------------------

    def stop(self) -> None:
        """Fetch nothing more and start no handler."""
        self.stopping = True

    def idle(self) -> bool:
        """Nothing running, nothing waiting to be settled (stop can hand back the rest)."""
        return not self.running and not self.finished and self.settling is None

    def abandon(self) -> int:
        """Stop waiting for running handlers (the stop timed out): their messages stay
        pending, and a result that comes late is still settled. Returns how many."""
        self.abandoned = True
        return len(self.running)

    def cancel_running(self) -> int:
        """Hand the running handlers' messages back with the unstarted ones (their task
        was cancelled: they did not finish). Returns how many."""
        n = len(self.running)
        for mid in list(self.running):
            m = self.held.get(mid)
            if m is not None:
                self.buffer.appendleft(m)
        self.running.clear()
        return n

    def late(self, messages: list[Message]) -> q.Settlement:
        """What to send for messages a fetch brought after the stop began (a blocking read
        that was already waiting on the server): every one handed back at once, and the
        group left again if nothing else is held."""
        ids = [m.id for m in messages if m.id not in self.held]
        skipped, self._skip_inbox = self._skip_inbox, []
        return q.Settlement(acks=skipped, release=ids, forget=not self.held)

    def hand_back(self, *, forget: bool = True) -> q.Settlement:
        """What to send at the end: every unstarted message handed back, the skipped log
        entries (other types) acknowledged, and the group left if nothing is held."""
        ids = [m.id for m in self.buffer]
        self.buffer.clear()
        for mid in ids:
            self._release_held(mid)
        skipped, self.skipped = self.skipped + self._skip_inbox, []
        self._skip_inbox.clear()
        return q.Settlement(acks=skipped, release=ids, forget=forget)
