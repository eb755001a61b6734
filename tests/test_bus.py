"""Tests for relaybus.bus: the EventBus rules, against a real server (no mocks).

Round trips are counted on the client side with a counting redis-py connection
class passed through the public ``client=`` seam: exact, and unaffected by other
clients of a shared test server (server-wide INFO commandstats would not be).
Outage and out-of-memory tests run on a private server they can kill or starve.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from relaybus import BrokerOutOfMemoryError, Event, EventBus
from relaybus.bus import ALL_EVENTS
from relaybus.embedded import find_server_binary
from relaybus.keys import GROUP, QueueKeys
from waiting import wait_for as wait_until

# -- events --------------------------------------------------------------------------


class OrderPlaced(Event, event_type="bustest.order_placed"):
    order_id: str


class OrderPaid(Event, event_type="bustest.order_paid"):
    order_id: str
    amount: float = 1.0


class OrderShipped(Event, event_type="bustest.order_shipped"):
    order_id: str


class NobodyListens(Event, event_type="bustest.nobody_listens"):
    n: int = 0


# -- helpers -------------------------------------------------------------------------


def route_all(bus: EventBus, limit: int = 1000) -> int:
    """Call route_once until the log has nothing left for this router; return the total."""
    total = 0
    for _ in range(limit):
        n = bus.route_once()
        if n == 0:
            return total
        total += n
    raise AssertionError("route_all did not drain the log")


def received(bus: EventBus, service: str) -> list[str]:
    """Event ids in a service's subscription queue, in order (duplicates kept)."""
    queue, _ = bus.subscription_queue(service)
    return [str(m.data["event_id"]) for m in queue.peek(count=1_000_000)]


def log_key(prefix: str) -> str:
    return QueueKeys(prefix, "all").stream


def log_rows(raw: redis.Redis, prefix: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The event log's entries, as the server holds them."""
    return cast("list[tuple[bytes, dict[bytes, bytes]]]", raw.xrange(log_key(prefix)))


def logged_event_ids(raw: redis.Redis, prefix: str) -> list[str]:
    return [str(json.loads(fields[b"d"])["event_id"]) for _, fields in log_rows(raw, prefix)]


def pending_in_log(raw: redis.Redis, prefix: str) -> int:
    return int(raw.xpending(log_key(prefix), GROUP)["pending"])


@dataclass
class Counts:
    round_trips: int = 0
    commands: int = 0
    by_name: Counter[str] = field(default_factory=Counter)

    def snapshot(self) -> tuple[int, int]:
        return self.round_trips, self.commands

    def count(self, args: Any) -> None:
        self.commands += 1
        self.by_name[str(args[0]).upper()] += 1


def counting_client(url: str) -> tuple[redis.Redis, Counts]:
    """A real client whose connections count round trips and commands.

    A round trip is a burst of requests written before the client reads a reply: a
    pipeline is one, however many commands it carries.
    """
    counts = Counts()

    class CountingConnection(redis.Connection):
        _sending = False

        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            if not self._sending:
                counts.round_trips += 1
                self._sending = True
            super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]

        def read_response(self, *args: Any, **kwargs: Any) -> Any:
            self._sending = False
            return super().read_response(*args, **kwargs)

        def send_command(self, *args: Any, **kwargs: Any) -> None:
            counts.count(args)
            super().send_command(*args, **kwargs)  # type: ignore[no-untyped-call]

        def pack_command(self, *args: Any) -> Any:
            counts.count(args)
            return super().pack_command(*args)  # type: ignore[no-untyped-call]

        def pack_commands(self, commands: Any) -> Any:
            commands = list(commands)
            for args in commands:
                counts.count(args)
            return super().pack_commands(commands)  # type: ignore[no-untyped-call]

    return redis.Redis.from_url(url, connection_class=CountingConnection), counts


@pytest.fixture
def make_bus(redis_url: str, prefix: str) -> Iterator[Callable[..., EventBus]]:
    """A factory of EventBus objects on the test server and prefix, all closed afterwards."""
    buses: list[EventBus] = []

    def make(**options: Any) -> EventBus:
        options.setdefault("retry_timeout", 5.0)
        bus = EventBus(options.pop("url", redis_url), prefix=options.pop("prefix", prefix),
                       **options)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        bus.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateServer:
    """A server process of our own (AOF on every write) that a test may kill and restart."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        cmd = [find_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "always",
               "--save", "", "--daemonize", "no", "--logfile", str(self.data_dir / "log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_timeout=0.5)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                return False

        try:
            wait_until(answers, timeout=15, what=f"server on port {self.port}")
        finally:
            client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[PrivateServer]:
    server = PrivateServer(tmp_path)
    server.start()
    yield server
    if server.proc is not None:
        server.kill()


# -- subscriptions ---------------------------------------------------------------------


def test_subscriptions_live_in_redis_and_every_bus_sees_them(
        make_bus: Callable[..., EventBus], redis_url: str) -> None:
    first = make_bus()
    assert first.subscribe("billing", [OrderPlaced]) == "sub:billing"
    second = make_bus()  # another EventBus object: same server, same prefix
    assert second.subscriptions() == {"billing": ["bustest.order_placed"]}
    other_prefix = make_bus(prefix=f"other{uuid.uuid4().hex[:8]}:")
    assert other_prefix.subscriptions() == {}

    event = OrderPlaced(order_id="o-1")
    first.publish(event)
    assert route_all(second) == 1  # routes by a table it never built itself
    assert received(second, "billing") == [event.event_id]


def test_publish_needs_no_running_processor(make_bus: Callable[..., EventBus],
                                            raw: redis.Redis, prefix: str) -> None:
    publisher = make_bus()
    assert not publisher.running
    publisher.subscribe("billing", [OrderPlaced])
    msg_id = publisher.publish(OrderPlaced(order_id="o-1"))
    assert raw.xlen(log_key(prefix)) == 1
    assert log_rows(raw, prefix)[0][0].decode() == msg_id
    router = make_bus()
    assert route_all(router) == 1
    assert len(received(router, "billing")) == 1


def test_subscribe_takes_classes_and_names(make_bus: Callable[..., EventBus]) -> None:
    bus = make_bus()
    bus.subscribe("mixed", [OrderPaid, "bustest.order_placed", "made.up.name"])
    bus.subscribe("one_class", OrderShipped)
    bus.subscribe("one_name", "bustest.order_paid")
    assert bus.subscriptions() == {
        "mixed": ["bustest.order_paid", "bustest.order_placed", "made.up.name"],
        "one_class": ["bustest.order_shipped"],
        "one_name": ["bustest.order_paid"],
    }


def test_subscribe_rejects_what_it_cannot_use(make_bus: Callable[..., EventBus]) -> None:
    bus = make_bus()
    with pytest.raises(ValueError):
        bus.subscribe("svc", [])
    with pytest.raises(ValueError):  # InvalidNameError is a ValueError
        bus.subscribe("bad name", None)
    with pytest.raises(TypeError):
        bus.subscribe("svc", [Event])  # abstract: no event type
    assert bus.subscriptions() == {}


def test_subscribe_again_replaces_the_types(make_bus: Callable[..., EventBus]) -> None:
    bus = make_bus()
    bus.subscribe("svc", [OrderPlaced])
    bus.subscribe("svc", [OrderPaid])
    assert bus.subscriptions() == {"svc": ["bustest.order_paid"]}
    placed, paid = OrderPlaced(order_id="a"), OrderPaid(order_id="a")
    bus.publish_many([placed, paid])
    route_all(bus)
    assert received(bus, "svc") == [paid.event_id]


def test_wildcard_subscription_gets_types_defined_after_it(
        make_bus: Callable[..., EventBus]) -> None:
    bus = make_bus()
    bus.subscribe("audit", None)
    assert bus.subscriptions() == {"audit": [ALL_EVENTS]}
    late_name = f"bustest.late.{uuid.uuid4().hex}"

    class DefinedLater(Event, event_type=late_name):
        n: int

    event = DefinedLater(n=1)
    bus.publish(event)
    route_all(bus)
    assert received(bus, "audit") == [event.event_id]


def test_unsubscribe_stops_routing_and_keeps_the_queue(
        make_bus: Callable[..., EventBus]) -> None:
    bus = make_bus()
    bus.subscribe("svc", [OrderPlaced])
    first = OrderPlaced(order_id="1")
    bus.publish(first)
    route_all(bus)
    assert bus.unsubscribe("svc") is True
    assert bus.unsubscribe("svc") is False
    assert bus.subscriptions() == {}
    bus.publish(OrderPlaced(order_id="2"))
    route_all(bus)
    assert received(bus, "svc") == [first.event_id]  # what waited there is kept
    assert bus.stats_counters()["unrouted"] == 1


# -- publishing ------------------------------------------------------------------------


def test_publish_many_is_one_round_trip(redis_url: str, prefix: str, raw: redis.Redis) -> None:
    client, counts = counting_client(redis_url)
    with EventBus(prefix=prefix, client=client) as bus:
        bus.publish_many([])  # warm up: connection, server check
        client.ping()
        events = [OrderPlaced(order_id=str(i)) for i in range(50)]
        round_trips, xadds = counts.round_trips, counts.by_name["XADD"]
        ids = bus.publish_many(events)
        assert (counts.round_trips - round_trips, counts.by_name["XADD"] - xadds) == (1, 50)
    assert [r[0].decode() for r in log_rows(raw, prefix)] == ids
    assert logged_event_ids(raw, prefix) == [e.event_id for e in events]
    client.close()


def test_publish_takes_events_only(make_bus: Callable[..., EventBus]) -> None:
    bus = make_bus()
    with pytest.raises(TypeError):
        bus.publish({"event_type": "x"})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        bus.publish_many([OrderPlaced(order_id="1"), "nope"])  # type: ignore[list-item]
    assert bus.events_queue.get_info().message_count == 0  # all-or-nothing encoding


# -- routing -----------------------------------------------------------------------------


def test_each_matching_subscription_gets_exactly_one_copy(
        make_bus: Callable[..., EventBus]) -> None:
    bus = make_bus(batch_size=7)  # several batches
    bus.subscribe("orders", [OrderPlaced, OrderPaid])
    bus.subscribe("shipping", [OrderPaid, OrderShipped])
    bus.subscribe("audit", None)
    bus.subscribe("audit_too", [OrderPlaced, ALL_EVENTS])  # a type and the wildcard
    events: list[Event] = []
    for i in range(20):
        events += [OrderPlaced(order_id=str(i)), OrderPaid(order_id=str(i)),
                   OrderShipped(order_id=str(i)), NobodyListens(n=i)]
    bus.publish_many(events)
    assert route_all(bus) == len(events)

    def expect(*types: type[Event]) -> list[str]:
        return [e.event_id for e in events if not types or isinstance(e, types)]

    assert received(bus, "orders") == expect(OrderPlaced, OrderPaid)
    assert received(bus, "shipping") == expect(OrderPaid, OrderShipped)
    assert received(bus, "audit") == expect()
    assert received(bus, "audit_too") == expect()


def test_same_event_published_twice_reaches_each_subscriber_once(
        make_bus: Callable[..., EventBus]) -> None:
    bus = make_bus()
    bus.subscribe("a", [OrderPlaced])
    bus.subscribe("b", None)
    event = OrderPlaced(order_id="1")
    bus.publish(event)
    bus.publish(event)  # e.g. a client retry, same batch
    route_all(bus)
    bus.publish(event)  # and again, in a later batch
    route_all(bus)
    assert received(bus, "a") == [event.event_id]
    assert received(bus, "b") == [event.event_id]
    assert bus.stats_counters()["routed"] == 3


def test_dedup_lasts_for_the_window_only(make_bus: Callable[..., EventBus]) -> None:
    bus = make_bus(dedup_window=0.05)
    bus.subscribe("a", [OrderPlaced])
    event = OrderPlaced(order_id="1")
    bus.publish(event)
    route_all(bus)
    routed_at = time.time()
    wait_until(lambda: time.time() > routed_at + 0.1, what="the dedup window to pass")
    bus.publish(event)
    route_all(bus)
    assert received(bus, "a") == [event.event_id, event.event_id]


def test_routing_needs_no_event_class(make_bus: Callable[..., EventBus],
                                      raw: redis.Redis, prefix: str) -> None:
    bus = make_bus()
    bus.subscribe("svc", ["never.defined.anywhere"])
    payload = {"event_type": "never.defined.anywhere", "event_id": "id-1", "x": 1}
    raw.xadd(log_key(prefix), {"d": json.dumps(payload), "t": int(time.time() * 1000)})
    assert route_all(bus) == 1
    assert received(bus, "svc") == ["id-1"]


def test_a_big_batch_is_copied_once_and_in_order(make_bus: Callable[..., EventBus]) -> None:
    """More events than route.lua handles per step, a re-published one across steps."""
    bus = make_bus(batch_size=2000)
    bus.subscribe("svc", None)
    events = [OrderPlaced(order_id=str(i)) for i in range(1100)]
    bus.publish_many([*events[:1050], events[10], *events[1050:]])
    assert bus.route_once() == 1101  # one batch
    assert received(bus, "svc") == [e.event_id for e in events]


def test_an_entry_of_another_shape_is_copied_with_every_field(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    bus = make_bus()
    bus.subscribe("svc", ["bustest.order_placed"])
    fields = {"d": json.dumps({"event_type": "bustest.order_placed", "event_id": "e-1",
                               "order_id": "o-1"}),
              "t": "1700000000000", "h": json.dumps({"trace": "abc"}), "custom": "kept",
              "e": "bustest.order_placed", "k": "e-1"}
    raw.xadd(log_key(prefix), fields)  # type: ignore[arg-type]
    assert route_all(bus) == 1
    queue, _ = bus.subscription_queue("svc")
    rows = cast("list[tuple[bytes, dict[bytes, bytes]]]", raw.xrange(queue.key))
    assert [{k.decode(): v.decode() for k, v in f.items()} for _, f in rows] == [fields]
    (message,) = queue.get_messages(count=1)
    assert message.headers == {"trace": "abc"}
    assert message.data["order_id"] == "o-1"


def test_entry_without_event_type_goes_to_the_bus_dlq(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    bus = make_bus()
    bus.subscribe("audit", None)
    raw.xadd(log_key(prefix), {"d": '{"x":1}', "t": int(time.time() * 1000)})
    good = OrderPlaced(order_id="1")
    bus.publish(good)
    assert route_all(bus) == 2
    dead = bus.events_dlq.peek(count=10)
    assert len(dead) == 1
    assert dead[0].data == {"x": 1}
    assert "event_type" in (dead[0].reason or "")
    assert pending_in_log(raw, prefix) == 0
    assert received(bus, "audit") == [good.event_id]  # not even the wildcard got it


@pytest.mark.parametrize("fields", [
    {"d": "{not json", "t": "1"},
    {"d": "[1, 2]", "t": "1"},
    {"t": "1", "e": "bustest.order_placed"},  # no payload at all
])
def test_malformed_entry_goes_to_the_bus_dlq(make_bus: Callable[..., EventBus],
                                             raw: redis.Redis, prefix: str,
                                             fields: dict[str, str]) -> None:
    bus = make_bus()
    bus.subscribe("audit", None)
    raw.xadd(log_key(prefix), fields)  # type: ignore[arg-type]
    bus.publish(OrderPlaced(order_id="1"))
    route_all(bus)
    dead = bus.events_dlq.peek(count=10)
    assert len(dead) == 1
    assert (dead[0].reason or "").startswith("malformed"), dead[0].reason
    assert pending_in_log(raw, prefix) == 0
    assert len(received(bus, "audit")) == 1


def test_event_without_subscriber_is_acknowledged_and_counted(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    bus = make_bus()
    bus.subscribe("svc", [OrderPlaced])
    bus.publish_many([NobodyListens(n=1), NobodyListens(n=2), OrderPlaced(order_id="1")])
    assert route_all(bus) == 3
    assert pending_in_log(raw, prefix) == 0
    counters = bus.stats_counters()
    assert counters["unrouted"] == 2
    assert counters["routed"] == 3
    assert raw.xlen(log_key(prefix)) == 3  # kept in the log for its retention


def test_route_once_costs_three_round_trips_whatever_the_batch(
        redis_url: str, prefix: str, raw: redis.Redis) -> None:
    """K events to S subscriptions, B of them undecodable or typeless: fetch, copy,
    settle, whatever K, S and B."""

    def measure(k: int, s: int, bad: int) -> tuple[int, int]:
        p = f"{prefix}k{k}s{s}b{bad}:"
        client, counts = counting_client(redis_url)
        try:
            with EventBus(prefix=p, client=client, batch_size=1000) as bus:
                for i in range(s):
                    bus.subscribe(f"svc{i}", [OrderPlaced] if i % 2 else None)
                assert bus.route_once() == 0  # warm up (and the first retention trim)
                events: list[Event] = [OrderPlaced(order_id=str(i)) for i in range(k)]
                events += [NobodyListens(n=i) for i in range(k // 10)]
                bus.publish_many(events)
                for i in range(bad):
                    raw.xadd(log_key(p), {"d": '{"no":"type"}' if i % 2 else "{broken"})
                before = counts.snapshot()
                assert bus.route_once() == len(events) + bad
                rt, cmds = counts.round_trips - before[0], counts.commands - before[1]
                assert len(received(bus, "svc0")) == len(events)  # svc0 takes every type
                assert bus.events_dlq.get_info().message_count == bad
            return rt, cmds
        finally:
            client.close()

    small, big = measure(10, 1, 2), measure(200, 5, 20)
    assert (small[0], big[0]) == (3, 3)
    # commands grow with subscriptions and kinds of failure, never with the events
    assert measure(200, 1, 2)[1] == small[1]


def test_rerouting_a_copied_but_unacknowledged_batch_adds_no_copy(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    """A router that died after copying, before acknowledging: its batch is routed again."""
    bus = make_bus()
    bus.subscribe("a", [OrderPlaced])
    bus.subscribe("b", None)
    events = [OrderPlaced(order_id=str(i)) for i in range(5)]
    bus.publish_many(events)
    route_all(bus)
    raw.xgroup_setid(log_key(prefix), GROUP, "0")  # the log forgets it routed them
    assert route_all(bus) == 5
    ids = [e.event_id for e in events]
    assert received(bus, "a") == ids
    assert received(bus, "b") == ids


def test_a_dead_routers_batch_is_taken_over_once(make_bus: Callable[..., EventBus],
                                                 raw: redis.Redis, prefix: str) -> None:
    dead = make_bus(consumer_id="dead-router", visibility_timeout=0.2)
    dead.subscribe("a", None)
    events = [OrderPlaced(order_id=str(i)) for i in range(10)]
    dead.publish_many(events)
    assert len(dead.events_queue.get_messages(count=4)) == 4  # fetched, then "killed"
    survivor = make_bus(consumer_id="survivor", visibility_timeout=0.2)
    assert route_all(survivor) == 6  # the new ones at once
    wait_until(lambda: survivor.route_once() == 4, what="the dead router's batch")
    assert sorted(received(survivor, "a")) == sorted(e.event_id for e in events)
    assert pending_in_log(raw, prefix) == 0


def test_a_failed_copy_is_not_acknowledged(private_server: PrivateServer) -> None:
    """The server refuses the copies (maxmemory): nothing is acknowledged, nothing lost."""
    admin = redis.Redis.from_url(private_server.url)
    with EventBus(private_server.url, prefix="oom:", visibility_timeout=0.1,
                  retry_timeout=2.0) as bus:
        bus.subscribe("a", None)
        events = [OrderPlaced(order_id=str(i)) for i in range(5)]
        bus.publish_many(events)
        admin.config_set("maxmemory", "1")
        try:
            with pytest.raises(BrokerOutOfMemoryError):
                bus.route_once()
            assert int(admin.xpending(log_key("oom:"), GROUP)["pending"]) == 5
        finally:
            admin.config_set("maxmemory", "0")
        wait_until(lambda: bus.route_once() == 5, what="the refused batch to be routed")
        assert received(bus, "a") == [e.event_id for e in events]
    admin.close()


def test_a_batch_that_keeps_killing_routers_is_dead_lettered(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    """Taken over more than max_deliveries times: to the bus DLQ, not retried forever."""
    dead = make_bus(consumer_id="dead-router", visibility_timeout=0.1, max_deliveries=1)
    dead.subscribe("a", None)
    dead.publish_many([OrderPlaced(order_id=str(i)) for i in range(3)])
    assert len(dead.events_queue.get_messages(count=10)) == 3  # delivery 1, then "killed"
    survivor = make_bus(consumer_id="survivor", visibility_timeout=0.1, max_deliveries=1)
    wait_until(lambda: survivor.route_once() == 3, what="the takeover")
    dead_lettered = survivor.events_dlq.peek(count=10)
    assert len(dead_lettered) == 3
    assert all("max deliveries" in (m.reason or "") for m in dead_lettered)
    assert received(survivor, "a") == []
    assert pending_in_log(raw, prefix) == 0
    assert survivor.stats_counters()["dead_lettered"] == 3


def test_expired_log_entry_goes_to_the_bus_dlq(make_bus: Callable[..., EventBus],
                                               raw: redis.Redis, prefix: str) -> None:
    bus = make_bus()
    bus.subscribe("a", None)
    payload = json.dumps({"event_type": "bustest.order_placed", "event_id": "e-1"})
    raw.xadd(log_key(prefix), {"d": payload, "t": 1, "x": 2, "e": "bustest.order_placed",
                               "k": "e-1"})
    assert route_all(bus) == 1
    assert [m.reason for m in bus.events_dlq.peek()] == ["expired"]
    assert received(bus, "a") == []


def test_subscription_made_while_the_router_waits_gets_the_next_event(
        redis_url: str, prefix: str, raw: redis.Redis) -> None:
    """The router read the table before it started waiting: it must read it again."""
    name = f"router-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url, client_name=name)
    with EventBus(prefix=prefix, client=client) as bus:
        bus.start()

        def router_waits() -> bool:  # blocked in XREADGROUP, with the table it read before
            return any(c.get("name") == name and c.get("cmd") == "xreadgroup"
                       and "b" in c.get("flags", "") for c in raw.client_list())

        wait_until(router_waits, what="the router to wait for events")
        bus.subscribe("late", [OrderPlaced])
        event = OrderPlaced(order_id="1")
        bus.publish(event)
        wait_until(lambda: received(bus, "late") == [event.event_id], what="routing")
        assert bus.stats_counters().get("unrouted", 0) == 0
    client.close()


# -- retention -------------------------------------------------------------------------


def test_retention_keeps_max_len_routed_events_and_never_trims_unrouted(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    bus = make_bus(retention_max_len=5, retention_seconds=None, batch_size=4)
    bus.trim_interval = float("inf")  # this test trims by hand
    bus.subscribe("svc", [OrderPlaced])
    events = [OrderPlaced(order_id=str(i)) for i in range(12)]
    bus.publish_many(events)
    assert bus.trim() == 0  # nothing routed yet: all 12 stay
    assert raw.xlen(log_key(prefix)) == 12

    assert bus.route_once() == 4
    assert bus.trim() == 4  # only the routed ones may go
    assert raw.xlen(log_key(prefix)) == 8

    fetched = bus.events_queue.get_messages(count=4)  # delivered but not yet routed
    assert len(fetched) == 4
    assert bus.trim() == 0
    bus.events_queue.acknowledge_messages([m.id for m in fetched])

    route_all(bus)
    assert bus.trim() == 3
    assert logged_event_ids(raw, prefix) == [e.event_id for e in events[-5:]]
    assert len(received(bus, "svc")) == 8  # the 4 acknowledged by hand were not routed


def test_retention_by_age_trims_only_routed_events(make_bus: Callable[..., EventBus],
                                                   raw: redis.Redis, prefix: str) -> None:
    bus = make_bus(retention_max_len=0, retention_seconds=0.0)
    bus.trim_interval = float("inf")  # this test trims by hand
    bus.subscribe("svc", None)
    bus.publish_many([OrderPlaced(order_id=str(i)) for i in range(3)])
    route_all(bus)
    routed_at = time.time()  # stream ids have millisecond resolution: let the clock move on
    wait_until(lambda: time.time() > routed_at + 0.005, what="the routed events to age")
    late = [OrderPlaced(order_id=str(i)) for i in range(2)]
    bus.publish_many(late)
    assert bus.trim() == 3  # the late ones may be past the age limit too, but are unrouted
    assert logged_event_ids(raw, prefix) == [e.event_id for e in late]


# -- the processor -----------------------------------------------------------------------


def test_started_bus_routes_in_the_background_and_stops(
        make_bus: Callable[..., EventBus]) -> None:
    with make_bus() as bus:
        bus.subscribe("svc", None)
        bus.start()
        bus.start()  # idempotent
        assert bus.running
        thread = bus.processor_thread
        assert thread is not None and thread.is_alive()
        event = OrderPlaced(order_id="1")
        bus.publish(event)
        wait_until(lambda: received(bus, "svc") == [event.event_id], what="routing")
    assert not bus.running
    assert not thread.is_alive()


def test_router_survives_a_broker_outage(private_server: PrivateServer,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relaybus.bus")
    bus = EventBus(private_server.url, prefix="outage:", retry_timeout=0.2)
    try:
        bus.subscribe("svc", None)
        bus.start()
        before = [OrderPlaced(order_id=str(i)) for i in range(3)]
        bus.publish_many(before)
        wait_until(lambda: len(received(bus, "svc")) == 3, what="routing before the outage")
        admin = redis.Redis.from_url(private_server.url)
        wait_until(lambda: pending_in_log(admin, "outage:") == 0, what="the acknowledgements")
        admin.close()

        private_server.kill()
        wait_until(lambda: bus.stats.get("errors", 0) >= 3, what="three failed router ticks")
        private_server.start()  # same port, state from the append-only file
        after = [OrderPlaced(order_id=f"after-{i}") for i in range(3)]
        bus.publish_many(after)
        expected = [e.event_id for e in before + after]
        wait_until(lambda: received(bus, "svc") == expected, timeout=20,
                   what="routing after the outage")
    finally:
        bus.close()

    messages = [r.getMessage() for r in caplog.records if r.name == "relaybus.bus"]
    assert sum("routing paused" in m for m in messages) == 1, messages
    assert sum("routing resumed" in m for m in messages) == 1, messages
