"""What the pages show, read from the broker and shaped for templates and JSON.

Every read goes through the queue layer and consumes nothing: ``list_queues`` and
``entries_added`` (through :class:`~.throughput.Throughput`), ``consumers``, ``peek``
and ``follow``; the shapes come from :mod:`relaybus.inspection`, as the ``relaybus``
commands' do. Values are plain dicts and lists, ready for Jinja2 and for JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .._core.bus import read_subscription_table
from ..bus import ALL_EVENTS, subscription_queue_name
from ..codec import Message
from ..errors import QueueNotFoundError
from ..formatting import fmt_age, fmt_rate, fmt_short_time, fmt_time, iso_time
from ..inspection import (
    dead_letter_queue,
    event_logs,
    event_type_of,
    failure_details,
    follow_logs,
    list_row,
    queue_row,
    short_payload,
)
from ..keys import is_event_log
from ..queue import MessageQueue, Queue
from .context import dlq_path
from .throughput import Throughput, round_rate

__all__ = ["STREAM_ID", "DLQ_PAGE", "TAIL_BATCH", "overview", "subscriptions",
           "dead_letter_queues", "DlqPage", "dlq_page", "dlq_message", "message_view",
           "tail", "event_types", "BadCursor"]

#: A stream id as the pages take it (``1732630000000-0``).
STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
#: Dead-lettered messages per page of a DLQ.
DLQ_PAGE = 50
#: Most events one tail poll returns (the rest come with the next).
TAIL_BATCH = 200
#: Characters of payload a tail row shows.
TAIL_PAYLOAD = 400


def _text(value: Any, fmt: Any) -> str:
    return "–" if value is None else str(fmt(value))


def overview(mq: MessageQueue, throughput: Throughput) -> dict[str, Any]:
    """Every queue with its counts and rates, the rates' history, the consumers and the
    subscriptions."""
    sample, points = throughput.sample(mq)
    latest = points[-1].queues if points else {}
    names = [n for n in sample.infos if not is_event_log(n)]
    consumers = mq.consumers(names)
    queues = []
    for name, info in sample.infos.items():
        row = queue_row(info)
        rate_in, rate_out = (round_rate(r) for r in latest.get(name, (None, None)))
        row.update(
            is_log=is_event_log(name), kept=info.message_count,
            rate_in=rate_in, rate_out=rate_out, dlq_url=dlq_path(name),
            oldest_waiting_text=_text(row["oldest_waiting"], fmt_age),
            rate_in_text=_text(rate_in, fmt_rate), rate_out_text=_text(rate_out, fmt_rate))
        queues.append(row)
    consumer_rows = [{"queue": queue, "name": c.name, "pending": c.pending, "idle": c.idle,
                      "idle_text": fmt_age(c.idle)}
                     for queue in names for c in consumers.get(queue, [])]
    last = points[-1] if points else None
    totals = {
        "published": round_rate(last.published) if last else None,
        "processed": round_rate(last.processed) if last else None,
        "waiting": sum(q["waiting"] or 0 for q in queues),
        "dlq": sum(q["dlq"] or 0 for q in queues),
        "consumers": len({c["name"] for c in consumer_rows}),
        "kept": sum(q["kept"] for q in queues if q["is_log"]),
    }
    totals["published_text"] = _text(totals["published"], fmt_rate)
    totals["processed_text"] = _text(totals["processed"], fmt_rate)
    subs, unreadable = subscriptions(mq)
    return {"queues": queues, "consumers": consumer_rows, "totals": totals,
            "subscriptions": subs, "unreadable": unreadable,
            "history": [p.to_json() for p in points]}


def subscriptions(mq: MessageQueue) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every subscription (service, queue, event types) and the unreadable entries."""
    subs, unreadable = mq.driver.run(read_subscription_table(mq.prefix))
    rows = [{"service": service, "queue": subscription_queue_name(service),
             "event_types": ["all" if t == ALL_EVENTS else t for t in types],
             "dlq_url": dlq_path(subscription_queue_name(service))}
            for service, types in sorted(subs.items())]
    return rows, unreadable


def dead_letter_queues(mq: MessageQueue) -> list[dict[str, Any]]:
    """Every queue's DLQ: its name, size and page."""
    return [{"queue": i.name, "dlq": i.name + ":dlq", "messages": i.dlq_messages,
             "url": dlq_path(i.name)}
            for i in mq.list_queues() if not i.is_dlq]


@dataclass(frozen=True)
class DlqPage:
    """A page of a dead-letter queue, oldest first."""

    dlq: Queue
    total: int
    rows: list[dict[str, Any]]
    #: Id to start the next page after (None: this is the last page).
    next_after: str | None


def dlq_page(mq: MessageQueue, queue: str, after: str | None = None,
             limit: int = DLQ_PAGE) -> DlqPage:
    """Up to ``limit`` messages of ``queue``'s DLQ after id ``after`` (from the start)."""
    dlq = dead_letter_queue(mq, queue)
    found = dlq.peek(count=limit + 1, start_id=f"({after}" if after else None)
    total = dlq.get_info().message_count
    rows = []
    for msg in found[:limit]:
        row = list_row(msg)
        row.update(first_failure_text=_text(row["first_failure"], fmt_short_time),
                   last_failure_text=_text(row["last_failure"], fmt_short_time),
                   url=dlq_path(dlq.pair_name, msg.id))
        rows.append(row)
    return DlqPage(dlq, total, rows, found[limit - 1].id if len(found) > limit else None)


def dlq_message(mq: MessageQueue, queue: str, message_id: str) -> tuple[Queue, Message]:
    """One message of ``queue``'s DLQ; :class:`QueueNotFoundError` when it is not there."""
    dlq = dead_letter_queue(mq, queue)
    found = [m for m in dlq.peek(count=1, start_id=message_id) if m.id == message_id]
    if not found:
        raise QueueNotFoundError(f"no message {message_id} in {dlq.name} (requeued or "
                                 "purged meanwhile?)")
    return dlq, found[0]


def _when(value: Any) -> str | None:
    return fmt_time(value) if isinstance(value, (int, float)) and value > 0 else None


def message_view(dlq: Queue, msg: Message) -> dict[str, Any]:
    """A dead-lettered message for its page: fields, payload, every failure record."""
    failures = []
    for n, record in enumerate(msg.failures, 1):
        details = []
        for key, shown in failure_details(record):
            raw = record.get(key)
            # times (``published_at``, ``started_at``...) as dates, the rest as given
            when = _when(raw) if key.endswith("_at") else None
            details.append((key, when or shown))
        failures.append({
            "n": n, "reason": record.get("reason", "–"), "time": _when(record.get("timestamp")),
            "attempt": record.get("attempts", record.get("attempt")),
            "queue": record.get("queue"), "details": details,
            "traceback": str(record["traceback"]).rstrip() if record.get("traceback") else None,
        })
    return {
        "id": msg.id, "queue": dlq.name, "pair": dlq.pair_name,
        "event_type": event_type_of(msg), "sent": _when(msg.timestamp),
        "headers": msg.headers, "payload": json.dumps(msg.data, indent=2, ensure_ascii=False,
                                                      default=str),
        "failures": failures,
    }


def event_types(values: list[str]) -> list[str]:
    """Event types from query values (repeated, or comma-separated in one), in order."""
    found = [t.strip() for v in values for t in v.split(",")]
    return list(dict.fromkeys(t for t in found if t))


class BadCursor(ValueError):
    """A tail cursor that is not one this dashboard gave."""


def _cursors(cursor: str | None, partitions: int, start: str) -> list[str]:
    if not cursor:
        return [start] * partitions
    given = cursor.split(",")
    if len(given) > partitions or not all(STREAM_ID.match(c) for c in given):
        raise BadCursor(f"bad cursor {cursor[:80]!r}")
    return given + ["0-0"] * (partitions - len(given))  # partitions added since: all of them


def tail(mq: MessageQueue, cursor: str | None, types: set[str], *,
         from_start: bool = False) -> dict[str, Any]:
    """Events of the event log after ``cursor`` (of the types in ``types``; all when
    empty), oldest first, and the cursor to pass next. Without a cursor: from now on,
    or from the oldest event kept (``from_start``)."""
    logs = event_logs(mq)
    cursors, messages = follow_logs(logs, _cursors(cursor, len(logs),
                                                   "0-0" if from_start else "$"),
                                    count=TAIL_BATCH)
    messages.sort(key=lambda m: m.timestamp)
    events = []
    for msg in messages:
        etype = event_type_of(msg)
        if types and etype not in types:
            continue
        events.append({"id": msg.id, "type": etype, "event_id": msg.data.get("event_id"),
                       "time": iso_time(msg.timestamp) if msg.timestamp else None,
                       "time_text": _clock(msg.timestamp),
                       "payload": short_payload(msg.data, TAIL_PAYLOAD)})
    return {"cursor": ",".join(cursors), "events": events}


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3] if ts else "–"
