"""Tests for relaybus.bus: the EventBus rules, against a real server (no mocks).

Events travel by native consumer-group fan-out: ``publish`` appends to the event log
``P{all}``; each subscription reads it through a consumer group of its own. A test
"receives" by reading a subscription with the queue API (``get_messages`` on
``bus.subscription_queue(name)[0]``) and acknowledging what it read.

Round trips are counted on the client side with a counting redis-py connection
class passed through the public ``client=`` seam: exact, and unaffected by other
clients of a shared test server (server-wide INFO commandstats would not be).
Outage and out-of-memory tests run on a private server they can kill or starve.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pydantic
import pytest
import redis

from relaybus import (
    AsyncEventBus,
    BrokerOutOfMemoryError,
    Event,
    EventBus,
    InvalidNameError,
    Message,
    Queue,
    SerializationError,
)
from relaybus.bus import ALL_EVENTS
from relaybus.codec import dedup_record
from relaybus.embedded import find_server_binary
from relaybus.events import resolve_event_type
from relaybus.keys import QueueKeys
from relaybus.testing import one_server
from streams import lag
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


def consume(queue: Queue, *, count: int = 1000, ack: bool = True) -> list[Message]:
    """Read ``queue`` until a read finds nothing (acknowledging each batch); all it read."""
    out: list[Message] = []
    while True:
        batch = queue.get_messages(count=count)
        if not batch:
            return out
        out += batch
        if ack:
            queue.acknowledge_messages([m.id for m in batch])


def event_ids(messages: list[Message]) -> list[str]:
    return [str(m.data["event_id"]) for m in messages]


def received(bus: EventBus, service: str) -> list[str]:
    """Event ids a fresh reader of the service's subscription gets now, in order
    (acknowledged, so a second call gets only what came since)."""
    queue, _ = bus.subscription_queue(service)
    return event_ids(consume(queue))


def log_key(prefix: str) -> str:
    return QueueKeys(prefix, "all").stream


def log_rows(raw: redis.Redis, prefix: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The event log's entries, as the server holds them."""
    return cast("list[tuple[bytes, dict[bytes, bytes]]]", raw.xrange(log_key(prefix)))


def logged_event_ids(raw: redis.Redis, prefix: str) -> list[str]:
    return [str(json.loads(fields[b"d"])["event_id"]) for _, fields in log_rows(raw, prefix)]


def groups_on_log(raw: redis.Redis, prefix: str) -> list[dict[str, Any]]:
    """XINFO GROUPS of the log (none before the first event made the stream)."""
    if not raw.exists(log_key(prefix)):
        return []
    groups: list[dict[str, Any]] = raw.xinfo_groups(log_key(prefix))
    return groups


def group_on_log(raw: redis.Redis, prefix: str, service: str) -> dict[str, Any] | None:
    """XINFO GROUPS of the log for the subscription's group ``sub:SERVICE`` (None: none)."""
    for group in groups_on_log(raw, prefix):
        if group["name"].decode() == f"sub:{service}":
            return group
    return None


def settled(raw: redis.Redis, prefix: str, service: str) -> bool:
    """The subscription's group has read the whole log and holds nothing unacknowledged."""
    group = group_on_log(raw, prefix, service)
    assert group is not None, f"no group sub:{service} on the log"
    return bool(group["pending"] == 0
                and lag(raw, log_key(prefix), group) == 0)


@dataclass
class Counts:
    round_trips: int = 0
    commands: int = 0
    by_name: Counter[str] = field(default_factory=Counter)

    def snapshot(self) -> tuple[int, int]:
        return self.round_trips, self.commands

    def count_packed(self, data: bytes) -> None:
        """Count the commands in a buffer of RESP arrays of bulk strings."""
        pos = 0
        while pos < len(data):
            assert data[pos:pos + 1] == b"*", data[pos:pos + 20]
            end = data.index(b"\r\n", pos)
            n, pos = int(data[pos + 1:end]), end + 2
            for i in range(n):
                end = data.index(b"\r\n", pos)
                size = int(data[pos + 1:end])
                if i == 0:
                    self.commands += 1
                    self.by_name[data[end + 2:end + 2 + size].decode().upper()] += 1
                pos = end + 2 + size + 2


def counting_client(url: str) -> tuple[redis.Redis, Counts]:
    if not one_server(url):
        pytest.skip("inspects one server's connections (CLIENT LIST, a counting client)")
    """A real client whose connections count round trips and commands.

    A round trip is a burst of requests written before the client reads a reply: a
    pipeline is one, however many commands it carries. Commands are counted in what is
    written to the socket, however it was packed (redis-py's packers or relaybus's own).
    """
    counts = Counts()

    class CountingConnection(redis.Connection):
        _sending = False

        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            if not self._sending:
                counts.round_trips += 1
                self._sending = True
            chunks = [command] if isinstance(command, (bytes, bytearray, memoryview)) \
                else command
            counts.count_packed(b"".join(bytes(c) for c in chunks))
            super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]

        def read_response(self, *args: Any, **kwargs: Any) -> Any:
            self._sending = False
            return super().read_response(*args, **kwargs)

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
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    first = make_bus()
    assert first.subscribe("billing", [OrderPlaced]) == "sub:billing"
    second = make_bus()  # another EventBus object: same server, same prefix
    assert second.subscriptions() == {"billing": ["bustest.order_placed"]}
    assert raw.hgetall(f"{prefix}subscriptions") == {b"billing": b'["bustest.order_placed"]'}
    other_prefix = make_bus(prefix=f"{prefix}other:")  # cleaned up with the test's prefix
    assert other_prefix.subscriptions() == {}

    event = OrderPlaced(order_id="o-1")
    first.publish(event)
    assert received(second, "billing") == [event.event_id]  # read through another bus
    assert received(other_prefix, "billing") == []  # another prefix sees nothing of it


def test_publish_needs_no_running_bus(make_bus: Callable[..., EventBus],
                                      raw: redis.Redis, prefix: str) -> None:
    subscriber = make_bus()
    subscriber.subscribe("billing", [OrderPlaced])
    publisher = make_bus()
    assert not publisher.running and not subscriber.running
    event = OrderPlaced(order_id="o-1")
    msg_id = publisher.publish(event)
    assert [r[0].decode() for r in log_rows(raw, prefix)] == [msg_id]
    queue, _ = subscriber.subscription_queue("billing")
    (message,) = consume(queue)
    assert message.id == f"all/{msg_id}"
    assert message.data["event_id"] == event.event_id
    assert not publisher.running and publisher.processor_thread is None


def test_subscribe_takes_classes_and_names(make_bus: Callable[..., EventBus],
                                           raw: redis.Redis, prefix: str) -> None:
    bus = make_bus()
    bus.subscribe("mixed", [OrderPaid, "bustest.order_placed", "made.up.name"])
    bus.subscribe("one_class", OrderShipped)
    bus.subscribe("one_name", "bustest.order_paid")
    assert bus.subscriptions() == {
        "mixed": ["bustest.order_paid", "bustest.order_placed", "made.up.name"],
        "one_class": ["bustest.order_shipped"],
        "one_name": ["bustest.order_paid"],
    }
    # the types the readers filter by live in each subscription's meta hash
    meta = QueueKeys(prefix, "sub:mixed").meta
    assert meta == f"{prefix}{{all}}:sub:mixed:meta"
    assert json.loads(raw.hget(meta, "types") or b"") == [
        "bustest.order_paid", "bustest.order_placed", "made.up.name"]


def test_subscribe_rejects_what_it_cannot_use(make_bus: Callable[..., EventBus],
                                              raw: redis.Redis, prefix: str) -> None:
    bus = make_bus()
    with pytest.raises(ValueError):
        bus.subscribe("svc", [])
    with pytest.raises(ValueError):  # InvalidNameError is a ValueError
        bus.subscribe("bad name", None)
    with pytest.raises(ValueError):  # no room left for the "sub:" of its queue
        bus.subscribe("x" * 198, None)
    with pytest.raises(TypeError):
        bus.subscribe("svc", [Event])  # abstract: no event type
    assert bus.subscriptions() == {}
    assert groups_on_log(raw, prefix) == []


def test_subscribe_again_replaces_the_types(make_bus: Callable[..., EventBus]) -> None:
    bus = make_bus()
    bus.subscribe("svc", [OrderPlaced])
    bus.subscribe("svc", [OrderPaid])
    assert bus.subscriptions() == {"svc": ["bustest.order_paid"]}
    placed, paid = OrderPlaced(order_id="a"), OrderPaid(order_id="a")
    bus.publish_many([placed, paid])
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
    assert received(bus, "audit") == [event.event_id]


def test_unsubscribe_keeps_what_was_meant_for_the_service_and_stops_new_events(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    bus = make_bus()
    bus.subscribe("svc", [OrderPlaced])
    held, other, waiting = OrderPlaced(order_id="1"), NobodyListens(n=1), OrderPlaced(order_id="2")
    for event in (held, other, waiting):
        bus.publish(event)
    reader, _ = bus.subscription_queue("svc")
    assert event_ids(reader.get_messages(count=1)) == [held.event_id]  # delivered, not acked

    assert bus.unsubscribe("svc") is True
    assert bus.unsubscribe("svc") is False
    assert bus.subscriptions() == {}
    assert group_on_log(raw, prefix, "svc") is None  # nothing holds the log back for it
    after = OrderPlaced(order_id="3")
    bus.publish(after)

    queue, _ = bus.subscription_queue("svc")
    # what was meant for it (delivered but unsettled, and published but unread) now
    # waits in its own stream, in log order; what came after the unsubscribe does not
    assert event_ids(queue.peek(count=100)) == [held.event_id, waiting.event_id]
    assert event_ids(consume(queue)) == [held.event_id, waiting.event_id]
    assert received(bus, "svc") == []
    assert group_on_log(raw, prefix, "svc") is None  # reading did not subscribe it again


def test_unsubscribe_keeps_only_the_services_types_whatever_the_entrys_shape(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    """An entry without routing field is typed by its payload, as a reader types it."""
    bus = make_bus()
    bus.subscribe("svc", [OrderPlaced])
    mine = {"event_type": "bustest.order_placed", "event_id": "mine"}
    theirs = {"event_type": "bustest.nobody_listens", "event_id": "theirs"}
    for payload in (mine, theirs):
        raw.xadd(log_key(prefix), {"d": json.dumps(payload), "t": int(time.time() * 1000)})
    assert bus.unsubscribe("svc") is True
    queue, _ = bus.subscription_queue("svc")
    assert event_ids(queue.peek(count=100)) == ["mine"]


# -- publishing ------------------------------------------------------------------------


def test_publish_many_is_one_round_trip(redis_url: str, prefix: str, raw: redis.Redis) -> None:
    client, counts = counting_client(redis_url)
    with EventBus(prefix=prefix, client=client) as bus:
        warm = OrderPlaced(order_id="warm-up")
        bus.publish(warm)  # connection, server check, script loaded
        events = [OrderPlaced(order_id=str(i)) for i in range(50)]
        round_trips, scripts = counts.round_trips, counts.by_name["EVALSHA"]
        ids = bus.publish_many(events)
        assert (counts.round_trips - round_trips, counts.by_name["EVALSHA"] - scripts) == (1, 1)
    assert [r[0].decode() for r in log_rows(raw, prefix)][1:] == ids
    assert logged_event_ids(raw, prefix) == [warm.event_id, *(e.event_id for e in events)]
    client.close()


def test_publish_takes_events_only(make_bus: Callable[..., EventBus],
                                   raw: redis.Redis, prefix: str) -> None:
    bus = make_bus()
    with pytest.raises(TypeError):
        bus.publish({"event_type": "x"})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        bus.publish_many([OrderPlaced(order_id="1"), "nope"])  # type: ignore[list-item]
    assert raw.xlen(log_key(prefix)) == 0  # all-or-nothing encoding: not even the first


class Reading(Event, event_type="bustest.reading"):
    value: float
    series: list[float] = []
    label: str = ""


class Sensor(pydantic.BaseModel):  # a nested model: its own config, the dict path
    value: float


class Sensed(Event, event_type="bustest.sensed"):
    sensor: Sensor


@pytest.mark.parametrize("bad", [
    Reading(value=float("nan")), Reading(value=float("inf")),
    Reading(value=1.0, series=[1.0, -float("inf")]), Sensed(sensor=Sensor(value=float("nan")))])
def test_publish_refuses_what_json_cannot_carry(make_bus: Callable[..., EventBus],
                                                raw: redis.Redis, prefix: str,
                                                bad: Event) -> None:
    bus = make_bus()
    with pytest.raises(SerializationError):
        bus.publish(bad)
    with pytest.raises(SerializationError):
        bus.publish_many([Reading(value=1.0), bad])
    assert raw.xlen(log_key(prefix)) == 0  # all or nothing


@pytest.mark.parametrize("bad", [
    Reading(value=float("nan")), Reading(value=1.0, series=[-float("inf")]),
    Sensed(sensor=Sensor(value=float("nan")))])
def test_an_async_publish_refuses_what_json_cannot_carry(redis_url: str, raw: redis.Redis,
                                                         prefix: str, bad: Event) -> None:
    async def main() -> None:
        async with AsyncEventBus(redis_url, prefix=prefix) as bus:
            with pytest.raises(SerializationError):
                await bus.publish(bad)
            with pytest.raises(SerializationError):
                await bus.publish_many([Reading(value=1.0), bad])

    asyncio.run(main())
    assert raw.xlen(log_key(prefix)) == 0  # all or nothing


def test_published_payloads_read_back_equal(make_bus: Callable[..., EventBus],
                                            raw: redis.Redis, prefix: str) -> None:
    sent = [Reading(value=0.1, series=[1e16, -2.5e-7, 3.0], label="NaN and Infinity, é"),
            Reading(value=2.0, label="a\ud800b"),  # a lone surrogate: written as \u escapes
            Sensed(sensor=Sensor(value=1.5))]
    make_bus().publish_many(sent)
    payloads = [fields[b"d"] for _, fields in log_rows(raw, prefix)]
    assert [type(e).from_dict(json.loads(p)) for e, p in zip(sent, payloads, strict=True)] == sent


def test_out_of_memory_server_refuses_publish_and_nothing_is_written(
        private_server: PrivateServer) -> None:
    admin = redis.Redis.from_url(private_server.url)
    p = "oom:"
    with EventBus(private_server.url, prefix=p, retry_timeout=2.0) as bus:
        bus.subscribe("a", None)
        before = OrderPlaced(order_id="before")
        bus.publish(before)
        refused = [OrderPlaced(order_id=str(i)) for i in range(3)]
        admin.config_set("maxmemory", "1")
        try:
            with pytest.raises(BrokerOutOfMemoryError):
                bus.publish(refused[0])
            with pytest.raises(BrokerOutOfMemoryError):
                bus.publish_many(refused)
            assert admin.xlen(log_key(p)) == 1
            published = QueueKeys(p, "all")
            assert admin.zcard(published.published) == 1  # the refused ones are not
            assert admin.hlen(published.published_ids) == 1  # remembered as published
        finally:
            admin.config_set("maxmemory", "0")
        ids = bus.publish_many(refused)  # so publishing them again writes them
        assert len(set(ids)) == 3 and admin.xlen(log_key(p)) == 4
        assert received(bus, "a") == [before.event_id, *(e.event_id for e in refused)]
    admin.close()


def test_a_full_server_still_takes_acknowledgements_with_their_done_records(
        private_server: PrivateServer) -> None:
    """Refused as a transaction (its ZADD), the batch goes through the settle script,
    which a full server runs: consumers keep draining, and the dedup records are kept."""
    admin = redis.Redis.from_url(private_server.url)
    p = "oomack:"
    with EventBus(private_server.url, prefix=p, retry_timeout=2.0) as bus:
        bus.subscribe("a", None)
        events = [OrderPlaced(order_id=str(i)) for i in range(4)]
        bus.publish_many(events)
        queue, _ = bus.subscription_queue("a")
        messages = queue.get_messages(count=10, consumer_id="c")
        assert len(messages) == 4
        admin.config_set("maxmemory", "1")
        try:
            assert queue.acknowledge_messages(
                [m.id for m in messages[:2]],
                record_done=[e.event_id for e in events[:2]]) == 2  # a batch of them
            assert queue.acknowledge_messages([messages[2].id],
                                              record_done=[events[2].event_id]) == 1
        finally:
            admin.config_set("maxmemory", "0")
        assert queue.acknowledge_messages([messages[3].id]) == 1
        done = set(admin.zrange(QueueKeys(p, "sub:a").done, 0, -1))
        assert done == {dedup_record(e.event_id) for e in events[:3]}
        assert settled(admin, p, "a")
    admin.close()


# -- fan-out ---------------------------------------------------------------------------


def test_each_matching_subscription_gets_each_event_exactly_once(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    subscriptions: dict[str, list[Any] | None] = {
        "orders": [OrderPlaced, OrderPaid],
        "shipping": [OrderPaid, OrderShipped],
        "audit": None,
        "audit_too": [OrderPlaced, ALL_EVENTS],  # a type and the wildcard
    }
    publisher = make_bus()
    for name, types in subscriptions.items():
        publisher.subscribe(name, types)
    events: list[Event] = []
    for i in range(20):
        events += [OrderPlaced(order_id=str(i)), OrderPaid(order_id=str(i)),
                   OrderShipped(order_id=str(i)), NobodyListens(n=i)]
    for start in range(0, len(events), 7):  # several publishes, read in several batches
        publisher.publish_many(events[start: start + 7])

    def expect(types: list[Any] | None) -> list[str]:
        classes = tuple(t for t in types or () if isinstance(t, type))
        wild = types is None or ALL_EVENTS in types
        return [e.event_id for e in events if wild or isinstance(e, classes)]

    for name, types in subscriptions.items():
        reader = make_bus()  # a consumer of its own: its counters are its own
        queue, dlq = reader.subscription_queue(name)
        assert event_ids(consume(queue, count=9)) == expect(types), name
        assert reader.mq.stats.get("skipped", 0) == len(events) - len(expect(types)), name
        assert settled(raw, prefix, name)
        assert dlq.peek() == [] and queue.peek() == []  # nothing copied anywhere
    assert raw.xlen(log_key(prefix)) == len(events)  # each event written once


def test_same_event_published_twice_reaches_each_subscriber_once(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    bus = make_bus()
    bus.subscribe("a", [OrderPlaced])
    bus.subscribe("b", None)
    event = OrderPlaced(order_id="1")
    first = bus.publish(event)
    assert bus.publish(event) == first  # e.g. a client retry
    assert received(bus, "a") == [event.event_id]
    assert bus.publish(event) == first  # and again, after it was read
    assert bus.publish_many([OrderPlaced(order_id="2"), event])[1] == first
    assert raw.xlen(log_key(prefix)) == 2
    assert received(bus, "a") == [logged_event_ids(raw, prefix)[1]]
    assert event_ids(consume(bus.subscription_queue("b")[0])) == logged_event_ids(raw, prefix)


def test_events_of_two_types_sharing_an_id_are_both_kept_and_repeats_are_counted(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Dedup identity is type and id: an event of another type with the same id is
    appended and delivered; a true repeat is not appended, counted and logged."""
    bus = make_bus()
    bus.subscribe("a", None)
    placed, paid = OrderPlaced(order_id="1", event_id="shared"), \
        OrderPaid(order_id="1", event_id="shared")
    with caplog.at_level(logging.INFO, logger="relaybus.bus"):
        first, second = bus.publish_many([placed, paid])
        assert first != second
        assert bus.publish(paid) == second  # the same type and id again: a repeat
    assert raw.xlen(log_key(prefix)) == 2
    assert [m.data["event_type"] for m in consume(bus.subscription_queue("a")[0])] == \
        ["bustest.order_placed", "bustest.order_paid"]
    assert bus.mq.stats["publish_duplicates"] == 1
    [line] = [r.getMessage() for r in caplog.records if "published again" in r.getMessage()]
    assert "shared" in line and "bustest.order_paid" in line and second in line


def test_same_event_twice_in_one_publish_many_is_written_once(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    bus = make_bus()
    bus.subscribe("a", None)
    event = OrderPlaced(order_id="1")
    ids = bus.publish_many([event, OrderPlaced(order_id="2"), event])
    assert ids[2] == ids[0]
    assert bus.publish(event) == ids[0]
    assert raw.xlen(log_key(prefix)) == 2
    assert received(bus, "a").count(event.event_id) == 1


def test_dedup_lasts_for_the_window_only(make_bus: Callable[..., EventBus],
                                         raw: redis.Redis, prefix: str) -> None:
    window = 0.3
    bus = make_bus(dedup_window=window)
    bus.subscribe("a", [OrderPlaced])
    event = OrderPlaced(order_id="1")
    started = time.monotonic()
    first = bus.publish(event)
    assert bus.publish(event) == first
    second = wait_until(lambda: (i := bus.publish(event)) != first and i, timeout=10,
                        what="the dedup window to pass")
    assert time.monotonic() - started >= window  # not before the window passed
    assert [r[0].decode() for r in log_rows(raw, prefix)] == [first, second]
    assert received(bus, "a") == [event.event_id, event.event_id]


def test_a_subscription_needs_no_event_class(make_bus: Callable[..., EventBus]) -> None:
    bus = make_bus()
    bus.subscribe("svc", ["never.defined.anywhere"])
    assert resolve_event_type("never.defined.anywhere") is None
    log_id = bus.publish_raw("never.defined.anywhere", {"event_id": "id-1", "x": 1})
    (message,) = consume(bus.subscription_queue("svc")[0])
    assert message.id == f"all/{log_id}"
    assert message.data["event_type"] == "never.defined.anywhere"
    assert message.data["event_id"] == "id-1" and message.data["x"] == 1


def test_a_big_batch_arrives_once_and_in_order(make_bus: Callable[..., EventBus],
                                               raw: redis.Redis, prefix: str) -> None:
    bus = make_bus()
    bus.subscribe("all_types", None)
    bus.subscribe("placed", [OrderPlaced])
    events: list[Event] = [OrderPlaced(order_id=str(i)) if i % 5 else NobodyListens(n=i)
                           for i in range(2500)]
    ids = bus.publish_many(events)
    assert len(set(ids)) == len(events)
    everything = consume(bus.subscription_queue("all_types")[0])  # several reads of 1000
    assert [m.id for m in everything] == [f"all/{i}" for i in ids]
    assert event_ids(everything) == [e.event_id for e in events]
    assert received(bus, "placed") == [e.event_id for e in events if isinstance(e, OrderPlaced)]


@pytest.mark.parametrize("types", [None, ["bustest.order_placed"]], ids=["wildcard", "typed"])
def test_an_entry_of_another_shape_is_delivered_with_every_field(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str,
        types: list[str] | None) -> None:
    """Written by another producer: no routing field, the event type in the payload."""
    bus = make_bus()
    bus.subscribe("svc", types)
    fields = {"d": json.dumps({"event_type": "bustest.order_placed", "event_id": "e-1",
                               "order_id": "o-1"}),
              "t": "1700000000000", "h": json.dumps({"trace": "abc"}), "custom": "kept"}
    raw.xadd(log_key(prefix), fields)  # type: ignore[arg-type]
    (message,) = consume(bus.subscription_queue("svc")[0])
    assert {k.decode(): v.decode() for k, v in message.fields.items()} == fields
    assert message.headers == {"trace": "abc"}
    assert message.data["order_id"] == "o-1" and message.timestamp == 1700000000.0
    assert settled(raw, prefix, "svc")
    if types is not None:  # a subscription of another type skips it, by its payload's type
        bus.subscribe("other", [OrderPaid])
        raw.xadd(log_key(prefix), fields)  # type: ignore[arg-type]
        other = make_bus()
        assert consume(other.subscription_queue("other")[0]) == []
        assert other.mq.stats.get("skipped") == 1


@pytest.mark.parametrize("types", [None, [OrderPlaced]], ids=["wildcard", "typed"])
def test_an_entry_without_sent_time_is_delivered_with_its_entry_ids_time(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str,
        types: list[Any] | None) -> None:
    """Another writer's entry without ``t``: its time is the entry id's (server clock)."""
    bus = make_bus()
    bus.subscribe("svc", types)
    entry_id = cast(bytes, raw.xadd(log_key(prefix), {
        "d": json.dumps({"event_type": "bustest.order_placed", "event_id": "e-1",
                         "order_id": "o-1"}), "e": "bustest.order_placed"})).decode()
    (message,) = consume(bus.subscription_queue("svc")[0])
    assert message.id == f"all/{entry_id}"
    assert message.timestamp == int(entry_id.split("-")[0]) / 1000
    assert settled(raw, prefix, "svc")


def test_a_typed_subscription_passes_over_a_payload_type_with_a_lone_surrogate(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    """No routing field, and a payload type that is not valid UTF-8 once decoded: not a
    type this subscription takes, so it is passed over, and the read goes on."""
    bus = make_bus()
    bus.subscribe("svc", [OrderPlaced])
    raw.xadd(log_key(prefix), {"d": json.dumps({"event_type": "bustest.order\udc80",
                                                "event_id": "odd"}), "t": "1"})
    good = OrderPlaced(order_id="good")
    bus.publish(good)
    assert received(bus, "svc") == [good.event_id]
    assert settled(raw, prefix, "svc")


@pytest.mark.parametrize("types", [None, [OrderPlaced]], ids=["wildcard", "typed"])
def test_an_entry_without_event_type_is_delivered(make_bus: Callable[..., EventBus],
                                                  raw: redis.Redis, prefix: str,
                                                  types: list[Any] | None) -> None:
    """Its type cannot be read: every subscription gets it, and its consumer decides."""
    bus = make_bus()
    bus.subscribe("svc", types)
    raw.xadd(log_key(prefix), {"d": '{"x":1}', "t": int(time.time() * 1000)})
    (message,) = consume(bus.subscription_queue("svc")[0])
    assert message.data == {"x": 1}
    assert settled(raw, prefix, "svc")


@pytest.mark.parametrize("types", [None, [OrderPlaced]], ids=["wildcard", "typed"])
@pytest.mark.parametrize("fields", [
    {"d": "{not json", "t": "1"},
    {"d": "[1, 2]", "t": "1"},
    {"t": "1", "e": "bustest.order_placed"},  # no payload at all
], ids=["not-json", "not-an-object", "no-payload"])
def test_a_malformed_entry_ends_in_the_subscriptions_dlq(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str,
        fields: dict[str, str], types: list[Any] | None) -> None:
    bus = make_bus()
    bus.subscribe("svc", types)
    before, after = OrderPlaced(order_id="before"), OrderPlaced(order_id="after")
    bus.publish(before)
    bad_id = cast(bytes, raw.xadd(log_key(prefix), fields)).decode()  # type: ignore[arg-type]
    bus.publish(after)
    queue, dlq = bus.subscription_queue("svc")
    assert event_ids(consume(queue)) == [before.event_id, after.event_id]
    (dead,) = dlq.peek(count=10)
    assert (dead.reason or "").startswith("malformed"), dead.reason
    (row,) = cast("list[tuple[bytes, dict[bytes, bytes]]]", raw.xrange(dlq.key))
    record = json.loads(row[1][b"f"])[-1]  # the failure record, as stored
    assert record["reason"].startswith("malformed entry"), record
    assert record["message_id"] == f"all/{bad_id}" and record["queue"] == "sub:svc"
    assert {k: v for k, v in row[1].items() if k != b"f"} == {  # the entry as it was
        k.encode(): v.encode() for k, v in fields.items()}
    assert settled(raw, prefix, "svc")  # nothing left pending in the log


def test_an_event_without_subscriber_stays_in_the_log_until_retention(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    bus = make_bus(retention_max_len=0, retention_seconds=None)  # no limit for now
    bus.subscribe("svc", [OrderPlaced])
    unheard = [NobodyListens(n=1), NobodyListens(n=2)]
    placed = OrderPlaced(order_id="1")
    bus.publish_many([*unheard, placed])
    reader = make_bus()
    assert event_ids(consume(reader.subscription_queue("svc")[0])) == [placed.event_id]
    assert reader.mq.stats["skipped"] == 2
    assert settled(raw, prefix, "svc")  # nothing holds the unheard ones
    assert bus.trim() == 0
    assert raw.xlen(log_key(prefix)) == 3  # kept in the log for inspection and replay
    bus.retention_max_len = 1
    assert bus.trim() == 2
    assert logged_event_ids(raw, prefix) == [placed.event_id]


# -- consumers -------------------------------------------------------------------------


def test_a_subscription_made_while_another_consumer_waits_gets_the_next_event(
        redis_url: str, prefix: str, raw: redis.Redis, make_bus: Callable[..., EventBus]) -> None:
    if not one_server(redis_url):
        pytest.skip("inspects one server's connections (CLIENT LIST, a counting client)")
    name = f"waiter-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url, client_name=name)
    with EventBus(prefix=prefix, client=client, retry_timeout=5.0) as waiter:
        waiter.subscribe("early", [OrderPlaced])
        queue, _ = waiter.subscription_queue("early")
        got: list[Message] = []
        thread = threading.Thread(
            target=lambda: got.extend(queue.get_messages(count=10, block_for_seconds=15)),
            daemon=True)
        thread.start()

        def blocked_on_the_log() -> bool:  # in XREADGROUP BLOCK, from before the subscribe
            return any(c.get("name") == name and c.get("cmd") == "xreadgroup"
                       and "b" in c.get("flags", "") for c in raw.client_list())

        wait_until(blocked_on_the_log, what="the consumer to wait for events")
        other = make_bus()
        other.subscribe("late", [OrderPlaced])
        event = OrderPlaced(order_id="1")
        other.publish(event)
        thread.join(timeout=15)
        assert not thread.is_alive()
        assert event_ids(got) == [event.event_id]
        assert received(other, "late") == [event.event_id]
    client.close()


def test_a_subscriptions_info_counts_the_log_entries_it_has_not_read(
        make_bus: Callable[..., EventBus]) -> None:
    """``waiting_messages`` is the lag on the log: reported by Redis 7+ and Valkey,
    counted on Redis 6.2; ``oldest_waiting_age`` comes from the first unread entry."""
    bus = make_bus()
    bus.subscribe("svc", None)
    queue, _ = bus.subscription_queue("svc")
    assert queue.get_info().waiting_messages == 0
    assert queue.get_info().oldest_waiting_age is None
    bus.publish_many([OrderPlaced(order_id=f"o-{i}") for i in range(5)])
    info = queue.get_info()
    assert info.waiting_messages == 5 and info.pending_messages == 0
    assert info.oldest_waiting_age is not None
    queue.get_messages(count=2, consumer_id="c")
    info = queue.get_info()
    assert info.waiting_messages == 3 and info.pending_messages == 2


def test_a_subscription_made_after_events_were_published_gets_only_later_ones(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    """A new subscription states where it starts: at the log's end, when it is made."""
    bus = make_bus()
    bus.subscription_queue("late")  # its queue pair exists before the events...
    earlier = [OrderPlaced(order_id=f"early-{i}") for i in range(3)]
    bus.publish_many(earlier)
    bus.subscribe("late", [OrderPlaced])  # ...the subscription only after them
    bus.subscribe("late_all", None)
    group = group_on_log(raw, prefix, "late")
    assert group is not None and group["pending"] == 0
    assert lag(raw, log_key(prefix), group) == 0
    later = [OrderPlaced(order_id=f"later-{i}") for i in range(3)]
    bus.publish_many(later)
    assert received(bus, "late") == [e.event_id for e in later]
    assert received(bus, "late_all") == [e.event_id for e in later]
    bus.subscribe("late", [OrderPlaced, OrderPaid])  # subscribing again keeps its place
    last = OrderPaid(order_id="last")
    bus.publish(last)
    assert received(bus, "late") == [last.event_id]


def test_a_dead_consumers_events_are_taken_over_once_after_the_visibility_timeout(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    vt = 0.3
    dead = make_bus(consumer_id="dead")
    dead.subscribe("svc", None, visibility_timeout=vt)
    events = [OrderPlaced(order_id=str(i)) for i in range(10)]
    dead.publish_many(events)
    held = dead.subscription_queue("svc")[0].get_messages(count=4)  # then it "dies"
    held_at = time.monotonic()
    assert len(held) == 4

    survivor = make_bus(consumer_id="survivor")
    queue, _ = survivor.subscription_queue("svc")
    assert queue.visibility_timeout == vt  # the subscription's stored setting
    got: list[Message] = []
    taken_over_at: list[float] = []

    def read() -> bool:
        batch = queue.get_messages(count=10)
        if any(m.id in {h.id for h in held} for m in batch):
            taken_over_at.append(time.monotonic())
        got.extend(batch)
        queue.acknowledge_messages([m.id for m in batch])
        return len(got) >= len(events)

    wait_until(read, timeout=10, what="the dead consumer's events")
    assert taken_over_at and taken_over_at[0] - held_at >= vt
    assert sorted(Counter(m.id for m in got).values()) == [1] * len(events)  # each once
    assert sorted(event_ids(got)) == sorted(e.event_id for e in events)
    assert sorted(m.delivery_count for m in got if m.id in {h.id for h in held}) == [2] * 4
    assert settled(raw, prefix, "svc")
    assert raw.xpending_range(log_key(prefix), "sub:svc", "-", "+", 10, "dead") == []
    # the dead consumer's late acknowledgement finds nothing of its own any more
    assert dead.subscription_queue("svc")[0].acknowledge_messages([h.id for h in held]) == 0
    assert received(make_bus(), "svc") == []


def test_a_dead_consumers_events_of_other_types_are_not_delivered_on_takeover(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    """A consumer reads new log entries of every type and skips the others when it settles;
    killed in between, it leaves them pending: taken over, they are skipped again."""
    vt = 0.3
    bus = make_bus()
    bus.subscribe("svc", [OrderPlaced], visibility_timeout=vt)
    placed, other = OrderPlaced(order_id="1"), NobodyListens(n=1)
    bus.publish_many([placed, other])
    # what the hot path reads for a consumer, which then dies before settling anything
    raw.xreadgroup("sub:svc", "dead", {log_key(prefix): ">"}, count=10)
    read_at = time.monotonic()
    queue, _ = bus.subscription_queue("svc")
    got: list[Message] = []

    def read() -> bool:
        batch = queue.get_messages(count=10)
        got.extend(batch)
        queue.acknowledge_messages([m.id for m in batch])
        return settled(raw, prefix, "svc")

    wait_until(read, timeout=10, what="the takeover")
    assert time.monotonic() - read_at >= vt
    assert event_ids(got) == [placed.event_id]


def test_consuming_and_settling_cost_constant_round_trips_whatever_the_batch(
        redis_url: str, prefix: str) -> None:
    """K events (some of types the subscription skips), read and settled in batches."""

    def measure(k: int, typed: bool, settle: str) -> tuple[int, int, int, int]:
        p = f"{prefix}{uuid.uuid4().hex[:6]}:"
        client, counts = counting_client(redis_url)
        try:
            with EventBus(prefix=p, client=client) as bus:
                bus.subscribe("svc", [OrderPlaced] if typed else None)
                events: list[Event] = [OrderPlaced(order_id=str(i)) for i in range(k)]
                events += [NobodyListens(n=i) for i in range(k // 10)]
                bus.publish_many(events)
                queue, _ = bus.subscription_queue("svc")
                before = counts.snapshot()
                got = queue.get_messages(count=10_000)
                read = counts.snapshot()
                assert len(got) == (k if typed else len(events))
                ids = [m.id for m in got]
                if settle == "ack":
                    assert queue.acknowledge_messages(ids) == len(ids)
                elif settle == "retry":
                    assert queue.schedule_retry(ids, 60, "later") == len(ids)
                else:
                    assert queue.move_to_dlq(ids, "dead") == len(ids)
                done = counts.snapshot()
                assert bus.subscription_queue("svc")[0].get_messages(count=10_000) == []
            return (read[0] - before[0], read[1] - before[1],
                    done[0] - read[0], done[1] - read[1])
        finally:
            client.close()

    for settle in ("ack", "retry", "dead"):  # warm up: every script loaded on the server
        measure(1, True, settle)
    for typed in (False, True):
        for settle in ("ack", "retry", "dead"):
            small, big = measure(10, typed, settle), measure(300, typed, settle)
            assert small == big, (typed, settle, small, big)
            read_trips, _, settle_trips, _ = big
            # the periodic fetch, one XREADGROUP (and the skipped ones' acknowledgement)
            assert read_trips == (3 if typed else 2), (typed, settle, big)
            assert settle_trips == 1, (typed, settle, big)


# -- retention -------------------------------------------------------------------------


def test_retention_keeps_max_len_events_and_never_trims_unread_ones(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    bus = make_bus(retention_max_len=5, retention_seconds=None)
    bus.subscribe("svc", [OrderPlaced])
    events = [OrderPlaced(order_id=str(i)) for i in range(12)]
    bus.publish_many(events)
    assert bus.trim() == 0  # nothing read yet: all 12 stay
    assert raw.xlen(log_key(prefix)) == 12

    queue, _ = bus.subscription_queue("svc")
    first = queue.get_messages(count=4)  # delivered, not yet acknowledged
    assert len(first) == 4
    assert bus.trim() == 0  # still pending: held
    queue.acknowledge_messages([m.id for m in first])
    assert bus.trim() == 4  # only what the subscription has settled may go
    assert raw.xlen(log_key(prefix)) == 8

    assert len(consume(queue)) == 8
    assert bus.trim() == 3
    assert logged_event_ids(raw, prefix) == [e.event_id for e in events[-5:]]
    assert bus.trim() == 0


def test_retention_by_age_trims_only_what_every_subscription_has_read(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    bus = make_bus(retention_max_len=0, retention_seconds=0.0)
    bus.subscribe("fast", None)
    bus.subscribe("slow", None)
    read_first = [OrderPlaced(order_id=str(i)) for i in range(3)]
    bus.publish_many(read_first)
    assert len(received(bus, "fast")) == 3
    assert bus.trim() == 0  # "slow" has not read them
    assert len(received(bus, "slow")) == 3
    published_at = time.time()  # stream ids have millisecond resolution: let the clock move on
    wait_until(lambda: time.time() > published_at + 0.005, what="the read events to age")
    late = [OrderPlaced(order_id=f"late-{i}") for i in range(2)]
    bus.publish_many(late)
    assert bus.trim() == 3  # the late ones may be past the age limit too, but are unread
    assert logged_event_ids(raw, prefix) == [e.event_id for e in late]


# -- maintenance -----------------------------------------------------------------------


def test_a_started_bus_runs_maintenance_in_the_background_and_stops(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    with make_bus(retention_max_len=3, retention_seconds=None) as bus:
        bus.maintenance_interval = 0.05
        events = [NobodyListens(n=i) for i in range(10)]
        bus.publish_many(events)
        bus.start()
        bus.start()  # idempotent
        assert bus.running
        thread = bus.processor_thread
        assert thread is not None and thread.is_alive()
        assert [t for t in threading.enumerate() if t.name == "relaybus-maintenance"] == [thread]
        wait_until(lambda: raw.xlen(log_key(prefix)) == 3, what="the retention trim")
        assert logged_event_ids(raw, prefix) == [e.event_id for e in events[-3:]]
    assert not bus.running
    assert not thread.is_alive()


def test_maintenance_survives_a_broker_outage(private_server: PrivateServer,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="relaybus.bus")
    p = "outage:"
    admin = redis.Redis.from_url(private_server.url, socket_timeout=1.0)
    bus = EventBus(private_server.url, prefix=p, retry_timeout=0.2, retention_max_len=2,
                   retention_seconds=None)
    try:
        bus.maintenance_interval = 0.05
        bus.publish_many([NobodyListens(n=i) for i in range(5)])
        bus.start()
        wait_until(lambda: admin.xlen(log_key(p)) == 2, what="trimming before the outage")

        def failures() -> list[str]:  # the first one logged as an error, later ones as debug
            return [r.getMessage() for r in caplog.records
                    if r.name == "relaybus.bus" and "event bus maintenance" in r.getMessage()
                    and r.levelno in (logging.ERROR, logging.DEBUG)]

        private_server.kill()
        wait_until(lambda: len(failures()) >= 3, what="three failed maintenance rounds")
        private_server.start()  # same port, state from the append-only file
        after = [NobodyListens(n=10 + i) for i in range(4)]
        bus.publish_many(after)
        wait_until(lambda: logged_event_ids(admin, p) == [e.event_id for e in after[-2:]],
                   timeout=20, what="trimming after the outage")
        assert bus.running and bus.processor_thread is not None
        assert bus.processor_thread.is_alive()
    finally:
        bus.close()
        admin.close()

    # one incident: its first failure logged as an error, its recovery once
    records = [r for r in caplog.records if r.name == "relaybus.bus"
               and "event bus maintenance" in r.getMessage()]
    assert any(r.levelno == logging.ERROR for r in records), [r.getMessage() for r in records]
    resumed = [r for r in records if r.levelno == logging.WARNING]
    assert len(resumed) == 1 and "resumed" in resumed[0].getMessage(), \
        [r.getMessage() for r in records]


def test_unreadable_subscription_entries_stop_nothing_else(
        make_bus: Callable[..., EventBus], redis_url: str, prefix: str, raw: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    """Entries of the subscriptions table that no service could have written (invalid
    names, types that are no list of names, names that are not UTF-8) are left out and
    logged once; the subscriptions around them work, and they can be removed."""
    received: list[str] = []
    bus = make_bus()
    bus.subscribe("good", [OrderPlaced])
    raw.hset(prefix + "subscriptions", mapping={
        b"bad name": b'["tests.bus.Ping"]', b"\xff\xfe": b"[]", b"odd": b'[1, null, {"a": 2}]',
        b"notjson": b"{{{"})
    with caplog.at_level(logging.WARNING, logger="relaybus.bus"):
        assert bus.subscriptions() == {"good": ["bustest.order_placed"]}
        assert bus.subscriptions() == {"good": ["bustest.order_placed"]}
    warned = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
    assert len(warned) == 4  # each once
    queue, _ = bus.subscription_queue("good")
    bus.publish(OrderPlaced(order_id='o-1'))
    received += [m.data["order_id"] for m in queue.get_messages(count=10)]
    assert received == ["o-1"]
    assert bus.remove_subscription("bad name") is True
    with pytest.raises(InvalidNameError):
        bus.remove_subscription("never stored")  # an invalid name not in the table

    async def front() -> dict[str, list[str]]:
        async with AsyncEventBus(redis_url, prefix=prefix) as abus:
            assert await abus.remove_subscription("notjson") is True
            return await abus.subscriptions()

    assert asyncio.run(front()) == {"good": ["bustest.order_placed"]}
    assert set(raw.hkeys(prefix + "subscriptions")) == {b"good", b"\xff\xfe", b"odd"}


def test_a_backlog_in_a_subscriptions_own_stream_is_read_batch_after_batch(
        make_bus: Callable[..., EventBus], raw: redis.Redis, prefix: str) -> None:
    """Entries of a subscription's own stream (requeued dead letters, retries due,
    copies) are read by the periodic fetch: a full batch makes the next fetch read it
    again at once, not a recheck interval later."""
    bus = make_bus()
    bus.subscribe("drain", [OrderPlaced])
    queue, _ = bus.subscription_queue("drain")
    own = QueueKeys(prefix, "sub:drain").stream
    for n in range(250):
        raw.xadd(own, {"d": json.dumps({"n": n})})
    sizes = [len(queue.get_messages(count=100, block_for_seconds=0)) for _ in range(3)]
    assert sizes == [100, 100, 50]
