"""Microservice: handlers, retries, dead letters, shutdown, leases, duplicates, outages.

Every test runs against the real server of the session (``redis_url``) under its own
key prefix. Services run with short fetch blocks (``block_for_seconds``) so that
stopping them is quick; synchronisation is by events and polling with deadlines.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from helpers_service import Ping, Pong, Proxy, blocked_reads, child_command, hold_the_gil
from relaybus import (
    ConfigurationError,
    EmbeddedServer,
    Event,
    EventBus,
    Microservice,
    Reject,
    Retry,
    RetryPolicy,
    serialize_event,
)
from relaybus._core.consumer import Consumer
from relaybus._core.queue import QueueRef, QueueSettings
from relaybus.codec import Message
from relaybus.keys import QueueKeys
from relaybus.retry import (
    FALSE_REASON,
    MAX_EXPLICIT_DELAY,
    Action,
    backoff_ceiling,
    compute_backoff,
)
from relaybus.testing import named_url
from waiting import wait_for

Factory = Callable[..., Microservice]


@pytest.fixture
def bus(redis_url: str, prefix: str) -> Iterator[EventBus]:
    """A bus for publishing; tests route with :func:`publish` (no router thread)."""
    b = EventBus(redis_url, prefix=prefix)
    yield b
    b.close()


@pytest.fixture
def make(redis_url: str, prefix: str) -> Iterator[Factory]:
    """Build services with test-friendly defaults; every one is closed afterwards."""
    made: list[Microservice] = []

    def factory(name: str = "svc", **options: Any) -> Microservice:
        opts: dict[str, Any] = dict(url=redis_url, prefix=prefix, maintenance=False,
                                    block_for_seconds=0.2, retry_backoff=0.01,
                                    retry_backoff_max=0.05, shutdown_timeout=5.0)
        opts.update(options)
        svc = Microservice(name, **opts)
        made.append(svc)
        return svc

    yield factory
    for svc in made:
        svc.close()


def publish(bus: EventBus, *events: Event) -> None:
    """Publish: every subscription made before sees the events at once."""
    for e in events:
        bus.publish(e)


def dead_letters(svc: Microservice) -> list[Any]:
    return svc.subscription_dlq.peek(100)


# -- retry.py (pure) ------------------------------------------------------------------


def test_backoff_ceiling_doubles_from_base_and_is_capped() -> None:
    assert [backoff_ceiling(n, 0.5, 60.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert backoff_ceiling(8, 0.5, 60.0) == 60.0
    assert backoff_ceiling(10_000, 0.5, 60.0) == 60.0  # no overflow
    assert backoff_ceiling(0, 0.5, 60.0) == 0.5
    assert backoff_ceiling(3, 0.0, 60.0) == 0.0


def test_compute_backoff_is_full_jitter_within_the_ceiling() -> None:
    assert compute_backoff(3, 0.5, 60.0, rand=lambda: 0.0) == 0.0
    assert compute_backoff(3, 0.5, 60.0, rand=lambda: 0.5) == 1.0
    rng = random.Random(7)
    delays = [compute_backoff(4, 1.0, 60.0, rand=rng.random) for _ in range(2000)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    assert 3.6 < sum(delays) / len(delays) < 4.4  # uniform on [0, 8]
    assert max(delays) > 7.5 and min(delays) < 0.5


def test_retry_policy_decisions() -> None:
    policy = RetryPolicy(max_attempts=3, backoff=1.0, backoff_max=10.0)
    half = lambda: 0.5  # noqa: E731
    assert policy.decide(1, result=None).action is Action.ACK
    assert policy.decide(1, result=0).action is Action.ACK
    d = policy.decide(1, result=False)
    assert (d.action, d.reason) == (Action.DEAD_LETTER, FALSE_REASON)
    d = policy.decide(1, error=Reject("bad data"))
    assert (d.action, d.reason) == (Action.DEAD_LETTER, "bad data")
    d = policy.decide(2, error=ValueError("boom"), rand=half)
    assert (d.action, d.delay, d.reason) == (Action.RETRY, 1.0, "ValueError: boom")
    d = policy.decide(3, error=ValueError("boom"))
    assert d.action is Action.DEAD_LETTER
    assert d.reason == "max attempts (3) reached: ValueError: boom"
    d = policy.decide(1, error=Retry(delay=7.5, reason="later"))
    assert (d.action, d.delay) == (Action.RETRY, 7.5)
    assert policy.decide(1, error=Retry(), rand=half).delay == 0.5
    assert policy.decide(3, error=Retry(delay=1)).action is Action.DEAD_LETTER
    assert policy.decide(1, error=Retry(delay=-3)).delay == 0.0
    assert policy.decide(1, error=Retry(delay=float("nan"))).delay == 0.0
    assert policy.decide(1, error=Retry(delay=float("inf"))).delay == MAX_EXPLICIT_DELAY
    assert RetryPolicy(max_attempts=1).decide(1, error=KeyError("k")).action is Action.DEAD_LETTER


@pytest.mark.parametrize("kwargs", [dict(max_attempts=0), dict(max_attempts=True),
                                    dict(backoff=-1.0), dict(backoff=float("nan")),
                                    dict(backoff=2.0, backoff_max=1.0)])
def test_retry_policy_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**kwargs)


# -- construction -----------------------------------------------------------------------


def test_constructor_validates_and_does_not_connect() -> None:
    svc = Microservice("lazy", url="redis://127.0.0.1:1/0")  # nothing listens there
    assert svc.subscription_queue_name == "sub:lazy" and not svc.running
    assert svc.prefetch == 200  # fetch and settle in batches, still a bound
    assert Microservice("c", concurrency=128).prefetch == 256
    bad_options: list[dict[str, Any]] = [
        dict(concurrency=0), dict(concurrency=2, prefetch=1), dict(event_types=[]),
        dict(visibility_timeout=0), dict(shutdown_timeout=-1), dict(max_attempts=0)]
    for bad in bad_options:
        with pytest.raises(ConfigurationError):
            Microservice("bad", **bad)
    with pytest.raises(ConfigurationError):
        Microservice("has space")


def test_on_registers_one_handler_per_type() -> None:
    svc = Microservice("reg")

    @svc.on(Ping, "test.service.pong")
    def first(event: Event) -> None:
        pass

    assert set(svc.handlers) == {"test.service.ping", "test.service.pong"}
    with pytest.raises(ConfigurationError):
        svc.on(Ping)(lambda e: None)
    with pytest.raises(TypeError):
        svc.on()
    assert svc.on(Ping)(first) is first  # the same function again is fine


def test_a_service_without_handlers_does_not_start() -> None:
    with pytest.raises(ConfigurationError, match="no handlers"):
        Microservice("empty", url="redis://127.0.0.1:1/0").start()  # refused before connecting


# -- handling and subscriptions ---------------------------------------------------------------


def test_decorator_form_subscribes_to_its_types_and_handles(make: Factory, bus: EventBus) -> None:
    svc = make("billing")
    seen: list[tuple[str, int]] = []

    @svc.on(Ping)
    def on_ping(event: Ping) -> None:
        seen.append(("ping", event.n))

    @svc.on(Pong)
    def on_pong(event: Pong) -> str:
        seen.append(("pong", event.n))
        return "anything but False"

    svc.start()
    assert bus.subscriptions()["billing"] == ["test.service.ping", "test.service.pong"]
    publish(bus, Ping(n=1), Pong(n=2), Ping(n=3))
    wait_for(lambda: svc.stats["handled"] == 3, what="3 handled")
    assert sorted(seen) == [("ping", 1), ("ping", 3), ("pong", 2)]
    info = svc.subscription_queue.get_info()
    assert (info.message_count, info.pending_messages, info.delayed_messages) == (0, 0, 0)
    assert dead_letters(svc) == []


def test_subclass_form_subscribes_to_everything(bus: EventBus, redis_url: str,
                                                prefix: str) -> None:
    class Audit(Microservice):
        def __init__(self) -> None:
            super().__init__("audit", url=redis_url, prefix=prefix, maintenance=False,
                             block_for_seconds=0.2)
            self.seen: list[str] = []

        def handle_event(self, event: Event) -> bool:
            self.seen.append(event.event_type)
            return not (isinstance(event, Ping) and event.tag == "refuse")

    svc = Audit()
    try:
        svc.start()
        assert bus.subscriptions()["audit"] == ["*"]
        publish(bus, Ping(n=1), Pong(n=2), Ping(tag="refuse"))
        wait_for(lambda: svc.stats["handled"] == 2 and svc.stats["dead_lettered"] == 1)
        assert sorted(svc.seen) == ["test.service.ping", "test.service.ping",
                                    "test.service.pong"]
        [dead] = dead_letters(svc)
        assert dead.reason == FALSE_REASON
        assert dead.failures[-1]["handler"].endswith("Audit.handle_event")
    finally:
        svc.close()


def test_router_runs_inside_the_service_by_default(make: Factory, bus: EventBus) -> None:
    svc = make("routed", maintenance=True)
    handled = threading.Event()
    svc.on(Ping)(lambda e: handled.set())
    svc.start()
    assert svc.event_bus.running
    bus.publish(Ping())  # no test routing: the service's own router copies it
    assert handled.wait(10)
    svc.stop()
    assert not svc.event_bus.running


# -- failures ---------------------------------------------------------------------------


def test_fails_twice_then_succeeds(make: Factory, bus: EventBus) -> None:
    svc = make("flaky", max_attempts=5)
    calls: list[float] = []

    @svc.on(Ping)
    def handle(event: Ping) -> None:
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise ConnectionError("dependency down")

    svc.start()
    publish(bus, Ping())
    wait_for(lambda: svc.stats["handled"] == 1, what="handled after retries")
    stats = svc.stats
    assert len(calls) == 3
    assert (stats["failed"], stats["retried"], stats["dead_lettered"]) == (2, 2, 0)
    assert dead_letters(svc) == []
    info = svc.subscription_queue.get_info()
    assert (info.message_count, info.pending_messages, info.delayed_messages) == (0, 0, 0)


def test_exhaustion_dead_letters_with_the_failure_record(make: Factory, bus: EventBus) -> None:
    svc = make("doomed", max_attempts=3)
    calls = Counter[str]()

    @svc.on(Ping)
    def always_fails(event: Ping) -> None:
        calls[event.event_id] += 1
        raise ValueError(f"cannot handle {event.n}")

    svc.start()
    event = Ping(n=42)
    before = time.time()
    publish(bus, event)
    # the DLQ entry is visible before the settle reply reaches the service's counters
    wait_for(lambda: svc.stats["dead_lettered"] == 1, what="the dead letter counted")
    [dead] = dead_letters(svc)
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
    assert record["event_type"] == "test.service.ping" and record["event_id"] == event.event_id
    assert before - 1 <= record["published_at"] <= record["started_at"] <= record["finished_at"]
    # "timestamp" is the server's clock in whole milliseconds (the dead-letter script's)
    assert record["finished_at"] - 0.001 <= record["timestamp"] <= time.time()
    assert [f["attempt"] for f in dead.failures] == [1, 2, 3]
    assert all("retry_delay" in f for f in dead.failures[:2])
    assert svc.stats["failed"] == 3
    info = svc.subscription_queue.get_info()
    assert (info.message_count, info.delayed_messages) == (0, 0)


def test_false_reject_and_retry(make: Factory, bus: EventBus) -> None:
    svc = make("choices", max_attempts=3)
    retry_calls: list[float] = []

    @svc.on(Ping)
    def handle(event: Ping) -> bool:
        if event.tag == "false":
            return False
        if event.tag == "reject":
            raise Reject("order total is negative")
        if event.tag == "retry":
            retry_calls.append(time.monotonic())
            if len(retry_calls) == 1:
                raise Retry(delay=0.3, reason="stock not yet known")
        return True

    svc.start()
    publish(bus, Ping(tag="retry"), Ping(tag="false"), Ping(tag="reject"), Ping(tag="ok"))
    wait_for(lambda: svc.stats["handled"] == 2 and svc.stats["dead_lettered"] == 2)
    reasons = sorted(m.reason for m in dead_letters(svc))
    assert reasons == [FALSE_REASON, "order total is negative"]
    assert len(retry_calls) == 2 and retry_calls[1] - retry_calls[0] >= 0.28
    assert svc.stats["failed"] == 0 and svc.stats["retried"] == 1
    for m in dead_letters(svc):
        assert m.failures[-1]["attempt"] == 1 and "exception_type" not in m.failures[-1]


def test_a_waiting_retry_does_not_block_the_events_behind_it(make: Factory,
                                                               bus: EventBus) -> None:
    svc = make("fifo", concurrency=1, prefetch=1)
    order: list[str] = []

    @svc.on(Ping)
    def handle(event: Ping) -> None:
        order.append(event.tag)
        if event.tag == "first" and order.count("first") == 1:
            raise Retry(delay=0.5)

    svc.start()
    publish(bus, Ping(tag="first"), Ping(tag="second"), Ping(tag="third"))
    wait_for(lambda: svc.stats["handled"] == 3)
    assert order == ["first", "second", "third", "first"]


def test_invalid_entries_and_missing_handlers_are_dead_lettered(make: Factory,
                                                                 bus: EventBus) -> None:
    svc = make("strict", event_types=[Ping, Pong])
    svc.on(Ping)(lambda e: None)
    svc.start()
    queue = svc.subscription_queue
    queue.send_message({"event_type": "test.service.nosuch", "event_id": "u-1"})
    queue.send_message({"event_type": "test.service.ping", "event_id": "v-1", "n": "many"})
    publish(bus, Pong(n=1), Ping(n=2))
    wait_for(lambda: len(dead_letters(svc)) == 3 and svc.stats["handled"] == 1)
    by_reason = {m.reason: m for m in dead_letters(svc)}
    unknown = by_reason["unknown event type 'test.service.nosuch'"]
    assert unknown.failures[-1]["error_type"] == "UnknownEventTypeError"
    [invalid] = [m for r, m in by_reason.items() if r.startswith("invalid 'test.service.ping'")]
    assert invalid.failures[-1]["errors"][0]["loc"] == "n"
    assert invalid.data["n"] == "many"  # the payload is kept for inspection and requeue
    assert "no handler for event type 'test.service.pong' in service 'strict'" in by_reason
    assert svc.stats["invalid"] == 2
    info = queue.get_info()
    assert (info.message_count, info.pending_messages) == (0, 0)


def test_a_handler_bug_that_escapes_everything_does_not_kill_the_worker(
        make: Factory, bus: EventBus) -> None:
    svc = make("exits")
    done = threading.Event()

    @svc.on(Ping)
    def handle(event: Ping) -> None:
        if event.tag == "exit":
            raise SystemExit(3)  # a BaseException from a handler thread
        done.set()

    svc.start()
    publish(bus, Ping(tag="exit"), Ping(tag="fine"))
    assert done.wait(10)
    wait_for(lambda: svc.stats["retried"] == 1)


def test_an_event_whose_consumers_kept_dying_is_dead_lettered_unrun(
        make: Factory, raw: redis.Redis) -> None:
    svc = make("poisoned", max_attempts=3, visibility_timeout=0.2)
    calls: list[int] = []
    svc.on(Ping)(lambda e: calls.append(e.n))
    queue = svc.subscription_queue
    queue.send_message(serialize_event(Ping(n=1)))
    [[_, [(entry_id, _)]]] = raw.xreadgroup("relaybus", "ghost", {queue.key: ">"})
    for _ in range(2):  # two more deliveries to consumers that died
        raw.xclaim(queue.key, "relaybus", "ghost", 0, [entry_id])
    svc.start()  # takes it over: its fourth delivery
    [dead] = wait_for(lambda: dead_letters(svc))
    assert calls == []
    assert dead.reason is not None and dead.reason.startswith("max attempts (3) reached: "
                                                              "delivered 4 times")
    assert dead.failures[-1]["attempt"] == 4


def test_stop_from_inside_a_handler(make: Factory, bus: EventBus) -> None:
    svc = make("self-stopping")
    svc.on(Ping)(lambda e: svc.stop())
    svc.start()
    publish(bus, Ping())
    wait_for(lambda: not svc.running and svc.stats["handled"] == 1, what="stopped and acked")


# -- duplicates -------------------------------------------------------------------------


def test_two_events_of_different_types_sharing_an_id_are_both_handled_once(
        make: Factory, bus: EventBus) -> None:
    """The done record of one does not make the other look handled, and a copy of
    each, requeued into the subscription, is dropped as the duplicate it is."""
    svc = make("both")
    seen: list[str] = []
    svc.on(Ping)(lambda e: seen.append("ping"))
    svc.on(Pong)(lambda e: seen.append("pong"))
    svc.start()
    ping, pong = Ping(n=1, event_id="shared"), Pong(n=2, event_id="shared")
    publish(bus, ping, pong)
    wait_for(lambda: svc.stats["handled"] == 2, what="both handled")
    for event in (ping, pong):  # copies, as from a DLQ requeue or a redelivery
        svc.subscription_queue.send_message(serialize_event(event), dedup_key="shared")
    wait_for(lambda: svc.stats["duplicates"] == 2, what="both copies dropped")
    assert sorted(seen) == ["ping", "pong"]


def test_an_entry_with_thousands_of_fields_is_dead_lettered_and_its_neighbours_flow(
        make: Factory, bus: EventBus, raw: redis.Redis) -> None:
    """Too wide for Lua's unpack(): retried, then dead-lettered with only relaybus's
    own fields and a count of the dropped ones; the events around it are handled."""
    svc = make("wide", max_attempts=2)
    seen: list[int] = []

    @svc.on(Ping)
    def handle(event: Ping) -> None:
        if event.n == 2:
            raise ValueError("cannot handle the wide one")
        seen.append(event.n)

    svc.start()
    publish(bus, Ping(n=1))
    wide = Ping(n=2)
    fields: dict[str, Any] = {"d": json.dumps(serialize_event(wide)),
                              "t": int(time.time() * 1000),
                              "k": wide.event_id, "e": wide.event_type}
    fields.update({f"junk{i}": "x" for i in range(5000)})
    raw.xadd(QueueKeys(svc.prefix, "all").stream, fields)
    publish(bus, Ping(n=3))
    wait_for(lambda: svc.stats["dead_lettered"] == 1, what="the wide one dead-lettered")
    [dead] = dead_letters(svc)
    assert dead.data["n"] == 2 and dead.failures[0]["dropped_fields"] == 5000  # at the retry
    assert set(dead.fields) <= {b"d", b"t", b"k", b"e", b"f", b"n"}
    wait_for(lambda: sorted(seen) == [1, 3], what="the neighbours handled")


def test_duplicates_are_not_handled_again(make: Factory, bus: EventBus) -> None:
    svc = make("once")
    calls = Counter[str]()
    marker = threading.Event()

    @svc.on(Ping)
    def handle(event: Ping) -> None:
        calls[event.event_id] += 1
        if event.tag == "marker":
            marker.set()

    svc.start()
    event = Ping(n=1)
    publish(bus, event, event)  # published twice
    wait_for(lambda: svc.stats["handled"] == 1)
    # requeued after success (as from a DLQ, or a redelivery), then a marker behind it
    svc.subscription_queue.send_message(serialize_event(event), dedup_key=event.event_id)
    publish(bus, Ping(tag="marker"))
    assert marker.wait(10)
    # the copy waits in the service's own stream, read at the next periodic fetch
    wait_for(lambda: svc.stats["duplicates"] == 1, what="the copy dropped as a duplicate")
    assert calls[event.event_id] == 1
    assert svc.stats["handled"] == 2


# -- concurrency and backpressure --------------------------------------------------------------


def test_concurrency_with_a_bounded_prefetch(make: Factory, bus: EventBus) -> None:
    svc = make("wide", concurrency=3, prefetch=4)
    gate = threading.Event()
    lock = threading.Lock()
    running = 0
    peak = 0

    @svc.on(Ping)
    def handle(event: Ping) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        gate.wait(10)
        with lock:
            running -= 1

    svc.start()
    publish(bus, *[Ping(n=i) for i in range(10)])
    wait_for(lambda: running == 3, what="3 handlers running")
    info = wait_for(lambda: (i := svc.subscription_queue.get_info()).pending_messages == 4 and i,
                    what="4 held")
    assert info.waiting_messages == 6  # the rest stays in Redis, not in this process
    for _ in range(5):  # the bound holds while the handlers stay busy
        assert svc.subscription_queue.get_info().pending_messages == 4
        assert svc.stats["received"] == 4
    gate.set()
    wait_for(lambda: svc.stats["handled"] == 10)
    assert peak == 3


def test_a_finished_event_is_acknowledged_while_another_handler_still_runs(
        make: Factory, bus: EventBus, raw: redis.Redis) -> None:
    # the settler wakes when a batch's first event finishes (its delay starts then),
    # not only when the batch is due: else this ack would wait for the lease extension
    svc = make("acks", concurrency=2, visibility_timeout=60)
    gates = [threading.Event(), threading.Event()]
    running: set[int] = set()

    @svc.on(Ping)
    def handle(event: Ping) -> None:
        running.add(event.n)
        gates[event.n].wait(30)

    svc.start()
    publish(bus, Ping(n=0), Ping(n=1))
    wait_for(lambda: running == {0, 1}, what="both handlers running")
    gates[1].set()  # n=1 finishes long after its fetch, while n=0 runs on
    log = QueueKeys(svc.prefix, "all").stream
    wait_for(lambda: len(raw.xpending_range(log, "sub:acks", "-", "+", 10)) == 1,
             timeout=5, what="n=1 acknowledged")
    assert svc.stats["handled"] == 1
    gates[0].set()
    wait_for(lambda: svc.stats["handled"] == 2)


# -- shutdown, crashes and leases ------------------------------------------------------------


def test_a_stopped_service_leaves_nothing_pending_in_the_log(make: Factory, bus: EventBus,
                                                            raw: redis.Redis) -> None:
    """Entries of types it does not take, read with the one it handles, are acknowledged
    too (:func:`test_the_stop_hands_back_what_it_holds_and_acknowledges_what_it_skipped`
    covers a stop that comes before the next settle batch would have carried them)."""
    svc = make("picky", event_types=[Ping], maintenance=False)
    seen: list[int] = []
    svc.on(Ping)(lambda e: seen.append(e.n))
    bus.subscribe("picky", [Ping])
    bus.publish_many([Pong(n=1), Ping(n=2), Pong(n=3)])  # one read takes all three
    svc.start()
    wait_for(lambda: seen == [2], what="the Ping handled")
    svc.stop()
    log = QueueKeys(svc.prefix, "all").stream
    assert raw.xpending(log, "sub:picky")["pending"] == 0
    assert svc.mq.stats["skipped"] == 2


def test_the_stop_hands_back_what_it_holds_and_acknowledges_what_it_skipped() -> None:
    """The consumer's last settlement: unstarted messages handed back, the log entries of
    other types read since the last batch acknowledged, the group left."""
    ref = QueueRef(QueueSettings(prefix="p:"), "sub:picky")
    consumer = Consumer(ref, "c1", prefetch=10)
    message = Message("all/1-1", {}, 1.0)
    consumer._skip_inbox += ["all/1-2"]  # what the fetch flow reports as skipped
    consumer.fetched([message], now=0.0)
    consumer._skip_inbox += ["all/1-3"]  # skipped by a fetch whose messages were not taken in
    consumer.stop()
    last = consumer.hand_back()
    assert last.acks == ["all/1-2", "all/1-3"] and last.release == ["all/1-1"] and last.forget
    assert not consumer.held and not consumer.skipped


def test_graceful_stop_finishes_in_flight_and_leaves_the_rest_pending(make: Factory,
                                                                      bus: EventBus) -> None:
    first = make("graceful", concurrency=2, prefetch=3, visibility_timeout=0.5)
    gate = threading.Event()
    started: list[int] = []

    @first.on(Ping)
    def slow(event: Ping) -> None:
        started.append(event.n)
        gate.wait(10)

    first.start()
    publish(bus, *[Ping(n=i) for i in range(6)])
    wait_for(lambda: len(started) == 2 and first.stats["received"] == 3)
    stopper = threading.Thread(target=first.stop)
    stopper.start()
    wait_for(lambda: not first.running, what="stop begun")
    stopper.join(0.3)
    assert stopper.is_alive()  # waiting for the two running handlers
    gate.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert first.stats["handled"] == 2 and sorted(started) == [0, 1]
    info = first.subscription_queue.get_info()
    assert (info.pending_messages, info.waiting_messages) == (1, 3)  # fetched-not-started: pending

    second = make("graceful", visibility_timeout=0.5)
    seen: list[int] = []
    second.on(Ping)(lambda e: seen.append(e.n))
    second.start()
    wait_for(lambda: second.stats["handled"] == 4, what="the rest handled elsewhere")
    assert sorted(seen) == [2, 3, 4, 5]  # the two finished ones were not redelivered


def test_stop_timeout_abandons_a_stuck_handler(make: Factory, bus: EventBus) -> None:
    svc = make("stuck", visibility_timeout=0.5)
    gate = threading.Event()
    started = threading.Event()

    @svc.on(Ping)
    def stuck(event: Ping) -> None:
        started.set()
        gate.wait(10)

    svc.start()
    publish(bus, Ping())
    assert started.wait(10)
    t0 = time.monotonic()
    svc.stop(timeout=0.2)
    assert time.monotonic() - t0 < 2.0
    assert svc.subscription_queue.get_info().pending_messages == 1
    gate.set()  # an abandoned handler that finishes late still settles its event
    wait_for(lambda: svc.stats["handled"] == 1)


def test_a_sigkilled_instance_s_events_are_handled_by_another(redis_url: str, prefix: str,
                                                               make: Factory,
                                                               bus: EventBus) -> None:
    child = subprocess.Popen(child_command("hold", redis_url, prefix, "crashy", "1.0"),
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        publish(bus, *[Ping(n=i) for i in range(3)])
        assert child.stdout.readline().strip() == "started 0"
        queue = bus.mq.get_queue("sub:crashy")
        assert queue is not None
        # it holds the running event, and the next one if they were fetched together
        # (with concurrency 1 the fetcher refills only between handler runs)
        wait_for(lambda: queue.get_info().pending_messages >= 1, what="child holding events")
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
        child.wait()

    survivor = make("crashy", visibility_timeout=1.0)
    seen = Counter[int]()
    survivor.on(Ping)(lambda e: seen.update([e.n]))
    t0 = time.monotonic()
    survivor.start()
    wait_for(lambda: seen[2] == 1, what="the never-fetched event")
    wait_for(lambda: survivor.stats["handled"] == 3, what="the dead instance's events")
    assert seen == Counter({0: 1, 1: 1, 2: 1})
    assert time.monotonic() - t0 < 8
    assert dead_letters(survivor) == []


def test_a_long_handler_keeps_its_lease(make: Factory, bus: EventBus, raw: redis.Redis) -> None:
    vt = 0.5
    calls: list[str] = []
    started = threading.Event()

    def slow(event: Ping) -> None:
        calls.append(event.event_id)
        started.set()
        threading.Event().wait(3 * vt + 0.1)  # the work: three visibility timeouts

    instances = [make("patient", visibility_timeout=vt) for _ in range(2)]
    for svc in instances:
        svc.on(Ping)(slow)
        svc.start()
    publish(bus, Ping())
    assert started.wait(10)
    log = QueueKeys(instances[0].prefix, "all").stream  # read through the group sub:patient
    deliveries: set[int] = set()
    while sum(s.stats["handled"] for s in instances) == 0:  # sample the PEL while it runs
        deliveries.update(int(p["times_delivered"])
                          for p in raw.xpending_range(log, "sub:patient", "-", "+", 10))
        time.sleep(0.02)  # sampling interval
    assert deliveries == {1}  # never reclaimed, by the other instance or its own
    assert len(calls) == 1
    assert sum(s.stats["received"] for s in instances) == 1
    assert sum(s.stats["lease_lapsed"] for s in instances) == 0


def test_a_handler_holding_the_gil_past_its_lease_is_logged_and_counted(
        make: Factory, bus: EventBus, caplog: pytest.LogCaptureFixture) -> None:
    vt = 0.3
    svc = make("frozen", visibility_timeout=vt)
    svc.on(Ping)(lambda e: hold_the_gil(3 * vt))
    svc.start()
    with caplog.at_level(logging.WARNING, logger="relaybus"):
        publish(bus, Ping())
        wait_for(lambda: svc.stats["handled"] == 1)
    assert svc.stats["lease_lapsed"] == 1
    [line] = [r.getMessage() for r in caplog.records if "lapsed" in r.getMessage()]
    assert "while its handler ran" in line and "visibility timeout 0.3 s" in line


def test_run_forever_returns_after_stop_from_another_thread(make: Factory) -> None:
    svc = make("forever")
    svc.on(Ping)(lambda e: None)
    runner = threading.Thread(target=svc.run_forever)
    runner.start()
    wait_for(lambda: svc.running)
    svc.stop()
    runner.join(5)
    assert not runner.is_alive() and not svc.running
    svc.start()  # a stopped service starts again
    assert svc.running


# -- the broker going away -----------------------------------------------------------------


def test_a_broker_outage_does_not_end_the_loop(redis_url: str, prefix: str, bus: EventBus,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="relaybus.worker")
    proxy = Proxy(redis_url)
    svc = Microservice("outage", url=proxy.url, prefix=prefix, maintenance=False,
                       block_for_seconds=0.2, retry_timeout=0.2)
    seen: list[int] = []
    svc.on(Ping)(lambda e: seen.append(e.n))
    try:
        svc.start()
        publish(bus, Ping(n=1))
        wait_for(lambda: seen == [1])
        proxy.cut()
        wait_for(lambda: [r for r in caplog.records if "still failing" in r.getMessage()],
                 what="several failed fetches")
        publish(bus, Ping(n=2))  # sent straight to the server meanwhile
        proxy.restore()
        wait_for(lambda: seen == [1, 2], what="handling to resume")
        fetch_logs = [r for r in caplog.records if "fetching" in r.getMessage()]
        assert sum("broker unavailable" in r.getMessage() for r in fetch_logs) == 1
        assert any("broker is back" in r.getMessage() for r in fetch_logs)
    finally:
        svc.close()
        proxy.close()


# -- cost when idle ---------------------------------------------------------------------------


def test_an_idle_worker_blocks_instead_of_polling(make: Factory, tmp_path: Path) -> None:
    # a private server: INFO commandstats counts every client's commands, and another
    # test's service still stopping on a shared server would be counted too
    server = EmbeddedServer(str(tmp_path))
    url = server.start().url
    raw = redis.Redis.from_url(url)
    try:
        _idle_calls(make, raw, url)
    finally:
        raw.close()
        server.stop()


def _idle_calls(make: Factory, raw: redis.Redis, url: str) -> None:
    svc = make("idle", block_for_seconds=2.0, visibility_timeout=30.0, url=url)  # defaults
    svc.on(Ping)(lambda e: None)
    svc.start()

    def calls() -> Counter[str]:
        stats = raw.info("commandstats")
        return Counter({c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
                        for c in ("evalsha", "eval", "xreadgroup")})

    wait_for(lambda: calls()["xreadgroup"] > 0, what="the worker's first read")
    start = calls()
    threading.Event().wait(4.0)  # a measurement window, not synchronisation
    used = calls() - start
    # idle: one blocking XREADGROUP on the log per 2 s, and the fetch script (its own
    # stream, reclaim, due retries; it reads once inside) every min(vt / 4, 2 s); the
    # server counts commands run inside scripts too
    scripts = used["evalsha"] + used["eval"]
    assert scripts <= 3, used
    # two 2 s reads fit in the window, and one more can end at each of its edges; a
    # polling worker would send hundreds
    assert used["xreadgroup"] - scripts <= 4, used
    svc.close()


def test_a_blocking_read_waiting_at_stop_hands_back_what_it_brings(
        make: Factory, bus: EventBus, raw: redis.Redis, redis_url: str) -> None:
    """A stop returns while the fetcher's blocking read still waits on the server; an
    event published then is delivered to that read: it is handed back at once, so the
    next instance handles it now, not a visibility timeout (30 s) later."""
    tag = f"late-{uuid.uuid4().hex[:8]}"
    first = make("late", block_for_seconds=5.0, url=named_url(redis_url, tag))
    first.on(Ping)(lambda e: None)
    first.start()
    wait_for(lambda: blocked_reads(raw, tag) == 1, what="the fetcher's blocking read")
    first.stop()
    assert blocked_reads(raw, tag) == 1  # still waiting on the server
    seen: list[int] = []
    second = make("late")
    second.on(Ping)(lambda e: seen.append(e.n))
    publish(bus, Ping(n=7))
    second.start()
    wait_for(lambda: seen == [7], what="the event handled by the next instance")


def test_a_fetch_still_waiting_at_stop_does_not_recreate_a_deleted_subscription(
        make: Factory, redis_url: str, prefix: str) -> None:
    from relaybus.testing import delete_prefix, plain_client

    svc = make("lingering", block_for_seconds=2.0)  # its fetch outlives the stop's wait
    svc.on(Ping)(lambda event: None)
    svc.start()
    fetchers = [t for t in threading.enumerate() if t.name.startswith("relaybus-lingering")
                and t.name.endswith("-fetch")]
    assert fetchers
    svc.close()
    delete_prefix(redis_url, prefix)  # a test's cleanup, or a removed subscription
    for thread in fetchers:
        thread.join(10)  # its blocking read returns: the log it waited on is gone
        assert not thread.is_alive()
    client = plain_client(redis_url)
    try:
        assert [k for k in client.scan_iter(match=prefix + "*")] == []
    finally:
        client.close()
