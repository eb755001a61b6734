"""The HTML pages, and the forms that change data (requeue, purge, login, logout).

Pages that only read are plain GETs run in a worker thread (the queue layer is
synchronous). Every form that changes data is a POST that passes
:meth:`~.security.Guard.authorize` first and answers with a redirect (so reloading
the page after does not send it again); what it did is shown once on the next page.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ..inspection import dead_letter_queue
from ..queue import MessageQueue, Queue
from . import reads
from .context import context, dlq_path, render
from .security import (
    Refused,
    clear_session_cookie,
    read_form,
    safe_next,
    set_session_cookie,
)

__all__ = ["overview", "dead_letters", "dlq", "dlq_message", "requeue", "purge_form",
           "purge", "tail", "login_form", "login", "logout"]


def _plural(n: int, word: str = "message") -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def overview(request: Request) -> Response:
    """``/``: every queue, live rates, subscriptions, consumers."""
    ctx = context(request)
    return render(request, "overview.html", nav="overview",
                  data=reads.overview(ctx.mq, ctx.throughput))


def dead_letters(request: Request) -> Response:
    """``/dlq``: every queue's dead-letter queue and its size."""
    ctx = context(request)
    return render(request, "dead_letters.html", nav="dlq",
                  queues=reads.dead_letter_queues(ctx.mq))


def dlq(request: Request) -> Response:
    """``/dlq/QUEUE``: the messages of a DLQ, a page at a time (``?after=ID``)."""
    ctx = context(request)
    after = request.query_params.get("after")
    if after is not None and not reads.STREAM_ID.match(after):
        raise Refused(400, f"bad message id {after[:40]!r}")
    page = reads.dlq_page(ctx.mq, request.path_params["queue"], after)
    return render(request, "dlq.html", nav="dlq", page=page, after=after,
                  dlq_url=dlq_path(page.dlq.pair_name))


def dlq_message(request: Request) -> Response:
    """``/dlq/QUEUE/ID``: one dead-lettered message, its payload and failure records."""
    ctx = context(request)
    queue, message = reads.dlq_message(ctx.mq, request.path_params["queue"],
                                       request.path_params["message_id"])
    return render(request, "message.html", nav="dlq", message=reads.message_view(queue, message),
                  dlq_url=dlq_path(queue.pair_name))


def _requeue(mq: MessageQueue, queue: str, ids: list[str] | None) -> tuple[Queue, int]:
    dlq = dead_letter_queue(mq, queue)
    return dlq, dlq.requeue_messages(ids) if ids is not None else dlq.requeue_where()


async def requeue(request: Request) -> Response:
    """POST ``/dlq/QUEUE/requeue``: ``ids`` (one or more) or ``all=1`` back to the queue."""
    ctx = context(request)
    session, form = await ctx.guard.authorize(request)
    ids = [i for i in form.get("ids", []) if i]
    every = form.get("all", [""])[0] == "1"
    if bool(ids) == every:
        raise Refused(400, "choose the messages to requeue, or all of them")
    bad = [i for i in ids if not reads.STREAM_ID.match(i)]
    if bad:
        raise Refused(400, f"bad message id {bad[0][:40]!r}")
    dlq, moved = await run_in_threadpool(_requeue, ctx.mq, request.path_params["queue"],
                                         ids or None)
    session.flash.append(f"requeued {_plural(moved)} from {dlq.name} to {dlq.pair_name}")
    missing = len(set(ids)) - moved
    if ids and missing > 0:
        session.flash.append(f"{_plural(missing)} {'was' if missing == 1 else 'were'} no "
                             f"longer in {dlq.name}")
    return RedirectResponse(dlq_path(dlq.pair_name), status_code=303)


def purge_form(request: Request) -> Response:
    """``/dlq/QUEUE/purge``: what a purge would delete, and the confirmation to type."""
    ctx = context(request)
    dlq = dead_letter_queue(ctx.mq, request.path_params["queue"])
    return render(request, "purge.html", nav="dlq", dlq=dlq, count=dlq.get_info().message_count,
                  dlq_url=dlq_path(dlq.pair_name), error=None)


async def purge(request: Request) -> Response:
    """POST ``/dlq/QUEUE/purge``: delete every message of the DLQ, once ``confirm``
    holds the DLQ's name (typed on the confirmation page)."""
    ctx = context(request)
    session, form = await ctx.guard.authorize(request)
    dlq = await run_in_threadpool(dead_letter_queue, ctx.mq,
                                  request.path_params["queue"])
    if form.get("confirm", [""])[0].strip() != dlq.name:
        count = await run_in_threadpool(lambda: dlq.get_info().message_count)
        return render(request, "purge.html", 400, nav="dlq", dlq=dlq, count=count,
                      dlq_url=dlq_path(dlq.pair_name),
                      error=f"type {dlq.name} to confirm: nothing was deleted")
    purged = await run_in_threadpool(dlq.purge)
    session.flash.append(f"purged {_plural(purged)} from {dlq.name}")
    return RedirectResponse(dlq_path(dlq.pair_name), status_code=303)


def tail(request: Request) -> Response:
    """``/tail``: the event log, live (``?type=T`` filters; ``?from=start`` starts with
    the oldest event kept)."""
    ctx = context(request)
    subs, _ = reads.subscriptions(ctx.mq)
    known = sorted({t for s in subs for t in s["event_types"] if t != "all"})
    types = reads.event_types(request.query_params.getlist("type"))
    start = reads.tail(ctx.mq, None, set(types),
                       from_start=request.query_params.get("from") == "start")
    return render(request, "tail.html", nav="tail", types=types, known_types=known,
                  start=start)


def login_form(request: Request) -> Response:
    """``/login``: the token field (or, read-only, why there is none)."""
    return render(request, "login.html", nav="login", error=None,
                  next=safe_next(request.query_params.get("next")))


async def login(request: Request) -> Response:
    """POST ``/login``: check the token; on success open a session and go on."""
    ctx = context(request)
    if not ctx.guard.writable:
        raise Refused(403, "this dashboard is read-only: no token is configured, so there is "
                      "nothing to log in to")
    ctx.guard.refuse_cross_site(request)
    form = await read_form(request)
    target = safe_next(form.get("next", [""])[0])
    if not ctx.guard.check_token(form.get("token", [""])[0]):
        return render(request, "login.html", 401, nav="login", error="wrong token",
                      next=target)
    session = ctx.guard.open_session()
    session.flash.append("logged in: you can requeue and purge dead letters")
    response = RedirectResponse(target, status_code=303)
    set_session_cookie(response, request, session)
    return response


async def logout(request: Request) -> Response:
    """POST ``/logout``: end the session."""
    ctx = context(request)
    session, _ = await ctx.guard.authorize(request)
    ctx.guard.close_session(session)
    response = RedirectResponse("/", status_code=303)
    clear_session_cookie(response)
    return response
