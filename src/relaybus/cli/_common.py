"""What every ``relaybus`` command shares: options, exit codes, errors and output.

Exit codes::

    0  EXIT_OK       the command did what it was asked
    1  EXIT_FAILURE  the broker could not be reached, or the operation failed
                     (unknown queue, invalid event, a server that is not running...)
    2  EXIT_USAGE    bad arguments or options (typer's own code for usage errors)
    130              interrupted by Ctrl-C (tail and top treat Ctrl-C as "quit": 0)

Ordinary failures print one line on stderr and never a traceback: commands are
wrapped in :func:`guarded`, which turns :class:`~relaybus.errors.RelaybusError` into
that line. Tables go to stdout through rich; ``--json`` prints a JSON list of
objects instead, one per row, keyed by the table's columns in snake_case.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..connection import embedded_dir, redact
from ..embedded import EmbeddedServer
from ..errors import BrokerUnavailableError, ConfigurationError, RelaybusError
from ..formatting import fmt_age as fmt_age  # re-exported: the formats are shared
from ..formatting import fmt_rate as fmt_rate
from ..formatting import fmt_short_time as fmt_short_time
from ..formatting import fmt_time as fmt_time
from ..formatting import iso_time as iso_time
from ..formatting import seconds_json as seconds_json
from ..queue import MessageQueue

P = ParamSpec("P")
R = TypeVar("R")

#: The command did what it was asked.
EXIT_OK = 0
#: The broker could not be reached, or the operation failed.
EXIT_FAILURE = 1
#: Bad arguments or options.
EXIT_USAGE = 2
#: Interrupted by Ctrl-C before finishing (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130

#: Help panels of ``relaybus --help``.
PANEL_RUNNING = "Running"
PANEL_INSPECTING = "Inspecting"
PANEL_REPAIRING = "Repairing"

#: Server used when neither ``--url`` nor ``RELAYBUS_URL`` names one.
DEFAULT_URL = "embedded"
#: Key prefix of the EventBus (``EventBus(prefix=...)``'s default).
DEFAULT_PREFIX = "events:"
#: Seconds an operation keeps retrying a broker that does not answer.
DEFAULT_TIMEOUT = 2.0

UrlOption = Annotated[str, typer.Option(
    "--url", envvar="RELAYBUS_URL", show_default=False,
    help="Broker: redis://, rediss://, unix://, redis+sentinel://, redis+cluster:// "
    "(rediss+ for TLS) or embedded[:///DIR] (default: "
         "$RELAYBUS_URL, else embedded, the local server in ./.relaybus).")]
PrefixOption = Annotated[str, typer.Option(
    "--prefix", envvar="RELAYBUS_PREFIX", help="Key prefix of the event bus.")]
TimeoutOption = Annotated[float, typer.Option(
    "--timeout", envvar="RELAYBUS_TIMEOUT", min=0.0,
    help="Seconds to keep retrying a broker that does not answer.")]
JsonOption = Annotated[bool, typer.Option(
    "--json/--no-json", help="Print a JSON list of objects (one per row) instead of a table.")]


# -- errors -------------------------------------------------------------------------

def error(message: str) -> None:
    """Print one error line on stderr."""
    typer.echo(f"error: {message}", err=True)


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print one error line and end the command with ``code``."""
    error(message)
    raise typer.Exit(code)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def guarded(fn: Callable[P, R]) -> Callable[P, R]:
    """Run a command so that relaybus errors end it with one line, not a traceback.

    :class:`BrokerUnavailableError` and other :class:`RelaybusError` give exit 1,
    :class:`ConfigurationError` (a bad URL, queue or prefix name) exit 2.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except BrokerUnavailableError as exc:
            cause = f" ({_one_line(str(exc.__cause__))})" if exc.__cause__ else ""
            url = kwargs.get("url")
            if not isinstance(url, str) or embedded_dir(url) is not None:
                url = exc.url  # the service's own URL (`relaybus run` without --url)
            where = f"{redact(url)} ({exc.address})" if url else exc.address
            waited = f" after waiting {exc.waited:.1f}s" if exc.waited is not None else ""
            fail(f"cannot reach the broker at {where}{waited}{cause}; check --url or "
                 "RELAYBUS_URL")
        except ConfigurationError as exc:
            fail(_one_line(str(exc)), EXIT_USAGE)
        except RelaybusError as exc:
            fail(_one_line(str(exc)) or type(exc).__name__)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


# -- connecting ---------------------------------------------------------------------

def running_url(url: str) -> str:
    """The URL for a command that only reads: an ``embedded`` URL names the server
    running for its data directory; with none running the command fails (exit 1)
    instead of starting one."""
    data_dir = embedded_dir(url)
    if data_dir is None:
        return url
    server = EmbeddedServer(data_dir or None)
    state = server.status()
    if state is None:
        fail(f"no embedded server is running for {server.data_dir}, so there is nothing "
             "to inspect; start it with `relaybus server start`, or pass --url")
    return state.url


@contextlib.contextmanager
def open_mq(url: str, prefix: str, timeout: float, *, read_only: bool = False
            ) -> Iterator[MessageQueue]:
    """A :class:`MessageQueue` for one command. An embedded URL starts the server,
    unless the command only reads (``read_only``: see :func:`running_url`)."""
    mq = MessageQueue(running_url(url) if read_only else url, prefix=prefix,
                      retry_timeout=timeout)
    try:
        yield mq
    finally:
        mq.close()


def import_module(name: str, param_hint: str) -> None:
    """Import the user module ``name`` (the working directory is importable, as with
    ``python -m``); a module that cannot be imported is a usage error."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        importlib.import_module(name)
    except ImportError as exc:
        raise typer.BadParameter(f"cannot import {name!r}: {exc}", param_hint=param_hint
                                 ) from exc


# -- output -------------------------------------------------------------------------

#: Width used when stdout is not a terminal, so piped tables are not squeezed.
PIPE_WIDTH = 200


def console(*, stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr); wide and colourless when not a terminal."""
    con = Console(stderr=stderr, highlight=False)
    if not con.is_terminal and "COLUMNS" not in os.environ:
        con = Console(stderr=stderr, highlight=False, width=PIPE_WIDTH)
    return con


_ACRONYMS = {"id", "dlq", "pid", "url"}


def _header(key: str) -> str:
    """``oldest_waiting`` -> ``Oldest waiting``, ``dlq`` -> ``DLQ``: snake_case gives it back."""
    text = " ".join(w.upper() if w in _ACRONYMS else w for w in key.split("_"))
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class Column:
    """A table column. ``key`` names it in JSON; the header is derived from it.

    ``fmt`` renders a value in the table, ``to_json`` in JSON (default: as is).
    """

    key: str
    fmt: Callable[[Any], str] = str
    to_json: Callable[[Any], Any] | None = None
    numeric: bool = False
    max_width: int | None = None

    @property
    def header(self) -> str:
        return _header(self.key)


def json_rows(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> list[dict[str, Any]]:
    """Rows as JSON-ready objects keyed by the columns' keys."""
    out = []
    for row in rows:
        out.append({c.key: (c.to_json(row[c.key]) if c.to_json and row[c.key] is not None
                            else row[c.key]) for c in columns})
    return out


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout."""
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], *,
          title: str | None = None, caption: str | None = None) -> Table:
    """A rich table of ``rows`` (cells are plain text: no rich markup is interpreted)."""
    tbl = Table(title=title, caption=caption, title_justify="left", caption_justify="left",
                box=box.SIMPLE_HEAD, title_style="bold", caption_style="dim",
                collapse_padding=True, pad_edge=False, show_edge=False)
    for c in columns:
        # ids, names and times never wrap; a column with a max width (a reason, a
        # payload) gives way: it wraps
        tbl.add_column(c.header, justify="right" if c.numeric else "left",
                       max_width=c.max_width, overflow="fold", no_wrap=c.max_width is None,
                       min_width=None if c.max_width else len(c.header))
    for row in rows:
        tbl.add_row(*(Text("-" if row[c.key] is None else c.fmt(row[c.key])) for c in columns))
    return tbl


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[Column], *, as_json: bool,
         title: str | None = None, caption: str | None = None, empty: str = "nothing") -> None:
    """Print rows as a table (or ``empty`` when there are none), or as JSON."""
    if as_json:
        print_json(json_rows(rows, columns))
    elif not rows:
        console().print(Text(empty))
    else:
        console().print(table(rows, columns, title=title, caption=caption))
