"""``relaybus health``: exit 0 when the broker answers and every queue is within bounds."""

from __future__ import annotations

from typing import Annotated

import typer

from ..health import check
from ._common import (
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    EXIT_FAILURE,
    PrefixOption,
    TimeoutOption,
    UrlOption,
    guarded,
    open_mq,
)


@guarded
def health(
    max_lag: Annotated[int | None, typer.Option(
        "--max-lag", min=0, metavar="N", show_default=False,
        help="Most messages a queue may have waiting (a subscription: log entries its "
             "group has not read, plus its own).")] = None,
    max_oldest: Annotated[float | None, typer.Option(
        "--max-oldest", min=0.0, metavar="SECONDS", show_default=False,
        help="Oldest age a waiting message may have, by the server's clock.")] = None,
    url: UrlOption = DEFAULT_URL, prefix: PrefixOption = DEFAULT_PREFIX,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Check the bus for a container probe: exit 0 when the broker answers and every
    queue is within --max-lag and --max-oldest, else 1; one line says why."""
    with open_mq(url, prefix, timeout, read_only=True) as mq:
        verdict = check(mq, max_lag=max_lag, max_oldest=max_oldest)
    typer.echo(("ok: " if verdict.ok else "unhealthy: ") + verdict.reason)
    if not verdict.ok:
        raise typer.Exit(EXIT_FAILURE)
