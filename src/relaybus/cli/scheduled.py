"""``relaybus scheduled list|cancel``: the events published for later, still waiting."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .._core import bus as core
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
    fmt_time,
    guarded,
    iso_time,
    open_mq,
)

app = typer.Typer(
    name="scheduled", no_args_is_help=True,
    help="Events published for later (publish(delay=...) or at=...): list, cancel.")

COLUMNS = [
    Column("id"),
    Column("event_type"),
    Column("due", fmt=fmt_time, to_json=iso_time),
]

__all__ = ["app"]


def _rows(entries: list[core.ScheduledEntry]) -> list[dict[str, Any]]:
    return [{"id": e.schedule_id, "event_type": e.event_type, "due": e.due_ms / 1000}
            for e in entries]


@app.command("list")
@guarded
def list_(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1,
                                       help="Show at most this many per partition.")] = 50,
    url: UrlOption = DEFAULT_URL, prefix: PrefixOption = DEFAULT_PREFIX,
    timeout: TimeoutOption = DEFAULT_TIMEOUT, as_json: JsonOption = False,
) -> None:
    """Show the scheduled events still waiting, soonest first (due times by the
    server's clock)."""
    with open_mq(url, prefix, timeout, read_only=True) as mq:
        partitions = mq.driver.run(core.stored_partitions(prefix))
        entries = mq.driver.drive(core.scheduled(prefix, partitions, limit))
    emit(_rows(entries), COLUMNS, as_json=as_json,
         caption=f"{len(entries)} scheduled event{'s' if len(entries) != 1 else ''}",
         empty=f"no scheduled events under prefix {prefix!r}")


@app.command()
@guarded
def cancel(
    schedule_id: Annotated[str, typer.Argument(
        metavar="ID", show_default=False,
        help="The schedule id publish returned (the event id; all@N/ID above partition 0).")],
    url: UrlOption = DEFAULT_URL, prefix: PrefixOption = DEFAULT_PREFIX,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Cancel a scheduled event that is still waiting (exit 1 when it is not)."""
    with open_mq(url, prefix, timeout) as mq:
        cancelled = mq.driver.run(core.cancel_scheduled(prefix, schedule_id))
    if not cancelled:
        fail(f"no scheduled event {schedule_id!r} is waiting under prefix {prefix!r} "
             "(published already, cancelled, or never scheduled)")
    typer.echo(f"cancelled {schedule_id}")
