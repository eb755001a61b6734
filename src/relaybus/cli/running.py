"""``relaybus demo``, ``relaybus run`` and ``relaybus maintain``: commands that run things.

Supervision (signals, graceful shutdown) lives in the library (``EventBus.stop``,
``relaybus.runner``); these commands only parse options, set up logging and call it.
"""

from __future__ import annotations

import enum
import logging
import signal
import sys
from types import FrameType
from typing import Annotated

import typer

from .._core.bus import MAINTENANCE_INTERVAL
from ..bus import DEFAULT_RETENTION_MAX_LEN, DEFAULT_RETENTION_SECONDS, EventBus
from ._common import (
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    PrefixOption,
    TimeoutOption,
    UrlOption,
    guarded,
)

logger = logging.getLogger("relaybus.cli")


class LogLevel(str, enum.Enum):
    """Logging levels offered by ``--log-level``."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


LogLevelOption = Annotated[LogLevel, typer.Option(
    "--log-level", envvar="RELAYBUS_LOG_LEVEL", case_sensitive=False,
    help="How much to log on stderr.")]


def setup_logging(level: LogLevel) -> None:
    """Readable log lines on stderr (for the running commands only)."""
    logging.basicConfig(level=level.value.upper(), stream=sys.stderr, datefmt="%H:%M:%S",
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


@guarded
def demo(
    orders: Annotated[int, typer.Option("--orders", min=1, help="Orders to create.")] = 10,
    seed: Annotated[int, typer.Option(
        "--seed", help="Seed of the random generator (which payments fail).")] = 1,
    processes: Annotated[bool, typer.Option(
        "--processes/--no-processes",
        help="Run each service and a maintenance process in its own OS process.")] = False,
    keep: Annotated[bool, typer.Option(
        "--keep/--no-keep", help="Keep the server and its data afterwards.")] = False,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.1, help="Seconds to wait for every order to finish.")] = 60.0,
    url: Annotated[str | None, typer.Option(
        "--url", envvar="RELAYBUS_URL", show_default=False,
        help="Broker to use (default: $RELAYBUS_URL, else a private embedded server, "
             "removed afterwards).")] = None,
) -> None:
    """Run the order-flow demo: order, payment, shipping and notification services."""
    from ..demo import run_demo  # imported late: it pulls in the services

    raise typer.Exit(int(run_demo(url=url, orders=orders, seed=seed, processes=processes,
                                  keep=keep, timeout=timeout)))


@guarded
def run(
    target: Annotated[str, typer.Argument(
        metavar="MODULE:ATTRIBUTE", show_default=False,
        help="The service: a Microservice instance, subclass or factory.")],
    url: Annotated[str | None, typer.Option(
        "--url", envvar="RELAYBUS_URL", show_default=False,
        help="Broker to run it on, over the one the service's code names (default: "
             "$RELAYBUS_URL, else the service's own).")] = None,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", envvar="RELAYBUS_START_TIMEOUT", min=0.0, metavar="SECONDS",
        show_default=False,
        help="Seconds to wait at start for a broker that does not answer, then exit 1 "
             "(default: wait until it answers).")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", envvar="RELAYBUS_METRICS_PORT", min=0, max=65535, metavar="PORT",
        show_default=False,
        help="Serve Prometheus metrics, /healthz and /readyz on this port (needs "
             "relaybus[metrics]).")] = None,
    log_level: LogLevelOption = LogLevel.info,
) -> None:
    """Run one service until SIGTERM or Ctrl-C (in-flight events finish first).

    The service connects where its code says, unless --url or RELAYBUS_URL names
    another server; it logs once at start which server (password hidden) and prefix.
    A broker that does not answer yet is waited for (normal in containers): one
    warning names it, and the service keeps trying until it answers or --timeout
    passes (exit 1).
    """
    from ..runner import load_service, run_service  # imported late: it pulls in the worker

    setup_logging(log_level)
    run_service(load_service(target, url=url, metrics_port=metrics_port),
                start_timeout=timeout)


@guarded
def maintain(
    max_len: Annotated[int, typer.Option(
        "--max-len", min=0, metavar="N",
        help="Events the log keeps at most (0: no count limit).")] = DEFAULT_RETENTION_MAX_LEN,
    max_age: Annotated[float, typer.Option(
        "--max-age", min=0.0, metavar="SECONDS",
        help="Seconds the log keeps an event, by the server's clock (0: no age limit).")
    ] = DEFAULT_RETENTION_SECONDS or 0.0,
    interval: Annotated[float, typer.Option(
        "--interval", min=0.01, metavar="SECONDS", help="Seconds between two trims.")
    ] = MAINTENANCE_INTERVAL,
    url: UrlOption = DEFAULT_URL, prefix: PrefixOption = DEFAULT_PREFIX,
    timeout: TimeoutOption = DEFAULT_TIMEOUT, log_level: LogLevelOption = LogLevel.info,
) -> None:
    """Apply the event log's retention until SIGTERM or Ctrl-C.

    Only needed when every service runs with maintenance=False; any number can run
    side by side. Never trims an event a subscription has not read and acknowledged.
    """
    setup_logging(log_level)
    seconds = max_age or None  # 0: no age limit
    bus = EventBus(url, prefix=prefix, retry_timeout=timeout, retention_max_len=max_len,
                   retention_seconds=seconds)
    bus.maintenance_interval = interval

    received: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        received.append(signum)  # no logging here: it could re-enter a stderr write
        bus.stop()  # run() returns once the trim in progress is done

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        logger.info("maintaining the event log under prefix %r at %s (retention: %s, %s; "
                    "a trim every %gs); SIGTERM or Ctrl-C stops", prefix,
                    bus.mq.connection.address,
                    f"at most {max_len} events" if max_len else "no count limit",
                    f"none older than {seconds:g}s" if seconds is not None else "no age limit",
                    interval)
        bus.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        bus.close()
    logger.info("maintenance stopped%s",
                f" on {signal.Signals(received[0]).name}" if received else "")
