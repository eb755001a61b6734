"""The ``relaybus`` command: run, inspect and repair an event bus.

Commands, by help panel::

    Running     demo, run, maintain, server {start,stop,status}, bench
    Inspecting  queues, subscriptions, tail, top, health, metrics, dashboard,
                schema {check}
    Repairing   dlq {list,show,requeue,purge}, publish, scheduled {list,cancel}

Each command lives in the module of its concern and stays thin: it parses options,
calls one library function and renders the result (:mod:`._common` holds the shared
options, exit codes and output). To add a command, write it in its module and
register it below with its panel.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from . import (
    bench,
    dashboard,
    dlq,
    inspect,
    live,
    observe,
    publish,
    running,
    scheduled,
    schema,
    server,
)
from ._common import PANEL_INSPECTING, PANEL_REPAIRING, PANEL_RUNNING

__all__ = ["app", "main"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"relaybus {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="relaybus",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Run, inspect and repair a relaybus event bus on Redis Streams.

    Every command takes --url (default: $RELAYBUS_URL, else the embedded server in
    ./.relaybus) and --prefix (default: events:). Exit codes: 0 ok, 1 failure (broker
    unreachable, unknown queue, invalid event), 2 usage error.
    """


app.command(rich_help_panel=PANEL_RUNNING)(running.demo)
app.command(rich_help_panel=PANEL_RUNNING)(running.run)
app.command(rich_help_panel=PANEL_RUNNING)(running.maintain)
app.add_typer(server.app, rich_help_panel=PANEL_RUNNING)
app.command(rich_help_panel=PANEL_RUNNING)(bench.bench)
app.command(rich_help_panel=PANEL_INSPECTING)(inspect.queues)
app.add_typer(inspect.subscriptions_app, rich_help_panel=PANEL_INSPECTING)
app.command(rich_help_panel=PANEL_INSPECTING)(live.tail)
app.command(rich_help_panel=PANEL_INSPECTING)(live.top)
app.command(rich_help_panel=PANEL_INSPECTING)(dashboard.dashboard)
app.command(rich_help_panel=PANEL_INSPECTING)(observe.health)
app.command(rich_help_panel=PANEL_INSPECTING)(observe.metrics)
app.add_typer(schema.app, rich_help_panel=PANEL_INSPECTING)
app.add_typer(dlq.app, rich_help_panel=PANEL_REPAIRING)
app.command(rich_help_panel=PANEL_REPAIRING)(publish.publish)
app.add_typer(scheduled.app, rich_help_panel=PANEL_REPAIRING)


def main() -> None:
    """Entry point of the ``relaybus`` console script and ``python -m relaybus``."""
    app(prog_name="relaybus")
