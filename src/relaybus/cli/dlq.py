"""``relaybus dlq``: list, show, requeue and purge dead-lettered messages.

QUEUE is the main queue's name (``sub:billing``); its DLQ's name (``sub:billing:dlq``)
and a bare service name (``billing``, when no queue has that name) work too.
Listing and showing read with ``Queue.peek``: they consume nothing.
"""

from __future__ import annotations

import json
import re
from typing import Annotated

import typer
from rich.json import JSON
from rich.text import Text

from ..codec import Message
from ..errors import QueueNotFoundError
from ..inspection import dead_letter_queue, event_type_of, failure_details, list_row
from ..queue import Queue
from ._common import (
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    Column,
    JsonOption,
    PrefixOption,
    TimeoutOption,
    UrlOption,
    console,
    emit,
    fail,
    fmt_short_time,
    fmt_time,
    guarded,
    iso_time,
    open_mq,
    print_json,
)

app = typer.Typer(
    name="dlq", no_args_is_help=True,
    help="Inspect and repair dead-letter queues: list, show, requeue, purge.")

QueueArg = Annotated[str, typer.Argument(
    metavar="QUEUE", show_default=False,
    help="Queue whose DLQ to use: sub:billing, sub:billing:dlq, or a service name.")]

LIST_COLUMNS = [
    Column("id"),
    Column("event_type"),
    Column("reason", max_width=44),
    Column("attempts", numeric=True),
    Column("first_failure", fmt=fmt_short_time, to_json=iso_time),
    Column("last_failure", fmt=fmt_short_time, to_json=iso_time),
]

_STREAM_ID = re.compile(r"^\d+(-\d+)?$")

__all__ = ["app", "dead_letter_queue", "event_type_of", "list_row"]


@app.command("list")
@guarded
def list_(
    queue: QueueArg,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1,
                                       help="Show at most this many messages, oldest first.")
                     ] = 50,
    url: UrlOption = DEFAULT_URL, prefix: PrefixOption = DEFAULT_PREFIX,
    timeout: TimeoutOption = DEFAULT_TIMEOUT, as_json: JsonOption = False,
) -> None:
    """List dead-lettered messages: id, event type, reason, attempts, failure times."""
    with open_mq(url, prefix, timeout, read_only=True) as mq:
        dlq = dead_letter_queue(mq, queue)
        messages = dlq.peek(count=limit)
        total = dlq.get_info().message_count if len(messages) == limit else len(messages)
    shown = f"{len(messages)} of {total}" if total > len(messages) else f"{total}"
    emit([list_row(m) for m in messages], LIST_COLUMNS, as_json=as_json,
         title=f"{dlq.name}: {shown} message{'s' if total != 1 else ''}",
         empty=f"{dlq.name} is empty")


@app.command()
@guarded
def show(
    queue: QueueArg,
    message_id: Annotated[str, typer.Argument(metavar="ID", show_default=False,
                                              help="Id of the message (from `dlq list`).")],
    url: UrlOption = DEFAULT_URL, prefix: PrefixOption = DEFAULT_PREFIX,
    timeout: TimeoutOption = DEFAULT_TIMEOUT, as_json: JsonOption = False,
) -> None:
    """Show one dead-lettered message: payload, headers, full failure history."""
    if not _STREAM_ID.match(message_id):
        raise typer.BadParameter(f"{message_id!r} is not a message id (like 1732630000000-0)",
                                 param_hint="'ID'")
    with open_mq(url, prefix, timeout, read_only=True) as mq:
        dlq = dead_letter_queue(mq, queue)
        found = [m for m in dlq.peek(count=1, start_id=message_id) if m.id == message_id]
    if not found:
        raise QueueNotFoundError(f"no message {message_id} in {dlq.name}")
    msg = found[0]
    if as_json:
        print_json([{
            "id": msg.id, "queue": dlq.name, "event_type": event_type_of(msg),
            "sent": iso_time(msg.timestamp) if msg.timestamp else None,
            "payload": msg.data, "headers": msg.headers, "failures": msg.failures,
        }])
        return
    _render_message(dlq, msg)


def _render_message(dlq: Queue, msg: Message) -> None:
    out = console()

    def field(label: str, value: str) -> None:
        out.print(Text.assemble((f"{label:<12}", "bold"), value))

    field("ID", msg.id)
    field("Queue", dlq.name)
    field("Event type", event_type_of(msg) or "-")
    if msg.timestamp:
        field("Sent", fmt_time(msg.timestamp))
    field("Headers", json.dumps(msg.headers, ensure_ascii=False) if msg.headers else "(none)")
    out.print(Text("Payload", style="bold"))
    out.print(JSON.from_data(msg.data, ensure_ascii=False))
    out.print(Text(f"Failures ({len(msg.failures)}, oldest first)", style="bold"))
    for n, record in enumerate(msg.failures, 1):
        head = [f"#{n}"]
        ts = record.get("timestamp")
        if isinstance(ts, (int, float)):
            head.append(fmt_time(ts))
        attempt = record.get("attempts", record.get("attempt"))
        if attempt is not None:
            head.append(f"attempt {attempt}")
        if record.get("queue"):
            head.append(f"in {record['queue']}")
        out.print(Text("  " + "  ".join(head), style="bold"))
        out.print(Text(f"    reason: {record.get('reason', '-')}"))
        for key, shown in failure_details(record):
            out.print(Text(f"    {key}: {shown}"))
        if record.get("traceback"):
            out.print(Text("    traceback:"))
            for line in str(record["traceback"]).rstrip().splitlines():
                out.print(Text("      " + line, style="dim"), soft_wrap=True)


@app.command()
@guarded
def requeue(
    ctx: typer.Context,
    queue: QueueArg,
    message_ids: Annotated[list[str] | None, typer.Argument(
        metavar="ID", show_default=False, help="Ids of the messages to requeue.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Requeue every message in the DLQ.")
                    ] = False,
    reason_contains: Annotated[str | None, typer.Option(
        "--reason-contains", metavar="TEXT",
        help="Requeue the messages whose latest reason contains TEXT (case-insensitive).")
    ] = None,
    url: UrlOption = DEFAULT_URL, prefix: PrefixOption = DEFAULT_PREFIX,
    timeout: TimeoutOption = DEFAULT_TIMEOUT, as_json: JsonOption = False,
) -> None:
    """Move dead-lettered messages back to their queue (IDs, --all or --reason-contains).

    Each message keeps its failure history and starts its attempts afresh. Exits 1 when
    some of the given IDs were not in the DLQ.
    """
    chosen = [bool(message_ids), all_, reason_contains is not None]
    if sum(chosen) != 1:
        raise typer.BadParameter("give message IDs, --all, or --reason-contains TEXT "
                                 "(exactly one of them)", ctx=ctx,
                                 param_hint="'[ID]...' / '--all' / '--reason-contains'")
    with open_mq(url, prefix, timeout) as mq:
        dlq = dead_letter_queue(mq, queue)
        if message_ids:
            moved = dlq.requeue_messages(message_ids)
        elif all_:
            moved = dlq.requeue_where()
        else:
            needle = (reason_contains or "").lower()
            moved = dlq.requeue_where(lambda m: needle in (m.reason or "").lower())
    target = dlq.pair_name
    if as_json:
        print_json([{"queue": dlq.name, "destination": target, "requeued": moved}])
    else:
        console().print(Text(f"requeued {moved} message{'s' if moved != 1 else ''} "
                             f"from {dlq.name} to {target}"))
    missing = len(set(message_ids or ())) - moved
    if message_ids and missing > 0:
        fail(f"{missing} of the given ids {'was' if missing == 1 else 'were'} not in {dlq.name}")


@app.command()
@guarded
def purge(
    queue: QueueArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")
                   ] = False,
    url: UrlOption = DEFAULT_URL, prefix: PrefixOption = DEFAULT_PREFIX,
    timeout: TimeoutOption = DEFAULT_TIMEOUT, as_json: JsonOption = False,
) -> None:
    """Delete every message in a DLQ (asks for confirmation unless --yes)."""
    with open_mq(url, prefix, timeout) as mq:
        dlq = dead_letter_queue(mq, queue)
        count = dlq.get_info().message_count
        if count and not yes:
            typer.confirm(f"Delete {count} message{'s' if count != 1 else ''} from "
                          f"{dlq.name}?", abort=True)
        purged = dlq.purge() if count else 0
    if as_json:
        print_json([{"queue": dlq.name, "purged": purged}])
    else:
        console().print(Text(f"purged {purged} message{'s' if purged != 1 else ''} "
                             f"from {dlq.name}"))
