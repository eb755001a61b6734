"""The web dashboard: look at a bus and repair it from a browser.

``relaybus dashboard`` serves it (``pip install 'relaybus[dashboard]'``); in code,
:func:`create_app` gives the Starlette application to serve with any ASGI server::

    import uvicorn
    from relaybus.dashboard import create_app

    uvicorn.run(create_app("redis://localhost:6379/0", token="s3cret"), host="127.0.0.1")

Pages: the overview of every queue with live rates (``/``), the dead-letter queues
(``/dlq``, ``/dlq/QUEUE``, ``/dlq/QUEUE/ID``) with requeue and purge, and a live tail
of the event log (``/tail``). Reading needs nothing; requeueing and purging need the
token (without one the dashboard is read-only). Modules, one concern each:

    app         the factory: routes, middleware, error pages
    context     what every handler shares (queue layer, guard, sampler, templates)
    security    the token, sessions, CSRF and cross-site checks, security headers
    throughput  the sampler behind the live charts
    reads       what the pages show, read from the broker (nothing consumed)
    pages       the HTML pages and the forms that change data
    api         the JSON the page script polls
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
