"""The sync driver: runs the core's steps and flows on redis-py connections.

:meth:`Driver.run` sends one :class:`~relaybus._core.steps.Step` (one command, a
pipeline, or MULTI/EXEC) as one write and reads its replies raw, retrying outages by
:mod:`relaybus._core.outage`'s policy, loading a script on ``NOSCRIPT``, and raising
what the policy says otherwise. :meth:`Driver.drive` runs a flow: each step's value
is sent back into it, each unhandled error thrown into it.

The driver talks to the connections of the client's pool directly (``pack_commands``,
``send_packed_command``, ``read_response``) instead of through ``Redis.execute_command``:
measured on a 2-vCPU VM, the client wrapper (pool checkout, retry wrapper, response
callbacks, hooks) cost about 60 µs of CPU per command, more than the round trip itself
(``python bench/driver_cost.py``). Replies are therefore raw (RESP2 lists for the
clients relaybus makes); :mod:`relaybus._core.replies` reads them. Thread-safe: each
call takes an idle connection (or a new one) and gives it back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from .._core.outage import Retrying
from .._core.resp import pack
from .._core.steps import (
    Call,
    Flow,
    ScriptCall,
    Step,
    command_args,
    first_error,
    noscript,
    unwrap,
)
from ..connection import address_of, check_version, server_name

__all__ = ["Driver"]

T = TypeVar("T")


def _take(pool: Any) -> Any:
    try:
        conn = pool.get_connection()
    except TypeError:  # redis-py < 5.3 wants a command name
        conn = pool.get_connection("EVALSHA")
    return conn


class Driver:
    """Runs steps and flows on ``client``'s connections (see the module docstring).

    ``retry_timeout``: longest time, in seconds, one step retries an outage.
    ``sleep`` and ``clock`` (monotonic) are injectable for tests.
    """

    def __init__(self, client: redis.Redis, *, retry_timeout: float, url: str = "",
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.pool = client.connection_pool
        self.address = address_of(client)
        self.url = url
        self.retry_timeout = retry_timeout
        self.sleep = sleep
        self.clock = clock
        self._checked = False
        self._idle: list[Any] = []  # redis-py connections (untyped)
        self._taken: list[Any] = []

    # -- running ---------------------------------------------------------------------

    def run(self, step: Step[T], *, retry_timeout: float | None = None) -> T:
        """Send ``step`` and return its value; outages are retried within the bound."""
        retrying: Retrying | None = None
        while True:
            try:
                if not self._checked:
                    check_version((self._exchange(Step.one(Call("INFO", "server"))))[0],
                                  self.address)
                    self._checked = True
                replies = self._exchange(step)
                for i in noscript(replies):  # those did not run: load and send them again
                    command = step.commands[i]
                    assert isinstance(command, ScriptCall)
                    self._exchange(Step.one(Call("SCRIPT", "LOAD", command.script.source)))
                    replies[i] = (self._exchange(Step.one(command)))[0]
                error = first_error(step, replies)
                if error is not None:
                    raise error
                return step.parse(replies)
            except Exception as exc:
                if retrying is None:
                    bound = self.retry_timeout if retry_timeout is None else retry_timeout
                    retrying = Retrying(bound, self.clock, self.address)
                self.sleep(retrying.after(exc))

    def drive(self, flow: Flow[T], *, retry_timeout: float | None = None) -> T:
        """Run ``flow`` to its end and return its result (each step as :meth:`run`)."""
        try:
            step = next(flow)
            while True:
                try:
                    value = self.run(step, retry_timeout=retry_timeout)
                except Exception as exc:
                    step = flow.throw(exc)
                else:
                    step = flow.send(value)
        except StopIteration as done:
            result: T = done.value
            return result

    def server_version(self) -> str:
        """The server's name and version, e.g. ``valkey 8.1.8`` or ``redis 7.0.15``."""
        return server_name(self.run(Step.one(Call("INFO", "server"))))

    # -- one exchange ----------------------------------------------------------------

    def _exchange(self, step: Step[Any]) -> list[Any]:
        """Write the step's commands at once, read every reply (errors in their place)."""
        conn: Any  # redis-py's connections are untyped
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = _take(self.pool)
            self._taken.append(conn)
        cmds = [command_args(c) for c in step.commands]
        if step.transaction:
            cmds = [("MULTI",), *cmds, ("EXEC",)]
        try:
            conn.send_packed_command([pack(cmds)])
            replies: list[Any] = []
            for _ in cmds:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:  # read on: keep the connection in step
                    replies.append(exc)
        except BaseException:
            conn.disconnect()  # replies may be left unread: start afresh next time
            raise
        finally:
            self._idle.append(conn)
        return unwrap(step, replies)

    def close(self) -> None:
        """Close every connection."""
        for conn in self._taken:
            conn.disconnect()
        self.client.close()
