"""Ordered delivery per key (#12 item 4): ``Microservice(..., ordered=True)`` and its
asyncio twin handle the events of one ``partition_key`` one at a time, in publish
order, across instances and retries; other keys (and events without one) flow on.

The kill test (instances SIGKILLed mid-stream) is fault scenario 14
(tests/faults/test_ordered.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from pydantic import ValidationError

from helpers_aio import running_service, service_options
from relaybus import Event, EventBus, Microservice, Reject, Retry
from relaybus.codec import dedup_identity, dedup_record
from relaybus.events import MAX_PARTITION_KEY_LENGTH
from relaybus.keys import QueueKeys
from waiting import wait_for


class Step(Event, event_type="test.ordered.step"):
    n: int = 0


class Tracker:
    """What the handlers ran, in order, and any overlap of two runs of one key."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy: Counter[str] = Counter()
        self.runs: list[tuple[str, int]] = []
        self.overlaps: list[tuple[str, int]] = []

    def enter(self, event: Step) -> None:
        key = event.partition_key or event.event_id
        with self.lock:
            if self.busy[key]:
                self.overlaps.append((key, event.n))
            self.busy[key] += 1
            self.runs.append((key, event.n))

    def leave(self, event: Step) -> None:
        with self.lock:
            self.busy[event.partition_key or event.event_id] -= 1

    def of(self, key: str) -> list[int]:
        with self.lock:
            return [n for k, n in self.runs if k == key]


@contextmanager
def running(front: str, url: str, prefix: str, name: str,
            handle: Callable[[Step], Any], **options: Any) -> Iterator[Any]:
    """A started ordered service of ``front`` (concurrency 4; see :func:`running_service`)."""
    with running_service(front, url, prefix, name, Step, handle,
                         **{"ordered": True, "concurrency": 4, **options}) as svc:
        yield svc


FRONTS = ["sync", "async"]


def test_partition_key_is_validated_and_written_to_the_entry(redis_url: str, prefix: str,
                                                             raw: redis.Redis) -> None:
    for bad in ("", "a\x00b", "k" * (MAX_PARTITION_KEY_LENGTH + 1)):
        with pytest.raises(ValidationError):
            Step(partition_key=bad)
    with EventBus(redis_url, prefix=prefix) as bus:
        bus.publish(Step(partition_key="order-7"))
        bus.publish(Step())
    rows = raw.xrange(QueueKeys(prefix, "all").stream)
    assert rows[0][1][b"p"] == b"order-7" and b"p" not in rows[1][1]


def test_one_key_at_a_time_in_order_across_two_instances_of_both_fronts(
        redis_url: str, prefix: str) -> None:
    """Two instances (one per front), concurrency 4 each, 8 keys of 40 events published
    interleaved: no two runs of one key overlap and each key's events run in order."""
    tracker = Tracker()
    keys, per_key = [f"k{i}" for i in range(8)], 40

    def work(event: Step) -> None:
        tracker.enter(event)
        try:
            threading.Event().wait(0.001)  # the work of a handler (a thread may preempt it)
        finally:
            tracker.leave(event)

    with running("sync", redis_url, prefix, "ord", work), \
            running("async", redis_url, prefix, "ord", work):
        with EventBus(redis_url, prefix=prefix) as bus:
            for start in range(0, per_key, 10):
                bus.publish_many([Step(n=n, partition_key=k) for n in range(start, start + 10)
                                  for k in keys])
        wait_for(lambda: len(tracker.runs) >= len(keys) * per_key, 60,
                 "every event to be handled")
    assert tracker.overlaps == []
    for key in keys:
        assert tracker.of(key) == list(range(per_key)), key


@pytest.mark.parametrize("front", FRONTS)
def test_a_retry_holds_back_its_key_only(redis_url: str, prefix: str, front: str) -> None:
    """a0 fails once and is retried 0.5 s later: a1 waits for it, b0 does not."""
    order: list[str] = []
    attempts: Counter[str] = Counter()
    lock = threading.Lock()

    def handle(event: Step) -> None:
        label = f"{event.partition_key}{event.n}"
        with lock:
            attempts[label] += 1
            order.append(label if attempts[label] == 1 else f"{label} again")
        if label == "a0" and attempts[label] == 1:
            raise Retry(0.5, "not yet")

    with running(front, redis_url, prefix, f"ord-retry-{front}", handle):
        with EventBus(redis_url, prefix=prefix) as bus:
            bus.publish_many([Step(n=0, partition_key="a"), Step(n=1, partition_key="a"),
                              Step(n=0, partition_key="b")])
        wait_for(lambda: "a1" in order, 30, "a1 to be handled")
    # a0 and b0 start side by side (either may be first); b0 does not wait for a0's
    # retry, a1 does
    assert sorted(order) == ["a0", "a0 again", "a1", "b0"]
    assert order.index("a0") < order.index("a0 again") < order.index("a1")
    assert order.index("b0") < order.index("a0 again")


@pytest.mark.parametrize("front", FRONTS)
def test_a_dead_letter_hands_its_key_on(redis_url: str, prefix: str, raw: redis.Redis,
                                        front: str) -> None:
    seen: list[int] = []

    def handle(event: Step) -> None:
        if event.n == 0:
            raise Reject("bad")
        seen.append(event.n)

    with running(front, redis_url, prefix, f"ord-dlq-{front}", handle):
        with EventBus(redis_url, prefix=prefix) as bus:
            bus.publish_many([Step(n=n, partition_key="a") for n in range(3)])
            wait_for(lambda: seen == [1, 2], 30, "the events after the dead letter")
    assert raw.xlen(QueueKeys(prefix, f"sub:ord-dlq-{front}").dlq) == 1


@pytest.mark.parametrize("keys", [(None, None), ("a", "b")], ids=["no key", "two keys"])
@pytest.mark.parametrize("front", FRONTS)
def test_other_keys_and_keyless_events_run_beside_a_busy_one(
        redis_url: str, prefix: str, front: str, keys: tuple[str | None, str | None]) -> None:
    """The first event's handler waits until the second one's has started: that
    happens only if the second is not held back behind the first."""
    second_started = threading.Event()
    on_loop: list[asyncio.Event] = []
    done: list[int] = []

    def handle(event: Step) -> None:
        if event.n == 0:
            assert second_started.wait(10), "the second event was held back"
        else:
            second_started.set()
        done.append(event.n)

    async def handle_async(event: Step) -> None:  # both run on the service's loop
        if not on_loop:
            on_loop.append(asyncio.Event())
        if event.n == 0:
            await asyncio.wait_for(on_loop[0].wait(), 10)
        else:
            on_loop[0].set()
        done.append(event.n)

    with running(front, redis_url, prefix, f"ord-par-{front}",
                 handle if front == "sync" else handle_async):
        with EventBus(redis_url, prefix=prefix) as bus:
            bus.publish_many([Step(n=0, partition_key=keys[0]),
                              Step(n=1, partition_key=keys[1])])
        wait_for(lambda: sorted(done) == [0, 1], 30, "both events to be handled")


def test_a_service_that_is_not_ordered_frees_what_was_held(redis_url: str, prefix: str,
                                                          raw: redis.Redis) -> None:
    """While a0 runs in an ordered instance, a1..a4 are held; an instance started
    without ``ordered`` (the subscription is then not ordered) puts them back in the
    subscription's stream and handles them."""
    release = threading.Event()
    ordered_seen: list[int] = []
    plain_seen: list[int] = []
    held = QueueKeys(prefix, "sub:ord-off").held

    def slow(event: Step) -> None:
        ordered_seen.append(event.n)
        if event.n == 0:
            release.wait(20)

    try:
        with running("sync", redis_url, prefix, "ord-off", slow):
            with EventBus(redis_url, prefix=prefix) as bus:
                bus.publish_many([Step(n=n, partition_key="a") for n in range(5)])
            wait_for(lambda: raw.zcard(held) == 4, 10, "a1..a4 to be held")
            with EventBus(redis_url, prefix=prefix) as bus:
                info = bus.subscription_queue("ord-off")[0].get_info()
            assert info.waiting_messages == 4  # held back behind their key
            plain = Microservice("ord-off", **service_options(redis_url, prefix))
            plain.on(Step)(lambda e: plain_seen.append(e.n))
            with plain:
                plain.start()
                wait_for(lambda: sorted(plain_seen + ordered_seen[1:]) == [1, 2, 3, 4], 20,
                         "a1..a4 to be handled")
            assert ordered_seen[0] == 0 and raw.zcard(held) == 0
    finally:
        release.set()


def test_a_key_whose_holder_was_acknowledged_elsewhere_is_handed_on(
        redis_url: str, prefix: str, raw: redis.Redis) -> None:
    """A holder acknowledged without handing its key on (its done record exists) frees
    its key: at the periodic fetch when an entry waits for it, and at once when a new
    entry of its key arrives."""
    name = "ord-repair"
    keys = QueueKeys(prefix, f"sub:{name}")
    seen: list[str] = []

    def holder(event_id: str) -> tuple[str, bytes]:  # (hex in the order hash, done record)
        record = dedup_record(dedup_identity(Step.type_name(), event_id))
        return record.hex(), record

    stale_a, stale_b = holder("gone-a"), holder("gone-b")
    def now_ms() -> int:  # done records are scored by the server's time (and pruned by it)
        seconds, micros = raw.time()
        return int(seconds) * 1000 + int(micros) // 1000

    raw.hset(keys.order, mapping={"a": stale_a[0], "b": stale_b[0]})
    raw.zadd(keys.done, {stale_b[1]: now_ms()})  # b's holder is done, a's not yet
    with running("sync", redis_url, prefix, name,
                 lambda e: seen.append(f"{e.partition_key}{e.n}")):
        with EventBus(redis_url, prefix=prefix) as bus:
            bus.publish(Step(n=1, partition_key="a"))
            wait_for(lambda: raw.zcard(keys.held) == 1, 10, "a1 to wait for its key")
            bus.publish(Step(n=1, partition_key="b"))
            wait_for(lambda: "b1" in seen, 10, "b1 (its key's holder was done)")
            assert "a1" not in seen
            raw.zadd(keys.done, {stale_a[1]: now_ms()})  # now a's holder is done too
            wait_for(lambda: "a1" in seen, 20, "a1, at the periodic fetch")
    assert raw.zcard(keys.held) == 0
