"""relaybus side by side with the raw redis-py ceiling and FastStream, same server, same run.

Run it with (needs the ``bench`` extra: ``pip install -e '.[bench]'``)::

    .venv/bin/python bench/compare.py                 # a private embedded Valkey
    .venv/bin/python bench/compare.py --quick         # small counts, 2 rounds
    .venv/bin/python bench/compare.py --url redis://127.0.0.1:6379/9 --json compare.json

Each round runs every workload through every implementation, one after the other,
on the same server; the table shows the median and min-max over the rounds and each
figure as a ratio to relaybus's (``× relaybus``: 2.00 means twice relaybus's figure).

Workloads (payload: the ~200-byte JSON event of ``relaybus.benchmark``):

- publish, one per call: raw ``XADD``; FastStream ``broker.publish(stream=...)``;
  relaybus ``EventBus.publish``.
- publish, batches of 100: raw ``XADD`` x100 in one pipeline; FastStream
  ``broker.publish(..., pipeline=pipe)`` x100 then ``pipe.execute()``; relaybus
  ``publish_many``.
- consume, one consumer: N pre-loaded entries, handled and acknowledged, from the
  start of consuming to the last acknowledgement. Raw: ``XREADGROUP COUNT 100`` then
  one pipeline of ``XACK`` per entry (no decoding: the ceiling), and the same with
  each entry decoded into the typed event (``json.loads`` + pydantic validation).
  FastStream: a ``StreamSub`` subscriber with a consumer group (``group=``,
  ``consumer=``, ``max_records=100``), a typed pydantic handler, default ack policy
  (acknowledged after the handler), logging off. relaybus: a ``Microservice`` with
  concurrency 1 in a process of its own (as ``relaybus bench consume``).
- memory per waiting entry: ``INFO memory`` ``used_memory`` delta over N entries:
  raw ``XADD`` of relaybus's own fields; FastStream's entries (its binary envelope);
  relaybus's subscription queue (stream + routed-id set).

Event objects (relaybus events, FastStream's pydantic models) are built before the
clock starts; encoding them is timed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from pydantic import BaseModel
from rich import box
from rich.console import Console
from rich.table import Table

from relaybus import EventBus
from relaybus.benchmark import (
    BenchEvent,
    ServiceProcess,
    consume_round,
    environment,
    fmt,
    make_events,
    memory_round,
    publish_all,
    raw_fields,
    temp_prefix,
    used_memory,
)
from relaybus.embedded import EmbeddedServer
from relaybus.events import serialize_event
from relaybus.keys import QueueKeys

GROUP = "bench"

try:
    from faststream.redis import RedisBroker, StreamSub
except ImportError:  # pragma: no cover - the bench extra is missing
    RedisBroker = None  # type: ignore[assignment,misc]


class FsEvent(BaseModel):
    """FastStream's typed message: the same fields as the relaybus event's payload."""

    event_id: str
    timestamp: float
    event_type: str
    correlation_id: str | None = None
    causation_id: str | None = None
    headers: dict[str, str] = {}
    order_id: str
    customer: str
    total: float
    sent_at: float = 0.0
    note: str = ""


IMPLS = ("raw redis-py", "raw + typed decode", "FastStream", "relaybus")


@contextlib.contextmanager
def server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="relaybus-compare-") as tmp:
        srv = EmbeddedServer(tmp, appendfsync="everysec")
        state = srv.start()
        try:
            yield state.url
        finally:
            srv.stop()


def _rate(n: int, fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def _stream_entries(reply: Any) -> list[Any]:
    """Entries of an XREADGROUP reply on one stream (RESP2 list or RESP3 dict)."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else [s[1] for s in reply]
    out: list[Any] = []
    for entries in streams:
        if entries and isinstance(entries[0], list) and entries[0] and \
                isinstance(entries[0][0], (list, tuple)):
            entries = entries[0]
        out.extend(entries)
    return out


# -- raw redis-py ------------------------------------------------------------------------


def raw_publish(client: redis.Redis, key: str, fields: list[dict[Any, Any]], batch: int
                ) -> float:
    def run() -> None:
        if batch == 1:
            for f in fields:
                client.xadd(key, f)
            return
        for i in range(0, len(fields), batch):
            pipe = client.pipeline(transaction=False)
            for f in fields[i: i + batch]:
                pipe.xadd(key, f)
            pipe.execute()

    return _rate(len(fields), run)


def raw_consume(client: redis.Redis, key: str, fields: list[dict[Any, Any]], decode: bool
                ) -> float:
    client.xgroup_create(key, GROUP, id="0", mkstream=True)
    for i in range(0, len(fields), 1000):
        pipe = client.pipeline(transaction=False)
        for f in fields[i: i + 1000]:
            pipe.xadd(key, f)
        pipe.execute()
    n = len(fields)

    def run() -> None:
        done = 0
        while done < n:
            entries = _stream_entries(client.xreadgroup(GROUP, "c1", {key: ">"}, count=100))
            if not entries:
                raise RuntimeError(f"raw consume: stream ran dry after {done} of {n}")
            if decode:
                for _, raw in entries:
                    BenchEvent.model_validate(json.loads(raw[b"d"]))
            pipe = client.pipeline(transaction=False)
            for entry_id, _ in entries:
                pipe.xack(key, GROUP, entry_id)
            pipe.execute()
            done += len(entries)

    return _rate(n, run)


def relaybus_publish(bus: EventBus, events: list[BenchEvent], batch: int) -> float:
    def run() -> None:
        if batch == 1:
            for e in events:
                bus.publish(e)
        else:
            publish_all(bus, events, batch)

    return _rate(len(events), run)


# -- FastStream ------------------------------------------------------------------------


def _fs_models(events: list[BenchEvent]) -> list[FsEvent]:
    return [FsEvent(**serialize_event(e)) for e in events]


async def _fs_publish(url: str, key: str, models: list[FsEvent], batch: int) -> float:
    broker = RedisBroker(url, logger=None)
    client = await broker.connect()  # FastStream's redis.asyncio client
    try:
        t = time.perf_counter()
        if batch == 1:
            for m in models:
                await broker.publish(m, stream=key)
        else:
            for i in range(0, len(models), batch):
                async with client.pipeline(transaction=False) as pipe:
                    for m in models[i: i + batch]:
                        await broker.publish(m, stream=key, pipeline=pipe)
                    await pipe.execute()
        return len(models) / (time.perf_counter() - t)
    finally:
        await broker.stop()


async def _fs_consume(url: str, key: str, models: list[FsEvent]) -> float:
    n = len(models)
    raw = redis.Redis.from_url(url)
    raw.xgroup_create(key, GROUP, id="0", mkstream=True)  # pre-loaded entries count
    await _fs_publish(url, key, models, 100)
    broker = RedisBroker(url, logger=None)
    done = asyncio.Event()
    count = 0

    @broker.subscriber(stream=StreamSub(key, group=GROUP, consumer="c1", max_records=100))
    async def handle(body: FsEvent) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    try:
        t = time.perf_counter()
        await broker.start()
        await asyncio.wait_for(done.wait(), timeout=30 + n / 200)
        while int(raw.xpending(key, GROUP)["pending"]) > 0:  # the last acks
            await asyncio.sleep(0.0005)
        return n / (time.perf_counter() - t)
    finally:
        await broker.stop()
        raw.close()


def fs_memory(url: str, key: str, models: list[FsEvent]) -> float:
    client = redis.Redis.from_url(url)
    try:
        m0 = used_memory(client)
        asyncio.run(_fs_publish(url, key, models, 1000))
        m1 = used_memory(client)
        return (m1 - m0) / len(models)
    finally:
        client.close()


def raw_memory(url: str, key: str, fields: list[dict[Any, Any]]) -> float:
    client = redis.Redis.from_url(url)
    try:
        m0 = used_memory(client)
        raw_publish(client, key, fields, 1000)
        m1 = used_memory(client)
        return (m1 - m0) / len(fields)
    finally:
        client.close()


# -- the run ---------------------------------------------------------------------------


WORKLOADS = {
    "publish, one per call": "events/s",
    "publish, batches of 100": "events/s",
    "consume, one consumer": "events/s",
    "memory per waiting entry": "bytes",
}


def run(url: str, rounds: int, quick: bool, say: Callable[[str], None]
        ) -> dict[str, dict[str, list[float]]]:
    n_single = 1_000 if quick else 5_000
    n_batch = 5_000 if quick else 50_000
    n_consume = 2_000 if quick else 20_000
    n_memory = 10_000 if quick else 100_000
    res: dict[str, dict[str, list[float]]] = {w: {i: [] for i in IMPLS} for w in WORKLOADS}

    def add(workload: str, impl: str, value: float) -> None:
        res[workload][impl].append(value)

    with ServiceProcess(url) as child:
        consume_round(url, child, make_events(200), 1, "bench-warm")
        for r in range(rounds):
            events = make_events(n_batch)
            models = _fs_models(events)
            with temp_prefix(url, "cmp") as p, EventBus(url, prefix=p) as bus:
                client = bus.mq.client
                fields = raw_fields(bus, events)
                say(f"round {r + 1}/{rounds}: publish")
                bus.publish_many(make_events(10))  # warm-up
                for workload, batch, n in (("publish, one per call", 1, n_single),
                                           ("publish, batches of 100", 100, n_batch)):
                    add(workload, "raw redis-py",
                        raw_publish(client, QueueKeys(p, f"raw{batch}").stream, fields[:n],
                                    batch))
                    add(workload, "FastStream",
                        asyncio.run(_fs_publish(url, QueueKeys(p, f"fs{batch}").stream,
                                                models[:n], batch)))
                    add(workload, "relaybus", relaybus_publish(bus, events[:n], batch))
                say(f"round {r + 1}/{rounds}: consume")
                cons = events[:n_consume]
                add("consume, one consumer", "raw redis-py",
                    raw_consume(client, QueueKeys(p, "rawc").stream, fields[:n_consume], False))
                add("consume, one consumer", "raw + typed decode",
                    raw_consume(client, QueueKeys(p, "rawd").stream, fields[:n_consume], True))
                add("consume, one consumer", "FastStream",
                    asyncio.run(_fs_consume(url, QueueKeys(p, "fsc").stream,
                                            models[:n_consume])))
            add("consume, one consumer", "relaybus", consume_round(url, child, cons, 1))
            say(f"round {r + 1}/{rounds}: memory")
            mem_events = make_events(n_memory)
            with temp_prefix(url, "cmp") as p, EventBus(url, prefix=p) as bus:
                add("memory per waiting entry", "raw redis-py",
                    raw_memory(url, QueueKeys(p, "rawm").stream, raw_fields(bus, mem_events)))
                add("memory per waiting entry", "FastStream",
                    fs_memory(url, QueueKeys(p, "fsm").stream, _fs_models(mem_events)))
            add("memory per waiting entry", "relaybus", memory_round(url, n_memory)["sub"])
    return res


def table(res: dict[str, dict[str, list[float]]], rounds: int) -> Table:
    t = Table(title=f"relaybus vs raw redis-py and FastStream (median of {rounds} rounds)",
              box=box.SIMPLE_HEAVY, title_justify="left")
    for col, justify in (("workload", "left"), ("implementation", "left"), ("median", "right"),
                         ("min–max", "right"), ("unit", "left"), ("× relaybus", "right")):
        t.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for workload, impls in res.items():
        base = statistics.median(impls["relaybus"]) if impls["relaybus"] else float("nan")
        first = True
        for impl, values in impls.items():
            if not values:
                continue
            med = statistics.median(values)
            t.add_row(workload if first else "", impl, fmt(med),
                      f"{fmt(min(values))}–{fmt(max(values))}", WORKLOADS[workload],
                      f"{med / base:.2f}" if base == base and base else "-",
                      style="bold" if impl == "relaybus" else None)
            first = False
    return t


def checks(res: dict[str, dict[str, list[float]]]) -> list[tuple[str, str, bool]]:
    """The issue's targets that compare implementations."""
    def med(w: str, i: str) -> float:
        v = res[w][i]
        return statistics.median(v) if v else float("nan")

    out = []
    pub = med("publish, batches of 100", "relaybus") / med("publish, batches of 100",
                                                           "raw redis-py")
    out.append(("publish_many ≥ 70% of raw pipelined XADD", f"{100 * pub:.0f}%", pub >= 0.7))
    c_rb = med("consume, one consumer", "relaybus")
    c_fs = med("consume, one consumer", "FastStream")
    out.append(("consume (c=1) ≥ 20,000 events/s", f"{c_rb:,.0f}/s", c_rb >= 20_000))
    out.append(("consume (c=1) ≥ 4× FastStream", f"{c_rb / c_fs:.2f}×", c_rb / c_fs >= 4))
    mem = med("memory per waiting entry", "relaybus") / med("memory per waiting entry",
                                                            "raw redis-py")
    out.append(("memory ≤ 1.5× raw XADD", f"{mem:.2f}×", mem <= 1.5))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="server URL (default: a private embedded Valkey)")
    parser.add_argument("--quick", action="store_true", help="small counts, 2 rounds")
    parser.add_argument("--rounds", type=int, help="rounds (default 5, quick 2)")
    parser.add_argument("--json", dest="json_file", help="also write the figures to FILE")
    args = parser.parse_args()
    if RedisBroker is None:
        print("FastStream is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    console = Console()
    if not console.is_terminal:
        console = Console(width=130)
    rounds = args.rounds or (2 if args.quick else 5)
    started = time.time()
    with server(args.url) as url:
        env = environment(url, args.url is None)
        from importlib import metadata
        env["faststream"] = metadata.version("faststream")
        console.print(f"server {env.get('server')}, Python {env['python']}, redis-py "
                      f"{env['redis_py']}, hiredis {env['hiredis'] or 'no'}, FastStream "
                      f"{env['faststream']}; {env['nproc']} × {env['cpu']}; load average "
                      f"{', '.join(f'{x:.2f}' for x in env['loadavg_at_start'] or [])}",
                      highlight=False)
        res = run(url, rounds, args.quick, lambda s: console.print(f"[dim]{s}[/dim]"))
    console.print(table(res, rounds))
    for text, value, ok in checks(res):
        console.print(f"  {'[green]ok  [/]' if ok else '[red]miss[/]'} {text}: {value}",
                      highlight=False)
    console.print(f"took {time.time() - started:.0f}s", highlight=False)
    if args.json_file:
        with open(args.json_file, "w") as fh:
            json.dump({"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                   time.localtime(started)),
                       "rounds": rounds, "quick": args.quick, "environment": env,
                       "results": res,
                       "checks": [{"check": c, "value": v, "ok": ok}
                                  for c, v, ok in checks(res)]}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
