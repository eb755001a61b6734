"""What every request handler shares: the queue layer, the guard, the sampler and the
templates, and how a page is rendered with them.

One :class:`Context` per application, in ``app.state.relaybus``. Pages show where
they look as the server's address and the prefix, never the URL (it may hold a
password).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from .. import __version__
from ..formatting import fmt_age, fmt_rate, fmt_short_time, fmt_time
from ..queue import MessageQueue
from .security import Guard
from .throughput import Throughput

__all__ = ["HERE", "Context", "context", "dlq_path", "make_templates", "render"]

#: The package's folder (``templates/`` and ``static/`` are in it).
HERE = Path(__file__).parent


def dlq_path(queue: str, *rest: str) -> str:
    """The path of a queue's DLQ page (``/dlq/sub:billing``), or of a page under it
    (``/dlq/sub:billing/ID``); names are quoted as URL paths."""
    parts = [quote(queue, safe=":@/"), *(quote(r, safe="") for r in rest)]
    return "/dlq/" + "/".join(parts)


def _static(name: str) -> str:
    return f"/static/{quote(name)}?v={quote(__version__)}"


def make_templates() -> Jinja2Templates:
    """The page templates: autoescaped, undefined names an error."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.globals.update(static=_static, dlq_path=dlq_path, version=__version__)
    env.filters.update(age=fmt_age, rate=fmt_rate, when=fmt_time, short_time=fmt_short_time)
    return Jinja2Templates(env=env)


@dataclass
class Context:
    """One dashboard's shared state."""

    mq: MessageQueue
    guard: Guard
    throughput: Throughput
    templates: Jinja2Templates
    prefix: str
    #: The server as pages name it (host:port, no password).
    address: str

    def close(self) -> None:
        """Release the connections."""
        self.mq.close()


def context(request: Request) -> Context:
    """The dashboard's :class:`Context`."""
    ctx: Context = request.app.state.relaybus
    return ctx


def render(request: Request, template: str, status_code: int = 200, *, nav: str = "",
           **values: Any) -> Response:
    """Render ``template`` with what every page shows (where, who, messages)."""
    ctx = context(request)
    session = ctx.guard.session(request)
    return ctx.templates.TemplateResponse(request, template, {
        "address": ctx.address, "prefix": ctx.prefix, "writable": ctx.guard.writable,
        "logged_in": session is not None, "csrf": session.csrf if session else "",
        "flash": session.pop_flash() if session else [], "nav": nav,
        "here": request.url.path, **values,
    }, status_code=status_code)
