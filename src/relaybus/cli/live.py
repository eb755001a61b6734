"""``relaybus tail`` and ``relaybus top``: watch the bus live.

``tail`` follows the event log with plain XREAD (``Queue.follow``): it joins no
consumer group, so it takes nothing from any service. ``top`` samples
every queue each interval and derives rates from the differences between samples.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.text import Text

from ..codec import Message
from ..inspection import (
    SHORT_PAYLOAD,
    Sample,
    event_logs,
    event_type_of,
    follow_logs,
    rates,
    short_payload,
)
from ..keys import is_event_log
from ._common import (
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    Column,
    PrefixOption,
    TimeoutOption,
    UrlOption,
    console,
    fmt_rate,
    guarded,
    iso_time,
    json_rows,
    open_mq,
    seconds_json,
    table,
)

__all__ = ["tail", "top", "top_rows", "Sample", "rates", "short_payload", "SHORT_PAYLOAD"]

#: Longest single wait of tail for new events, in seconds (keeps Ctrl-C responsive).
_TAIL_POLL = 1.0


def _tail_line(msg: Message, type_width: int) -> Text:
    when = datetime.fromtimestamp(msg.timestamp).strftime("%H:%M:%S.%f")[:-3]
    etype = event_type_of(msg) or "?"
    return Text.assemble((when, "dim"), "  ", (f"{etype:<{type_width}}", "bold cyan"), "  ",
                         (msg.id, "dim"), "  ", short_payload(msg.data))


@guarded
def tail(
    types: Annotated[list[str] | None, typer.Option(
        "--type", "-t", metavar="TYPE", help="Show only this event type (repeatable).")] = None,
    from_start: Annotated[bool, typer.Option(
        "--from-start/--no-from-start", help="Start with the oldest event the log still keeps.")] = False,
    count: Annotated[int | None, typer.Option(
        "--count", "-n", min=1, help="Stop after this many events.")] = None,
    max_seconds: Annotated[float | None, typer.Option(
        "--max-seconds", min=0.0, help="Stop after this many seconds.")] = None,
    url: UrlOption = DEFAULT_URL, prefix: PrefixOption = DEFAULT_PREFIX,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
    as_json: Annotated[bool, typer.Option(
        "--json/--no-json", help="Print one JSON object per event and line (JSON Lines).")] = False,
) -> None:
    """Follow the event log live: time, type, id and payload of each event.

    Reads without a consumer group: takes nothing from any service.
    """
    wanted = set(types or ())
    deadline = time.monotonic() + max_seconds if max_seconds is not None else None
    out = console()
    shown = 0
    type_width = max([16, *(len(t) for t in wanted)])
    with open_mq(url, prefix, timeout, read_only=True) as mq, contextlib.suppress(KeyboardInterrupt):
        logs = event_logs(mq)
        cursors = ["0-0" if from_start else "$"] * len(logs)
        while True:
            wait = _TAIL_POLL
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return
            # a partitioned log: each in turn, a share of the wait; ids as publish gives
            # them (all@2/ID on partition 2)
            cursors, messages = follow_logs(logs, cursors, count=100, block_for_seconds=wait)
            for msg in messages:
                if wanted and event_type_of(msg) not in wanted:
                    continue
                if as_json:
                    typer.echo(json.dumps({
                        "time": iso_time(msg.timestamp), "type": event_type_of(msg),
                        "id": msg.id, "event_id": msg.data.get("event_id"), "payload": msg.data,
                    }, ensure_ascii=False, default=str))
                else:
                    out.print(_tail_line(msg, type_width), no_wrap=True, overflow="ellipsis")
                shown += 1
                if count is not None and shown >= count:
                    return


# -- top ------------------------------------------------------------------------------

TOP_COLUMNS = [
    Column("name"),
    Column("rate_in", fmt=fmt_rate, to_json=seconds_json, numeric=True),
    Column("rate_out", fmt=fmt_rate, to_json=seconds_json, numeric=True),
    Column("waiting", numeric=True),
    Column("pending", numeric=True),
    Column("delayed", numeric=True),
    Column("dlq", numeric=True),
    Column("consumers", numeric=True),
]


def top_rows(prev: Sample | None, cur: Sample) -> list[dict[str, Any]]:
    """One row per queue for a frame of ``top`` (the event log shows its rate in, the
    publish rate, and its DLQ: what waits in it is counted in the subscriptions)."""
    rows = []
    for name, info in cur.infos.items():
        rate_in, rate_out = rates(prev, cur, name)
        log = is_event_log(name)
        rows.append({
            "name": name, "rate_in": rate_in, "rate_out": rate_out,
            "waiting": None if log else info.waiting_messages,
            "pending": None if log else info.pending_messages,
            "delayed": None if log else info.delayed_messages, "dlq": info.dlq_messages,
            "consumers": None if log else info.consumers,
        })
    return rows


class QuitKeys:
    """Waits between frames; when stdin is a terminal, returns early when q is pressed.

    The terminal goes to cbreak mode (keys arrive unbuffered, Ctrl-C still interrupts)
    and is restored on exit. Without a terminal it only sleeps.
    """

    def __init__(self) -> None:
        self._fd: int | None = None
        self._saved: Any = None

    def __enter__(self) -> QuitKeys:
        if sys.stdin.isatty():
            try:
                import termios
                import tty
            except ImportError:  # no termios (Windows): Ctrl-C only
                return self
            self._fd = sys.stdin.fileno()
            self._saved = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            import termios

            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._fd = None

    def wait(self, seconds: float) -> bool:
        """Wait ``seconds``; True when q was pressed meanwhile."""
        if self._fd is None:
            time.sleep(seconds)
            return False
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self._fd], [], [], left)
            if ready and os.read(self._fd, 1) in (b"q", b"Q"):
                return True
        return False


@contextlib.contextmanager
def _maybe_live(live: Live | None) -> Iterator[None]:
    if live is None:
        yield
    else:
        with live:
            yield


@guarded
def top(
    interval: Annotated[float, typer.Option(
        "--interval", "-i", min=0.05, help="Seconds between refreshes.")] = 2.0,
    iterations: Annotated[int | None, typer.Option(
        "--iterations", min=1, help="Stop after this many refreshes.")] = None,
    url: UrlOption = DEFAULT_URL, prefix: PrefixOption = DEFAULT_PREFIX,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
    as_json: Annotated[bool, typer.Option(
        "--json/--no-json", help="Print each refresh as a JSON list on one line.")] = False,
) -> None:
    """Live view of every queue: rates in/out per second, backlog, DLQ (q quits).

    On a terminal the table refreshes in place; otherwise each refresh is printed.
    """
    out = console()
    live = Live(console=out, auto_refresh=False) if out.is_terminal and not as_json else None
    prev: Sample | None = None
    frames = 0
    with open_mq(url, prefix, timeout, read_only=True) as mq, QuitKeys() as keys, \
            _maybe_live(live), contextlib.suppress(KeyboardInterrupt):
        address = mq.connection.address
        while True:
            cur = Sample.take(mq)
            rows = top_rows(prev, cur)
            frames += 1
            if as_json:
                typer.echo(json.dumps(json_rows(rows, TOP_COLUMNS), ensure_ascii=False))
            else:
                stamp = datetime.now().strftime("%H:%M:%S")
                hint = " · q to quit" if live is not None else ""
                frame = table(rows, TOP_COLUMNS, title=f"relaybus top · {address} · prefix "
                              f"{prefix} · {stamp} · every {interval:g}s{hint}")
                if live is not None:
                    live.update(frame, refresh=True)
                else:
                    out.print(frame)
            prev = cur
            if iterations is not None and frames >= iterations:
                return
            if keys.wait(interval):
                return
