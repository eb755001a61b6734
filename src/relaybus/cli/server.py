"""``relaybus server``: the local embedded server of a data directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from ..connection import redact
from ..embedded import DEFAULT_DATA_DIR, EmbeddedServer, ServerState
from ._common import EXIT_FAILURE, JsonOption, console, guarded, print_json

app = typer.Typer(
    name="server", no_args_is_help=True,
    help="Start, stop or check the local embedded server (the `embedded` URL).")

DataDirOption = Annotated[Path, typer.Option(
    "--data-dir", envvar="RELAYBUS_DATA_DIR", file_okay=False,
    help="Data directory of the server (its append-only file, log and state).")]


def _row(server: EmbeddedServer, state: ServerState | None) -> dict[str, Any]:
    return {
        "running": state is not None, "url": redact(state.url) if state else None,
        "pid": state.pid if state else None, "port": state.port if state else None,
        "data_dir": str(server.data_dir),
    }


def _report(row: dict[str, Any], text: str, as_json: bool) -> None:
    if as_json:
        print_json([row])
    else:
        console().print(Text(text))


@app.command()
@guarded
def start(data_dir: DataDirOption = Path(DEFAULT_DATA_DIR), as_json: JsonOption = False) -> None:
    """Start the server for a data directory (or report the one already running)."""
    server = EmbeddedServer(data_dir)
    running = server.status()
    state = running or server.start()
    verb = "already running" if running else "started"
    _report(_row(server, state), f"{verb}: {redact(state.url)} (pid {state.pid}, data in "
                                 f"{server.data_dir}; connect with the URL `embedded`)",
            as_json)


@app.command()
@guarded
def stop(data_dir: DataDirOption = Path(DEFAULT_DATA_DIR), as_json: JsonOption = False) -> None:
    """Stop the server of a data directory (its data stays on disk)."""
    server = EmbeddedServer(data_dir)
    stopped = server.data_dir.is_dir() and server.stop()  # stop() would create the dir
    text = "stopped" if stopped else "not running"
    _report({**_row(server, None), "stopped": stopped}, f"{text}: {server.data_dir}", as_json)


@app.command()
@guarded
def status(data_dir: DataDirOption = Path(DEFAULT_DATA_DIR), as_json: JsonOption = False) -> None:
    """Show whether a server runs for a data directory; exits 1 when none does."""
    server = EmbeddedServer(data_dir)
    state = server.status()
    text = (f"running: {redact(state.url)} (pid {state.pid}, data in {server.data_dir})"
            if state
            else f"not running: {server.data_dir}")
    _report(_row(server, state), text, as_json)
    if state is None:
        raise typer.Exit(EXIT_FAILURE)
