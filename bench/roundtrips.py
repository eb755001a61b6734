"""How many requests and commands the event bus's hot-path operations cost.

Run it with::

    .venv/bin/python bench/roundtrips.py            # a private embedded Valkey
    .venv/bin/python bench/roundtrips.py --url redis://127.0.0.1:6379/9

The operations are the ones a service runs, driven the way it runs them (the core's
:class:`~relaybus._core.consumer.Consumer` on the sync driver, as ``Microservice``
does; the asyncio front sends the very same steps):

- ``publish_many`` of 100 events (one ``publish.lua`` call: appends and dedup records);
- a subscription's fetch of a batch of 100 between two periodic rechecks (one plain
  ``XREADGROUP`` on the event log), and a fetch that does the periodic work too
  (``fetch.lua``: due retries, reclaiming a dead instance's events; once a second
  while busy, every ``min(visibility_timeout / 4, 2 s)`` while idle);
- settling a batch of 100 acknowledgements with their done records (one MULTI/EXEC);
- settling a batch with retries and dead letters (one ``settle.lua`` call);
- the idle wait: one blocking ``XREADGROUP`` per period on an empty subscription.

For each it reports:

- requests: network round trips the client made (counted on the client: every write
  of a command, a pipeline or a MULTI/EXEC to the socket is one; an EVALSHA is one
  request however many commands its script runs);
- top-level commands: the commands those requests carried (from ``MONITOR``);
- in scripts: the commands Lua scripts ran inside the server (``MONITOR`` lines
  tagged ``lua``);
- commandstats: the per-command deltas of ``INFO commandstats``, which count both,
  as a cross-check (``redis-cli INFO commandstats`` shows the same counters).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import redis
from redis.connection import AbstractConnection

from relaybus import EventBus
from relaybus._bench import BenchEvent, make_events, temp_prefix
from relaybus._core.consumer import Consumer, Outcome
from relaybus.codec import Message
from relaybus.connection import redact
from relaybus.embedded import EmbeddedServer
from relaybus.retry import Action, Decision

N = 100


class RequestCounter:
    """Counts requests written by redis-py sync connections (a pipeline is one)."""

    def __init__(self) -> None:
        self.count = 0
        self._original = AbstractConnection.send_packed_command
        counter = self

        def counting(conn: AbstractConnection, command: Any, check_health: bool = True) -> None:
            counter.count += 1
            counter._original(conn, command, check_health)

        AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]

    def restore(self) -> None:
        AbstractConnection.send_packed_command = self._original  # type: ignore[method-assign]


class Monitor:
    """Collects MONITOR lines until a marker ECHO, from a thread."""

    def __init__(self, url: str, ignore: list[redis.Redis]) -> None:
        self.url = url
        self.marker_client = redis.Redis.from_url(url)
        #: addresses of the measuring clients, whose commands are not counted
        self.ignored = {str(c.client_info()["addr"]) for c in [self.marker_client, *ignore]}

    @contextlib.contextmanager
    def watch(self) -> Iterator[list[dict[str, Any]]]:
        lines: list[dict[str, Any]] = []
        marker = f"relaybus-bench-{uuid.uuid4().hex}"
        client = redis.Redis.from_url(self.url)
        ready = threading.Event()

        def listen() -> None:
            with client.monitor() as mon:
                ready.set()
                for item in mon.listen():
                    if item["command"] == f"ECHO {marker}":
                        return
                    if item.get("client_address") == "lua" or item.get("client_type") == "lua":
                        item["from_lua"] = True
                    elif f"{item.get('client_address')}:{item.get('client_port')}" \
                            in self.ignored:
                        continue
                    lines.append(item)

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        ready.wait(5)
        self.marker_client.echo("warm-up")  # make sure MONITOR is attached before the op
        time.sleep(0.05)
        try:
            yield lines
        finally:
            self.marker_client.echo(marker)
            thread.join(10)
            client.close()


def commandstats(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()})


def measure(label: str, op: Callable[[], Any], stats_client: redis.Redis,
            counter: RequestCounter, monitor: Monitor, expected: int) -> dict[str, Any]:
    with monitor.watch() as lines:
        before = commandstats(stats_client)
        counter.count = 0
        result = op()
        requests = counter.count
        after = commandstats(stats_client)
    delta = after - before
    for name in ("info", "echo", "monitor", "client|info"):
        delta.pop(name, None)
    top = [ln for ln in lines if not ln.get("from_lua")]
    inside = [ln for ln in lines if ln.get("from_lua")]
    return {
        "label": label,
        "result": result,
        "requests": requests,
        "expected": expected,
        "top": Counter(ln["command"].split(" ", 1)[0].upper() for ln in top),
        "inside": Counter(ln["command"].split(" ", 1)[0].upper() for ln in inside),
        "stats": delta,
    }


def fmt(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counter.items())) or "-"


class Service:
    """One subscription's consumer, driven as a service's worker drives it."""

    def __init__(self, bus: EventBus, name: str, block: float) -> None:
        queue, _ = bus.subscription_queue(name)
        self.driver = bus.mq.driver
        self.core = Consumer(queue.ref, f"{name}-c1", prefetch=2 * N, block_for_seconds=block,
                             name=name)

    def between_rechecks(self) -> None:
        """The next fetch is a plain read (the periodic work is not due)."""
        self.core.read.next_periodic = time.monotonic() + 60

    def recheck_due(self) -> None:
        self.core.read.next_periodic = 0.0

    def fetch(self, count: int = N) -> list[Message]:
        messages = self.driver.drive(self.core.fetch(count, time.monotonic))
        self.core.fetched(messages, time.monotonic())
        return messages

    def finish(self, outcomes: Callable[[int, Message], Outcome]) -> int:
        """Handle everything buffered with ``outcomes(i, message)``; settle it as one
        batch; return how many the batch held."""
        i = 0
        while (m := self.core.take()) is not None:
            self.core.finish(m, outcomes(i, m), time.monotonic())
            i += 1
        batch = self.core.settle_batch(time.monotonic())
        assert batch is not None
        self.core.settled(batch, self.driver.drive(self.core.settle_flow(batch)),
                          time.monotonic())
        return len(batch.items)


def _ack(i: int, m: Message) -> Outcome:
    return Outcome(Decision(Action.ACK), done_key=m.dedup_key)


def _mixed(i: int, m: Message) -> Outcome:
    if i % 4 == 1:
        return Outcome(Decision(Action.RETRY, delay=60.0, reason="bench: retry"),
                       details={"attempt": 1})
    if i % 4 == 3:
        return Outcome(Decision(Action.DEAD_LETTER, reason="bench: dead letter"),
                       details={"why": "bench"})
    return _ack(i, m)


def run(url: str) -> None:
    stats_client = redis.Redis.from_url(url, decode_responses=True)
    monitor = Monitor(url, ignore=[stats_client])
    rows = []
    with temp_prefix(url, "rt") as p, EventBus(url, prefix=p) as bus:
        bus.subscribe("rt", [BenchEvent])
        svc = Service(bus, "rt", block=0.5)
        # warm up: server check, scripts loaded (EVALSHA, loading once on NOSCRIPT)
        bus.publish_many(make_events(10))
        svc.fetch()
        svc.finish(_ack)  # MULTI/EXEC
        bus.publish_many(make_events(4))
        svc.fetch()
        svc.finish(_mixed)  # settle.lua
        svc.fetch()  # empty: the next fetch waits
        events = [make_events(N) for _ in range(4)]
        counter = RequestCounter()
        try:
            rows.append(measure(f"publish_many({N} events)",
                                lambda: bus.publish_many(events[0]), stats_client, counter,
                                monitor, 1))
            for batch in events[1:]:
                bus.publish_many(batch)
            svc.between_rechecks()
            got = measure(f"fetch a batch of {N} (between periodic rechecks)", svc.fetch,
                          stats_client, counter, monitor, 1)
            rows.append(got)
            assert len(got["result"]) == N, len(got["result"])
            rows.append(measure(f"settle {N} acknowledgements with their done records",
                                lambda: svc.finish(_ack), stats_client, counter, monitor, 1))
            svc.recheck_due()
            rows.append(measure(f"fetch a batch of {N} with the periodic work (recheck)",
                                svc.fetch, stats_client, counter, monitor, 2))
            svc.finish(_ack)
            svc.between_rechecks()
            svc.fetch()
            rows.append(measure(f"settle {N}: {N // 2} acks, {N // 4} retries, {N // 4} dead "
                                "letters", lambda: svc.finish(_mixed), stats_client, counter,
                                monitor, 1))
            svc.fetch()
            svc.finish(_ack)
            assert svc.fetch() == []  # nothing left: the next fetch waits
            svc.between_rechecks()
            rows.append(measure("idle wait: an empty subscription, one period (0.5 s)",
                                svc.fetch, stats_client, counter, monitor, 1))
        finally:
            counter.restore()

    server = stats_client.info("server")
    name = f"valkey {server['valkey_version']}" if "valkey_version" in server else \
        f"redis {server['redis_version']}"
    print(f"relaybus round trips, {N} events per batch, against {name} ({redact(url)})")
    print()
    for row in rows:
        top_total = sum(row["top"].values())
        inside_total = sum(row["inside"].values())
        stats_total = sum(row["stats"].values())
        flag = "" if row["requests"] == row["expected"] else f"  (expected {row['expected']})"
        print(row["label"])
        print(f"  requests (round trips): {row['requests']}{flag}")
        print(f"  top-level commands:     {top_total}  ({fmt(row['top'])})")
        print(f"  commands inside scripts: {inside_total}  ({fmt(row['inside'])})")
        print(f"  INFO commandstats delta: {stats_total}  ({fmt(row['stats'])})")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="server to measure (default: a private embedded Valkey)")
    args = parser.parse_args()
    if args.url:
        run(args.url)
        return
    with tempfile.TemporaryDirectory(prefix="relaybus-bench-") as tmp:
        server = EmbeddedServer(tmp)
        state = server.start()
        try:
            run(state.url)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
