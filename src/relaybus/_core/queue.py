"""The queue layer's commands and flows: every step a queue operation sends, and why.

A :class:`QueueRef` describes one stream of a queue pair (which keys, which group,
which settings); a :class:`ReadState` is what one reader remembers between fetches
(reclaim cursors, when it last found nothing, the ids to wait on). Both fronts'
``Queue`` classes are thin over these.

Round trips: sending one or many messages, fetching up to ``count``, and settling a
batch (acknowledge + done records, retries, dead letters, lease extensions,
hand-backs) cost one each, whatever the number of messages. A blocking fetch adds one
``XREAD BLOCK`` that only waits: it consumes nothing, so the fetch script that follows
it screens everything it delivers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from .. import codec
from ..codec import Message
from ..errors import BrokerOutOfMemoryError, CrossSlotError, SerializationError
from ..keys import DLQ_SUFFIX, GROUP, QueueKeys, is_event_log, registry_key
from ..scripts import script
from .outage import GroupMissing
from .replies import flat_to_dict, group_rows, id_order, read_entries, stream_entries, text
from .steps import Call, Command, Flow, ScriptCall, Step

__all__ = ["DEFAULT_VISIBILITY_TIMEOUT", "DEFAULT_MAX_DELIVERIES", "DEFAULT_DEDUP_WINDOW",
           "IDLE_RECHECK_MAX", "MAX_BLOCK", "LOG_ID_SEPARATOR", "QueueSettings", "QueueRef",
           "QueueInfo", "ReadState", "Fetched", "Settled", "Settlement"]

#: The stored type of a subscription to every event type.
ALL_TYPES = "*"
#: Visibility timeout of a new queue, in seconds.
DEFAULT_VISIBILITY_TIMEOUT = 30.0
#: Deliveries of one entry after which it is dead-lettered (a message that keeps
#: killing its consumers must not be redelivered forever).
DEFAULT_MAX_DELIVERIES = 10
#: How long, in seconds, a dedup key stays recorded after its message was acknowledged.
DEFAULT_DEDUP_WINDOW = 600.0
#: Longest time, in seconds, an idle blocking consumer goes without running the fetch
#: script (which reclaims a dead consumer's messages and promotes due retries); it is
#: also at most a quarter of the visibility timeout. Idle, a consumer sends one
#: blocking read per ``block_for_seconds`` and one script per this interval.
IDLE_RECHECK_MAX = 10.0
#: The same for a subscription, whose own stream (requeued dead letters, retries other
#: instances scheduled) is read by that script too: an idle instance waits at most this
#: long to see them.
SUB_RECHECK_MAX = 2.0
#: Longest time, in seconds, a busy consumer goes without the periodic work.
BUSY_RECHECK = 1.0
#: A consumer that holds nothing and was not seen for this long (seconds; and for
#: twice its visibility timeout) is removed from its group(s): a live one is seen at
#: least every :data:`IDLE_RECHECK_MAX`, and one removed by mistake is back at its
#: next read, having lost nothing.
PRUNE_IDLE = 300.0
#: How often, in seconds, one reader's periodic fetch looks for such consumers.
PRUNE_EVERY = 60.0
#: Most entries counted for a subscription's lag on a server that does not report it
#: (Redis 6.2: ``XINFO GROUPS`` has no ``lag``).
LAG_COUNT_CAP = 1000
#: Longest single blocking read, in seconds (kept under the socket timeout).
MAX_BLOCK = 5.0
#: Between the log's queue name and a log entry's id in a subscription's message ids:
#: ``all/1795705750066-0`` is entry ``1795705750066-0`` of the event log.
LOG_ID_SEPARATOR = "/"


@dataclass(frozen=True)
class QueueSettings:
    """Settings of one MessageQueue, shared by its queues."""

    prefix: str
    max_message_size: int = codec.DEFAULT_MAX_MESSAGE_SIZE
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    dedup_window: float = DEFAULT_DEDUP_WINDOW


@dataclass(frozen=True)
class QueueRef:
    """One stream of a queue pair: the main queue or its dead-letter queue."""

    settings: QueueSettings
    pair_name: str
    is_dlq: bool = False
    visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT
    #: Delete acknowledged entries (work queues); False keeps them (the event log).
    delete_on_ack: bool = True

    @cached_property
    def keys(self) -> QueueKeys:
        return QueueKeys(self.settings.prefix, self.pair_name)

    @cached_property
    def name(self) -> str:
        return self.pair_name + DLQ_SUFFIX if self.is_dlq else self.pair_name

    @cached_property
    def key(self) -> str:
        return self.keys.dlq if self.is_dlq else self.keys.stream

    @cached_property
    def leases(self) -> str:
        """The hash of its consumers' leases (see ``lua/fetch.lua``)."""
        return self.keys.dlq_leases if self.is_dlq else self.keys.leases

    @cached_property
    def log(self) -> QueueKeys | None:
        """The event log this queue also reads (a subscription's main queue), or None."""
        return None if self.is_dlq else self.keys.log

    @cached_property
    def log_prefix(self) -> str:
        log = self.log
        return log.name + LOG_ID_SEPARATOR if log is not None else ""

    def with_settings(self, visibility_timeout: float) -> QueueRef:
        return replace(self, visibility_timeout=float(visibility_timeout))


@dataclass(frozen=True)
class QueueInfo:
    """A snapshot of one queue.

    ``message_count`` counts the entries in the stream; ``pending_messages`` those
    delivered but not yet acknowledged; ``waiting_messages`` those not yet delivered
    (the lag; for a subscription, the event-log entries its group has not read yet,
    of every type, plus its own stream's, plus, ordered, the events held back behind
    their key); ``oldest_waiting_age`` is the age in
    seconds of the oldest of those, by the server's clock.
    """

    name: str
    is_dlq: bool
    message_count: int
    pending_messages: int
    waiting_messages: int
    consumer_group: str
    consumers: int
    created_at: float | None
    oldest_waiting_age: float | None
    visibility_timeout: float
    delayed_messages: int = 0
    dlq_messages: int = 0
    #: Events scheduled for later (``publish(delay=...)``): the event log's only.
    scheduled_messages: int = 0


@dataclass
class ReadState:
    """What one reader of a queue remembers between fetches (monotonic times)."""

    cursor: str = "0-0"
    log_cursor: str = "0-0"
    #: When the next fetch does the periodic work (due retries, reclaiming).
    next_periodic: float = 0.0
    #: The last fetch found nothing: a blocking reader waits before fetching again.
    idle: bool = False
    #: When the earliest waiting retry is due, as the last fetch saw it.
    next_due: float | None = None
    #: The earliest retry scheduled through this object (waited for exactly).
    local_due: float | None = None
    #: Newest id of the own stream to wait on (XREAD) when nothing was there.
    wake: list[str] = field(default_factory=list)
    #: A subscription's event types as the last periodic fetch read them (``*``: all).
    types: frozenset[str] = frozenset()
    #: When the next periodic fetch also prunes consumers long gone.
    next_prune: float = 0.0
    #: The subscription is ordered (the last fetch script said so): its new log entries
    #: are read by the fetch script, which holds back those whose key is in use.
    ordered: bool = False

    def earliest_due(self) -> float | None:
        dues = [d for d in (self.next_due, self.local_due) if d is not None]
        return min(dues) if dues else None

    def periodic_due(self, now: float) -> bool:
        """True when the next fetch should promote due retries and reclaim."""
        due = self.earliest_due()
        return now >= self.next_periodic or (due is not None and due <= now)


@dataclass(frozen=True)
class Fetched:
    """What one fetch script call returned."""

    entries: list[tuple[str, Any, int]]
    gone: int
    duplicates: int
    dead_lettered: int
    #: Seconds until the earliest waiting retry is due (server's clock), or None.
    next_due_in: float | None
    cursor: str
    log_cursor: str
    #: All it read was dropped: fetch again before waiting.
    more: bool
    #: Newest id of the own stream, to wait on when nothing came.
    wake: list[str]
    #: A subscription's stored event types (``*`` = all; empty: it reads no log).
    types: list[str]
    #: Reclaimed log entries of types the subscription does not keep (acknowledged).
    skipped: int = 0
    #: Consumers that held nothing and were long unseen, removed from the group(s).
    pruned: int = 0
    #: An ordered subscription (see :attr:`ReadState.ordered`).
    ordered: bool = False

    def remember(self, state: ReadState, fetched_at: float) -> None:
        """Carry what the next fetch needs into ``state`` (``fetched_at``: monotonic)."""
        state.cursor, state.log_cursor = self.cursor, self.log_cursor
        if self.wake:
            state.wake = self.wake
        state.types = frozenset(self.types)
        state.ordered = self.ordered
        state.next_due = None if self.next_due_in is None else fetched_at + self.next_due_in
        if state.local_due is not None and state.local_due <= fetched_at:
            state.local_due = None  # that fetch promoted it


@dataclass(frozen=True)
class Settled:
    """What one settle script call did (counts, and ids no longer there to move)."""

    acknowledged: int = 0
    retried: int = 0
    dead_lettered: int = 0
    extended: int = 0
    released: int = 0
    removed: bool = False
    missing: tuple[str, ...] = ()
    #: The dead letters' ids in the dead-letter stream.
    parked: tuple[str, ...] = ()


@dataclass
class Settlement:
    """A batch for one settle call (every list may be empty).

    ``retries`` holds ``(id, delay seconds, record)``, ``dead`` ``(id, record)``;
    a record is the failure-record JSON (:func:`failure_record`).
    """

    acks: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    retries: list[tuple[str, float, str]] = field(default_factory=list)
    dead: list[tuple[str, str]] = field(default_factory=list)
    extend: list[str] = field(default_factory=list)
    release: list[str] = field(default_factory=list)
    forget: bool = False

    def __bool__(self) -> bool:
        return bool(self.acks or self.done or self.retries or self.dead or self.extend
                    or self.release or self.forget)


def failure_record(ref: QueueRef, reason: str, details: Mapping[str, Any] | None) -> str:
    """A failure record's JSON (the script adds message_id, attempt and the server time)."""
    record: dict[str, Any] = dict(details or {})
    record.update(reason=str(reason), queue=ref.name)
    # lossy: the scripts check failure lists with cjson, which refuses lone surrogates
    return codec.dumps(record, lossy=True)


# -- writing ------------------------------------------------------------------------


def send(ref: QueueRef, fields: Mapping[str, str | int], message_id: str | None = None
         ) -> Step[str]:
    """Append one entry; the step's value is its stream id."""
    flat = [x for kv in fields.items() for x in kv]
    return Step.one(Call("XADD", ref.key, message_id or "*", *flat), text, durable=True)


def send_many(keys_fields: Sequence[tuple[str, Mapping[str, str | int]]]) -> Step[list[str]]:
    """Append entries (to one stream or several) all or none: one MULTI/EXEC."""
    commands = tuple(Call("XADD", key, "*", *[x for kv in fields.items() for x in kv])
                     for key, fields in keys_fields)
    return Step(commands, lambda replies: [text(r) for r in replies], transaction=True,
                durable=True)


# -- reading ------------------------------------------------------------------------


def fetch(ref: QueueRef, consumer: str, count: int, state: ReadState, periodic: bool,
          prune: bool = False) -> Step[Fetched]:
    """One fetch script call (see ``lua/fetch.lua``) from where ``state`` left off;
    ``periodic`` adds the periodic work (due retries, reclaiming lapsed leases);
    ``prune`` also removes consumers that hold nothing and were not seen for
    :data:`PRUNE_IDLE`."""
    k = ref.keys
    s = ref.settings
    delayed = k.dlq + ":delayed" if ref.is_dlq else k.delayed  # a DLQ has no retries
    keys = [ref.key, delayed, k.done, k.dlq, ref.leases]
    args: list[Any] = [GROUP, consumer, count, int(ref.visibility_timeout * 1000), ref.name,
                       s.max_deliveries, state.cursor, 0 if ref.is_dlq else 1,
                       1 if periodic else 0, int(PRUNE_IDLE * 1000) if prune else 0]
    log = ref.log
    if log is not None:
        keys += [log.stream, k.meta, k.order, k.held]
        args += [ref.pair_name, state.log_cursor, ref.log_prefix]

    def parse(reply: list[Any]) -> Fetched:
        (entries, gone, dups, dead, next_due, cursor, log_cursor, more, wake, types, skipped,
         pruned, ordered) = reply
        try:
            stored = json.loads(types)
        except ValueError:
            stored = []
        return Fetched([(text(e[0]), e[1], int(e[2])) for e in entries], int(gone), int(dups),
                       int(dead), None if int(next_due) < 0 else int(next_due) / 1000,
                       text(cursor), text(log_cursor), bool(int(more)),
                       [text(w) for w in wake],
                       [str(t) for t in stored] if isinstance(stored, list) else [],
                       int(skipped), int(pruned), bool(int(ordered)))

    return Step.one(ScriptCall(script("fetch"), keys, args), parse)


def read_log(ref: QueueRef, consumer: str, count: int, block: float | None = None
             ) -> Step[list[tuple[Any, Any]]]:
    """A subscription's new log entries: a plain XREADGROUP through its group (the hot
    path); ``block`` seconds to wait when there are none."""
    log = ref.log
    assert log is not None
    args: list[Any] = ["XREADGROUP", "GROUP", ref.pair_name, consumer, "COUNT", count]
    ms = None
    if block is not None:
        ms = max(1, int(min(block, MAX_BLOCK) * 1000))
        args += ["BLOCK", ms]
    return Step.one(Call(*args, "STREAMS", log.stream, ">"), read_entries,
                    block=ms / 1000 if ms else None)


def split_log(ref: QueueRef, rows: list[Any], types: frozenset[str], parse: bool = True
              ) -> tuple[list[Message], list[tuple[str, Any, int]], list[str]]:
    """New log entries by event type: ``(messages, other entries to decode, ids to
    acknowledge at once)``.

    The type is the entry's routing field (publish writes it), else the payload's
    ``event_type``; an entry with no readable type is delivered (the consumer
    dead-letters it with the reason). Entries in the shape publish writes (``d``, ``t``,
    ``k``, ``e``) become messages here, in one pass (the hot path); others are left to
    :func:`decode`.
    """
    prefix = ref.log_prefix
    name = ref.name
    every = ALL_TYPES in types
    wanted = {t.encode() for t in types}
    messages: list[Message] = []
    others: list[tuple[str, Any, int]] = []
    skip: list[str] = []
    for entry_id, f in rows:
        if type(f) is list and (len(f) == 8 or (len(f) == 10 and f[8] == b"p")) and \
                f[0] == b"d" and f[2] == b"t" and f[4] == b"k" and f[6] == b"e":
            if not every and f[7] not in wanted:
                skip.append(prefix + entry_id.decode())
                continue
            payload, sent = f[1], f[3]
            try:
                data = json.loads(payload) if parse else {}
                key = f[5].decode()
                sent_ms = int(sent)
            except (ValueError, UnicodeDecodeError, RecursionError):
                data = None
            if not isinstance(data, dict):  # decode() dead-letters it with the reason
                others.append((prefix + text(entry_id), f, 1))
                continue
            raw = {b"d": payload, b"t": sent, b"k": f[5], b"e": f[7]}
            if len(f) == 10:
                raw[b"p"] = f[9]
            messages.append(Message(prefix + entry_id.decode(), data, sent_ms / 1000, 1, {}, [],
                                    None, key, 0, name, raw, payload))
            continue
        if not every:
            found = _type_of(f)
            if found is not None and found not in types:  # (may hold a lone surrogate)
                skip.append(prefix + text(entry_id))
                continue
        others.append((prefix + text(entry_id), f, 1))
    return messages, others, skip


def _type_of(fields: Any) -> str | None:
    """An entry's event type: its routing field, else its payload's ``event_type``."""
    raw = flat_to_dict(fields)
    etype = raw.get(b"e")
    if etype is not None:
        return text(etype)
    try:
        data = json.loads(raw[b"d"]) if b"d" in raw else None
    except (ValueError, TypeError, RecursionError):
        return None
    found = data.get("event_type") if isinstance(data, dict) else None
    return found if isinstance(found, str) else None


def wait(ref: QueueRef, state: ReadState, seconds: float) -> Step[bool]:
    """Block until something is added to the queue's own stream (consumes nothing), or,
    for an ordered subscription, to its stream or the log.

    The step's value is True when something came (then fetch). Waits on the ids the
    last fetch reported as newest; with none known yet, it does not wait.
    """
    if not state.wake:
        return Step.one(Call("PING"), lambda _: True)  # nothing known to wait on: fetch
    ms = max(1, int(min(seconds, MAX_BLOCK) * 1000))
    streams = [ref.key]
    if len(state.wake) > 1 and ref.log is not None:
        streams.append(ref.log.stream)
    return Step.one(Call("XREAD", "COUNT", 1, "BLOCK", ms, "STREAMS", *streams,
                         *state.wake[:len(streams)]),
                    lambda reply: bool(reply), block=ms / 1000)


def decode(ref: QueueRef, entries: Iterable[tuple[str, Any, int]], parse: bool = True
           ) -> tuple[list[Message], dict[str, list[str]]]:
    """Decode fetched entries: ``(messages, {malformed reason: ids})``.

    On a dead-letter queue an undecodable entry is shown with its reason instead (there
    is nowhere further to send it). ``parse=False`` leaves payloads undecoded (see
    :func:`relaybus.codec.decode_entry`).
    """
    good: list[Message] = []
    bad: dict[str, list[str]] = {}
    for entry_id, raw, deliveries in entries:
        try:
            good.append(codec.decode_entry(entry_id, raw, deliveries, ref.name, parse=parse))
        except SerializationError as exc:
            if ref.is_dlq:
                good.append(Message(entry_id, {}, 0.0, deliveries,
                                    failures=[{"reason": str(exc)}], queue=ref.name))
            else:
                bad.setdefault(str(exc), []).append(entry_id)
    return good, bad


def recheck_interval(ref: QueueRef) -> float:
    """Seconds an idle consumer goes without the fetch script (reclaim, promote; for a
    subscription also its own stream: requeued dead letters, other instances' retries)."""
    cap = SUB_RECHECK_MAX if ref.log is not None else IDLE_RECHECK_MAX
    return max(0.05, min(ref.visibility_timeout / 4, cap))


@dataclass
class Counts:
    """What the queue layer handled on its own, for ``MessageQueue.stats``; ``parent``
    (one consumer's counts in a service over several partitions) gets every count too."""

    values: dict[str, int] = field(default_factory=dict)
    parent: Counts | None = None

    def add(self, name: str, n: int) -> None:
        if n:
            self.values[name] = self.values.get(name, 0) + n
            if self.parent is not None:
                self.parent.add(name, n)


def get_messages(ref: QueueRef, state: ReadState, consumer: str, count: int,
                 block_for_seconds: float | None, clock: Callable[[], float],
                 counts: Counts, recover: Callable[[QueueRef], Flow[Any]] | None = None,
                 parse: bool = True, skipped: Callable[[list[str]], None] | None = None,
                 stopped: Callable[[], bool] | None = None) -> Flow[list[Message]]:
    """Deliver up to ``count`` messages (see ``Queue.get_messages``); ``clock`` is monotonic.
    ``stopped`` (a consumer stopping) ends the flow, with nothing, before its next step
    and instead of a recovery (a fetch still waiting at a stop must not recreate what
    was deleted since).

    A plain queue is read by the fetch script alone. A subscription's new log entries
    are read with a plain XREADGROUP (and, when waiting, a blocking one), its own
    stream and the periodic work by the fetch script every ``recheck_interval`` (or
    when a retry is due). An ordered subscription (the script says so) is read by the
    script alone, like a plain queue, which holds back entries whose key is in use.
    Log entries of other types are acknowledged: by ``skipped`` (the consumer's next
    settle batch), else here at once.

    When the consumer group is gone (the server was flushed), ``recover`` recreates what
    is needed (default: the pair, see :func:`ensure_pair`) and the fetch runs again.
    ``parse=False`` leaves payloads undecoded (a consumer validating them from JSON).
    """
    recover = recover or _recreate
    sub = ref.log is not None
    blocking = bool(block_for_seconds) and block_for_seconds is not None \
        and block_for_seconds > 0
    deadline = clock() + (block_for_seconds or 0.0)
    rows: list[tuple[Any, Any]] | None = None  # what a blocking read of the log brought
    while True:
        if rows is None and stopped is not None and stopped():
            return []  # its consumer stopped during a blocking wait: nothing more is sent
            # (entries a blocking read brought, in ``rows``, are still delivered)
        now = clock()
        periodic = state.periodic_due(now)
        entries: list[tuple[str, Any, int]] = []
        more = False
        direct = sub and not state.ordered  # new log entries read here, not by the script
        if rows is None and (periodic or not (direct or (blocking and state.idle))):
            periodic = periodic or not sub  # a plain queue reclaims on every fetch
            prune = periodic and now >= state.next_prune
            try:
                got = yield fetch(ref, consumer, count, state, periodic, prune)
            except GroupMissing:
                if stopped is not None and stopped():
                    return []  # stopped meanwhile: what was deleted stays deleted
                counts.add("groups_recreated", 1)
                yield from recover(ref)
                periodic = True
                got = yield fetch(ref, consumer, count, state, periodic, prune)
            got.remember(state, now)
            if prune:
                state.next_prune = now + PRUNE_EVERY
            if periodic:
                # busy: again within a second (messages another instance handed back are
                # taken soon); idle: at the recheck interval, which bounds the idle cost
                state.next_periodic = now + (min(BUSY_RECHECK, recheck_interval(ref))
                                             if got.entries or not state.idle
                                             else recheck_interval(ref))
                if got.more or len(got.entries) >= count:
                    # the own stream may hold more (a requeued backlog, copies being
                    # dropped): read it again at once, not at the next interval
                    state.next_periodic = now
            counts.add("gone", got.gone)
            counts.add("duplicates", got.duplicates)
            counts.add("dead_lettered", got.dead_lettered)
            counts.add("skipped", got.skipped)
            counts.add("consumers_pruned", got.pruned)
            entries, more = got.entries, got.more
            direct = sub and not state.ordered
        drained = False  # the log gave fewer than asked: the next read may block at once
        if sub and state.types and (rows is not None or (direct and len(entries) < count and
                                                         not (blocking and state.idle
                                                              and not entries))):
            if rows is None:
                room = count - len(entries)
                try:
                    rows = yield read_log(ref, consumer, room)
                except GroupMissing:  # the group on the log is gone: recover next round
                    state.next_periodic = 0.0
                    rows = []
                more = more or len(rows) >= room
                drained = len(rows) < room
            else:
                drained = len(rows) < count
            ready, others, skip = split_log(ref, rows, state.types, parse)
            rows = None
            if skip:
                counts.add("skipped", len(skip))
                if skipped is not None:
                    skipped(skip)
                else:
                    yield from settle(ref, consumer, Settlement(acks=skip))
            entries += others
            more = more or bool(skip)
        else:
            ready = []
        state.idle = (not entries and not more and not ready) or (drained and not more)
        if entries or ready:
            messages, bad = decode(ref, entries, parse)
            messages += ready
            if bad:
                yield from settle(ref, consumer, Settlement(dead=[
                    (i, failure_record(ref, reason, None)) for reason, ids_ in bad.items()
                    for i in ids_]))
                counts.add("dead_lettered", sum(len(v) for v in bad.values()))
            if messages:
                return messages
            continue  # every one was dead-lettered: look again before reporting empty
        if more:
            continue
        if not blocking:
            return []
        wait_for = min(deadline, state.next_periodic) - clock()
        due = state.earliest_due()
        if due is not None:
            wait_for = min(wait_for, due - clock())
        if wait_for <= 0:
            if clock() >= deadline:
                return []
            continue  # the periodic work (or a retry) is due: fetch
        if direct and state.types:
            try:
                rows = yield read_log(ref, consumer, count, block=wait_for)
            except GroupMissing:
                state.next_periodic = 0.0
                rows = []
            if not rows:
                rows = None
        elif (yield wait(ref, state, wait_for)):
            state.idle = False  # something came: fetch it
        if rows is None and clock() >= deadline:
            return []


def _recreate(ref: QueueRef) -> Flow[Any]:
    """Recreate a queue pair the server lost (the default recovery of a fetch)."""
    import time  # created_at only: a label, not a decision

    return (yield from ensure_pair(ref, None, now=time.time()))


def peek(ref: QueueRef, count: int, start_id: str | None) -> Step[list[Message]]:
    """Up to ``count`` entries of the queue's own stream from ``start_id``, unconsumed."""
    return Step.one(Call("XRANGE", ref.key, start_id or "-", "+", "COUNT", count),
                    lambda rows: decode_rows(ref, stream_entries(rows)))


def decode_rows(ref: QueueRef, rows: Iterable[tuple[Any, Any]], id_prefix: str = ""
                ) -> list[Message]:
    """Decode read-only rows; an undecodable one is shown with its reason, not raised."""
    out = []
    for entry_id, raw in rows:
        mid = id_prefix + text(entry_id)
        try:
            out.append(codec.decode_entry(mid, raw, 0, ref.name))
        except SerializationError as exc:
            out.append(Message(mid, {}, 0.0, 0, failures=[{"reason": str(exc)}],
                               queue=ref.name))
    return out


def follow(ref: QueueRef, after_id: str, count: int, block_for_seconds: float | None
           ) -> Flow[tuple[str, list[Message]]]:
    """Messages added after ``after_id`` (a plain XREAD: nothing consumed); for tailing."""
    cursor = after_id
    if cursor == "$":
        last = yield Step.one(Call("XREVRANGE", ref.key, "+", "-", "COUNT", 1))
        rows = stream_entries(last)
        cursor = text(rows[0][0]) if rows else "0-0"
    args: list[Any] = ["COUNT", count]
    block = None
    if block_for_seconds is not None and block_for_seconds > 0:
        block = max(1, int(min(block_for_seconds, MAX_BLOCK) * 1000))
        args += ["BLOCK", block]
    reply = yield Step.one(Call("XREAD", *args, "STREAMS", ref.key, cursor),
                           block=block / 1000 if block else None)
    messages = decode_rows(ref, read_entries(reply))
    return (messages[-1].id if messages else cursor), messages


# -- settling -----------------------------------------------------------------------


def settle(ref: QueueRef, consumer: str, batch: Settlement, dlq_key: str | None = None,
           ordered: bool = False) -> Flow[Settled]:
    """One round trip settling ``batch``; dead letters go to ``dlq_key`` (default: the
    pair's own dead-letter queue).

    A batch of acknowledgements alone (the hot path) is one MULTI/EXEC of plain
    commands; anything else is one call of ``lua/settle.lua``. Either way it is atomic,
    and the done records are scored by the newest acknowledged entry's id (stream
    time: the server's clock). A server out of memory refuses the whole transaction
    (its ``ZADD`` of done records; on Redis 6.2 even its ``XACK``); the batch then goes
    through the script, which a full server runs since its first write, the ``XACK``,
    frees memory: acknowledging keeps working while the server is full. ``ordered`` (an
    ordered subscription's batch) always goes through the script, which hands each
    settled message's partition key on to the next event of that key.
    """
    fast = bool(batch.acks) and not (batch.retries or batch.dead or batch.extend
                                     or batch.release or batch.forget or ordered)
    done: Settled
    if fast:
        try:
            done = yield _acknowledge(ref, batch)
            return done
        except BrokerOutOfMemoryError:
            pass
    try:
        done = yield _settle_script(ref, consumer, batch, dlq_key)
    except CrossSlotError:
        if dlq_key is None:
            raise
        # on a cluster, another pair's DLQ lives on another slot: dead-letter into the
        # pair's own DLQ (atomically, as above), then move the new entries across
        done = yield _settle_script(ref, consumer, batch, None)
        if done.parked:
            yield from move_across(ref.keys.dlq, list(done.parked), dlq_key, fresh=False)
    return done


def _settle_script(ref: QueueRef, consumer: str, batch: Settlement, dlq_key: str | None
                   ) -> Step[Settled]:
    k = ref.keys
    keys = [ref.key, k.delayed, k.done, dlq_key or k.dlq, ref.leases]
    log = ref.log
    if log is not None:
        keys += [log.stream, k.order, k.held]
    done = [codec.dedup_record(d) for d in batch.done]
    args: list[Any] = [GROUP, consumer, "1" if ref.delete_on_ack else "0",
                       int(ref.settings.dedup_window * 1000),
                       int(ref.visibility_timeout * 1000) + 1, ref.pair_name, ref.log_prefix,
                       len(batch.acks), *batch.acks, len(done), *done, len(batch.retries)]
    for mid, delay, record in batch.retries:
        args += [mid, int(max(0.0, delay) * 1000), record]
    args.append(len(batch.dead))
    for mid, record in batch.dead:
        args += [mid, record]
    args += [len(batch.extend), *batch.extend, len(batch.release), *batch.release,
             "1" if batch.forget else "0"]

    def parse(r: list[Any]) -> Settled:
        return Settled(int(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]), bool(int(r[5])),
                       tuple(text(m) for m in r[6]), tuple(text(m) for m in r[7]))

    return Step.one(ScriptCall(script("settle"), keys, args), parse, durable=True)


def _acknowledge(ref: QueueRef, batch: Settlement) -> Step[Settled]:
    prefix = ref.log_prefix
    own: list[str] = []
    logged: list[str] = []
    for mid in batch.acks:
        if prefix and mid.startswith(prefix):
            logged.append(mid[len(prefix):])
        else:
            own.append(mid)
    cmds: list[Call] = []
    log = ref.log
    if logged and log is not None:
        cmds.append(Call("XACK", log.stream, ref.pair_name, *logged))
    if own:
        cmds.append(Call("XACK", ref.key, GROUP, *own))
    n_acks = len(cmds)
    if own and ref.delete_on_ack:
        cmds.append(Call("XDEL", ref.key, *own))
    if batch.done:
        newest = id_order(batch.acks[-1])[0]  # stream time of the batch: the records' score
        pairs = [x for key in batch.done for x in (newest, codec.dedup_record(key))]
        cmds += [Call("ZADD", ref.keys.done, *pairs),
                 Call("ZREMRANGEBYSCORE", ref.keys.done, "-inf",
                      newest - int(ref.settings.dedup_window * 1000))]

    def parse(replies: list[Any]) -> Settled:
        # the group on the log may be gone (unsubscribed, its backlog copied over)
        return Settled(sum(r for r in replies[:n_acks] if isinstance(r, int)))

    return Step(tuple(cmds), parse, transaction=len(cmds) > 1, tolerate=True, durable=True)


def requeue(ref: QueueRef, message_ids: list[str], destination_key: str) -> Flow[int]:
    """Move entries (usually from a DLQ) to ``destination_key``, history kept: one
    script call (atomic), or, to another slot of a cluster, :func:`move_across`."""
    try:
        moved: int = yield Step.one(ScriptCall(script("requeue"), [ref.key, destination_key],
                                               [GROUP, *message_ids]), int, durable=True)
    except CrossSlotError:
        moved = yield from move_across(ref.key, message_ids, destination_key, fresh=True)
    return moved


#: Fields a requeued entry leaves behind: it starts afresh (``requeue.lua`` drops them too).
_FRESH_DROPS = frozenset({b"x", b"l", b"n"})


def move_across(source: str, message_ids: list[str], destination: str, *, fresh: bool
                ) -> Flow[int]:
    """Move entries between streams in different cluster slots: copy, then remove
    (three round trips, not atomic). A crash between the two leaves an entry in both
    streams, never in neither: the copy keeps its dedup key, so a consumer's done
    record makes handling it twice harmless. ``fresh`` drops the expiry and attempt
    counter (a requeue). The value: how many moved."""
    replies = yield Step(tuple(Call("XRANGE", source, i, i) for i in message_ids),
                         lambda r: r)
    found: list[tuple[str, list[Any]]] = []
    for mid, reply in zip(message_ids, replies, strict=True):
        rows = stream_entries(reply)
        if rows:
            f = rows[0][1]
            found.append((mid, [x for kv in f.items() for x in kv] if isinstance(f, Mapping)
                          else list(f)))
    if not found:
        return 0
    adds = []
    for _, f in found:
        pairs = [(f[i], f[i + 1]) for i in range(0, len(f), 2)]
        kept = [x for k, v in pairs if not (fresh and k in _FRESH_DROPS) for x in (k, v)]
        adds.append(Call("XADD", destination, "*", *kept))
    yield Step(tuple(adds), lambda r: r, durable=True)
    ids = [mid for mid, _ in found]
    yield Step((Call("XACK", source, GROUP, *ids), Call("XDEL", source, *ids)), lambda r: r,
               transaction=True, durable=True)
    return len(found)


def requeue_where(ref: QueueRef, predicate: Callable[[Message], bool] | None,
                  destination_key: str, batch_size: int) -> Flow[int]:
    """Requeue every message ``predicate`` accepts, page by page (see ``Queue.requeue_where``)."""
    last = yield Step.one(Call("XREVRANGE", ref.key, "+", "-", "COUNT", 1))
    rows = stream_entries(last)
    if not rows:
        return 0
    end = id_order(text(rows[0][0]))
    start, moved = "-", 0
    while True:
        page: list[Message] = yield peek(ref, batch_size, start)
        in_range = [m for m in page if id_order(m.id) <= end]
        chosen = [m.id for m in in_range if predicate is None or predicate(m)]
        if chosen:
            moved += yield from requeue(ref, chosen, destination_key)
        if len(page) < batch_size or len(in_range) < len(page):
            return moved
        start = "(" + page[-1].id


def delete(ref: QueueRef, message_ids: list[str]) -> Step[int]:
    """Delete entries (pending or not) without dead-letter: one MULTI/EXEC."""
    return Step((Call("XACK", ref.key, GROUP, *message_ids), Call("XDEL", ref.key, *message_ids)),
                lambda r: int(r[1]), transaction=True)


def purge(ref: QueueRef) -> Flow[int]:
    """Remove every entry (waiting, pending, delayed retries); the value: how many.

    A subscription's group on the event log is moved to the log's end: what it had not
    read is dropped for it (the log keeps it for the others).
    """
    cmds: list[Call] = [Call("XLEN", ref.key), Call("DEL", ref.key),
                        Call("XGROUP", "CREATE", ref.key, GROUP, "0", "MKSTREAM")]
    if not ref.is_dlq:
        cmds += [Call("ZCARD", ref.keys.delayed), Call("DEL", ref.keys.delayed)]
    res = yield Step(tuple(cmds), lambda r: r, transaction=True)
    dropped = int(res[0]) + (int(res[3]) if not ref.is_dlq else 0)
    log = ref.log
    if log is not None:
        groups = yield Step.one(Call("XINFO", "GROUPS", log.stream), group_rows)
        mine = groups.get(ref.pair_name)
        if mine:
            dropped += int(mine.get("pending", 0)) + int(mine.get("lag") or 0)
            yield Step((Call("XGROUP", "DESTROY", log.stream, ref.pair_name),
                        Call("XGROUP", "CREATE", log.stream, ref.pair_name, "$")),
                       lambda r: r, transaction=True)
    return dropped


# -- queue pairs and inspection --------------------------------------------------------


def ensure_pair(ref: QueueRef, visibility_timeout: float | None, *, now: float,
                consumed: bool = True) -> Flow[float]:
    """Create (or open) the pair's streams, groups and settings; the value: its timeout.

    ``now`` (epoch seconds) is recorded as ``created_at`` when the pair is new (for
    display only). ``consumed=False`` (the event log, read through the subscriptions'
    groups) gives the main stream no ``relaybus`` group. A subscription whose stored
    types are not empty gets its group on the event log back if it is missing (created
    at the log's end).
    """
    k = ref.keys
    created = repr(now)
    cmds = [Call("HSETNX", k.meta, "created_at", created),
            Call("HSET", k.meta, "visibility_timeout", repr(float(visibility_timeout)))
            if visibility_timeout is not None else
            Call("HSETNX", k.meta, "visibility_timeout", repr(DEFAULT_VISIBILITY_TIMEOUT)),
            Call("SADD", registry_key(ref.settings.prefix), ref.pair_name),
            Call("XGROUP", "CREATE", k.stream, GROUP, "0", "MKSTREAM") if consumed else
            Call("PING"),
            Call("XGROUP", "CREATE", k.dlq, GROUP, "0", "MKSTREAM"),
            Call("HGET", k.meta, "visibility_timeout"),
            Call("HGET", k.meta, "types")]
    res = yield Step(tuple(cmds), lambda r: r, tolerate=True)
    for r in res:
        if isinstance(r, Exception) and "BUSYGROUP" not in str(r):
            raise GroupMissing(f"creating queue {ref.pair_name!r}: {r}") \
                if "NOGROUP" in str(r) else _refused(ref, r)
    log = ref.log
    if log is not None and res[-1] and res[-1] not in (b"[]", "[]"):
        # a subscription's group on the log: it reads what is published from now on
        yield Step((Call("XGROUP", "CREATE", log.stream, ref.pair_name, "$", "MKSTREAM"),),
                   lambda r: r, tolerate=True)  # BUSYGROUP: it exists
    return float(res[-2])


def _refused(ref: QueueRef, err: Exception) -> Exception:
    from ..errors import BrokerCommandError

    return BrokerCommandError(f"creating queue {ref.pair_name!r}: {err}")


def visibility(ref: QueueRef) -> Step[float | None]:
    """The pair's stored visibility timeout, or None when the pair does not exist."""
    return Step.one(Call("HGET", ref.keys.meta, "visibility_timeout"),
                    lambda raw: float(raw) if raw is not None else None)


def queue_names(prefix: str) -> Step[list[str]]:
    """Names of every queue pair under ``prefix``, sorted."""
    return Step.one(Call("SMEMBERS", registry_key(prefix)),
                    lambda names: sorted(text(n) for n in names))


def delete_pair(ref: QueueRef, keep_dlq: bool) -> Step[bool]:
    """Delete the pair's keys (and its group on the log); the value: whether any existed."""
    k = ref.keys
    doomed = [key for key in k.all() if not keep_dlq or key not in (k.dlq, k.dlq_leases)]
    cmds = [Call("DEL", *doomed), Call("SREM", registry_key(ref.settings.prefix), ref.pair_name)]
    if k.log is not None:
        cmds.append(Call("XGROUP", "DESTROY", k.log.stream, ref.pair_name))
    return Step(tuple(cmds), lambda r: bool(r[0]) and not isinstance(r[0], Exception),
                tolerate=True)


def entries_added(prefix: str, names: Iterable[str]) -> Step[dict[str, int | None]]:
    """How many entries each named queue ever received (XINFO STREAM ``entries-added``)."""
    pairs = []
    for name in names:
        base = name[: -len(DLQ_SUFFIX)] if name.endswith(DLQ_SUFFIX) else name
        keys = QueueKeys(prefix, base)
        pairs.append((name, keys.dlq if name.endswith(DLQ_SUFFIX) else keys.stream))

    def parse(res: list[Any]) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for (name, _), info in zip(pairs, res, strict=True):
            fields = {text(k): v for k, v in flat_to_dict(info).items()} \
                if isinstance(info, (dict, list)) else {}
            added = fields.get("entries-added")
            out[name] = int(added) if added is not None else None
        return out

    return Step(tuple(Call("XINFO", "STREAM", key) for _, key in pairs), parse, tolerate=True)


def infos(refs: Sequence[QueueRef]) -> Flow[list[QueueInfo]]:
    """A :class:`QueueInfo` per queue: two round trips whatever their number; ages by
    the server's clock."""
    if not refs:
        return []
    cmds: list[Call] = [Call("TIME")]
    for r in refs:
        cmds += [Call("XLEN", r.key), Call("XINFO", "GROUPS", r.key), Call("HGETALL", r.keys.meta),
                 Call("ZCARD", r.keys.delayed), Call("XLEN", r.keys.dlq)]
        log = r.log
        if log is not None:
            cmds += [Call("XINFO", "GROUPS", log.stream), Call("ZCARD", r.keys.held)]
        else:  # the event log's scheduled events, in the same slot
            cmds += [Call("PING"), Call("ZCARD", r.keys.scheduled) if _is_log(r) else Call("PING")]
    res = yield Step(tuple(cmds), lambda x: x, tolerate=True)
    secs, micros = res[0]
    now_ms = int(secs) * 1000 + int(micros) // 1000
    rows = []
    scheduled: dict[str, int] = {}
    for i, r in enumerate(refs):
        xlen, groups, meta, delayed, dlq_len, log_groups, held = res[1 + 7 * i: 8 + 7 * i]
        scheduled[r.name] = held if _is_log(r) and isinstance(held, int) else 0
        held = held if r.log is not None else 0
        own = group_rows(groups).get(GROUP, {})
        on_log = group_rows(log_groups).get(r.pair_name, {}) if r.log is not None else {}
        rows.append((r, xlen if isinstance(xlen, int) else 0, own, on_log,
                     flat_to_dict(meta) if isinstance(meta, (dict, list)) else {},
                     delayed, dlq_len, held if isinstance(held, int) else 0))
    # the first entry not yet delivered, per stream: its id's time is its age
    second: list[Command] = []
    for r, _, own, on_log, *_ in rows:
        last = text(own.get("last-delivered-id", b"0-0")) if own else "0-0"
        second.append(Call("XRANGE", r.key, "(" + last, "+", "COUNT", 1))
        start = "(" + text(on_log.get("last-delivered-id", b"0-0")) if on_log else ""
        if on_log and r.log is not None and on_log.get("lag") is None:  # Redis 6.2
            second.append(ScriptCall(script("count"), [r.log.stream], [start, LAG_COUNT_CAP]))
        elif on_log and r.log is not None:
            second.append(Call("XRANGE", r.log.stream, start, "+", "COUNT", 1))
        else:
            second.append(Call("PING"))
    oldest = yield Step(tuple(second), lambda x: x, tolerate=True)
    out = []
    for i, (r, xlen, own, on_log, meta, delayed, dlq_len, held) in enumerate(rows):
        pending = int(own.get("pending", 0)) if own else 0
        lag = own.get("lag") if own else None
        if lag is None:
            lag = max(0, xlen - pending) if r.delete_on_ack else 0
        lag = int(lag) + held  # an ordered subscription's events waiting for their key
        consumers = int(own.get("consumers", 0)) if own else 0
        firsts = [oldest[2 * i]]
        if on_log:
            pending += int(on_log.get("pending", 0))
            log_lag, on_log_first = on_log.get("lag"), oldest[2 * i + 1]
            if log_lag is None and isinstance(on_log_first, list):  # counted (Redis 6.2)
                log_lag = on_log_first[0]
                on_log_first = [[on_log_first[1]]] if on_log_first[1] else []
            lag += int(log_lag) if log_lag is not None else 0
            consumers = max(consumers, int(on_log.get("consumers", 0)))
            firsts.append(on_log_first)
        ages = [max(0.0, (now_ms - int(text(f[0][0]).split("-")[0])) / 1000)
                for f in firsts if isinstance(f, list) and f]
        created = meta.get(b"created_at")
        vt = meta.get(b"visibility_timeout")
        out.append(QueueInfo(
            name=r.name, is_dlq=r.is_dlq, message_count=xlen, pending_messages=pending,
            waiting_messages=lag, consumer_group=GROUP, consumers=consumers,
            created_at=float(created) if created else None,
            oldest_waiting_age=max(ages) if ages else None,
            visibility_timeout=float(vt) if vt else DEFAULT_VISIBILITY_TIMEOUT,
            delayed_messages=0 if r.is_dlq else int(delayed or 0)
            if not isinstance(delayed, Exception) else 0,
            dlq_messages=0 if r.is_dlq else int(dlq_len or 0)
            if not isinstance(dlq_len, Exception) else 0,
            scheduled_messages=scheduled[r.name],
        ))
    return out


def _is_log(ref: QueueRef) -> bool:
    """True for the event log's main stream (a partition of it), which holds the bus's
    scheduled events."""
    return not ref.is_dlq and is_event_log(ref.pair_name)


@dataclass(frozen=True)
class ConsumerInfo:
    """One consumer of a queue: its name, how many messages it holds (delivered, not
    yet settled) and the seconds since it last read or settled (XINFO CONSUMERS)."""

    name: str
    pending: int
    idle: float


def consumers(refs: Sequence[QueueRef]) -> Step[dict[str, list[ConsumerInfo]]]:
    """XINFO CONSUMERS of each queue's group, and, for a subscription, of its group on
    the event log; errors (no such stream or group) read as no consumers."""
    calls: list[Call] = []
    for ref in refs:
        calls.append(Call("XINFO", "CONSUMERS", ref.key, GROUP))
        log = ref.log
        calls.append(Call("XINFO", "CONSUMERS", log.stream, ref.pair_name) if log is not None
                     else Call("PING"))

    def parse(replies: list[object]) -> dict[str, list[ConsumerInfo]]:
        out: dict[str, list[ConsumerInfo]] = {}
        for i, ref in enumerate(refs):
            seen: dict[str, ConsumerInfo] = {}
            for reply in replies[2 * i: 2 * i + 2]:
                for name, f in group_rows(reply).items():
                    pending, idle = int(f.get("pending", 0)), int(f.get("idle", 0)) / 1000
                    if name in seen:
                        old = seen[name]
                        pending, idle = old.pending + pending, min(old.idle, idle)
                    seen[name] = ConsumerInfo(name, pending, idle)
            out[ref.name] = sorted(seen.values(), key=lambda c: c.name)
        return out

    return Step(tuple(calls), parse, tolerate=True)



def ping() -> Step[bool]:
    """PING."""
    return Step.one(Call("PING"), bool)


__all__ += ["failure_record", "send", "send_many", "fetch", "wait", "decode", "get_messages",
            "peek", "decode_rows", "follow", "read_log", "split_log", "settle", "requeue",
            "requeue_where", "delete",
            "purge", "ensure_pair", "visibility", "queue_names", "delete_pair",
            "entries_added", "infos", "consumers", "ConsumerInfo", "ping", "recheck_interval",
            "Counts"]
