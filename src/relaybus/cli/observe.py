"""``relaybus health`` (a probe's exit status) and ``relaybus metrics`` (an exporter)."""

from __future__ import annotations

import signal
import threading
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
    fail,
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


@guarded
def metrics(
    port: Annotated[int, typer.Option(
        "--port", min=0, max=65535, envvar="RELAYBUS_METRICS_PORT",
        help="Port to serve /metrics, /healthz and /readyz on.")] = 9464,
    host: Annotated[str, typer.Option(
        "--host", help="Address to bind (0.0.0.0: every interface, for a scraper).")
    ] = "0.0.0.0",
    url: UrlOption = DEFAULT_URL, prefix: PrefixOption = DEFAULT_PREFIX,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Serve Prometheus metrics of every queue (waiting, pending, delayed, DLQ size,
    consumers, oldest waiting age, events kept) until Ctrl-C or SIGTERM: one exporter
    for the whole bus, read at each scrape. Needs relaybus[metrics]."""
    try:
        from ..metrics import serve
    except ImportError as exc:
        fail(str(exc))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with open_mq(url, prefix, timeout, read_only=True) as mq:
        server = serve(port=port, host=host, queues=mq)
        typer.echo(f"serving metrics of {mq.connection.address} (prefix {prefix}) on "
                   f"http://{host}:{server.port}/metrics; Ctrl-C stops")
        try:
            stop.wait()
        finally:
            server.close()
