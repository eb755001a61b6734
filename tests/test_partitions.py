"""A partitioned event log (#12 item 3): ``EventBus(partitions=N)`` spreads events over
N logs by partition key; each subscription has a pair per partition, and a service of
either front reads them all. N is stored with the bus and can grow, losing nothing.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter

import pytest
import redis
from typer.testing import CliRunner

from helpers_aio import running_service
from relaybus import AsyncEventBus, Event, EventBus
from relaybus._core.bus import partition_of
from relaybus.cli import app
from relaybus.errors import ConfigurationError, InvalidNameError
from relaybus.keys import QueueKeys, partition_name, split_partition, validate_name
from relaybus.queue import MessageQueue
from test_ordered import Tracker
from waiting import wait_for

FRONTS = ["sync", "async"]


class Item(Event, event_type="test.partitions.item"):
    n: int = 0


class Seen:
    """Event numbers handled, counted (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[int] = Counter()

    def add(self, event: Item) -> None:
        with self.lock:
            self.counts[event.n] += 1

    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())


def log_lengths(raw: redis.Redis, prefix: str, n: int) -> list[int]:
    return [int(raw.xlen(QueueKeys(prefix, partition_name("all", i)).stream))
            for i in range(n)]


def test_partition_names_keys_and_reserved_names() -> None:
    assert split_partition("sub:billing@2") == ("sub:billing", 2)
    assert split_partition("all@11") == ("all", 11)
    assert split_partition("mail@2") == ("mail@2", 0)
    assert split_partition("sub:billing") == ("sub:billing", 0)
    keys = QueueKeys("p:", "sub:billing@2")
    assert keys.tag == "p:{all@2}:sub:billing" and keys.partition == 2
    assert keys.log is not None and keys.log.stream == "p:{all@2}"
    assert QueueKeys("p:", "sub:billing").tag == "p:{all}:sub:billing"
    assert validate_name("sub:billing@2") == "sub:billing@2"  # reachable from the CLI
    for bad in ("mail@2", "sub:billing@0", "all@01", "sub:billing@"[:-1] + "@007"):
        with pytest.raises(InvalidNameError, match="partitions"):
            validate_name(bad)
    with pytest.raises(InvalidNameError, match="partitions"):
        validate_name("billing@2", "service name")
    assert validate_name("mail@home") == "mail@home"
    # the same key goes to the same partition, and keys spread over all of them
    spread = Counter(partition_of({"p": f"order-{i}"}, 4) for i in range(400))
    assert sorted(spread) == [0, 1, 2, 3] and min(spread.values()) > 50
    assert partition_of({"p": "x", "k": "id-1"}, 7) == partition_of({"p": "x", "k": "id-2"}, 7)
    assert partition_of({"k": "id-1"}, 1) == 0


def test_the_number_is_stored_with_the_bus_and_never_shrinks(redis_url: str,
                                                              prefix: str) -> None:
    for bad in (0, 257, "3", True, 2.0):
        with pytest.raises(ConfigurationError, match="partitions"):
            EventBus(redis_url, prefix=prefix, partitions=bad)  # type: ignore[arg-type]
    with EventBus(redis_url, prefix=prefix) as bus:
        assert bus.partitions == 1  # a new bus: today's layout
    with EventBus(redis_url, prefix=prefix, partitions=3) as bus:
        assert bus.partitions == 3
    with EventBus(redis_url, prefix=prefix) as bus:
        assert bus.partitions == 3  # None takes the stored number
    with pytest.raises(ConfigurationError, match="has 3 partitions; it cannot shrink to 2"):
        EventBus(redis_url, prefix=prefix, partitions=2)

    async def on_async() -> int:
        async with AsyncEventBus(redis_url, prefix=prefix) as abus:
            return abus.partitions

    assert asyncio.run(on_async()) == 3


@pytest.mark.parametrize("front", FRONTS)
def test_events_spread_by_key_and_a_service_reads_every_partition(
        redis_url: str, prefix: str, raw: redis.Redis, front: str) -> None:
    seen = Seen()
    with EventBus(redis_url, prefix=prefix, partitions=3) as bus, \
            running_service(front, redis_url, prefix, f"parts-{front}", Item, seen.add,
                            concurrency=2):
        ids = bus.publish_many([Item(n=n, partition_key=f"k{n % 12}") for n in range(120)])
        wait_for(lambda: seen.total() >= 120, 30, "every event to be handled")
    assert seen.counts == Counter(range(120))  # each once
    lengths = log_lengths(raw, prefix, 3)
    assert sum(lengths) == 120 and min(lengths) > 0
    # the log id names the partition; one key's events share one partition
    by_key: dict[str, set[str]] = {}
    for n, log_id in enumerate(ids):
        part = log_id.split("/")[0] if "/" in log_id else "all"
        assert part == partition_name("all", partition_of({"p": f"k{n % 12}"}, 3))
        by_key.setdefault(f"k{n % 12}", set()).add(part)
    assert all(len(parts) == 1 for parts in by_key.values())


@pytest.mark.parametrize("front", FRONTS)
def test_ordered_delivery_holds_within_each_partition(redis_url: str, prefix: str,
                                                      front: str) -> None:
    tracker = Tracker()
    keys, per_key = [f"k{i}" for i in range(6)], 20

    def work(event: Item) -> None:
        tracker.enter(event)  # type: ignore[arg-type]
        try:
            threading.Event().wait(0.001)
        finally:
            tracker.leave(event)  # type: ignore[arg-type]

    with EventBus(redis_url, prefix=prefix, partitions=3) as bus, \
            running_service(front, redis_url, prefix, f"parts-ord-{front}", Item, work,
                            ordered=True, concurrency=4):
        for start in range(0, per_key, 5):
            bus.publish_many([Item(n=n, partition_key=k) for n in range(start, start + 5)
                              for k in keys])
        wait_for(lambda: len(tracker.runs) >= len(keys) * per_key, 30, "every event")
    assert tracker.overlaps == []
    for key in keys:
        assert tracker.of(key) == list(range(per_key)), key


def test_growing_the_bus_loses_nothing(redis_url: str, prefix: str,
                                       raw: redis.Redis) -> None:
    """Events published before, while a service is stopped, and after growing 1 -> 4:
    the subscription (made at N=1) reads the new partitions from their start."""
    seen = Seen()
    with EventBus(redis_url, prefix=prefix) as small:
        small.subscribe("grower", Item)
        small.publish_many([Item(n=n, partition_key=f"k{n}") for n in range(20)])
    with EventBus(redis_url, prefix=prefix, partitions=4) as big:
        big.publish_many([Item(n=n, partition_key=f"k{n}") for n in range(20, 60)])
        assert min(log_lengths(raw, prefix, 4)[1:]) > 0
        with running_service("sync", redis_url, prefix, "grower", Item, seen.add):
            wait_for(lambda: seen.total() >= 60, 30, "every event to be handled")
            assert seen.counts == Counter(range(60))
    # the new partitions' pairs took the subscription's settings
    meta = raw.hgetall(QueueKeys(prefix, "sub:grower@3").meta)
    assert meta[b"types"] == b'["test.partitions.item"]'


def test_unsubscribe_and_remove_cover_every_partition(redis_url: str, prefix: str,
                                                      raw: redis.Redis) -> None:
    with EventBus(redis_url, prefix=prefix, partitions=3) as bus:
        bus.subscribe("leaver", Item)
        bus.publish_many([Item(n=n, partition_key=f"k{n}") for n in range(30)])
        assert bus.unsubscribe("leaver")
        mq = bus.mq
        waiting = [mq.get_queue(partition_name("sub:leaver", i)).get_info().waiting_messages
                   for i in range(3)]
        assert sum(waiting) == 30 and min(waiting) > 0  # kept, in each partition's queue
        assert bus.remove_subscription("leaver")
    names = {i.name for i in MessageQueue(redis_url, prefix=prefix).list_queues()}
    assert not any(n.startswith("sub:leaver") for n in names)
    assert raw.exists(*[QueueKeys(prefix, partition_name("sub:leaver", i)).stream
                        for i in range(3)]) == 0


def test_trim_applies_to_every_partition(redis_url: str, prefix: str,
                                         raw: redis.Redis) -> None:
    with EventBus(redis_url, prefix=prefix, partitions=2, retention_max_len=5) as bus:
        bus.publish_many([Item(n=n, partition_key=f"k{n}") for n in range(40)])
        assert bus.trim() == 30
    assert log_lengths(raw, prefix, 2) == [5, 5]


def test_the_cli_shows_and_tails_every_partition(redis_url: str, prefix: str,
                                                 raw: redis.Redis) -> None:
    def cli(*args: str) -> str:
        result = CliRunner().invoke(app, [*args, "--url", redis_url, "--prefix", prefix])
        assert result.exit_code == 0, result.output
        return result.stdout

    with EventBus(redis_url, prefix=prefix, partitions=3) as bus:
        bus.subscribe("watcher", Item)
        ids = bus.publish_many([Item(n=n, partition_key=f"k{n}") for n in range(9)])
    rows = {r["name"]: r for r in json.loads(cli("queues", "--json"))}
    for i in range(3):
        log, sub = rows[partition_name("all", i)], rows[partition_name("sub:watcher", i)]
        assert log["waiting"] is None  # a log: what waits is counted in the subscriptions
        assert sub["waiting"] == log_lengths(raw, prefix, 3)[i]
    tailed = [json.loads(line) for line in
              cli("tail", "--from-start", "--count", "9", "--json").splitlines()]
    assert sorted(e["id"] for e in tailed) == sorted(ids)
    assert any(i.startswith("all@") for i in ids)

