"""The asyncio front: AsyncMicroservice, AsyncEventBus and the awaited queue layer.

The sync service's behaviours (tests/test_service.py), mirrored for
:class:`~relaybus.AsyncMicroservice`, plus what only the asyncio front has: plain
``def`` handlers in worker threads, cancellation of the task running a service, and
cancellation of a blocked queue call. Every test is a plain function that runs an
inner coroutine with :func:`run`, against the real server of the session under its
own key prefix; waiting is polling with a deadline (:func:`until`), never a sleep.
Real processes (``tests/helpers_aio.py``) are signalled and killed where the sync
tests use them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import signal
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio

from helpers_aio import RUN_VISIBILITY_TIMEOUT, Child, child_command
from helpers_service import Ping, Pong, blocked_reads, hold_the_gil
from relaybus import (
    AsyncEventBus,
    AsyncMessageQueue,
    AsyncMicroservice,
    AsyncQueue,
    ConfigurationError,
    CrossSlotError,
    Event,
    EventBus,
    Microservice,
    QueueInfo,
    Reject,
    RelaybusError,
    Retry,
    load_service,
    run_service,
    serialize_event,
)
from relaybus._core.service import AWAITABLE_REASON
from relaybus.keys import QueueKeys
from relaybus.retry import FALSE_REASON
from relaybus.testing import named_url, on_cluster, one_server, plain_async_client, wait_for_async
from waiting import wait_for

T = TypeVar("T")
S = TypeVar("S", bound=AsyncMicroservice)

class Pang(Event, event_type="test.aio.pang"):
    """A third event type, for fan-out."""

    n: int = 0


# -- helpers ----------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run a test's coroutine on a fresh event loop; fail it after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate: Callable[[], Any], timeout: float = 10.0,
                what: str = "condition") -> Any:
    """Await ``predicate`` (a plain or an async callable) until it is truthy; fail after
    ``timeout`` seconds. The loop runs between checks."""
    return await wait_for_async(predicate, timeout, what)


class Harness:
    """Inside a test's coroutine: a bus to publish on, a factory of services with
    test-friendly defaults, an asyncio client for inspecting; all closed on exit."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.url = redis_url
        self.prefix = prefix
        self.bus = AsyncEventBus(redis_url, prefix=prefix)
        self.raw = plain_async_client(redis_url)
        self.made: list[AsyncMicroservice] = []

    def service(self, name: str = "svc", **options: Any) -> AsyncMicroservice:
        opts: dict[str, Any] = dict(url=self.url, prefix=self.prefix, maintenance=False,
                                    block_for_seconds=0.2, retry_backoff=0.01,
                                    retry_backoff_max=0.05, shutdown_timeout=5.0)
        opts.update(options)
        return self.track(AsyncMicroservice(name, **opts))

    def track(self, svc: S) -> S:
        self.made.append(svc)
        return svc

    async def publish(self, *events: Event) -> list[str]:
        """Publish: every subscription made before sees the events."""
        return [await self.bus.publish(e) for e in events]

    async def log_pending(self, service: str) -> list[dict[str, Any]]:
        """The PEL of the service's group on the event log (what its instances hold)."""
        log = QueueKeys(self.prefix, "all").stream
        rows: list[dict[str, Any]] = await self.raw.xpending_range(
            log, f"sub:{service}", "-", "+", 1000)
        return rows

    async def __aenter__(self) -> Harness:
        await self.bus.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            for svc in self.made:
                await svc.close()
        finally:
            await self.bus.close()
            await self.raw.aclose()


async def queue_info(svc: AsyncMicroservice) -> QueueInfo:
    queue, _ = await svc.subscription_queues()
    return await queue.get_info()


async def dead_letters(svc: AsyncMicroservice) -> list[Any]:
    _, dlq = await svc.subscription_queues()
    return await dlq.peek(100)


async def handed_back(h: Harness, service: str, count: int, vt: float) -> None:
    """Assert the service's group on the log holds ``count`` entries, every one handed
    back (idle for at least the visibility timeout: the next fetch of any instance
    takes it, nobody waits for a lease to lapse)."""
    rows = await h.log_pending(service)
    assert len(rows) == count, rows
    assert all(r["time_since_delivered"] >= vt * 1000 for r in rows), rows


async def nothing() -> None:
    """An awaitable that never completes (until cancelled)."""
    await asyncio.Event().wait()


# -- the sync front refuses async handlers ----------------------------------------------


async def _async_handler(event: Ping) -> None:
    pass


class _AsyncCallable:
    async def __call__(self, event: Ping) -> None:
        pass


@pytest.mark.parametrize("handler", [_async_handler, _AsyncCallable(),
                                     functools.partial(_async_handler)],
                         ids=["async-def", "async-call", "partial"])
def test_sync_on_refuses_async_handlers_naming_async_microservice(handler: Any) -> None:
    svc = Microservice("sync-front", url="redis://127.0.0.1:1/0")  # nothing listens
    with pytest.raises(TypeError, match="AsyncMicroservice"):
        svc.on(Ping)(handler)
    assert svc.handlers == {}
    AsyncMicroservice("async-front").on(Ping)(handler)  # where it belongs


def test_sync_subclass_with_async_handle_event_refuses_to_start() -> None:
    class Wrong(Microservice):
        async def handle_event(self, event: Event) -> bool:  # type: ignore[override]
            return True

    svc = Wrong("wrong", url="redis://127.0.0.1:1/0")  # refused before connecting
    with pytest.raises(TypeError, match="AsyncMicroservice"):
        svc.start()
    assert not svc.running


def test_sync_handler_returning_a_coroutine_is_dead_lettered(redis_url: str,
                                                             prefix: str) -> None:
    ran: list[int] = []

    async def body(event: Ping) -> None:
        ran.append(event.n)

    bus = EventBus(redis_url, prefix=prefix)
    svc = Microservice("sneaky", url=redis_url, prefix=prefix, maintenance=False,
                       block_for_seconds=0.2)
    svc.on(Ping)(lambda event: body(event))  # a plain function: passes registration
    try:
        svc.start()
        bus.publish(Ping(n=7))
        # the DLQ entry is visible before the settle reply reaches the service's counters
        wait_for(lambda: svc.stats["dead_lettered"] == 1, what="the dead letter counted")
        [dead] = svc.subscription_dlq.peek(10)
        assert dead.reason == AWAITABLE_REASON and "AsyncMicroservice" in dead.reason
        assert dead.data["n"] == 7
        assert svc.stats["handled"] == 0
        assert ran == []  # its body never ran
        info = svc.subscription_queue.get_info()
        assert (info.message_count, info.pending_messages) == (0, 0)
    finally:
        svc.close()
        bus.close()


# -- handling and subscriptions ---------------------------------------------------------


def test_decorator_form_subscribes_to_its_types_and_handles(redis_url: str,
                                                            prefix: str) -> None:
    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            svc = h.service("billing")
            seen: list[tuple[str, int]] = []
            threads: set[int] = set()

            @svc.on(Ping)
            async def on_ping(event: Ping) -> None:
                await asyncio.sleep(0)
                threads.add(threading.get_ident())
                seen.append(("ping", event.n))

            @svc.on(Pong)
            async def on_pong(event: Pong) -> str:
                threads.add(threading.get_ident())
                seen.append(("pong", event.n))
                return "anything but False"

            await svc.start()
            assert (await h.bus.subscriptions())["billing"] == ["test.service.ping",
                                                                "test.service.pong"]
            await h.publish(Ping(n=1), Pong(n=2), Ping(n=3))
            await until(lambda: svc.stats["handled"] == 3, what="3 handled")
            assert sorted(seen) == [("ping", 1), ("ping", 3), ("pong", 2)]
            assert threads == {threading.get_ident()}  # awaited on the loop
            info = await queue_info(svc)
            assert (info.message_count, info.pending_messages, info.delayed_messages) == (0, 0, 0)
            assert await dead_letters(svc) == []

    run(main())


def test_subclass_overriding_async_handle_event_gets_every_type(redis_url: str,
                                                                prefix: str) -> None:
    class Audit(AsyncMicroservice):
        def __init__(self) -> None:
            super().__init__("audit", url=redis_url, prefix=prefix, maintenance=False,
                             block_for_seconds=0.2)
            self.seen: list[str] = []

        async def handle_event(self, event: Event) -> bool:
            await asyncio.sleep(0)
            self.seen.append(event.event_type)
            return not (isinstance(event, Ping) and event.tag == "refuse")

    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            svc = h.track(Audit())
            await svc.start()
            assert (await h.bus.subscriptions())["audit"] == ["*"]
            await h.publish(Ping(n=1), Pong(n=2), Pang(n=3), Ping(tag="refuse"))
            await until(lambda: svc.stats["handled"] == 3 and svc.stats["dead_lettered"] == 1)
            assert sorted(svc.seen) == ["test.aio.pang", "test.service.ping",
                                        "test.service.ping", "test.service.pong"]
            [dead] = await dead_letters(svc)
            assert dead.reason == FALSE_REASON
            assert dead.failures[-1]["handler"].endswith("Audit.handle_event")

    run(main())


def test_fan_out_each_service_gets_exactly_its_types_once(redis_url: str,
                                                          prefix: str) -> None:
    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            got: dict[str, Counter[str]] = {}
            wanted = {"orders": (Ping,), "shipping": (Pong, Pang), "audit": ("*",)}
            services = {}
            for name, types in wanted.items():
                svc = services[name] = h.service(name)
                seen = got[name] = Counter()

                async def handle(event: Event, seen: Counter[str] = seen) -> None:
                    seen[event.event_id] += 1

                svc.on(*types)(handle)
                await svc.start()
            assert await h.bus.subscriptions() == {
                "audit": ["*"], "orders": ["test.service.ping"],
                "shipping": ["test.aio.pang", "test.service.pong"]}
            pings = [Ping(n=i) for i in range(4)]
            pongs = [Pong(n=i) for i in range(3)]
            pangs = [Pang(n=i) for i in range(2)]
            await h.bus.publish_many([*pings, *pongs, *pangs])
            expected: dict[str, list[Event]] = {
                "orders": [*pings], "shipping": [*pongs, *pangs],
                "audit": [*pings, *pongs, *pangs]}
            await until(lambda: all(services[n].stats["handled"] == len(e)
                                    for n, e in expected.items()),
                        what="every service to handle its events")
            for name, events in expected.items():
                assert got[name] == Counter({e.event_id: 1 for e in events}), name
                info = await queue_info(services[name])
                assert (info.pending_messages, info.waiting_messages) == (0, 0), name
                assert services[name].stats["received"] == len(events), name

    run(main())


# -- failures ---------------------------------------------------------------------------


def test_fails_twice_then_succeeds(redis_url: str, prefix: str) -> None:
    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            svc = h.service("flaky", max_attempts=5)
            calls: list[float] = []

            @svc.on(Ping)
            async def handle(event: Ping) -> None:
                calls.append(time.monotonic())
                await asyncio.sleep(0)
                if len(calls) <= 2:
                    raise ConnectionError("dependency down")

            await svc.start()
            await h.publish(Ping())
            await until(lambda: svc.stats["handled"] == 1, what="handled after retries")
            stats = svc.stats
            assert len(calls) == 3
            assert (stats["failed"], stats["retried"], stats["dead_lettered"]) == (2, 2, 0)
            assert await dead_letters(svc) == []
            info = await queue_info(svc)
            assert (info.message_count, info.pending_messages, info.delayed_messages) == (0, 0, 0)

    run(main())


def test_exhaustion_dead_letters_with_the_failure_record(redis_url: str, prefix: str) -> None:
    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            svc = h.service("doomed", max_attempts=3)
            calls = Counter[str]()

            @svc.on(Ping)
            async def always_fails(event: Ping) -> None:
                calls[event.event_id] += 1
                await asyncio.sleep(0)
                raise ValueError(f"cannot handle {event.n}")

            await svc.start()
            event = Ping(n=42)
            before = time.time()
            await h.publish(event)
            await until(lambda: svc.stats["dead_lettered"] == 1, what="the dead letter counted")
            [dead] = await dead_letters(svc)
            assert calls[event.event_id] == 3
            assert dead.data["event_id"] == event.event_id and dead.data["n"] == 42
            assert len(dead.failures) == 3  # two retries, then the dead letter
            record = dead.failures[-1]
            assert record["reason"] == "max attempts (3) reached: ValueError: cannot handle 42"
            assert record["exception_type"] == "builtins.ValueError"
            assert record["exception_message"] == "cannot handle 42"
            assert "always_fails" in record["traceback"] and "ValueError" in record["traceback"]
            assert record["attempt"] == 3 and record["max_attempts"] == 3
            assert record["service"] == "doomed" and record["consumer"] == svc.consumer_id
            assert record["handler"].endswith("always_fails")
            assert record["event_type"] == "test.service.ping"
            assert record["event_id"] == event.event_id
            assert before - 1 <= record["published_at"] <= record["started_at"] \
                <= record["finished_at"]
            # "timestamp" is the server's clock in whole milliseconds (the dead-letter script's)
            assert record["finished_at"] - 0.001 <= record["timestamp"] <= time.time()
            assert [f["attempt"] for f in dead.failures] == [1, 2, 3]
            assert all("retry_delay" in f for f in dead.failures[:2])
            assert svc.stats["failed"] == 3
            info = await queue_info(svc)
            assert (info.message_count, info.pending_messages, info.delayed_messages) == (0, 0, 0)

    run(main())


@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt])
def test_a_handler_raising_system_exit_fails_like_any_other(redis_url: str, prefix: str,
                                                            raised: type[BaseException]) -> None:
    """As in the sync front: retried, then dead-lettered with the reason; the loop and the
    service live on and handle the next event."""
    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            svc = h.service("exits", max_attempts=2)

            @svc.on(Ping)
            async def exits(event: Ping) -> None:
                if event.n == 1:
                    raise raised(3)

            await svc.start()
            await h.publish(Ping(n=1), Ping(n=2))
            [dead] = await until(lambda: dead_letters(svc), what="a DLQ entry")
            assert dead.failures[-1]["exception_type"] == f"builtins.{raised.__name__}"
            await until(lambda: svc.stats["handled"] == 1, what="the next event handled")
            assert svc.running

    run(main())


def test_false_reject_and_retry(redis_url: str, prefix: str) -> None:
    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            svc = h.service("choices", max_attempts=3)
            retry_calls: list[float] = []

            @svc.on(Ping)
            async def handle(event: Ping) -> bool:
                await asyncio.sleep(0)
                if event.tag == "false":
                    return False
                if event.tag == "reject":
                    raise Reject("order total is negative")
                if event.tag == "retry":
                    retry_calls.append(time.monotonic())
                    if len(retry_calls) == 1:
                        raise Retry(delay=0.3, reason="stock not yet known")
                return True

            await svc.start()
            await h.publish(Ping(tag="retry"), Ping(tag="false"), Ping(tag="reject"),
                            Ping(tag="ok"))
            await until(lambda: svc.stats["handled"] == 2 and svc.stats["dead_lettered"] == 2)
            dead = await dead_letters(svc)
            assert sorted(m.reason for m in dead) == [FALSE_REASON, "order total is negative"]
            assert len(retry_calls) == 2 and retry_calls[1] - retry_calls[0] >= 0.28
            assert svc.stats["failed"] == 0 and svc.stats["retried"] == 1
            for m in dead:
                assert m.failures[-1]["attempt"] == 1 and "exception_type" not in m.failures[-1]

    run(main())


def test_invalid_entries_and_missing_handlers_are_dead_lettered(redis_url: str,
                                                                 prefix: str) -> None:
    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            svc = h.service("strict", event_types=[Ping, Pong])
            svc.on(Ping)(_async_handler)
            await svc.start()
            queue, _ = await svc.subscription_queues()
            await queue.send_message({"event_type": "test.service.nosuch", "event_id": "u-1"})
            await queue.send_message({"event_type": "test.service.ping", "event_id": "v-1",
                                      "n": "many"})
            await h.publish(Pong(n=1), Ping(n=2))

            async def settled() -> bool:
                return len(await dead_letters(svc)) == 3 and svc.stats["handled"] == 1

            await until(settled, what="3 dead letters and 1 handled")
            by_reason = {m.reason: m for m in await dead_letters(svc)}
            unknown = by_reason["unknown event type 'test.service.nosuch'"]
            assert unknown.failures[-1]["error_type"] == "UnknownEventTypeError"
            [invalid] = [m for r, m in by_reason.items()
                         if r.startswith("invalid 'test.service.ping'")]
            assert invalid.failures[-1]["errors"][0]["loc"] == "n"
            assert invalid.data["n"] == "many"  # kept for inspection and requeue
            assert "no handler for event type 'test.service.pong' in service 'strict'" \
                in by_reason
            assert svc.stats["invalid"] == 2
            info = await queue.get_info()
            assert (info.message_count, info.pending_messages) == (0, 0)

    run(main())


# -- duplicates -------------------------------------------------------------------------


def test_duplicates_are_not_handled_again(redis_url: str, prefix: str) -> None:
    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            svc = h.service("once")
            calls = Counter[str]()
            marker = asyncio.Event()

            @svc.on(Ping)
            async def handle(event: Ping) -> None:
                calls[event.event_id] += 1
                if event.tag == "marker":
                    marker.set()

            await svc.start()
            event = Ping(n=1)
            await h.publish(event, event)  # published twice
            await until(lambda: svc.stats["handled"] == 1)
            # requeued after success (as from a DLQ, or a redelivery), then a marker
            queue, _ = await svc.subscription_queues()
            await queue.send_message(serialize_event(event), dedup_key=event.event_id)
            await h.publish(Ping(tag="marker"))
            await asyncio.wait_for(marker.wait(), 10)
            # the copy waits in the service's own stream, read at the next periodic fetch
            await until(lambda: svc.stats["duplicates"] == 1,
                        what="the copy dropped as a duplicate")
            assert calls[event.event_id] == 1
            assert svc.stats["handled"] == 2
            info = await queue.get_info()
            assert (info.message_count, info.pending_messages) == (0, 0)

    run(main())


# -- concurrency, threads and leases ------------------------------------------------------


def test_concurrency_with_a_bounded_prefetch(redis_url: str, prefix: str) -> None:

    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            svc = h.service("wide", concurrency=3, prefetch=4)
            gate = asyncio.Event()
            running = 0
            peak = 0

            @svc.on(Ping)
            async def handle(event: Ping) -> None:
                nonlocal running, peak
                running += 1
                peak = max(peak, running)
                try:
                    await gate.wait()
                finally:
                    running -= 1

            await svc.start()
            await h.bus.publish_many([Ping(n=i) for i in range(10)])
            await until(lambda: running == 3, what="3 handlers running")

            async def held_four() -> QueueInfo | None:
                info = await queue_info(svc)
                return info if info.pending_messages == 4 else None

            info = await until(held_four, what="4 held")
            assert info.waiting_messages == 6  # the rest stays in Redis, not here
            for _ in range(5):  # the bound holds while the handlers stay busy
                assert (await queue_info(svc)).pending_messages == 4
                assert svc.stats["received"] == 4 and running == 3
            gate.set()
            await until(lambda: svc.stats["handled"] == 10)
            assert peak == 3
            await asyncio.wait_for(svc.stop(), 5)  # idle handler tasks end too

    run(main())


def test_the_default_prefetch_fetches_and_settles_in_batches_of_100() -> None:
    assert AsyncMicroservice("lazy", url="redis://127.0.0.1:1/0").prefetch == 200
    assert AsyncMicroservice("c", url="redis://127.0.0.1:1/0", concurrency=128).prefetch == 256


def test_a_finished_event_is_acknowledged_while_another_handler_still_runs(
        redis_url: str, prefix: str) -> None:
    # the settler wakes when a batch's first event finishes (its delay starts then),
    # not only when the batch is due: else this ack would wait for the lease extension

    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            svc = h.service("acks", concurrency=2, visibility_timeout=60)
            gates = [asyncio.Event(), asyncio.Event()]
            running: set[int] = set()

            @svc.on(Ping)
            async def handle(event: Ping) -> None:
                running.add(event.n)
                await gates[event.n].wait()

            await svc.start()
            ids = await h.publish(Ping(n=0), Ping(n=1))
            await until(lambda: running == {0, 1}, what="both handlers running")
            gates[1].set()  # n=1 finishes long after its fetch, while n=0 runs on

            async def only_the_gated_one_pending() -> bool:
                rows = await h.log_pending("acks")
                return [r["message_id"].decode() for r in rows] == [ids[0]]

            await until(only_the_gated_one_pending, timeout=5, what="n=1 acknowledged")
            assert svc.stats["handled"] == 1
            gates[0].set()
            await until(lambda: svc.stats["handled"] == 2)

    run(main())


def test_a_plain_def_handler_runs_in_a_thread_and_does_not_block_the_loop(
        redis_url: str, prefix: str) -> None:
    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            svc = h.service("threaded")
            entered = threading.Event()
            release = threading.Event()
            threads: list[int] = []

            @svc.on(Ping)
            def blocking(event: Ping) -> bool:  # a plain def: blocks its thread only
                threads.append(threading.get_ident())
                if event.tag == "refuse":
                    return False
                entered.set()
                assert release.wait(10)
                return True

            gaps: list[float] = []

            async def ticker() -> None:
                last = time.monotonic()
                while True:
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            await svc.start()
            tick = asyncio.create_task(ticker())
            try:
                await h.publish(Ping(n=1))
                await until(entered.is_set, what="the handler to block")
                gaps.clear()
                await until(lambda: len(gaps) >= 30, what="30 ticks while the handler blocks")
                assert svc.stats["handled"] == 0 and not release.is_set()
                release.set()
                await until(lambda: svc.stats["handled"] == 1, what="its outcome settled")
            finally:
                tick.cancel()
            assert max(gaps) < 0.2, max(gaps)
            await h.publish(Ping(tag="refuse"))  # a False from a thread dead-letters too
            [dead] = await until(lambda: dead_letters(svc), what="a dead letter")
            assert dead.reason == FALSE_REASON
            assert threading.get_ident() not in threads and len(threads) == 2
            info = await queue_info(svc)
            assert (info.message_count, info.pending_messages) == (0, 0)

    run(main())


def test_an_awaiting_handler_keeps_its_lease(redis_url: str, prefix: str) -> None:
    vt = 0.5

    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            calls: list[str] = []
            started = asyncio.Event()

            async def slow(event: Ping) -> None:
                calls.append(event.event_id)
                started.set()
                await asyncio.sleep(3 * vt + 0.1)  # the work: three visibility timeouts

            instances = [h.service("patient", visibility_timeout=vt) for _ in range(2)]
            for svc in instances:
                svc.on(Ping)(slow)
                await svc.start()
            await h.publish(Ping())
            await asyncio.wait_for(started.wait(), 10)
            deliveries: set[int] = set()
            deadline = time.monotonic() + 10
            while sum(s.stats["handled"] for s in instances) == 0:  # sample while it runs
                assert time.monotonic() < deadline, "the handler never finished"
                deliveries.update(int(p["times_delivered"])
                                  for p in await h.log_pending("patient"))
                await asyncio.sleep(0.02)  # sampling interval
            assert deliveries == {1}  # never reclaimed, by the other instance or its own
            assert len(calls) == 1
            assert sum(s.stats["received"] for s in instances) == 1
            assert sum(s.stats["lease_lapsed"] for s in instances) == 0

    run(main())


def test_a_thread_handler_holding_the_gil_past_its_lease_is_logged_and_counted(
        redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    vt = 0.3

    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            svc = h.service("frozen", visibility_timeout=vt)
            svc.on(Ping)(lambda e: hold_the_gil(3 * vt))  # a plain def: in a worker thread
            await svc.start()
            await h.publish(Ping())
            await until(lambda: svc.stats["handled"] == 1, what="the frozen handler")
            assert svc.stats["lease_lapsed"] == 1

    with caplog.at_level(logging.WARNING, logger="relaybus"):
        run(main())
    assert any("lapsed while its handler ran" in r.getMessage() for r in caplog.records)


# -- stopping and cancelling ------------------------------------------------------------------


def test_a_stopped_service_leaves_nothing_pending_in_the_log(redis_url: str,
                                                            prefix: str) -> None:
    """Entries of types it does not take, read with the one it handles, are acknowledged
    too (the stop's own settlement is covered in test_service.py)."""
    async def scenario() -> None:
        async with Harness(redis_url, prefix) as h:
            svc = h.service("picky", event_types=[Ping])
            seen: list[int] = []

            @svc.on(Ping)
            async def handle(event: Ping) -> None:
                seen.append(event.n)

            await h.bus.subscribe("picky", [Ping])
            await h.bus.publish_many([Pong(n=1), Ping(n=2), Pong(n=3)])  # one read: all
            await svc.start()
            await until(lambda: seen == [2], what="the Ping handled")
            await svc.stop()
            assert await h.log_pending("picky") == []
            assert svc.mq.stats["skipped"] == 2

    run(scenario())


@pytest.mark.parametrize("concurrency", [1, 2])
def test_graceful_stop_finishes_in_flight_and_hands_back_the_rest(
        redis_url: str, prefix: str, concurrency: int) -> None:
    vt = 30.0  # what another instance gets within seconds was handed back, not lapsed
    prefetch = concurrency + 1  # one fetched that never starts

    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            first = h.service("graceful", concurrency=concurrency, prefetch=prefetch,
                              visibility_timeout=vt)
            gate = asyncio.Event()
            started: list[int] = []

            @first.on(Ping)
            async def slow(event: Ping) -> None:
                started.append(event.n)
                await gate.wait()

            await first.start()
            await h.bus.publish_many([Ping(n=i) for i in range(6)])  # one fetch fills it
            await until(lambda: len(started) == concurrency
                        and first.stats["received"] == prefetch)
            stopper = asyncio.create_task(first.stop())
            await until(lambda: not first.running, what="stop begun")
            done, _ = await asyncio.wait({stopper}, timeout=0.3)
            assert not done  # waiting for the running handlers
            gate.set()
            await asyncio.wait_for(stopper, 10)
            assert first.stats["handled"] == concurrency
            assert sorted(started) == list(range(concurrency))
            info = await queue_info(first)
            assert (info.pending_messages, info.waiting_messages) == (1, 6 - prefetch)
            await handed_back(h, "graceful", 1, vt)  # the fetched one nobody started

            second = h.service("graceful", visibility_timeout=vt)
            seen: list[int] = []

            @second.on(Ping)
            async def fast(event: Ping) -> None:
                seen.append(event.n)

            t0 = time.monotonic()
            await second.start()
            await until(lambda: second.stats["handled"] == 6 - concurrency, timeout=5,
                        what="the rest handled elsewhere")
            assert time.monotonic() - t0 < 5
            assert sorted(seen) == list(range(concurrency, 6))  # the finished: not again

    run(main())


def test_stop_timeout_cancels_a_stuck_handler_and_hands_its_event_back(
        redis_url: str, prefix: str) -> None:
    vt = 30.0

    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            svc = h.service("stuck", visibility_timeout=vt, shutdown_timeout=0.3)
            started = asyncio.Event()
            cancelled: list[str] = []

            @svc.on(Ping)
            async def stuck(event: Ping) -> None:
                started.set()
                try:
                    await nothing()
                except asyncio.CancelledError:
                    cancelled.append(event.event_id)
                    raise

            await svc.start()
            event = Ping(n=1)
            await h.publish(event)
            await asyncio.wait_for(started.wait(), 10)
            t0 = time.monotonic()
            await svc.stop()
            assert 0.3 <= time.monotonic() - t0 < 2.0  # waited shutdown_timeout, no longer
            assert cancelled == [event.event_id]
            assert svc.stats["handled"] == 0 and svc.stats["failed"] == 0
            await handed_back(h, "stuck", 1, vt)  # not acknowledged: handed back

            other = h.service("stuck", visibility_timeout=vt)
            seen: list[str] = []

            @other.on(Ping)
            async def fine(e: Ping) -> None:
                seen.append(e.event_id)

            await other.start()
            await until(lambda: other.stats["handled"] == 1, timeout=5,
                        what="another instance to handle it")
            assert seen == [event.event_id]

    run(main())


@pytest.mark.parametrize("concurrency", [1, 2])
def test_cancelling_run_hands_every_unfinished_event_back(redis_url: str, prefix: str,
                                                          concurrency: int) -> None:
    vt = 30.0

    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            svc = h.service("cancelled", concurrency=concurrency, prefetch=4,
                            visibility_timeout=vt)
            started: list[int] = []
            cancelled: list[int] = []

            @svc.on(Ping)
            async def waits(event: Ping) -> None:
                started.append(event.n)
                try:
                    await nothing()
                except asyncio.CancelledError:
                    cancelled.append(event.n)
                    raise

            task = asyncio.create_task(svc.run(install_signals=False))
            await until(lambda: svc.running, what="the service to start")
            await h.bus.publish_many([Ping(n=i) for i in range(6)])  # one fetch takes 4
            await until(lambda: len(started) == concurrency and svc.stats["received"] == 4)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert sorted(cancelled) == sorted(started) and len(cancelled) == concurrency
            assert not svc.running and svc.stats["handled"] == 0
            await handed_back(h, "cancelled", 4, vt)  # nothing acknowledged, all handed back
            with pytest.raises(RelaybusError, match="closed"):
                await svc.start()  # run() closed it

            other = h.service("cancelled", visibility_timeout=vt)
            seen = Counter[int]()

            @other.on(Ping)
            async def fine(e: Ping) -> None:
                seen[e.n] += 1

            await other.start()
            await until(lambda: other.stats["handled"] == 6, timeout=5,
                        what="every event handled elsewhere")
            assert seen == Counter(range(6))  # each exactly once
            info = await queue_info(other)
            assert (info.pending_messages, info.waiting_messages) == (0, 0)

    run(main())


# -- real processes ---------------------------------------------------------------------------


async def _handle_rest(redis_url: str, prefix: str, name: str, count: int,
                       vt: float) -> Counter[int]:
    """Run a survivor instance of ``name`` until it handled ``count`` events."""
    async with Harness(redis_url, prefix) as h:
        survivor = h.service(name, visibility_timeout=vt)
        seen = Counter[int]()

        @survivor.on(Ping)
        async def handle(event: Ping) -> None:
            seen[event.n] += 1

        await survivor.start()
        await until(lambda: survivor.stats["handled"] >= count, timeout=10,
                    what=f"{count} events handled by the survivor")
        assert await dead_letters(survivor) == []
        return seen


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_child_gracefully_while_a_handler_runs(
        redis_url: str, prefix: str, raw: redis.Redis, sig: signal.Signals) -> None:
    name = f"term-{sig.name.lower()}"
    bus = EventBus(redis_url, prefix=prefix)
    child = Child(child_command("run", redis_url, prefix, name))
    try:
        child.expect("ready")
        wait_for(lambda: name in bus.subscriptions(), what="the child to subscribe")
        for n in range(3):
            bus.publish(Ping(n=n))
        child.expect("started 0")
        child.popen.send_signal(sig)
        child.expect("stop requested", stderr=True)
        assert "finished 0" not in child.out  # the handler is still running
        raw.rpush(prefix + "release", "go")  # let it finish
        assert child.wait(20) == 0, child.err
        assert child.out[:3] == ["ready", "started 0", "finished 0"], child.out
        assert len(child.out) == 4 and "'handled': 1" in child.out[3], child.out
        assert any(re.search(rf"service {name} stopped after \d+\.\ds: 1 in-flight "
                             r"event\(s\) finished, 0 cancelled", line)
                   for line in child.err), child.err
        queue = bus.mq.get_queue(f"sub:{name}")
        assert queue is not None
        info = queue.get_info()
        assert (info.pending_messages, info.waiting_messages) == (1, 1)
    finally:
        child.close()
        bus.close()
    seen = run(_handle_rest(redis_url, prefix, name, 2, RUN_VISIBILITY_TIMEOUT))
    assert seen == Counter([1, 2])  # event 0 was acknowledged: not redelivered


def test_a_second_signal_stops_a_child_at_once(redis_url: str, prefix: str) -> None:
    name = "impatient"
    bus = EventBus(redis_url, prefix=prefix)
    child = Child(child_command("run", redis_url, prefix, name))
    try:
        child.expect("ready")
        wait_for(lambda: name in bus.subscriptions(), what="the child to subscribe")
        for n in range(3):
            bus.publish(Ping(n=n))
        child.expect("started 0")
        child.popen.send_signal(signal.SIGTERM)
        child.expect("stop requested", stderr=True)
        t0 = time.monotonic()
        child.popen.send_signal(signal.SIGINT)
        assert child.wait(10) == 0, child.err
        assert time.monotonic() - t0 < 5  # not the 20 s shutdown timeout
        assert "finished 0" not in child.out
        [stopped] = [found for line in child.err if (found := re.search(
            rf"service {name} stopped after (\d+\.\d)s \(forced\): 0 in-flight event\(s\) "
            r"finished, 1 cancelled", line))]
        assert float(stopped.group(1)) < 5  # the time it waited, not the timeout
    finally:
        child.close()
        bus.close()
    seen = run(_handle_rest(redis_url, prefix, name, 3, RUN_VISIBILITY_TIMEOUT))
    assert seen == Counter([0, 1, 2])  # the cancelled one too: handed back, not acked


def test_a_sigkilled_async_instance_loses_nothing(redis_url: str, prefix: str,
                                                  raw: redis.Redis) -> None:
    name, total = "crashy", 300
    bus = EventBus(redis_url, prefix=prefix)
    ledger = prefix + "ledger"
    child = Child(child_command("stream", redis_url, prefix, name))
    try:
        consumer = child.expect("ready ").split()[1]
        ids = bus.publish_many([Ping(n=i) for i in range(total)])
        wait_for(lambda: raw.llen(ledger) >= 20, what="the child to be mid-stream")
        child.popen.kill()
        child.wait(10)
    finally:
        child.close()
        bus.close()
    number_of = dict(zip(ids, range(total), strict=True))
    log = QueueKeys(prefix, "all").stream
    held = {number_of[r["message_id"].decode()]
            for r in raw.xpending_range(log, f"sub:{name}", "-", "+", 1000, consumername=consumer)}
    by_child = Counter(int(n) for n in raw.lrange(ledger, 0, -1))
    assert len(held) <= 4  # what it died holding (at most its prefetch)
    assert 20 <= len(by_child) < total and max(by_child.values()) == 1  # mid-stream

    async def survive() -> Counter[int]:
        async with Harness(redis_url, prefix) as h:
            survivor = h.service(name, visibility_timeout=1.0)
            seen = Counter[int]()

            @survivor.on(Ping)
            async def handle(event: Ping) -> None:
                seen[event.n] += 1

            await survivor.start()
            await until(lambda: set(seen) | set(by_child) == set(range(total)), timeout=15,
                        what="every event handled by someone")
            assert await dead_letters(survivor) == []
            return seen

    seen = run(survive())
    assert max(seen.values()) == 1  # the survivor handled each at most once
    assert set(seen) & set(by_child) <= held  # repeats only of what the dead one held


# -- the queue layer ----------------------------------------------------------------------------


def test_async_reclaim_waits_for_the_holders_lease_not_the_callers(
        redis_url: str, prefix: str, raw: redis.Redis) -> None:
    """As on the sync front: a consumer with a short visibility timeout takes over a
    long-lease holder's message only once the holder's lease has passed (ages set on
    the server with XCLAIM ... IDLE)."""
    async def main() -> None:
        async with AsyncMessageQueue(redis_url, prefix=prefix, consumer_id="old") as old_mq, \
                AsyncMessageQueue(redis_url, prefix=prefix, consumer_id="new") as new_mq:
            old, _ = await old_mq.create_queue_pair("orders", visibility_timeout=30)
            new, _ = await new_mq.create_queue_pair("orders", visibility_timeout=0.3)
            mid = await old.send_message({"job": 1})
            assert [m.id for m in await old.get_messages()] == [mid]
            raw.xclaim(old.key, "relaybus", "old", 0, [mid], idle=5_000, justid=True)
            assert await new.get_messages() == []  # 5 s: past 0.3 s, not the holder's 30 s
            raw.xclaim(old.key, "relaybus", "old", 0, [mid], idle=30_001, justid=True)
            [taken] = await new.get_messages()
            assert (taken.id, taken.delivery_count) == (mid, 2)

    run(main())


def test_async_queue_round_trip(redis_url: str, prefix: str) -> None:
    async def main() -> None:
        async with AsyncMessageQueue(redis_url, prefix=prefix, retry_timeout=5.0) as mq:
            q, dlq = await mq.create_queue_pair("orders", visibility_timeout=12)
            assert isinstance(q, AsyncQueue) and dlq.is_dlq
            assert await mq.queue_names() == ["orders"]
            found = await mq.get_queue("orders")
            assert found is not None and found.visibility_timeout == 12.0
            assert await mq.get_queue("nothing") is None
            mid = await q.send_message({"n": 1}, headers={"trace": "t1"})
            ids = await q.send_messages([{"n": 2}, {"n": 3}])
            info = await q.get_info()
            assert (info.message_count, info.pending_messages, info.waiting_messages) == (3, 0, 3)
            assert info.visibility_timeout == 12.0

            msgs = await q.get_messages(count=10)
            assert [m.id for m in msgs] == [mid, *ids]
            assert [m.data for m in msgs] == [{"n": 1}, {"n": 2}, {"n": 3}]
            assert msgs[0].headers == {"trace": "t1"} and msgs[0].delivery_count == 1
            assert (await q.get_info()).pending_messages == 3
            assert await q.acknowledge_messages(mid) == 1
            assert await q.acknowledge_messages(mid) == 0  # already acknowledged

            assert await q.move_to_dlq(ids[0], "payment declined", dlq,
                                       details={"handler": "h1"}) == 1
            [dead] = await dlq.peek()
            assert dead.data == {"n": 2} and dead.reason == "payment declined"
            assert dead.failures[0]["handler"] == "h1"
            assert (await q.get_info()).dlq_messages == 1
            assert await dlq.requeue_messages(dead.id) == 1  # back to its own queue
            assert await dlq.peek() == []

            scheduled = time.monotonic()
            assert await q.schedule_retry(ids[1], 0.3, "later") == 1
            assert (await q.get_info()).delayed_messages == 1
            [back] = await q.get_messages(count=10)
            assert back.data == {"n": 2}
            assert [f["reason"] for f in back.failures] == ["payment declined"]
            assert await q.acknowledge_messages(back.id) == 1
            [retried] = await q.get_messages(block_for_seconds=5)  # wakes up for the retry
            assert 0.28 <= time.monotonic() - scheduled < 3
            assert retried.data == {"n": 3} and retried.attempts == 2
            assert await q.acknowledge_messages(retried.id) == 1
            info = await q.get_info()
            assert (info.message_count, info.pending_messages, info.delayed_messages,
                    info.dlq_messages) == (0, 0, 0, 0)

            a, _ = await mq.create_queue_pair("a")
            b, _ = await mq.create_queue_pair("b")
            if on_cluster(redis_url):  # two pairs, two slots: one queue for the rest
                with pytest.raises(CrossSlotError, match="within one slot"):
                    async with mq.transaction() as refused:
                        refused.send_message(a, {"to": "a"})
                        refused.send_message(b, {"to": "b"})
                assert await a.peek() == [] and await b.peek() == []
                b = a
            async with mq.transaction() as tx:
                tx.send_message(a, {"to": "a"})
                tx.send_message(b, {"to": "b"}, headers={"k": "v"})
                assert await a.peek() == [] and await b.peek() == []  # nothing before the end
            assert len(tx.ids) == 2
            if b is a:
                am, bm = await a.get_messages(count=5)
            else:
                [am] = await a.get_messages(count=5)
                [bm] = await b.get_messages(count=5)
            assert (am.data, bm.data, bm.headers) == ({"to": "a"}, {"to": "b"}, {"k": "v"})
            assert [am.id, bm.id] == tx.ids
            with pytest.raises(RuntimeError, match="boom"):
                async with mq.transaction() as failed:
                    failed.send_message(a, {"to": "never"})
                    raise RuntimeError("boom")
            assert failed.ids == [] and [m.id for m in await a.peek()] == (
                [am.id, bm.id] if b is a else [am.id])
            assert await mq.delete_queue("a") is True
            assert await mq.get_queue("a") is None

    run(main())


def test_async_consumers_lists_each_consumer_once(redis_url: str, prefix: str) -> None:
    async def main() -> dict[str, Any]:
        async with AsyncMessageQueue(redis_url, prefix=prefix) as mq:
            orders, _ = await mq.create_queue_pair("orders")
            await orders.send_messages([{"n": 1}, {"n": 2}])
            await orders.get_messages(count=2, consumer_id="worker-a")
            return await mq.consumers(["orders", "missing"])

    found = run(main())
    assert [(c.name, c.pending) for c in found["orders"]] == [("worker-a", 2)]
    assert found["missing"] == []


def test_cancelled_blocking_get_leaves_the_queue_usable(redis_url: str, prefix: str) -> None:
    """redis-py#2579: a command cancelled mid-read must not leave its reply for the next."""
    if not one_server(redis_url):
        pytest.skip("inspects one server's connections (CLIENT LIST, a counting client)")
    client_name = f"aio-cancel-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, client_name=client_name)
        async with AsyncMessageQueue(prefix=prefix, client=client) as mq, \
                redis.asyncio.Redis.from_url(redis_url) as inspector:

            async def blocked() -> bool:
                return any(c.get("name") == client_name and "b" in c.get("flags", "")
                           for c in await inspector.client_list())

            q, _ = await mq.create_queue_pair("jobs")
            assert await q.get_messages() == []

            async def cancel_while_blocked(cancel: Callable[[], Awaitable[None]]) -> None:
                await cancel()
                t0 = time.monotonic()
                mid = await asyncio.wait_for(q.send_message({"after": cancel.__name__}), 2.0)
                assert isinstance(mid, str) and "-" in mid  # its own reply, not a stale one
                assert await mq.ping() is True
                msgs = await asyncio.wait_for(q.get_messages(block_for_seconds=1), 2.0)
                assert [m.id for m in msgs] == [mid] and msgs[0].delivery_count == 1
                assert msgs[0].data == {"after": cancel.__name__}
                assert await q.acknowledge_messages(mid) == 1
                info = await q.get_info()
                assert (info.message_count, info.pending_messages) == (0, 0)
                assert time.monotonic() - t0 < 3  # nobody waited out the 5 s block

            async def by_cancel() -> None:
                task = asyncio.create_task(q.get_messages(block_for_seconds=5))
                await until(blocked, what="the get to block on the server")
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

            async def by_timeout() -> None:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(q.get_messages(block_for_seconds=5), 0.3)

            await cancel_while_blocked(by_cancel)
            await cancel_while_blocked(by_timeout)

    run(main())


# -- the runner ---------------------------------------------------------------------------------

MODULE = '''
from relaybus import AsyncMicroservice
from helpers_service import Ping

instance = AsyncMicroservice("aio-instance", url="redis://127.0.0.1:1/0")  # nothing listens

class Service(AsyncMicroservice):
    def __init__(self):
        super().__init__("aio-class", url="redis://127.0.0.1:1/0")

    async def handle_event(self, event):
        return True

def factory():
    svc = AsyncMicroservice("aio-factory", url="redis://127.0.0.1:1/0")

    @svc.on(Ping)
    async def handle(event):
        pass

    return svc
'''


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    """Write a module importable under a fresh name; return that name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"aiomod_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


def test_load_service_accepts_an_async_instance_subclass_and_factory(
        module: Callable[[str], str]) -> None:
    mod = module(MODULE)
    instance = load_service(f"{mod}:instance")
    assert isinstance(instance, AsyncMicroservice) and instance.service_name == "aio-instance"
    made = load_service(f"{mod}:Service")
    assert isinstance(made, AsyncMicroservice) and type(made).__name__ == "Service"
    assert made.service_name == "aio-class"
    factory = load_service(f"{mod}:factory")
    assert isinstance(factory, AsyncMicroservice) and factory.service_name == "aio-factory"
    assert set(factory.handlers) == {"test.service.ping"}


def test_url_applies_to_an_async_service_that_has_not_connected(
        module: Callable[[str], str], redis_url: str, prefix: str) -> None:
    mod = module(f'''
        from relaybus import AsyncMicroservice
        svc = AsyncMicroservice("pointed", url="redis://127.0.0.1:1/0", prefix={prefix!r},
                                maintenance=False, block_for_seconds=0.2)

        @svc.on("test.service.ping")
        async def handle(event):
            pass
    ''')
    svc = load_service(f"{mod}:svc", url=redis_url)  # importing it connected nowhere
    assert isinstance(svc, AsyncMicroservice)

    async def main() -> None:
        try:
            await svc.start()
            assert svc.running and await svc.mq.ping()
            with pytest.raises(ConfigurationError, match="already connected"):
                load_service(f"{mod}:svc", url=redis_url)
        finally:
            await svc.close()

    run(main())


def _async_service(redis_url: str, prefix: str, name: str) -> AsyncMicroservice:
    svc = AsyncMicroservice(name, url=redis_url, prefix=prefix, maintenance=False,
                            block_for_seconds=0.2)
    svc.on(Ping)(_async_handler)
    return svc


def _sigterm_when_running(svc: AsyncMicroservice) -> threading.Thread:
    def kill() -> None:
        wait_for(lambda: svc.running, what="the service to run")
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=kill)
    killer.start()
    return killer


def test_run_service_runs_an_async_service_until_sigterm(redis_url: str, prefix: str) -> None:
    svc = _async_service(redis_url, prefix, "aio-signalled")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    killer = _sigterm_when_running(svc)
    run_service(svc)  # returns after the signal and a graceful stop
    killer.join()
    assert not svc.running
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with pytest.raises(RelaybusError, match="closed"):
        asyncio.run(svc.start())


def test_run_service_restores_a_custom_signal_handler_for_an_async_service(
        redis_url: str, prefix: str) -> None:
    received: list[int] = []

    def custom(signum: int, frame: object) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, custom)
    try:
        svc = _async_service(redis_url, prefix, "aio-restored")
        killer = _sigterm_when_running(svc)
        run_service(svc)
        killer.join()
        assert signal.getsignal(signal.SIGTERM) is custom  # the runner doc: restored
        assert received == []  # the service's handler took the signal
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_blocking_read_waiting_at_stop_brings_nothing_to_the_stopped_instance(
        redis_url: str, prefix: str, raw: redis.Redis) -> None:
    """As on the sync front: an event published while a stopped instance's blocking
    read may still wait is handled by the next instance now, not a visibility timeout
    later."""
    async def main() -> None:
        async with Harness(redis_url, prefix) as h:
            tag = f"late-{uuid.uuid4().hex[:8]}"
            first = h.service("late", block_for_seconds=5.0, url=named_url(redis_url, tag))
            first.on(Ping)(lambda e: None)
            await first.start()
            await until(lambda: blocked_reads(raw, tag) == 1, what="the fetcher's blocking read")
            await first.stop()
            seen: list[int] = []
            second = h.service("late")

            @second.on(Ping)
            async def handle(event: Ping) -> None:
                seen.append(event.n)

            await h.publish(Ping(n=7))
            await second.start()
            await until(lambda: seen == [7], what="the event handled by the next instance")

    run(main())
