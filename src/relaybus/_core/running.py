"""How a step is run, IO excluded: what both drivers do around one exchange.

:meth:`StepRunner.run` is a generator that yields what the driver must do (a
:class:`~.steps.Step` to exchange, whose raw replies, errors in their place, are sent
back; or a :class:`Pause` to sleep) and returns the step's value. It checks the
server's version on first use, loads a script the server answered ``NOSCRIPT`` for
and sends that command again, raises the first error reply, and retries outages by
:mod:`.outage`'s policy. An exchange that fails (the connection, a timeout) is
thrown back in. :meth:`StepRunner.drive` does the same for a whole flow, and
:meth:`StepRunner.reach` waits for a server that does not answer yet (a service
started before its broker).

A driver is then one loop (``send`` the replies or the pause's end, ``throw`` what the
exchange raised) over its own IO; :class:`DriverBase` holds what both drivers keep
(the runner, a cluster's slot map, connections by node).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from ..connection import address_of, check_version, cluster_address, cluster_seeds, redact
from ..errors import BrokerUnavailableError
from . import cluster
from .outage import Retrying
from .steps import Call, Flow, ScriptCall, Step, first_error, noscript, request_size

__all__ = ["Pause", "IO", "StepRunner", "DriverBase"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Pause:
    """Sleep ``seconds`` before the next attempt (an outage is being retried)."""

    seconds: float


#: What a runner generator asks of its driver; it is sent the replies of a step (a
#: list) or ``None`` after a pause.
IO = Generator["Step[Any] | Pause", Any, T]

_INFO: Step[Any] = Step.one(Call("INFO", "server"))
_PING: Step[Any] = Step.one(Call("PING"))


class StepRunner:
    """The driver's logic for one server: version check, scripts, errors, retries.

    ``retry_timeout``: longest time, in seconds, one step retries an outage;
    ``clock``: monotonic time; ``address`` and ``url`` (its password is never shown):
    the server's, for error messages.
    """

    def __init__(self, *, retry_timeout: float, clock: Callable[[], float],
                 address: str, url: str = "") -> None:
        self.retry_timeout = retry_timeout
        self.clock = clock
        self.address = address
        self.url = redact(url)
        self.checked = False

    def run(self, step: Step[T], retry_timeout: float | None = None) -> IO[T]:
        """Run ``step``: yields exchanges and pauses, returns its value."""
        retrying: Retrying | None = None
        while True:
            try:
                if not self.checked:
                    check_version((yield _INFO)[0], self.address)
                    self.checked = True
                replies: list[Any] = yield step
                for i in noscript(replies):  # those did not run: load and send them again
                    command = step.commands[i]
                    assert isinstance(command, ScriptCall)
                    yield Step.one(Call("SCRIPT", "LOAD", command.script.source))
                    replies[i] = (yield Step.one(command))[0]
                error = first_error(step, replies)
                if error is not None:
                    raise error
                return step.parse(replies)
            except Exception as exc:
                if retrying is None:
                    bound = self.retry_timeout if retry_timeout is None else retry_timeout
                    retrying = Retrying(bound, self.clock, self.address, self.url)
                yield Pause(retrying.after(exc, request_size(step)))

    def drive(self, flow: Flow[T], retry_timeout: float | None = None) -> IO[T]:
        """Run ``flow`` to its end (each step as :meth:`run`); an error a step raises
        is thrown into the flow."""
        try:
            step = next(flow)
            while True:
                try:
                    value = yield from self.run(step, retry_timeout)
                except Exception as exc:
                    step = flow.throw(exc)
                else:
                    step = flow.send(value)
        except StopIteration as done:
            result: T = done.value
            return result

    def reach(self, timeout: float | None, on_wait: Callable[[BaseException], None] | None = None,
              abandon: Callable[[], bool] | None = None) -> IO[bool]:
        """Wait until the server answers: returns True once it does.

        An outage (refused, unknown host, timeout, ``LOADING``...) is retried with the
        usual backoff for ``timeout`` seconds (None: for ever); ``on_wait(error)`` is
        called once, at the first failed attempt. Anything else (refused credentials,
        no such database, a server too old) raises at once. Past ``timeout`` it raises
        :class:`~relaybus.errors.BrokerUnavailableError` naming the URL (password
        redacted) and how long it waited. ``abandon()`` is asked after each pause: when
        it is true, the wait ends and this returns False.
        """
        bound = math.inf if timeout is None else float(timeout)
        started = self.clock()
        retrying = Retrying(bound, self.clock, self.address, self.url)
        waiting = False
        while True:
            try:
                yield from self.run(_PING, 0.0)  # one attempt: the pauses are ours
                return True
            except BrokerUnavailableError as exc:
                cause = exc.__cause__ if exc.__cause__ is not None else exc
                try:
                    pause = retrying.after(cause if isinstance(cause, Exception) else exc)
                except BrokerUnavailableError:
                    raise BrokerUnavailableError(
                        self.address, cause, url=self.url if "://" in self.url else None,
                        waited=self.clock() - started) from cause
            if not waiting:
                waiting = True
                if on_wait is not None:
                    on_wait(cause)
            yield Pause(pause)
            if abandon is not None and abandon():
                return False


class DriverBase:
    """What both drivers keep: the ``client`` (a ``redis.Redis`` or
    ``redis.asyncio.Redis``), the :class:`StepRunner`, a cluster's slot map (a
    ``redis+cluster://`` ``url``), and redis-py connections by node (idle ones, and
    every one taken from a pool, to close)."""

    def __init__(self, client: Any, *, retry_timeout: float, url: str = "",
                 replication: Any = None, clock: Callable[[], float]) -> None:
        self.client = client
        self.pool = client.connection_pool
        seeds = cluster_seeds(url) if url else None
        #: The slot map of a cluster (None: one server).
        self.slots = cluster.SlotMap(seeds) if seeds else None
        self.address = cluster_address(seeds) if seeds else address_of(client)
        self.url = url
        #: ``durability="replicated"``: durable steps wait for the replicas (None: not).
        self.replication = replication
        self.runner = StepRunner(retry_timeout=retry_timeout, clock=clock,
                                 address=self.address, url=url)
        self._pools: dict[cluster.Node | None, Any] = {None: self.pool}
        self._idle: dict[cluster.Node | None, list[Any]] = {None: []}  # redis-py connections
        self._taken: list[Any] = []

    @property
    def retry_timeout(self) -> float:
        """Longest time, in seconds, one step retries an outage."""
        return self.runner.retry_timeout
