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

import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from ..codec import dedup_identity, dedup_record
from ..errors import EventValidationError, InvalidNameError
from ..events import Event, event_type_name, serialize_event
from ..keys import (
    EVENTS_QUEUE,
    GROUP,
    MAX_NAME_LENGTH,
    SUB_PREFIX,
    QueueKeys,
    subscriptions_key,
    validate_name,
)
from ..scripts import script
from .queue import Counts, QueueRef, QueueSettings, delete_pair, ensure_pair
from .replies import text
from .steps import Call, Flow, ScriptCall, Step

logger = logging.getLogger("relaybus.bus")

__all__ = ["ALL_EVENTS", "EVENTS_QUEUE", "DEFAULT_RETENTION_MAX_LEN", "DEFAULT_RETENTION_SECONDS",
           "MAINTENANCE_INTERVAL", "DRAIN_BATCH", "subscription_queue_name",
           "parse_subscriptions", "subscription_types", "event_fields", "raw_event", "publish",
           "open_log", "subscribe", "unsubscribe", "remove_subscription", "read_subscriptions",
           "read_subscription_table", "split_subscriptions", "trim"]

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


def event_fields(encode: Any, event: Event) -> dict[str, str | int]:
    """The log entry of ``event``; ``encode`` is the queue layer's ``_encode``."""
    if not isinstance(event, Event):
        raise TypeError(f"publish takes an Event, not {type(event).__name__}")
    fields: dict[str, str | int] = encode(serialize_event(event), dedup_key=event.event_id,
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


def _log(prefix: str) -> QueueKeys:
    return QueueKeys(prefix, EVENTS_QUEUE)


def publish(prefix: str, encoded: list[dict[str, str | int]], dedup_window: float,
            counts: Counts) -> Step[list[str]]:
    """Append events to the log in one script call, all or none, each event (type and
    id) once per ``dedup_window``; the value: their log ids. A repeat (published within
    the window, in this call or before) is not appended and gets its first log id; it
    is counted in ``counts`` (``publish_duplicates``) and logged."""
    log = _log(prefix)
    args: list[Any] = [int(dedup_window * 1000)]
    for fields in encoded:
        flat = [x for kv in fields.items() for x in kv]
        key = fields.get("k")
        routing = fields.get("e")
        args += [dedup_record(dedup_identity(str(routing) if routing else None, str(key)))
                 if key else "", len(flat), *flat]

    def parse(reply: Any) -> list[str]:
        ids, repeats = [text(i) for i in reply[0]], [int(i) - 1 for i in reply[1]]
        counts.add("publish_duplicates", len(repeats))
        for i in repeats:
            logger.info("event %s of type %s was published again within the dedup window: "
                        "not appended (its log id is %s)", encoded[i].get("k"),
                        encoded[i].get("e"), ids[i])
        return ids

    return Step.one(ScriptCall(script("publish"), [log.stream, log.published, log.published_ids],
                               args), parse, durable=True)


def open_log(log: QueueRef, now: float) -> Flow[float]:
    """Create (or open) the event log's pair; the value: its visibility timeout.

    The log has no consumer group of its own (each subscription has one); a
    ``relaybus`` group left by relaybus 0.1's routers is removed: nothing reads it any
    more, and it would hold back the log's trimming forever.
    """
    vt = yield from ensure_pair(log, log.visibility_timeout, now=now, consumed=False)
    yield Step((Call("XGROUP", "DESTROY", log.keys.stream, GROUP),), lambda r: r, tolerate=True)
    return vt


def subscribe(sub: QueueRef, service: str, types: list[str], visibility_timeout: float | None,
              now: float, ordered: bool | None = None) -> Flow[float]:
    """Subscribe ``service`` (queue ``sub``) to ``types``; the value: its visibility timeout.

    ``visibility_timeout`` replaces the stored one when given, ``ordered`` (handle the
    events of one partition key one at a time, in order) the stored setting. The
    subscription's group on the log starts at the log's end: it receives every event
    published after this returns (a repeat keeps the group where it is).
    """
    vt = yield from ensure_pair(sub, visibility_timeout, now=now)
    log = sub.keys.log
    assert log is not None
    encoded = json.dumps(types)
    settings = ["types", encoded]
    if ordered is not None:
        settings += ["ordered", "1" if ordered else "0"]
    yield Step((Call("HSET", sub.keys.meta, *settings),
                Call("XGROUP", "CREATE", log.stream, sub.pair_name, "$", "MKSTREAM"),
                Call("HSET", subscriptions_key(sub.settings.prefix), service, encoded)),
               lambda r: r, tolerate=True)  # BUSYGROUP: subscribed before
    return vt


def unsubscribe(sub: QueueRef, service: str) -> Flow[bool]:
    """Stop delivering new events to ``service``; what was meant for it is kept.

    The subscription leaves the table and its types are cleared (instances still
    running stop reading the log); then its backlog in the log (entries delivered but
    not acknowledged, and those not read yet of its types) is copied into its own
    stream, page by page, and its group on the log is removed. The value: whether it
    was subscribed.
    """
    log = sub.keys.log
    assert log is not None
    res = yield Step((Call("HGET", sub.keys.meta, "types"),
                      Call("HDEL", subscriptions_key(sub.settings.prefix), service),
                      Call("HSET", sub.keys.meta, "types", "[]")), lambda r: r, tolerate=True)
    old_types = text(res[0]) if isinstance(res[0], (bytes, str)) else "[]"
    while True:
        _, gone = yield Step.one(ScriptCall(script("drain"), [sub.keys.stream, log.stream],
                                            [sub.pair_name, DRAIN_BATCH, old_types]))
        if int(gone):
            return bool(res[1]) and not isinstance(res[1], Exception)


def remove_subscription(settings: QueueSettings, service: str) -> Flow[bool]:
    """Remove a retired service's subscription and everything kept for it: its entry in
    the table, its group on the log (what it had not read), and its queue pair (waiting
    messages, retries, dead letters, done records). The value: whether any of it
    existed. Instances of the service still running would subscribe again: stop them
    first. A name the table holds but that is no valid service name (an unreadable
    entry) is removed as it is stored."""
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
    existed = yield delete_pair(QueueRef(settings, name), keep_dlq=False)
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


def trim(prefix: str, max_len: int, max_age: float | None) -> Step[tuple[int, str]]:
    """Apply the log's retention; the value: ``(entries trimmed, group it was held at)``."""
    age = "" if max_age is None else int(max_age * 1000)
    return Step.one(ScriptCall(script("trim"), [_log(prefix).stream], [max_len, age]),
                    lambda r: (int(r[0]), text(r[1])))
