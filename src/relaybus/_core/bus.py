"""The event bus's commands and flows: publishing, subscriptions, the log's retention.

How an event travels::

    publish(event) --XADD--> P{all}                   the event log (one stream)
                               |  one consumer group per subscription, "sub:NAME"
                               v
        fetch.lua on P{all} + P{all}:sub:NAME          a service instance's fetch:
          keeps the types in P{all}:sub:NAME:meta,     other types are acknowledged
          each event id once per dedup window          at once, on the server
                               v
                         handler(event) --ok--> settle.lua: XACK in the log group (the
                               |                log keeps the entry for its retention)
                               +--error--> P{all}:sub:NAME:delayed -> P{all}:sub:NAME
                               +--dead---> P{all}:sub:NAME:dlq

There is no copy step: each subscription reads the log through a group of its own
(native consumer-group fan-out), so an event is written once and read once per
subscription. Retries, requeued dead letters and messages sent to the queue directly
go into the subscription's own stream, which the same fetch reads. A subscription's
keys share the log's hash tag, so each fetch and each settle is one script in one
slot. The log is trimmed by retention, never past what a group has not acknowledged.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import uuid
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from ..codec import JsonText, dedup_identity, dedup_record
from ..errors import ConfigurationError, EventValidationError, InvalidNameError
from ..events import Event, event_json, event_type_name, serialize_event
from ..keys import (
    EVENTS_QUEUE,
    GROUP,
    MAX_NAME_LENGTH,
    SUB_PREFIX,
    QueueKeys,
    is_event_log,
    partition_name,
    subscriptions_key,
    validate_name,
)
from ..scripts import script
from .queue import Counts, QueueRef, QueueSettings, delete_pair, ensure_pair
from .replies import text
from .steps import Call, Command, Flow, ScriptCall, Step
from .telemetry import Telemetry, by_type

logger = logging.getLogger("relaybus.bus")

__all__ = ["ALL_EVENTS", "EVENTS_QUEUE", "DEFAULT_RETENTION_MAX_LEN", "DEFAULT_RETENTION_SECONDS",
           "MAINTENANCE_INTERVAL", "DRAIN_BATCH", "MAX_PARTITIONS", "subscription_queue_name",
           "partition_of", "partition_refs", "open_partitions",
           "parse_subscriptions", "subscription_types", "event_fields", "raw_event", "publish",
           "open_log", "subscribe", "unsubscribe", "remove_subscription", "read_subscriptions",
           "read_subscription_table", "split_subscriptions", "stored_partitions", "trim"]

#: Marker stored for a subscription to every event type.
ALL_EVENTS = "*"
#: Events the log keeps (0: no count limit); never one a subscription has not read.
DEFAULT_RETENTION_MAX_LEN = 100_000
#: Seconds the log keeps events (None: no age limit), by the server's clock.
DEFAULT_RETENTION_SECONDS: float | None = 24 * 3600.0
#: Seconds between two rounds of a bus's maintenance (the log's retention trim).
MAINTENANCE_INTERVAL = 5.0
#: Log entries one drain call (unsubscribe) moves at most.
DRAIN_BATCH = 1000
#: Most partitions a bus may have.
MAX_PARTITIONS = 256


def partition_of(fields: Mapping[str, str | int], partitions: int) -> int:
    """The partition of a log entry: CRC-32 of its partition key (field ``p``), else of
    its event id (``k``), modulo ``partitions``. Every process computes the same."""
    if partitions == 1:
        return 0
    key = fields.get("p") or fields.get("k") or ""
    return zlib.crc32(str(key).encode("utf-8")) % partitions


def partition_refs(ref: QueueRef, partitions: int) -> list[QueueRef]:
    """``ref`` (the log's or a subscription's, partition 0) and its other partitions."""
    return [ref] + [replace(ref, pair_name=partition_name(ref.pair_name, i))
                    for i in range(1, partitions)]


def subscription_queue_name(service_name: str) -> str:
    """The queue-pair name of a service's subscription: ``sub:<service_name>``.

    Raises InvalidNameError for a name :func:`~relaybus.keys.validate_name` refuses,
    or one too long to leave room for the ``sub:`` in front of it.
    """
    name = validate_name(service_name, "service name")
    if len(name) > MAX_NAME_LENGTH - len(SUB_PREFIX):
        raise InvalidNameError(f"service name is {len(name)} characters; the limit is "
                               f"{MAX_NAME_LENGTH - len(SUB_PREFIX)} (its queue is 'sub:<name>')")
    return SUB_PREFIX + name


def _entry(name: Any, value: Any) -> tuple[str, list[str]] | str:
    """One entry of the subscriptions hash: ``(service, types)``, or why it cannot be
    used (written by another tool, an older version, or by hand)."""
    if isinstance(name, bytes):
        try:
            name = name.decode("utf-8")
        except UnicodeDecodeError:
            return "its name is not UTF-8 text"
    try:
        subscription_queue_name(str(name))
        types = json.loads(value)
    except InvalidNameError as exc:
        return str(exc)
    except ValueError:
        return f"its event types are not JSON: {text(value)[:80]!r}"
    if not isinstance(types, list) or not all(isinstance(t, str) and t for t in types):
        return f"its event types are not a list of type names: {text(value)[:80]!r}"
    return str(name), types


def split_subscriptions(raw: Mapping[Any, Any]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The subscriptions hash as ``({service: [types]}, {unreadable name: why})``, each
    sorted by name. An unreadable entry concerns only itself: every subscription reads
    the log through its own group, so the others flow on."""
    usable: dict[str, list[str]] = {}
    unreadable: dict[str, str] = {}
    for name, value in raw.items():
        entry = _entry(name, value)
        if isinstance(entry, tuple):
            usable[entry[0]] = entry[1]
        else:
            unreadable[text(name)] = entry
    return dict(sorted(usable.items())), dict(sorted(unreadable.items()))


def parse_subscriptions(raw: Mapping[Any, Any]) -> dict[str, list[str]]:
    """The usable subscriptions of the hash (see :func:`split_subscriptions`)."""
    return split_subscriptions(raw)[0]


def subscription_types(event_types: Iterable[str | type[Event]] | str | type[Event] | None
                       ) -> list[str]:
    """Type names as stored: ``["*"]`` for None (every type), else sorted and unique."""
    if event_types is None:
        return [ALL_EVENTS]
    if isinstance(event_types, (str, type)):
        return [event_type_name(event_types)]
    types = sorted({event_type_name(t) for t in event_types})
    if not types:
        raise ValueError("event_types is empty: pass None to subscribe to every type")
    return types


def event_fields(encode: Any, event: Event, headers: Mapping[str, str] | None = None
                 ) -> dict[str, str | int]:
    """The log entry of ``event``; ``encode`` is the queue layer's ``_encode``;
    ``headers`` are added to the event's own (a trace context), not to ``event``."""
    if not isinstance(event, Event):
        raise TypeError(f"publish takes an Event, not {type(event).__name__}")
    data: Mapping[str, Any] | JsonText | None = None if headers else event_json(event)
    if data is None:  # the dict path: a trace context to add, or text not vouched for
        payload = serialize_event(event)
        if headers:
            payload["headers"] = {**payload.get("headers", {}), **headers}
        data = payload
    fields: dict[str, str | int] = encode(data, dedup_key=event.event_id,
                                          routing_key=event.event_type,
                                          partition_key=event.partition_key)
    return fields


def raw_event(event_type: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` completed into an event payload of ``event_type`` (``publish_raw``)."""
    payload = dict(data)
    given = payload.setdefault("event_type", event_type)
    if not isinstance(event_type, str) or not event_type or given != event_type:
        msg = (f"event_type {given!r} does not match {event_type!r}" if event_type
               else "event_type must be a non-empty string")
        raise EventValidationError(str(event_type), [{
            "type": "event_type_mismatch", "loc": ("event_type",), "msg": msg,
            "input": given}])
    payload.setdefault("event_id", str(uuid.uuid4()))
    payload.setdefault("timestamp", time.time())
    return payload


@functools.lru_cache(maxsize=1024)
def _log(prefix: str, partition: int = 0) -> QueueKeys:
    """The keys of the event log's ``partition`` (kept: their names are computed once)."""
    return QueueKeys(prefix, partition_name(EVENTS_QUEUE, partition))


def publish(prefix: str, encoded: list[dict[str, str | int]], dedup_window: float,
            counts: Counts, partitions: int = 1, telemetry: Telemetry | None = None
            ) -> Step[list[str]]:
    """Append events to the log in one round trip, each event (type and id) once per
    ``dedup_window``; the value: their log ids (``all@2/...`` on partition 2). One
    script call per partition they go to, each all or none. A repeat (published within
    the window, in this call or before) is not appended and gets its first log id; it
    is counted in ``counts`` (``publish_duplicates``) and logged; ``telemetry`` counts
    the appended ones by type (``published``)."""
    groups = _by_partition(encoded, partitions)
    calls = []
    for partition, members in groups.items():
        log = _log(prefix, partition)
        args: list[Any] = [int(dedup_window * 1000)]
        for i in members:
            args += _entry_args(encoded[i])
        calls.append(ScriptCall(script("publish"), [log.stream, log.published,
                                                    log.published_ids], args))

    def parse(replies: list[Any]) -> list[str]:
        ids = [""] * len(encoded)
        repeats: set[int] = set()
        for (partition, members), reply in zip(groups.items(), replies, strict=True):
            shown = _id_prefix(prefix, partition)
            for i, log_id in zip(members, reply[0], strict=True):
                ids[i] = shown + text(log_id)
            for n in reply[1]:
                i = members[int(n) - 1]
                repeats.add(i)
                counts.add("publish_duplicates", 1)
                logger.info("event %s of type %s was published again within the dedup "
                            "window: not appended (its log id is %s)", encoded[i].get("k"),
                            encoded[i].get("e"), ids[i])
        if telemetry is not None:
            types: dict[Any, int] = {}  # by the entries' type (labelled once per type)
            for i, f in enumerate(encoded):
                if i not in repeats:
                    kind = f.get("e")
                    types[kind] = types.get(kind, 0) + 1
            telemetry.add("published", by_type(types))
        return ids

    return Step(tuple(calls), parse, durable=True)


def _by_partition(encoded: list[dict[str, str | int]], partitions: int) -> dict[int, list[int]]:
    """The positions of ``encoded``'s entries by the partition each goes to."""
    groups: dict[int, list[int]] = {}
    for i, fields in enumerate(encoded):
        groups.setdefault(partition_of(fields, partitions), []).append(i)
    return groups


def _id_prefix(prefix: str, partition: int) -> str:
    """What precedes an id of ``partition`` when shown: nothing for 0, else ``all@N/``."""
    return "" if partition == 0 else _log(prefix, partition).name + "/"


def _entry_args(fields: Mapping[str, str | int]) -> list[Any]:
    """An entry as publish.lua and schedule.lua take it: its dedup record (of its type
    and id; '' for none), the number of flat fields, the fields."""
    flat = [x for kv in fields.items() for x in kv]
    key, routing = fields.get("k"), fields.get("e")
    record = dedup_record(dedup_identity(str(routing) if routing else None, str(key))) \
        if key else ""
    return [record, len(flat), *flat]


# -- scheduled events ----------------------------------------------------------------------

#: Most scheduled events one promote call appends per partition.
PROMOTE_BATCH = 1000


def due_of(delay: float | timedelta | None, at: datetime | None) -> tuple[str, int] | None:
    """What :func:`schedule` takes for ``publish(delay=...)`` / ``publish(at=...)``
    (None: publish now). ``delay``: seconds (or a timedelta) from now by the server's
    clock, >= 0; ``at``: an aware datetime (a naive one is refused)."""
    if delay is None and at is None:
        return None
    if delay is not None and at is not None:
        raise ConfigurationError("give delay or at, not both")
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or \
                not math.isfinite(seconds) or seconds < 0:
            raise ConfigurationError(f"delay must be a number of seconds >= 0 (or a "
                                     f"timedelta), not {delay!r}")
        return ("d", round(seconds * 1000))
    if not isinstance(at, datetime):
        raise ConfigurationError(f"at must be a datetime, not {type(at).__name__}")
    if at.tzinfo is None or at.utcoffset() is None:
        raise ConfigurationError(f"at={at!r} is a naive datetime: give an aware one, such as "
                                 "datetime.now(timezone.utc) + timedelta(minutes=5)")
    return ("a", round(at.timestamp() * 1000))


def maintenance_pause(now: float, next_trim: float, due_in: float | None) -> float:
    """How long the maintenance loop waits (``now``, ``next_trim``: monotonic): until
    its next round (a trim, which also promotes what is due) or the next scheduled
    event it knows of, whichever is sooner."""
    pause = max(0.0, next_trim - now)
    return pause if due_in is None else max(0.0, min(pause, due_in))


def schedule(prefix: str, encoded: list[dict[str, str | int]], due: tuple[str, int],
             partitions: int = 1) -> Step[list[str]]:
    """Schedule events for later, in one round trip: ``due`` is ``("d", ms from now by
    the server's clock)`` or ``("a", ms since the epoch)``. The value: each one's
    schedule id, its event id (``all@2/ID`` on partition 2), which
    :func:`cancel_scheduled` takes. Scheduling an event id again replaces it."""
    groups = _by_partition(encoded, partitions)
    calls = []
    for partition, members in groups.items():
        log = _log(prefix, partition)
        args: list[Any] = []
        for i in members:
            fields = {k: str(v) for k, v in encoded[i].items()}  # stored as JSON text
            record, *entry = _entry_args(fields)
            args += [fields["k"], due[0], due[1], record.hex() if record else "", *entry]
        calls.append(ScriptCall(script("schedule"), [log.scheduled, log.scheduled_events], args))

    def parse(replies: list[Any]) -> list[str]:
        ids = [""] * len(encoded)
        for partition, members in groups.items():
            shown = _id_prefix(prefix, partition)
            for i in members:
                ids[i] = shown + str(encoded[i]["k"])
        return ids

    return Step(tuple(calls), parse, durable=True)


def _scheduled_member(prefix: str, schedule_id: str) -> tuple[QueueKeys, str]:
    """The log partition and member of a schedule id (``ID`` or ``all@2/ID``)."""
    log, sep, member = schedule_id.rpartition("/")
    if not sep:
        return _log(prefix), member
    if not is_event_log(log):
        raise ConfigurationError(f"{schedule_id!r} is not a schedule id (ID or all@N/ID)")
    return QueueKeys(prefix, log), member


def cancel_scheduled(prefix: str, schedule_id: str) -> Step[bool]:
    """Remove a scheduled event that is still waiting; the value: whether it was."""
    log, member = _scheduled_member(prefix, schedule_id)
    return Step((Call("ZREM", log.scheduled, member), Call("HDEL", log.scheduled_events, member)),
                lambda replies: bool(replies[0]), durable=True)


def promote(prefix: str, dedup_window: float, partitions: int = 1) -> Step[float | None]:
    """Append the scheduled events that are due to the log (one script call per
    partition, one round trip); the value: seconds until the next one is due (None:
    none is scheduled)."""
    calls = [ScriptCall(script("promote"), [log.stream, log.published, log.published_ids,
                                            log.scheduled, log.scheduled_events],
                        [int(dedup_window * 1000), PROMOTE_BATCH])
             for log in (_log(prefix, i) for i in range(partitions))]

    return Step(tuple(calls), lambda replies: _due_in([(r[0], r[1]) for r in replies]))


def scheduled(prefix: str, partitions: int, limit: int) -> Flow[list[ScheduledEntry]]:
    """The first ``limit`` scheduled events of each partition, soonest first."""
    logs = [_log(prefix, i) for i in range(partitions)]
    ranges = yield Step(tuple(Call("ZRANGE", log.scheduled, 0, limit - 1, "WITHSCORES")
                              for log in logs), lambda replies: [_pairs(r) for r in replies])
    wanted = [(log, pairs) for log, pairs in zip(logs, ranges, strict=True) if pairs]
    if not wanted:
        return []
    packed = yield Step(tuple(Call("HMGET", log.scheduled_events, *[m for m, _ in pairs])
                              for log, pairs in wanted), lambda replies: replies)
    out = []
    for (log, pairs), values in zip(wanted, packed, strict=True):
        shown = _id_prefix(prefix, log.partition)
        for (member, score), raw in zip(pairs, values, strict=True):
            if raw is None:
                continue  # promoted or cancelled meanwhile
            flat = json.loads(raw)[2:]
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            out.append(ScheduledEntry(shown + text(member), int(float(score)),
                                      str(fields.get("e", "")), str(fields.get("k", "")), fields))
    return sorted(out, key=lambda e: e.due_ms)


@dataclass(frozen=True)
class ScheduledEntry:
    """A scheduled event: its schedule id, when it is due (ms since the epoch, by the
    server's clock), its type and id, and its log entry's fields."""

    schedule_id: str
    due_ms: int
    event_type: str
    event_id: str
    fields: dict[str, str]


def _pairs(reply: Any) -> list[tuple[Any, Any]]:
    if reply and isinstance(reply[0], (list, tuple)):
        return [(m, sc) for m, sc in reply]  # RESP3
    return list(zip(reply[::2], reply[1::2], strict=True))


def open_log(log: QueueRef, now: float) -> Flow[float]:
    """Create (or open) the event log's pair; the value: its visibility timeout.

    The log has no consumer group of its own (each subscription has one); a
    ``relaybus`` group left by relaybus 0.1's routers is removed: nothing reads it any
    more, and it would hold back the log's trimming forever.
    """
    vt = yield from ensure_pair(log, log.visibility_timeout, now=now, consumed=False)
    yield Step((Call("XGROUP", "DESTROY", log.keys.stream, GROUP),), lambda r: r, tolerate=True)
    return vt


def stored_partitions(prefix: str) -> Step[int]:
    """How many partitions the bus under ``prefix`` has (1 for a bus that never said)."""
    return Step.one(Call("HGET", _log(prefix).meta, "partitions"),
                    lambda raw: int(raw) if raw is not None else 1)


def open_partitions(log: QueueRef, wanted: int | None, now: float) -> Flow[tuple[float, int]]:
    """Open the event log and its partitions; the value: ``(visibility timeout, N)``.

    ``wanted`` None takes the stored number of partitions (1 for a new bus). More than
    stored grows the bus, losing nothing: the new partitions' logs are made, every
    subscription gets its pair and its group (at the start: nothing published there
    is missed) on each new partition, and only then is N stored, so a publisher never
    writes to a partition some subscription does not read. Fewer than stored raises
    :class:`~relaybus.errors.ConfigurationError` (their events would be stranded).
    """
    vt = yield from open_log(log, now)
    stored = yield stored_partitions(log.settings.prefix)
    if wanted is None or wanted == stored:
        return vt, stored
    if not isinstance(wanted, int) or isinstance(wanted, bool) or \
            not 1 <= wanted <= MAX_PARTITIONS:
        raise ConfigurationError(f"partitions must be an int from 1 to {MAX_PARTITIONS}, "
                                 f"not {wanted!r}")
    if wanted < stored:
        raise ConfigurationError(
            f"the bus under prefix {log.settings.prefix!r} has {stored} partitions; it "
            f"cannot shrink to {wanted} (the events in the others would be stranded): "
            f"pass partitions={stored} or None")
    new = range(stored, wanted)
    for ref in partition_refs(log, wanted)[stored:]:
        yield from ensure_pair(ref, vt, now=now, consumed=False)
    yield from _extend_subscriptions(log.settings, new, now)
    yield Step.one(Call("HSET", log.keys.meta, "partitions", wanted))
    # a service that subscribed meanwhile (it saw the old N) gets the new partitions too
    yield from _extend_subscriptions(log.settings, new, now)
    logger.info("event bus under prefix %r grown from %d to %d partitions",
                log.settings.prefix, stored, wanted)
    return vt, wanted


def _extend_subscriptions(settings: QueueSettings, partitions: range, now: float
                          ) -> Flow[None]:
    """Give every subscription a pair and a group (at the start) on ``partitions``."""
    table = yield read_subscriptions(settings.prefix)
    for service in table:
        sub = QueueRef(settings, subscription_queue_name(service))
        meta = yield Step((Call("HGET", sub.keys.meta, "types"),
                           Call("HGET", sub.keys.meta, "ordered"),
                           Call("HGET", sub.keys.meta, "visibility_timeout")), lambda r: r)
        types, ordered, vt = (text(x) if x is not None else None for x in meta)
        settings_of = ["types", types or "[]"] + (["ordered", ordered] if ordered else [])
        for ref in partition_refs(sub, partitions.stop)[partitions.start:]:
            yield from ensure_pair(ref, float(vt) if vt else None, now=now)
            log = ref.keys.log
            assert log is not None
            yield Step((Call("XGROUP", "CREATE", log.stream, ref.pair_name, "0", "MKSTREAM"),
                        Call("HSET", ref.keys.meta, *settings_of)),
                       lambda r: r, tolerate=True)  # BUSYGROUP: made before


def subscribe(sub: QueueRef, service: str, types: list[str], visibility_timeout: float | None,
              now: float, ordered: bool | None = None, partitions: int = 1) -> Flow[float]:
    """Subscribe ``service`` (queue ``sub``) to ``types``; the value: its visibility timeout.

    ``visibility_timeout`` replaces the stored one when given, ``ordered`` (handle the
    events of one partition key one at a time, in order) the stored setting. The
    subscription's group on the log starts at the log's end: it receives every event
    published after this returns (a repeat keeps the group where it is). With
    ``partitions`` above 1, each partition of the subscription gets the same.
    """
    refs = partition_refs(sub, partitions)
    vt = 0.0
    for ref in reversed(refs):
        vt = yield from ensure_pair(ref, visibility_timeout, now=now)
    encoded = json.dumps(types)
    settings = ["types", encoded]
    if ordered is not None:
        settings += ["ordered", "1" if ordered else "0"]
    cmds: list[Command] = []
    for ref in refs:
        log = ref.keys.log
        assert log is not None
        cmds += [Call("HSET", ref.keys.meta, *settings),
                 Call("XGROUP", "CREATE", log.stream, ref.pair_name, "$", "MKSTREAM")]
    cmds.append(Call("HSET", subscriptions_key(sub.settings.prefix), service, encoded))
    yield Step(tuple(cmds), lambda r: r, tolerate=True)  # BUSYGROUP: subscribed before
    return vt


def unsubscribe(sub: QueueRef, service: str, partitions: int = 1) -> Flow[bool]:
    """Stop delivering new events to ``service``; what was meant for it is kept.

    The subscription leaves the table and its types are cleared (instances still
    running stop reading the log); then its backlog in the log (entries delivered but
    not acknowledged, and those not read yet of its types) is copied into its own
    stream, page by page, and its group on the log is removed; so for each partition.
    The value: whether it was subscribed.
    """
    refs = partition_refs(sub, partitions)
    res = yield Step((Call("HGET", sub.keys.meta, "types"),
                      Call("HDEL", subscriptions_key(sub.settings.prefix), service),
                      *(Call("HSET", ref.keys.meta, "types", "[]") for ref in refs)),
                     lambda r: r, tolerate=True)
    old_types = text(res[0]) if isinstance(res[0], (bytes, str)) else "[]"
    for ref in refs:
        log = ref.keys.log
        assert log is not None
        while True:
            _, gone = yield Step.one(ScriptCall(script("drain"), [ref.keys.stream, log.stream],
                                                [ref.pair_name, DRAIN_BATCH, old_types]))
            if int(gone):
                break
    return bool(res[1]) and not isinstance(res[1], Exception)


def remove_subscription(settings: QueueSettings, service: str) -> Flow[bool]:
    """Remove a retired service's subscription and everything kept for it: its entry in
    the table, its group on the log (what it had not read), and its queue pair (waiting
    messages, retries, dead letters, done records), on every partition. The value:
    whether any of it existed. Instances of the service still running would subscribe
    again: stop them first. A name the table holds but that is no valid service name
    (an unreadable entry) is removed as it is stored."""
    table = subscriptions_key(settings.prefix)
    try:
        name = subscription_queue_name(service)
    except InvalidNameError:
        if not isinstance(service, str):
            raise
        stored = yield Step.one(Call("HEXISTS", table, service), lambda r: bool(r))
        if not stored:
            raise
        name = SUB_PREFIX + service
    removed = yield Step.one(Call("HDEL", table, service), lambda r: bool(r))
    partitions = yield stored_partitions(settings.prefix)
    existed = False
    for ref in partition_refs(QueueRef(settings, name), partitions):
        existed = bool((yield delete_pair(ref, keep_dlq=False))) or existed
    return bool(removed or existed)


def _table(raw: Any) -> Mapping[Any, Any]:
    return raw if isinstance(raw, Mapping) else dict(zip(raw[::2], raw[1::2], strict=False))


def read_subscriptions(prefix: str) -> Step[dict[str, list[str]]]:
    """Every subscription under ``prefix``: service name -> event types (``*`` = all).
    Unreadable entries are left out, each logged once (WARNING)."""
    def parse(raw: Any) -> dict[str, list[str]]:
        usable, unreadable = split_subscriptions(_table(raw))
        for name, why in unreadable.items():
            if (prefix, name) not in _reported:
                _reported.add((prefix, name))
                logger.warning("subscription entry %r under prefix %r is ignored: %s (delete "
                               "it with `relaybus subscriptions remove NAME`)", name, prefix,
                               why)
        return usable

    return Step.one(Call("HGETALL", subscriptions_key(prefix)), parse)


def read_subscription_table(prefix: str) -> Step[tuple[dict[str, list[str]], dict[str, str]]]:
    """The subscriptions under ``prefix`` and the unreadable entries (name -> why)."""
    return Step.one(Call("HGETALL", subscriptions_key(prefix)),
                    lambda raw: split_subscriptions(_table(raw)))


#: Unreadable entries already logged, as (prefix, name).
_reported: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class TrimRound:
    """What a maintenance round did: entries trimmed, a group the trim was held at
    (''), and seconds until the next scheduled event is due (None: none is)."""

    trimmed: int
    held: str
    due_in: float | None


def trim(prefix: str, max_len: int, max_age: float | None, partitions: int = 1,
         dedup_window: float = 0.0) -> Step[TrimRound]:
    """A maintenance round, one script call per partition: publish the scheduled events
    that are due (deduplicated within ``dedup_window``), then apply the log's retention."""
    age = "" if max_age is None else int(max_age * 1000)
    window = int(dedup_window * 1000)

    def parse(replies: list[Any]) -> TrimRound:
        held = next((text(r[1]) for r in replies if text(r[1])), "")
        return TrimRound(sum(int(r[0]) for r in replies), held,
                         _due_in([(r[2], r[3]) for r in replies]))

    calls = []
    for i in range(partitions):
        log = _log(prefix, i)
        calls.append(ScriptCall(script("trim"), [log.stream, log.published, log.published_ids,
                                                 log.scheduled, log.scheduled_events],
                                [max_len, age, window, PROMOTE_BATCH]))
    return Step(tuple(calls), parse)


def _due_in(rounds: list[tuple[Any, Any]]) -> float | None:
    """Seconds until the next scheduled event of any partition, from each partition's
    ``(events promoted, ms to the next or -1)``; 0 when a partition has more due."""
    if any(int(promoted) >= PROMOTE_BATCH for promoted, _ in rounds):
        return 0.0
    waits = [int(ms) / 1000 for _, ms in rounds if int(ms) >= 0]
    return min(waits) if waits else None
