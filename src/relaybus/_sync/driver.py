"""The sync driver: runs the core's steps and flows on redis-py connections.

:meth:`Driver.run` sends one :class:`~relaybus._core.steps.Step` (one command, a
pipeline, or MULTI/EXEC) as one write and reads its replies raw; :meth:`Driver.drive`
runs a flow. What happens around each exchange (version check, ``NOSCRIPT``, errors,
outage retries) is decided by the core's :class:`~relaybus._core.running.StepRunner`;
this module does only the IO it asks for.

The driver talks to the connections of the client's pool directly (the core's ``wire``,
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

from .._core import cluster
from .._core.outage import role_changed
from .._core.running import IO, DriverBase, Pause
from .._core.steps import (
    Call,
    Flow,
    Replication,
    Step,
    unwrap,
    wire,
)
from ..connection import pool_of, sentinel_clients, server_name

__all__ = ["Driver"]

T = TypeVar("T")


def _take(pool: Any) -> Any:
    try:
        conn = pool.get_connection()
    except TypeError:  # redis-py < 5.3 wants a command name
        conn = pool.get_connection("EVALSHA")
    return conn


class Driver(DriverBase):
    """Runs steps and flows on ``client``'s connections (see the module docstring).

    ``retry_timeout``: longest time, in seconds, one step retries an outage.
    ``sleep`` and ``clock`` (monotonic) are injectable for tests.
    """

    def __init__(self, client: redis.Redis, *, retry_timeout: float, url: str = "",
                 replication: Replication | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(client, retry_timeout=retry_timeout, url=url,
                         replication=replication, clock=clock)
        self.client: redis.Redis = client
        self.sleep = sleep

    # -- running ---------------------------------------------------------------------

    def run(self, step: Step[T], *, retry_timeout: float | None = None) -> T:
        """Send ``step`` and return its value; outages are retried within the bound."""
        return self._go(self.runner.run(step, retry_timeout))

    def drive(self, flow: Flow[T], *, retry_timeout: float | None = None) -> T:
        """Run ``flow`` to its end and return its result (each step as :meth:`run`)."""
        return self._go(self.runner.drive(flow, retry_timeout))

    def reach(self, timeout: float | None, on_wait: Callable[[BaseException], None] | None = None,
              abandon: Callable[[], bool] | None = None) -> bool:
        """Wait until the server answers, up to ``timeout`` seconds (None: for ever);
        False when ``abandon()`` ended the wait (see
        :meth:`~relaybus._core.running.StepRunner.reach`)."""
        return self._go(self.runner.reach(timeout, on_wait, abandon))

    def _go(self, io: IO[T]) -> T:
        """Do what the core's runner asks (exchanges, pauses) until it returns."""
        try:
            want = next(io)
            while True:
                if isinstance(want, Pause):
                    self.sleep(want.seconds)
                    want = io.send(None)
                    continue
                try:
                    replies = self._exchange(want)
                except Exception as exc:
                    want = io.throw(exc)
                else:
                    want = io.send(replies)
        except StopIteration as done:
            result: T = done.value
            return result

    def server_version(self) -> str:
        """The server's name and version, e.g. ``valkey 8.1.8`` or ``redis 7.0.15``."""
        return server_name(self.run(Step.one(Call("INFO", "server"))))

    # -- one exchange ----------------------------------------------------------------

    def _exchange(self, step: Step[Any]) -> list[Any]:
        """Write the step's commands at once, read every reply (errors in their place);
        on a cluster, one batch per node (:func:`relaybus._core.cluster.exchange`)."""
        if self.slots is None:
            packed, n = wire(step, self.replication)
            return unwrap(step, self._talk([cluster.Batch(None, packed, n)])[0], self.replication)
        flow = cluster.exchange(step, self.slots, self.replication)
        try:
            want = next(flow)
            while True:
                try:
                    answers = self._talk(want.batches)
                except Exception as exc:
                    want = flow.throw(exc)
                else:
                    want = flow.send(answers)
        except StopIteration as done:
            replies: list[Any] = done.value
            return replies

    def _connection(self, node: cluster.Node | None) -> Any:
        idle = self._idle.setdefault(node, [])
        try:
            return idle.pop()
        except IndexError:
            pass
        pool = pool_of(self._pools, node)
        conn = _take(pool)
        self._taken.append(conn)
        return conn

    def _talk(self, batches: tuple[cluster.Batch, ...] | list[cluster.Batch]) -> list[list[Any]]:
        """Write every batch on a connection to its node, then read each one's replies."""
        conns: list[Any] = []  # redis-py's connections are untyped
        try:
            for batch in batches:
                conn = self._connection(batch.node)
                conns.append(conn)
                if getattr(conn, "_sock", True) is None:  # through connect(): a Sentinel-managed
                    conn.connect()  # connection asks where the primary is (send would not)
                conn.send_packed_command([batch.packed])
            out = []
            for conn, batch in zip(conns, batches, strict=True):
                replies: list[Any] = []
                for _ in range(batch.replies):
                    try:
                        replies.append(conn.read_response())
                    except redis.ResponseError as exc:  # read on: keep the connection in step
                        replies.append(exc)
                if any(role_changed(r) for r in replies):  # not the primary: ask again next time
                    conn.disconnect()
                out.append(replies)
        except BaseException:
            for conn in conns:
                conn.disconnect()  # replies may be left unread: start afresh next time
            raise
        finally:
            for conn, batch in zip(conns, batches, strict=False):
                self._idle[batch.node].append(conn)
        return out

    def close(self) -> None:
        """Close every connection."""
        for conn in self._taken:
            conn.disconnect()
        for node, pool in self._pools.items():
            if node is not None:
                pool.disconnect()
        self.client.close()
        for sentinel in sentinel_clients(self.client):
            sentinel.close()
