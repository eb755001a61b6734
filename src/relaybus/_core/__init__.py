"""The sans-IO core of relaybus: no sockets, no threads, no asyncio; the clock is an input.

Everything relaybus asks of a server is built here as a :class:`~.steps.Step` (the
commands to send in one round trip and how to read their replies), and every
operation that needs more than one round trip is a *flow*: a generator that yields
steps and receives their replies (``reply = yield step``), as httpx's auth flows do.
Two thin drivers run them: :mod:`relaybus._sync.driver` on redis-py and
:mod:`relaybus._async.driver` on ``redis.asyncio``. A rule fixed here is fixed for both
fronts.
"""
