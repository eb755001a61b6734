"""How many requests and commands the queue layer's batch operations cost.

Run it with::

    .venv/bin/python bench/roundtrips.py            # a private embedded Valkey
    .venv/bin/python bench/roundtrips.py --url redis://127.0.0.1:6379/9

For each operation it reports:

- requests: network round trips the client made (counted on the client: every write
  of a command or a pipeline to the socket is one; a pipeline of 100 XADDs is one
  request, and an EVALSHA is one request however many commands its script runs);
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

from relaybus import MessageQueue
from relaybus.embedded import EmbeddedServer

N = 100


class RequestCounter:
    """Counts requests written by redis-py connections (a pipeline is one)."""

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


def measure(label: str, op: Callable[[], Any], url: str, stats_client: redis.Redis,
            counter: RequestCounter, monitor: Monitor) -> dict[str, Any]:
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
        "top": Counter(ln["command"].split(" ", 1)[0].upper() for ln in top),
        "inside": Counter(ln["command"].split(" ", 1)[0].upper() for ln in inside),
        "stats": delta,
    }


def fmt(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counter.items())) or "-"


def run(url: str) -> None:
    stats_client = redis.Redis.from_url(url, decode_responses=True)
    monitor = Monitor(url, ignore=[stats_client])
    mq = MessageQueue(url, prefix=f"bench{uuid.uuid4().hex[:8]}:")
    q, dlq = mq.create_queue_pair("bench", visibility_timeout=0.2)
    # warm up: server version check, scripts loaded (EVALSHA, loading once on NOSCRIPT)
    q.send_messages([{"warm": 1}])
    q.acknowledge_messages([m.id for m in q.get_messages(count=10)])
    q.move_to_dlq(q.send_message({"warm": 2}), "warm-up")
    dlq.purge()

    payloads = [{"order_id": i, "sku": f"SKU-{i:05d}", "qty": 1 + i % 3} for i in range(N)]
    counter = RequestCounter()
    rows = []
    try:
        rows.append(measure(f"send_messages({N} messages)",
                            lambda: q.send_messages(payloads), url, stats_client, counter,
                            monitor))
        got = measure(f"get_messages(count={N})", lambda: q.get_messages(count=N), url,
                      stats_client, counter, monitor)
        rows.append(got)
        ids = [m.id for m in got["result"]]
        assert len(ids) == N, len(ids)
        rows.append(measure(f"acknowledge_messages({N} ids)",
                            lambda: q.acknowledge_messages(ids), url, stats_client, counter,
                            monitor))
        # a dead consumer's messages: reclaimed after the visibility timeout
        q.send_messages(payloads)
        q.get_messages(count=N, consumer_id="dead")
        time.sleep(0.25)
        rows.append(measure(f"get_messages(count={N}), all {N} reclaimed from a dead consumer",
                            lambda: q.get_messages(count=N), url, stats_client, counter,
                            monitor))
        held = [m.id for m in rows[-1]["result"]]
        rows.append(measure(f"move_to_dlq({N} ids)", lambda: q.move_to_dlq(held, "bench"),
                            url, stats_client, counter, monitor))
        rows.append(measure("get_messages(count=100, block_for_seconds=0.1), empty queue",
                            lambda: q.get_messages(count=N, block_for_seconds=0.1), url,
                            stats_client, counter, monitor))
    finally:
        counter.restore()
        mq.delete_queue("bench")
        mq.close()

    server = stats_client.info("server")
    name = f"valkey {server['valkey_version']}" if "valkey_version" in server else \
        f"redis {server['redis_version']}"
    print(f"relaybus round trips, {N} messages per batch, against {name} ({url})")
    print()
    for row in rows:
        top_total = sum(row["top"].values())
        inside_total = sum(row["inside"].values())
        stats_total = sum(row["stats"].values())
        print(row["label"])
        print(f"  requests (round trips): {row['requests']}")
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
