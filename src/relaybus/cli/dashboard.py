"""``relaybus dashboard``: serve the web dashboard (the extra ``relaybus[dashboard]``).

It binds to loopback unless told otherwise and is read-only without a token; with
``--token`` (or ``RELAYBUS_DASHBOARD_TOKEN``, which keeps it out of the process list)
a user who logs in with it can requeue and purge dead letters. See
:mod:`relaybus.dashboard`.
"""

from __future__ import annotations

import importlib
import ipaddress
from typing import Annotated, Any

import typer

from ._common import (
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    PrefixOption,
    TimeoutOption,
    UrlOption,
    fail,
    guarded,
    running_url,
)

__all__ = ["dashboard", "DEFAULT_HOST", "DEFAULT_PORT", "INSTALL_HINT"]

#: Address the dashboard binds to by default (loopback: only this machine reaches it).
DEFAULT_HOST = "127.0.0.1"
#: Port the dashboard listens on by default.
DEFAULT_PORT = 8700
#: What to install when the dashboard's packages are missing.
INSTALL_HINT = "pip install 'relaybus[dashboard]'"
#: Hosts that mean "every interface".
_ANY = ("0.0.0.0", "::", "")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _load() -> tuple[Any, Any]:
    """uvicorn's ``run`` and the dashboard's app module, or a clear error."""
    try:
        uvicorn = importlib.import_module("uvicorn")
        app_module = importlib.import_module("relaybus.dashboard.app")
    except ImportError as exc:
        missing = f" ({exc.name} is not installed)" if exc.name else ""
        fail(f"the dashboard needs its extra packages{missing}: {INSTALL_HINT}")
    return uvicorn.run, app_module


@guarded
def dashboard(
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on (loopback by default; 0.0.0.0 for every "
        "interface: then anyone who reaches it can read, so set a token).")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535,
                                      help="Port to listen on.")] = DEFAULT_PORT,
    token: Annotated[str | None, typer.Option(
        "--token", envvar="RELAYBUS_DASHBOARD_TOKEN", show_default=False,
        help="Token to log in with to requeue and purge (default: "
             "$RELAYBUS_DASHBOARD_TOKEN; without one the dashboard is read-only).")] = None,
    url: UrlOption = DEFAULT_URL, prefix: PrefixOption = DEFAULT_PREFIX,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Serve the web dashboard: queues with live rates, dead letters, a live tail.

    Read-only without --token; with it, log in on the page to requeue or purge dead
    letters. Ctrl-C stops it.
    """
    run, dashboard_app = _load()
    # the Host names it answers to: loopback's and the address it listens on
    allowed = ["*"] if host in _ANY else [*dashboard_app.LOOPBACK_HOSTS, host]
    app = dashboard_app.create_app(running_url(url), prefix, token or None,
                                   allowed_hosts=allowed, retry_timeout=timeout)
    address = app.state.relaybus.address
    shown = f"[{host}]" if ":" in host else host
    mode = "log in with the token to repair" if token else "read-only (no --token)"
    typer.echo(f"relaybus dashboard on http://{shown}:{port}/ · {address} · prefix {prefix} "
               f"· {mode} · Ctrl-C stops it")
    if not _is_loopback(host):
        typer.echo(f"warning: listening on {host}, not only loopback: anyone who reaches it "
                   "can read the queues and payloads" + ("" if token else
                                                          ", and no token is set"), err=True)
    run(app, host=host, port=port, log_level="warning", access_log=False)
