"""``relaybus queues`` and ``relaybus subscriptions``: what waits where, who listens."""

from __future__ import annotations

import shlex
from typing import Annotated, Any

import typer

from .._core.bus import read_subscription_table, stored_partitions
from ..bus import ALL_EVENTS, EventBus, subscription_queue_name
from ..inspection import is_event_log, queue_row
from ..keys import partition_name
from ._common import (
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    Column,
    JsonOption,
    PrefixOption,
    TimeoutOption,
    UrlOption,
    emit,
    fail,
    fmt_age,
    guarded,
    open_mq,
    seconds_json,
)

QUEUE_COLUMNS = [
    Column("name"),
    Column("waiting", numeric=True),
    Column("pending", numeric=True),
    Column("delayed", numeric=True),
    Column("consumers", numeric=True),
    Column("oldest_waiting", fmt=fmt_age, to_json=seconds_json, numeric=True),
    Column("dlq", numeric=True),
]

SUBSCRIPTION_COLUMNS = [
    Column("service"),
    Column("queue"),
    Column("event_types",
           fmt=lambda types: ", ".join("all" if t == ALL_EVENTS else t for t in types)),
]


@guarded
def queues(url: UrlOption = DEFAULT_URL, prefix: PrefixOption = DEFAULT_PREFIX,
           timeout: TimeoutOption = DEFAULT_TIMEOUT, as_json: JsonOption = False) -> None:
    """Show every queue: waiting, pending, retries, consumers, oldest age, DLQ size.

    Waiting: not yet delivered. Pending: delivered, not yet acknowledged. Delayed:
    retries waiting for their time. Oldest waiting: age of the oldest waiting message.
    A subscription (sub:NAME) counts as waiting the event-log entries its group has not
    read yet, of every type (it skips other types as it reads), plus its own stream's
    (retries that came due, requeued messages). The event log itself (all) shows only
    its DLQ; the caption says how many events it keeps.
    """
    with open_mq(url, prefix, timeout, read_only=True) as mq:
        infos = [i for i in mq.list_queues() if not i.is_dlq]
        address = mq.connection.address
    caption = f"{address} · prefix {prefix}"
    for info in infos:
        if is_event_log(info):
            kept = info.message_count
            caption += f" · event log {info.name}: {kept} event{'s' if kept != 1 else ''} kept"
            if info.scheduled_messages:
                caption += f", {info.scheduled_messages} scheduled"
    emit([queue_row(i) for i in infos], QUEUE_COLUMNS, as_json=as_json, caption=caption,
         empty=f"no queues under prefix {prefix!r} at {address}")


subscriptions_app = typer.Typer(
    name="subscriptions", no_args_is_help=False,
    help="Show every subscription (service, queue, event types); `remove NAME` deletes a "
         "retired one.")


@subscriptions_app.callback(invoke_without_command=True)
@guarded
def subscriptions(ctx: typer.Context, url: UrlOption = DEFAULT_URL,
                  prefix: PrefixOption = DEFAULT_PREFIX,
                  timeout: TimeoutOption = DEFAULT_TIMEOUT, as_json: JsonOption = False) -> None:
    """Show every subscription: service, its queue, and the event types it receives."""
    if ctx.invoked_subcommand is not None:
        return
    with open_mq(url, prefix, timeout, read_only=True) as mq:
        subs, unreadable = mq.driver.run(read_subscription_table(prefix))
        address = mq.connection.address
    rows: list[dict[str, Any]] = [
        {"service": service, "queue": subscription_queue_name(service), "event_types": types}
        for service, types in subs.items()
    ]
    emit(rows, SUBSCRIPTION_COLUMNS, as_json=as_json, caption=f"{address} · prefix {prefix}",
         empty=f"no subscriptions under prefix {prefix!r} at {address}")
    for name, why in unreadable.items():  # each concerns itself only: the others flow on
        typer.echo(f"warning: subscription entry {name!r} is unreadable and ignored: {why}; "
                   f"delete it with: relaybus subscriptions remove {shlex.quote(name)}",
                   err=True)


@subscriptions_app.command("remove")
@guarded
def remove(
    service: Annotated[str, typer.Argument(metavar="NAME", show_default=False,
                                           help="The retired service's name.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")
                   ] = False,
    url: UrlOption = DEFAULT_URL, prefix: PrefixOption = DEFAULT_PREFIX,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Delete a retired service's subscription and all that was kept for it: its queue
    (waiting and unsettled messages), retries, dead letters and done records, and its
    place in the event log. Says what it deletes and asks first. Stop the service's
    instances before: a running one subscribes again."""
    with open_mq(url, prefix, timeout, read_only=True) as mq:
        subs, unreadable = mq.driver.run(read_subscription_table(prefix))
        if service in unreadable:  # stored by another tool or by hand: removed as it is
            what = f"an unreadable entry ({unreadable[service]})"
        else:
            # every partition's pair (sub:NAME, sub:NAME@1, ...): all of them are deleted
            partitions = mq.driver.run(stored_partitions(prefix))
            names = [partition_name(subscription_queue_name(service), i)
                     for i in range(partitions)]
            infos = [q.get_info() for q in map(mq.get_queue, names) if q is not None]
            if not infos and service not in subs:
                fail(f"no subscription {service!r} under prefix {prefix!r}")
            what = (f"{sum(i.waiting_messages for i in infos)} waiting (unread events in the "
                    f"log included), {sum(i.pending_messages for i in infos)} delivered and "
                    f"not settled, {sum(i.delayed_messages for i in infos)} retries, "
                    f"{sum(i.dlq_messages for i in infos)} in its dead-letter queue"
                    + (f" (over {partitions} partitions)" if partitions > 1 else "")
                    if infos else "no queue")
        typer.echo(f"subscription {service!r} under prefix {prefix!r}: {what}, and its done "
                   "records; all of it will be deleted.")
        if not yes and not typer.confirm("Delete it?", default=False):
            fail("nothing deleted")
        with EventBus(mq=mq) as bus:
            bus.remove_subscription(service)
    typer.echo(f"removed subscription {service!r}")
