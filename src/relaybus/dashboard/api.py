"""The JSON the page script polls (read-only, like every GET).

``GET /api/overview``: every queue's counts and rates, the rates' history (a few
minutes) and the consumers. ``GET /api/tail?cursor=C&type=T``: the events after the
cursor (of type T; repeatable), and the next cursor; without one, from now on.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import reads
from .context import context
from .security import Refused

__all__ = ["overview", "tail"]


def overview(request: Request) -> Response:
    """Every queue's counts and rates, their history, and the consumers."""
    ctx = context(request)
    return JSONResponse(reads.overview(ctx.mq, ctx.throughput))


def tail(request: Request) -> Response:
    """The events after ``cursor``, filtered by ``type``, and the next cursor."""
    ctx = context(request)
    types = set(reads.event_types(request.query_params.getlist("type")))
    try:
        found = reads.tail(ctx.mq, request.query_params.get("cursor"), types,
                           from_start=request.query_params.get("from") == "start")
    except reads.BadCursor as exc:
        raise Refused(400, str(exc)) from None
    return JSONResponse(found)
