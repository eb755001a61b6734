"""``relaybus queues`` and ``relaybus subscriptions``: what waits where, who listens."""

from __future__ import annotations

from typing import Any

from ..bus import ALL_EVENTS, read_subscriptions, subscription_queue_name
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
    """
    with open_mq(url, prefix, timeout) as mq:
        infos = [i for i in mq.list_queues() if not i.is_dlq]
        address = mq.connection.address
    rows: list[dict[str, Any]] = [{
        "name": i.name, "waiting": i.waiting_messages, "pending": i.pending_messages,
        "delayed": i.delayed_messages, "consumers": i.consumers,
        "oldest_waiting": i.oldest_waiting_age, "dlq": i.dlq_messages,
    } for i in infos]
    emit(rows, QUEUE_COLUMNS, as_json=as_json, caption=f"{address} · prefix {prefix}",
         empty=f"no queues under prefix {prefix!r} at {address}")


@guarded
def subscriptions(url: UrlOption = DEFAULT_URL, prefix: PrefixOption = DEFAULT_PREFIX,
                  timeout: TimeoutOption = DEFAULT_TIMEOUT, as_json: JsonOption = False) -> None:
    """Show every subscription: service, its queue, and the event types it receives."""
    with open_mq(url, prefix, timeout) as mq:
        subs = read_subscriptions(mq)
        address = mq.connection.address
    rows: list[dict[str, Any]] = [
        {"service": service, "queue": subscription_queue_name(service), "event_types": types}
        for service, types in subs.items()
    ]
    emit(rows, SUBSCRIPTION_COLUMNS, as_json=as_json, caption=f"{address} · prefix {prefix}",
         empty=f"no subscriptions under prefix {prefix!r} at {address}")
