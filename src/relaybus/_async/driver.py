"""The asyncio driver: runs the core's steps and flows on ``redis.asyncio`` connections.

The same core :class:`~relaybus._core.running.StepRunner` as
:mod:`relaybus._sync.driver`, awaited: each step is one write and its raw replies,
outage pauses with ``asyncio.sleep`` (the loop is never blocked). A call that is
cancelled (or fails) mid-exchange disconnects its connection, so no reply is ever read
by the wrong call: cancellation is safe.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import hiredis
import redis
import redis.asyncio

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

__all__ = ["AsyncDriver"]

T = TypeVar("T")
#: Bytes waiting to be written above which a write waits for the socket to drain.
_WRITE_BUFFER_LIMIT = 1 << 20

if sys.version_info >= (3, 11):
    _timeout = asyncio.timeout
else:  # pragma: no cover - Python 3.10
    from async_timeout import timeout as _timeout


class AsyncDriver(DriverBase):
    """Runs steps and flows on an asyncio ``client``'s connections (see the module docstring)."""

    def __init__(self, client: redis.asyncio.Redis, *, retry_timeout: float, url: str = "",
                 replication: Replication | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(client, retry_timeout=retry_timeout, url=url,
                         replication=replication, clock=clock)
        self.client: redis.asyncio.Redis = client
        self._readers: dict[int, tuple[Any, Any]] = {}  # connection -> (writer, hiredis reader)
        self.socket_timeout = float(client.connection_pool.connection_kwargs.get(
            "socket_timeout") or 10.0)

    async def run(self, step: Step[T], *, retry_timeout: float | None = None) -> T:
        """Send ``step`` and return its value; outages are retried within the bound."""
        return await self._go(self.runner.run(step, retry_timeout))

    async def drive(self, flow: Flow[T], *, retry_timeout: float | None = None) -> T:
        """Run ``flow`` to its end and return its result (each step as :meth:`run`)."""
        return await self._go(self.runner.drive(flow, retry_timeout))

    async def reach(self, timeout: float | None,
                    on_wait: Callable[[BaseException], None] | None = None,
                    abandon: Callable[[], bool] | None = None) -> bool:
        """Wait until the server answers, up to ``timeout`` seconds (None: for ever);
        False when ``abandon()`` ended the wait (see
        :meth:`~relaybus._core.running.StepRunner.reach`)."""
        return await self._go(self.runner.reach(timeout, on_wait, abandon))

    async def _go(self, io: IO[T]) -> T:
        """Do what the core's runner asks (exchanges, pauses) until it returns."""
        try:
            want = next(io)
            while True:
                if isinstance(want, Pause):
                    await asyncio.sleep(want.seconds)
                    want = io.send(None)
                    continue
                try:
                    replies = await self._exchange(want)
                except Exception as exc:
                    want = io.throw(exc)
                else:
                    want = io.send(replies)
        except StopIteration as done:
            result: T = done.value
            return result

    async def server_version(self) -> str:
        """The server's name and version, e.g. ``valkey 8.1.8`` or ``redis 7.0.15``."""
        return server_name(await self.run(Step.one(Call("INFO", "server"))))

    async def _exchange(self, step: Step[Any]) -> list[Any]:
        """One round trip for the step; on a cluster, one batch per node, written and
        read concurrently (:func:`relaybus._core.cluster.exchange`)."""
        if self.slots is None:
            packed, n = wire(step, self.replication)
            return unwrap(step, await self._talk(cluster.Batch(None, packed, n, step.block)),
                          self.replication)
        flow = cluster.exchange(step, self.slots, self.replication)
        try:
            want = next(flow)
            while True:
                try:
                    if len(want.batches) == 1:
                        answers = [await self._talk(want.batches[0])]
                    else:
                        answers = list(await asyncio.gather(
                            *(self._talk(b) for b in want.batches)))
                except Exception as exc:
                    want = flow.throw(exc)
                else:
                    want = flow.send(answers)
        except StopIteration as done:
            replies: list[Any] = done.value
            return replies

    async def _connection(self, node: cluster.Node | None) -> Any:
        idle = self._idle.setdefault(node, [])
        try:
            return idle.pop()
        except IndexError:
            pass
        pool = pool_of(self._pools, node)
        conn = await pool.get_connection()
        self._taken.append(conn)
        return conn

    async def _talk(self, batch: cluster.Batch) -> list[Any]:
        """Write one batch to its node and read its replies (errors in their place)."""
        conn: Any = await self._connection(batch.node)  # redis-py's connections are untyped
        try:
            replies = await self._replies(conn, batch.packed, batch.replies, batch.block)
            if any(role_changed(r) for r in replies):  # not the primary: ask again next time
                await conn.disconnect()
                self._readers.pop(id(conn), None)
        except BaseException:
            await conn.disconnect(nowait=True)  # cancelled or failed: never reuse it half-read
            self._readers.pop(id(conn), None)
            raise
        finally:
            self._idle[batch.node].append(conn)
        return replies

    async def _replies(self, conn: Any, packed: bytes, n: int, block: float | None
                       ) -> list[Any]:
        """Write ``packed`` and read ``n`` replies (errors in their place).

        Over the connection's own asyncio streams, with a hiredis reader of ours: the
        connection's ``read_response`` costs 2.5 times the CPU per round trip
        (``python bench/driver_cost.py``). redis-py still connects, authenticates and
        selects the database. A connection of a redis-py without those streams is read
        through its own calls.
        """
        if getattr(conn, "_writer", None) is None:
            await conn.connect()
        writer, reader = getattr(conn, "_writer", None), getattr(conn, "_reader", None)
        if writer is None or reader is None:  # not the redis-py this was written against
            await conn.send_packed_command([packed])
            out: list[Any] = []
            for _ in range(n):
                try:
                    out.append(await conn.read_response())
                except redis.ResponseError as exc:  # read on: keep the connection in step
                    out.append(exc)
            return out
        known = self._readers.get(id(conn))
        if known is None or known[0] is not writer:  # a new connection: a new reader
            known = (writer, hiredis.Reader(replyError=redis.ResponseError,
                                            protocolError=redis.exceptions.InvalidResponse))
            self._readers[id(conn)] = known
        parser = known[1]
        writer.write(packed)
        if writer.transport.get_write_buffer_size() > _WRITE_BUFFER_LIMIT:
            await writer.drain()
        replies: list[Any] = []
        limit = (block or 0.0) + self.socket_timeout
        try:
            async with _timeout(limit):
                while len(replies) < n:
                    reply = parser.gets()
                    if reply is False:
                        data = await reader.read(65536)
                        if not data:
                            raise redis.ConnectionError(f"connection to {self.address} closed")
                        parser.feed(data)
                        continue
                    replies.append(reply)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise redis.TimeoutError(f"timeout reading from {self.address}") from exc
        return replies

    async def close(self) -> None:
        """Close every connection."""
        for conn in self._taken:
            await conn.disconnect()
        for node, pool in self._pools.items():
            if node is not None:
                await pool.disconnect()
        await self.client.aclose()
        for sentinel in sentinel_clients(self.client):
            await sentinel.aclose()
