"""The asyncio consume loop: the core's :class:`~relaybus._core.consumer.Consumer` on tasks.

The same roles as the sync worker, as tasks on one event loop: a **fetcher**, a
**settler** (batched settlement, lease extensions) and ``concurrency`` **handler**
tasks. Nothing blocks the loop: every server call is awaited, and a handler task
yields to the loop after each message when it has given the fetcher or the settler
work (so a batch goes out while the next message is handled), and at least every few
messages (so replies are read while handlers that never await run).

Stopping: :meth:`AsyncWorker.join` stops fetching and starting handlers, waits for
running handlers (up to a timeout), settles what finished and hands the rest back
(fetched but unstarted, and unfinished after a timeout or a cancellation) so another
instance takes it at once. A cancelled handler never acknowledges its message: it is
handed back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .._core.consumer import Consumer, Outcome, SettleBatch, StopReport
from .._core.incidents import Incident
from .._core.queue import QueueRef, Settlement
from .._core.steps import Flow
from ..codec import Message
from ..errors import BrokerError
from .driver import AsyncDriver

__all__ = ["AsyncWorker", "AsyncWorkers", "StillRunning", "YIELD_EVERY"]

logger = logging.getLogger("relaybus.worker")

#: A handler task yields to the event loop at least every this many messages.
YIELD_EVERY = 8


class _Signal:
    """Wakes every task waiting on it (each re-checks its own condition before waiting
    again, so nothing is missed); a timer, not a task, bounds a wait."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    def set(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, timeout: float | None = None) -> None:
        if timeout is not None and timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.add(waiter)
        timer = loop.call_later(timeout, _wake, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)
            if timer is not None:
                timer.cancel()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class StillRunning(asyncio.CancelledError):
    """A handler running in a worker thread was cancelled: the thread cannot be stopped,
    so its message is left pending (redelivered after the visibility timeout) rather than
    handed back while it may still run."""


class AsyncWorker:
    """Consumes one queue with ``concurrency`` handler tasks (see the module docstring).

    ``process`` turns a message into an :class:`Outcome` (awaited); ``recover``, when
    given, recreates what a flushed server lost before fetching again. A worker runs
    once.
    """

    def __init__(self, driver: AsyncDriver, consumer: Consumer,
                 process: Callable[[Message], Awaitable[Outcome]], *, concurrency: int = 1,
                 recover: Callable[[QueueRef], Flow[Any]] | None = None) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.driver = driver
        self.core = consumer
        self.process = process
        self.concurrency = concurrency
        self.recover = recover
        self.name = consumer.name
        self._work = _Signal()
        self._room = _Signal()
        self._to_settle = _Signal()
        self._idle = _Signal()
        self._io_tasks: list[asyncio.Task[None]] = []
        self._handlers: list[asyncio.Task[None]] = []
        self._cancelling = False

    @property
    def in_flight(self) -> int:
        """Messages held by this worker: fetched and not yet settled."""
        return len(self.core.held)

    def start(self) -> None:
        """Start the fetcher, the settler and the handler tasks (on the running loop)."""
        if self._io_tasks:
            raise RuntimeError("a worker runs once; create a new one")
        self._io_tasks = [asyncio.create_task(self._fetch_loop(), name=f"{self.name}-fetch"),
                          asyncio.create_task(self._settle_loop(), name=f"{self.name}-settle")]
        self._handlers = [asyncio.create_task(self._handler_loop(), name=f"{self.name}-h{i}")
                          for i in range(self.concurrency)]

    def _wake_all(self) -> None:
        for signal in (self._work, self._room, self._to_settle, self._idle):
            signal.set()

    # -- fetching -------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        incident = Incident(f"{self.name}: fetching", logger)
        core = self.core
        while True:
            while not core.stopping and core.fetch_count() == 0:
                await self._room.wait()
            if core.stopping:
                return
            try:
                messages = await self.driver.drive(
                    core.fetch(core.fetch_count(), time.monotonic, self.recover))
            except Exception as exc:  # a broker outage, or a bug: the loop goes on
                pause = incident.failed(exc, time.monotonic(),
                                        expected=isinstance(exc, BrokerError))
                await self._room.wait(pause)
                continue
            incident.succeeded(time.monotonic())
            if core.fetched(messages, time.monotonic()):
                self._work.set()
                self._to_settle.set()  # its next lease extension is due in time
                await asyncio.sleep(0)  # handlers start before the next fetch is sent
            elif core.skipped:
                self._to_settle.set()  # entries of other types to acknowledge

    # -- handling -------------------------------------------------------------------

    async def _handler_loop(self) -> None:
        core = self.core
        since_yield = 0
        while True:
            message = core.take()
            if message is None:
                if core.stopping:
                    return
                if not core.buffer:
                    self._room.set()  # nothing buffered: the fetcher may refill
                await self._work.wait()
                continue
            if not core.buffer:
                self._room.set()
            try:
                outcome = await self.process(message)
            except asyncio.CancelledError as exc:
                if self._cancelling:  # the service is stopping: hand it back, then end
                    if isinstance(exc, StillRunning):
                        core.dropped(message)  # it may still run: left pending
                    else:
                        core.unfinished(message)
                    raise
                # the handler cancelled itself: hand the message back, count a delivery
                logger.warning("%s: handling %s was cancelled; handing it back", self.name,
                               message.id)
                core.dropped(message)
                await self._hand_back(Settlement(release=[message.id]))
                continue
            except Exception:  # a bug outside the handler (it runs inside process)
                logger.exception("%s: unexpected error handling message %s; it stays pending "
                                 "and will be redelivered after the visibility timeout",
                                 self.name, message.id)
                core.counters.incr("errors")
                core.dropped(message)
                self._room.set()
                continue
            now = time.monotonic()
            first = not core.finished
            core.finish(message, outcome, now)
            since_yield += 1
            due = core.wants_settle(now)
            if due or first:  # wake the settler when a batch is due or its delay starts
                self._to_settle.set()
            if due or since_yield >= YIELD_EVERY:
                since_yield = 0
                await asyncio.sleep(0)  # let the settler send (and replies be read)

    # -- settling -------------------------------------------------------------------

    async def _settle_loop(self) -> None:
        incident = Incident(f"{self.name}: settling", logger)
        core = self.core
        while True:
            now = time.monotonic()
            batch = core.settle_batch(now)
            if batch is None:
                if core.abandoned and not core.finished:
                    return
                await self._to_settle.wait(core.next_settle_in(now))
                continue
            result = await self._settle(batch)
            self._room.set()
            self._idle.set()
            pause = core.settled(batch, result, time.monotonic())
            if isinstance(result, BaseException):
                if pause is not None:
                    await self._to_settle.wait(incident.failed(
                        result, time.monotonic(), expected=isinstance(result, BrokerError)))
            else:
                incident.succeeded(time.monotonic())

    async def _settle(self, batch: SettleBatch) -> Any:
        try:
            return await self.driver.drive(self.core.settle_flow(batch))
        except Exception as exc:
            return exc

    async def _hand_back(self, settlement: Settlement) -> None:
        try:
            done = await self.driver.drive(self.core.settle_flow_for(settlement), retry_timeout=1.0)
        except Exception as exc:  # best effort: they lapse as after a crash
            logger.warning("%s: could not hand back %d events (%s); they will be redelivered "
                           "after the visibility timeout", self.name, len(settlement.release),
                           exc)
        else:
            if done.released:
                logger.info("%s: handed back %d events", self.name, done.released)

    # -- stopping -------------------------------------------------------------------

    async def join(self, timeout: float, abandon: Callable[[], bool] | None = None
                   ) -> StopReport:
        """Stop: wait up to ``timeout`` seconds for running handlers and their settling.

        ``abandon``, polled while waiting, cuts the wait short (a second signal). Then
        handlers still running are cancelled, and their messages, with every fetched
        but unstarted one, are handed back at once (another instance takes them
        without waiting for their lease); the consumer leaves its group if it holds
        nothing.
        """
        core = self.core
        core.stop()
        self._wake_all()
        deadline = time.monotonic() + max(0.0, timeout)
        while not core.idle():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (abandon is not None and abandon()):
                break
            await self._idle.wait(min(remaining, 0.1))
        return await self._finish(cancelled=False)

    async def cancel(self) -> StopReport:
        """Stop at once (the service's task was cancelled): running handlers are cancelled
        and their messages handed back, what finished is settled."""
        self.core.stop()
        self._wake_all()
        return await self._finish(cancelled=True)

    async def _finish(self, *, cancelled: bool) -> StopReport:
        core = self.core
        running = [t for t in self._handlers if not t.done()]
        abandoned = len(core.running)
        if abandoned:
            if not cancelled:
                logger.warning("%s: %d handlers still running when the stop gave up "
                               "waiting; they are cancelled and their events handed back",
                               self.name, abandoned)
            self._cancelling = True
            for t in running:
                t.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if core.finished and core.settling is None:  # settle what finished meanwhile
            batch = core.settle_batch(time.monotonic())
            if batch is not None:
                core.settled(batch, await self._settle(batch), time.monotonic())
        waited = time.monotonic() + 5.0  # a settle in flight completes before its task ends
        while core.settling is not None and time.monotonic() < waited:
            await self._idle.wait(0.1)
        core.cancel_running()
        core.abandoned = True
        unstarted = len(core.buffer) - abandoned
        finished = core.settled_while_stopping
        self._wake_all()
        for t in self._io_tasks:
            t.cancel()
        await asyncio.gather(*self._io_tasks, return_exceptions=True)
        await self._hand_back(core.hand_back())
        return StopReport(finished=finished, abandoned=abandoned, left_pending=max(0, unstarted))


class AsyncWorkers:
    """Workers run as one: a service over the partitions of its subscription (one
    worker each). Same calls as :class:`AsyncWorker`; they stop together."""

    def __init__(self, workers: list[AsyncWorker]) -> None:
        self.workers = workers

    @property
    def in_flight(self) -> int:
        """Messages held by the workers: fetched and not yet settled."""
        return sum(w.in_flight for w in self.workers)

    def start(self) -> None:
        for w in self.workers:
            w.start()

    async def join(self, timeout: float, abandon: Callable[[], bool] | None = None
                   ) -> StopReport:
        """As :meth:`AsyncWorker.join`, for every worker at once."""
        joins = (w.join(timeout, abandon) for w in self.workers)
        return StopReport.total(await asyncio.gather(*joins))

    async def cancel(self) -> StopReport:
        """As :meth:`AsyncWorker.cancel`, for every worker at once."""
        return StopReport.total(await asyncio.gather(*(w.cancel() for w in self.workers)))


