"""The dashboard's factory: :func:`create_app` wires routes, middleware and error pages.

Routes::

    GET  /                         overview: queues, live rates, subscriptions, consumers
    GET  /api/overview             the same as JSON (polled by the page script)
    GET  /dlq                      every dead-letter queue and its size
    GET  /dlq/QUEUE                a DLQ's messages (?after=ID: the next page)
    GET  /dlq/QUEUE/ID             one message: payload, headers, every failure record
    POST /dlq/QUEUE/requeue        ids=ID... or all=1: back to the queue      (token)
    GET  /dlq/QUEUE/purge          what a purge deletes; type the name to confirm
    POST /dlq/QUEUE/purge          confirm=NAME: delete every message        (token)
    GET  /tail, /api/tail          the event log, live, filterable by type
    GET  /login, POST /login       the token field; a session cookie
    POST /logout                                                              (token)
    GET  /static/...               the stylesheet and the page script

Requests whose ``Host`` is not one of ``allowed_hosts`` (by default the loopback
names) are refused, so a web page cannot reach the dashboard by rebinding a name of
its own to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..connection import scrub
from ..errors import BrokerUnavailableError, InvalidNameError, QueueNotFoundError, RelaybusError
from ..queue import MessageQueue
from . import api, pages
from .context import HERE, Context, context, make_templates, render
from .security import Guard, Refused, SecurityHeaders
from .throughput import Throughput

__all__ = ["LOOPBACK_HOSTS", "DEFAULT_RETRY_TIMEOUT", "create_app"]

#: Host names a dashboard answers to unless told otherwise.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
#: Seconds a request keeps retrying a broker that does not answer before its page
#: says so.
DEFAULT_RETRY_TIMEOUT = 2.0


class _StreamId(Convertor[str]):
    """A stream id in a path (``/dlq/QUEUE/1732630000000-0``)."""

    regex = r"\d{1,20}-\d{1,20}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("relaybus_id", _StreamId())

_ROUTES = [
    Route("/", pages.overview, methods=["GET"]),
    Route("/api/overview", api.overview, methods=["GET"]),
    Route("/api/tail", api.tail, methods=["GET"]),
    Route("/tail", pages.tail, methods=["GET"]),
    Route("/login", pages.login_form, methods=["GET"]),
    Route("/login", pages.login, methods=["POST"]),
    Route("/logout", pages.logout, methods=["POST"]),
    Route("/dlq", pages.dead_letters, methods=["GET"]),
    # the most specific first: a queue name may hold "/"
    Route("/dlq/{queue:path}/requeue", pages.requeue, methods=["POST"]),
    Route("/dlq/{queue:path}/purge", pages.purge_form, methods=["GET"]),
    Route("/dlq/{queue:path}/purge", pages.purge, methods=["POST"]),
    Route("/dlq/{queue:path}/{message_id:relaybus_id}", pages.dlq_message, methods=["GET"]),
    Route("/dlq/{queue:path}", pages.dlq, methods=["GET"]),
    Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
]


def _error(request: Request, status: int, message: str) -> Response:
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    return render(request, "error.html", status, message=message, status=status)


def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    return _error(request, exc.status, exc.reason)


def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: "no such page", 405: "this page does not take that method (pages "
               "that change data take a POST from their form)"}.get(exc.status_code,
                                                                      str(exc.detail))
    return _error(request, exc.status_code, message)


def _not_found(request: Request, exc: Exception) -> Response:
    return _error(request, 404, str(exc))


def _unavailable(request: Request, exc: Exception) -> Response:
    return _error(request, 503, f"cannot reach the broker at {context(request).address}; "
                  "is it running? (the page retries by itself)")


def _failed(request: Request, exc: Exception) -> Response:
    ctx = context(request)
    return _error(request, 500, scrub(" ".join(str(exc).split()) or type(exc).__name__,
                                      ctx.mq.url))


def create_app(url: str, prefix: str = "events:", token: str | None = None, *,
               allowed_hosts: Sequence[str] | None = None,
               retry_timeout: float = DEFAULT_RETRY_TIMEOUT) -> Starlette:
    """The dashboard for the bus under ``prefix`` at ``url``, as a Starlette app.

    ``token`` (None or empty: read-only) is what a user types to log in and requeue or
    purge dead letters. ``allowed_hosts``: the ``Host`` names it answers to (default
    :data:`LOOPBACK_HOSTS`; ``["*"]`` for any). Connecting is lazy: a broker that is
    down makes the pages say so (503) until it answers.
    """
    mq = MessageQueue(url, prefix=prefix, retry_timeout=retry_timeout)
    ctx = Context(mq, Guard(token), Throughput(), make_templates(), prefix,
                  mq.connection.address)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            ctx.close()

    app = Starlette(
        routes=_ROUTES,
        middleware=[Middleware(SecurityHeaders),
                    Middleware(TrustedHostMiddleware,
                               allowed_hosts=list(allowed_hosts or LOOPBACK_HOSTS))],
        exception_handlers={Refused: _refused, HTTPException: _http,
                            QueueNotFoundError: _not_found, InvalidNameError: _not_found,
                            BrokerUnavailableError: _unavailable, RelaybusError: _failed},
        lifespan=lifespan)
    app.state.relaybus = ctx
    return app
