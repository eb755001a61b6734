"""The raw ceiling of two fan-out designs, with no relaybus code in the way: copy routing
(relaybus 0.1: a router copies each log entry into a stream per subscription) against
native fan-out (one consumer group per subscription on the log).

    .venv/bin/python bench/fanout_hop.py                 # a private embedded Valkey
    .venv/bin/python bench/fanout_hop.py --url redis://127.0.0.1:6379/9 --events 60000

A publisher process appends events to the log in pipelines of 100; one subscriber
process reads 3 subscriptions 100 at a time and acknowledges (copy routing also deletes
what it read, as 0.1 did); for copy routing a router process reads the log 500 at a
time, runs the copy script once per subscription and acknowledges. The figure is
events per second from the start signal to the last acknowledgement of the last
subscription. Payloads are not decoded: this is the broker-side ceiling.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
import uuid
from multiprocessing.synchronize import Barrier, Event

import redis

from relaybus.embedded import EmbeddedServer

SUBSCRIPTIONS = 3
#: relaybus 0.1's route.lua, reduced to what this benchmark sends: copy each event into
#: one subscription stream unless its id was copied within the window.
COPY = """
local dst, routed, now = KEYS[1], KEYS[2], tonumber(ARGV[1])
local oldest = now - tonumber(ARGV[2])
local ids, fresh = {}, {}
for i = 3, #ARGV, 4 do ids[#ids + 1] = ARGV[i] end
local scores = redis.call('ZMSCORE', routed, unpack(ids))
for j, id in ipairs(ids) do
  if not scores[j] or tonumber(scores[j]) <= oldest then
    local s = 3 + (j - 1) * 4
    redis.call('XADD', dst, '*', 'd', ARGV[s + 1], 't', ARGV[s + 2], 'k', id, 'e', ARGV[s + 3])
    fresh[#fresh + 1] = now
    fresh[#fresh + 1] = id
  end
end
if #fresh > 0 then redis.call('ZADD', routed, unpack(fresh)) end
redis.call('ZREMRANGEBYSCORE', routed, '-inf', oldest)
return #ids
"""
PAYLOAD = json.dumps({"event_id": "x" * 36, "timestamp": 1.8e9, "event_type": "bench",
                      "order_id": "o-000001", "customer": "c-42", "total": 19.99,
                      "headers": {}})


def entries(reply: object) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of a one-stream XREADGROUP reply (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.values())[0][0]  # type: ignore[no-any-return]
    return reply[0][1]  # type: ignore[index, no-any-return]


def publisher(url: str, log: str, events: int, start: Barrier) -> None:
    client = redis.Redis.from_url(url)
    client.ping()
    start.wait()  # every process connected: the clock starts
    for i in range(0, events, 100):
        pipe = client.pipeline(transaction=False)
        for j in range(i, min(i + 100, events)):
            pipe.xadd(log, {"d": PAYLOAD, "t": 1, "k": f"ev-{j}", "e": "bench"})
        pipe.execute()


def router(url: str, prefix: str, log: str, events: int, start: Barrier) -> None:
    client = redis.Redis.from_url(url)
    copy = client.register_script(COPY)
    client.ping()
    start.wait()  # every process connected: the clock starts
    routed = 0
    while routed < events:
        batch = entries(client.xreadgroup("router", "r1", {log: ">"}, count=500, block=100))
        if not batch:
            continue
        args: list[bytes | int] = []
        for _, f in batch:
            args += [f[b"k"], f[b"d"], f[b"t"], f[b"e"]]
        pipe = client.pipeline(transaction=False)
        for s in range(SUBSCRIPTIONS):
            copy(keys=[f"{prefix}{{sub:{s}}}", f"{prefix}{{sub:{s}}}:routed"],
                 args=[int(time.time() * 1000), 600_000, *args], client=pipe)
        pipe.xack(log, "router", *[eid for eid, _ in batch])
        pipe.execute()
        routed += len(batch)


def subscriber(url: str, prefix: str, log: str, mode: str, events: int,
               start: Barrier, done: Event) -> None:
    client = redis.Redis.from_url(url)
    if mode == "copy":
        keys, groups = [f"{prefix}{{sub:{s}}}" for s in range(SUBSCRIPTIONS)], ["g"] * 3
    else:
        keys, groups = [log] * SUBSCRIPTIONS, [f"g{s}" for s in range(SUBSCRIPTIONS)]
    client.ping()
    start.wait()  # every process connected: the clock starts
    counts = [0] * SUBSCRIPTIONS
    while sum(counts) < events * SUBSCRIPTIONS:
        pipe = client.pipeline(transaction=False)
        for key, group in zip(keys, groups, strict=True):
            pipe.xreadgroup(group, "c", {key: ">"}, count=100)
        acks = client.pipeline(transaction=False)
        for s, reply in enumerate(pipe.execute()):
            ids = [eid for eid, _ in entries(reply)]
            if ids:
                counts[s] += len(ids)
                acks.xack(keys[s], groups[s], *ids)
                if mode == "copy":
                    acks.xdel(keys[s], *ids)
        if len(acks):
            acks.execute()
        else:
            time.sleep(0.0005)  # all caught up: poll again shortly
    done.set()


def run(url: str, mode: str, events: int) -> float:
    """Events per second, end to end, for ``mode`` ("copy" or "native")."""
    prefix = f"fh{uuid.uuid4().hex[:8]}:"
    log = prefix + "{all}"
    client = redis.Redis.from_url(url)
    if mode == "copy":
        client.xgroup_create(log, "router", id="0", mkstream=True)
        for s in range(SUBSCRIPTIONS):
            client.xgroup_create(f"{prefix}{{sub:{s}}}", "g", id="0", mkstream=True)
    else:
        for s in range(SUBSCRIPTIONS):
            client.xgroup_create(log, f"g{s}", id="0", mkstream=True)
    ctx = mp.get_context("spawn")
    children = 3 if mode == "copy" else 2  # publisher, subscriber (and router)
    start, done = ctx.Barrier(children + 1), ctx.Event()
    procs = [ctx.Process(target=publisher, args=(url, log, events, start)),
             ctx.Process(target=subscriber,
                         args=(url, prefix, log, mode, events, start, done))]
    if mode == "copy":
        procs.append(ctx.Process(target=router, args=(url, prefix, log, events, start)))
    for proc in procs:
        proc.start()
    try:
        start.wait()
        started = time.perf_counter()
        done.wait()
        return events / (time.perf_counter() - started)
    finally:
        for proc in procs:
            proc.join()
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="server to measure (default: a private embedded Valkey)")
    parser.add_argument("--events", type=int, default=60_000)
    args = parser.parse_args()

    def measure(url: str) -> None:
        print(f"fan-out to {SUBSCRIPTIONS}, {args.events:,} events of {len(PAYLOAD)} bytes")
        for mode in ("copy", "native"):
            print(f"  {mode:7s} {run(url, mode, args.events):>9,.0f} events/s end to end")

    if args.url:
        measure(args.url)
        return
    with tempfile.TemporaryDirectory(prefix="relaybus-bench-") as tmp:
        server = EmbeddedServer(tmp)
        try:
            measure(server.start().url)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
