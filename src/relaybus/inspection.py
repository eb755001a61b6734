"""What the operator tools read from a bus, and the shapes they show it in.

Shared by the ``relaybus`` commands and the web dashboard, so both count, name and
compute the same way: a queue's row (:func:`queue_row`), rates between two samples of
every queue (:class:`Sample`, :func:`rates`), a DLQ by the names people give it
(:func:`dead_letter_queue`) and its messages' rows (:func:`list_row`), and the event
log followed across its partitions (:func:`event_logs`, :func:`follow_logs`). Nothing
here consumes: reads are ``list_queues``, ``entries_added``, ``peek`` and ``follow``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import keys
from ._core.bus import stored_partitions
from .bus import subscription_queue_name
from .codec import Message
from .errors import QueueNotFoundError
from .keys import DLQ_SUFFIX, EVENTS_QUEUE, SUB_PREFIX, log_of, partition_name
from .queue import MessageQueue, Queue, QueueInfo

__all__ = ["is_event_log", "queue_row", "Sample", "rates", "dead_letter_queue",
           "event_type_of", "list_row", "failure_details", "RECORD_HEAD", "short_payload",
           "SHORT_PAYLOAD", "event_logs", "follow_logs"]


# -- queues -------------------------------------------------------------------------

def is_event_log(info: QueueInfo) -> bool:
    """True for the event log (``all``, and its partitions ``all@N``), which no one
    consumes as a queue: each subscription reads it through a group of its own."""
    return keys.is_event_log(info.name)


def queue_row(info: QueueInfo) -> dict[str, Any]:
    """One queue's row. The event log has no backlog of its own (what waits in it for a
    service is counted in that service's ``sub:NAME`` row): only its DLQ is shown."""
    if is_event_log(info):
        return {"name": info.name, "waiting": None, "pending": None, "delayed": None,
                "consumers": None, "oldest_waiting": None, "dlq": info.dlq_messages}
    return {"name": info.name, "waiting": info.waiting_messages,
            "pending": info.pending_messages, "delayed": info.delayed_messages,
            "consumers": info.consumers, "oldest_waiting": info.oldest_waiting_age,
            "dlq": info.dlq_messages}


# -- rates --------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """Every main queue at one moment, with its streams' entries-added counters."""

    at: float
    infos: dict[str, QueueInfo]
    added: dict[str, int | None]

    @classmethod
    def take(cls, mq: MessageQueue) -> Sample:
        """Sample every main queue under ``mq``'s prefix (``at``: monotonic seconds)."""
        infos = {i.name: i for i in mq.list_queues() if not i.is_dlq}
        return cls(time.monotonic(), infos, mq.entries_added(list(infos)))


def _backlog(info: QueueInfo) -> int:
    return info.waiting_messages + info.pending_messages + info.delayed_messages


def _added(prev: Sample, cur: Sample, name: str) -> int | None:
    """Entries added to queue ``name``'s stream between two samples (XINFO STREAM
    entries-added; on servers without it, the growth of the stream); None if unknown."""
    old, info = prev.infos.get(name), cur.infos.get(name)
    if old is None or info is None:
        return None
    added_now, added_then = cur.added.get(name), prev.added.get(name)
    if added_now is not None and added_then is not None:
        return max(0, added_now - added_then)
    return max(0, info.message_count - old.message_count)


def rates(prev: Sample | None, cur: Sample, name: str) -> tuple[float | None, float | None]:
    """Messages per second into and out of queue ``name`` between two samples.

    In: entries added to the stream; a subscription (``sub:NAME``) also takes in every
    entry added to the event log, which it reads through its group (its waiting count
    includes them). Out: what came in minus the growth of the backlog (waiting +
    pending + delayed): acknowledged (or skipped), dead-lettered or expired messages.
    The event log itself has no rate out (entries leave it only by retention).
    """
    if prev is None or cur.at <= prev.at:
        return None, None
    inflow = _added(prev, cur, name)
    if inflow is None:
        return None, None
    if name.startswith(SUB_PREFIX):
        inflow += _added(prev, cur, log_of(name)) or 0
    dt = cur.at - prev.at
    if keys.is_event_log(name):
        return inflow / dt, None
    outflow = max(0, inflow - (_backlog(cur.infos[name]) - _backlog(prev.infos[name])))
    return inflow / dt, outflow / dt


# -- dead letters -------------------------------------------------------------------

#: Keys of a failure record shown in its heading rather than as details.
RECORD_HEAD = ("reason", "timestamp", "queue", "attempt", "attempts", "message_id", "traceback")


def dead_letter_queue(mq: MessageQueue, name: str) -> Queue:
    """The DLQ for ``name``: a main queue's name (``sub:billing``), its DLQ's
    (``sub:billing:dlq``), or a bare service name (``billing``, when no queue has that
    name). Raises :class:`QueueNotFoundError` when there is none."""
    base = name[: -len(DLQ_SUFFIX)] if name.endswith(DLQ_SUFFIX) else name
    dlq = mq.get_dead_letter_queue(base)
    if dlq is None and not base.startswith("sub:"):
        dlq = mq.get_dead_letter_queue(subscription_queue_name(base))
    if dlq is None:
        raise QueueNotFoundError(f"no queue named {base!r} under prefix {mq.prefix!r} "
                                 "(see `relaybus queues`)")
    return dlq


def event_type_of(message: Message) -> str | None:
    """The event type of a message: the payload's, else the entry's routing key."""
    etype = message.data.get("event_type")
    if isinstance(etype, str) and etype:
        return etype
    raw = message.fields.get(b"e")
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


def _attempts(message: Message) -> int | None:
    last = message.failures[-1] if message.failures else {}
    for key in ("attempts", "attempt"):
        if isinstance(last.get(key), int):
            return int(last[key])
    return None


def _failure_time(message: Message, index: int) -> float | None:
    if not message.failures:
        return None
    ts = message.failures[index].get("timestamp")
    return float(ts) if isinstance(ts, (int, float)) else None


def list_row(message: Message) -> dict[str, Any]:
    """One dead-lettered message's row: id, event type, reason, attempts, failure times."""
    return {
        "id": message.id, "event_type": event_type_of(message), "reason": message.reason,
        "attempts": _attempts(message), "first_failure": _failure_time(message, 0),
        "last_failure": _failure_time(message, -1),
    }


def failure_details(record: dict[str, Any]) -> list[tuple[str, str]]:
    """A failure record's details (the keys not in :data:`RECORD_HEAD`), values as text."""
    return [(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
            for key, value in record.items() if key not in RECORD_HEAD]


# -- the event log ------------------------------------------------------------------

#: Envelope fields left out of a short payload (always, or when empty).
_ENVELOPE = frozenset({"event_id", "timestamp", "event_type"})
_ENVELOPE_IF_EMPTY = frozenset({"correlation_id", "causation_id", "headers", "partition_key"})
#: Characters of payload a tail line shows.
SHORT_PAYLOAD = 120


def short_payload(data: dict[str, Any], limit: int = SHORT_PAYLOAD) -> str:
    """The payload's own fields as compact JSON, cut to ``limit`` characters."""
    body = {k: v for k, v in data.items()
            if k not in _ENVELOPE and not (k in _ENVELOPE_IF_EMPTY and not v)}
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def event_logs(mq: MessageQueue) -> list[Queue]:
    """The event log's partitions under ``mq``'s prefix (``all``, ``all@1``, ...)."""
    partitions = mq.driver.run(stored_partitions(mq.prefix))
    return [Queue(mq, partition_name(EVENTS_QUEUE, i)) for i in range(partitions)]


def follow_logs(logs: Sequence[Queue], cursors: Sequence[str], *, count: int = 100,
                block_for_seconds: float | None = None) -> tuple[list[str], list[Message]]:
    """Events added to each log after its cursor (``Queue.follow``: nothing consumed).

    Returns the new cursors and the messages, partition by partition; a message of a
    partition above 0 has its id as publish gives it (``all@2/ID``). The wait is shared
    out between the partitions.
    """
    new_cursors = list(cursors)
    messages: list[Message] = []
    wait = block_for_seconds / len(logs) if block_for_seconds and logs else None
    for i, log in enumerate(logs):
        new_cursors[i], got = log.follow(cursors[i], count=count, block_for_seconds=wait)
        for msg in got:
            msg.id = f"{log.name}/{msg.id}" if i else msg.id
        messages += got
    return new_cursors, messages
