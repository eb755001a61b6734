"""The scenarios of ``relaybus bench`` and :func:`run_bench`, which runs them.

``run_bench`` runs the chosen scenarios against a server (by default a private
embedded Valkey in a temporary directory, ``appendfsync everysec``, started and
stopped here, so nothing else's load is measured), repeats each one for several
rounds (5; 2 with ``quick``, on smaller counts) and prints one table row per figure:
scenario, figure, median and min-max over the rounds, and unit: figures, to compare
with another run's (the project's own targets are in docs/benchmarks.md). ``json_file`` gets the same figures with every round's value, the
machine and the versions.

Where the time goes, per scenario:

- ``publish`` and ``memory`` run in this process (the bus's own API, timed around
  the calls; building the events is not timed, encoding them is);
- ``consume``, ``fanout``, ``e2e``, ``latency``, ``payload`` and ``idle`` run the
  services in a child process of their own (:mod:`relaybus._bench.child`), as a
  deployment would, while this process publishes; each runs both fronts, the sync
  :class:`~relaybus.service.Microservice` (threads) and the
  :class:`~relaybus.aio.AsyncMicroservice` (asyncio), one child per front, their
  rounds interleaved so both see the same machine. Times that cross the two
  processes use the wall clock (``time.time()``), which both read from the same
  kernel clock.

A subscription receives the events published after it exists: every scenario
subscribes (``EventBus.subscribe``, or the service's ``start``) before publishing.

Every key goes under a fresh prefix that is deleted afterwards, so ``--url`` may
name a shared server (whose other load then shows up in the figures).
Nothing here asserts a time: the figures are for reading, not for failing a build.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import redis

from ..bus import EventBus, subscription_queue_name
from ..embedded import EmbeddedServer
from ..events import Event
from ..keys import QueueKeys
from ..testing import named_url
from .child import FRONTS, ServiceProcess
from .common import (
    DEFAULT_PAYLOAD,
    BenchEvent,
    Figure,
    environment,
    make_events,
    paced_publish,
    percentiles,
    publish_all,
    raw_fields,
    render_table,
    servers,
    temp_prefix,
    used_memory,
    wait_timeout,
)

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["SCENARIOS", "RUNNERS", "Scenario", "run_bench", "consume_round", "memory_round",
           "preload"]

_N = TypeVar("_N", int, float)
T = TypeVar("T")


class Scenario(NamedTuple):
    """A scenario ``relaybus bench`` can run: its name and a one-line description."""

    name: str
    description: str


#: Every scenario, in the order they run.
SCENARIOS: list[Scenario] = [
    Scenario("publish", "publish one event per call; publish_many in batches of 100 and 1,000"),
    Scenario("consume", "one service handling pre-loaded events: sync concurrency 1 and 8, "
                        "async (acked/s)"),
    Scenario("fanout", "end to end to 1 and 3 subscribing services in one process, "
                       "sync and async"),
    Scenario("e2e", "publish -> handler at saturation, one service, sync and async"),
    Scenario("latency", "publish call -> handler start p50/p95/p99 at 200, 1,000, 5,000 "
                        "events/s, sync and async"),
    Scenario("payload", "end to end at saturation with 2 KiB and 64 KiB payloads, "
                        "sync and async"),
    Scenario("memory", "Redis bytes per waiting event (log entry, publish-dedup records) "
                       "vs raw XADD; what is left after the acks"),
    Scenario("idle", "an idle sync and an idle async service: commands per second, CPU"),
    Scenario("partitions", "publish_many 100 and consume (sync) with 1 and 6 partitions; "
                           "round trips and requests per batch"),
]

#: Batch of ``publish_many`` in the saturation scenarios (fanout, e2e, payload 2 KiB).
PUBLISH_BATCH = 100


# -- the run context -------------------------------------------------------------------


@dataclass
class _Ctx:
    url: str = field(repr=False)  # it may hold a password
    quick: bool
    console: Console
    rounds: int
    figures: list[Figure] = field(default_factory=list)

    def n(self, full: _N, quick: _N) -> _N:
        return quick if self.quick else full

    def add(self, scenario: str, figure: str, unit: str, values: Sequence[float],
            note: str = "") -> Figure:
        fig = Figure(scenario, figure, unit, [float(v) for v in values], note)
        self.figures.append(fig)
        return fig

    def ratio(self, scenario: str, figure: str, num: Sequence[float],
              den: Sequence[float]) -> Figure:
        """A row of round-by-round ratios ``num / den`` (the rounds ran interleaved)."""
        return self.add(scenario, figure, "×",
                        [a / b for a, b in zip(num, den, strict=True) if b])

    def say(self, text: str) -> None:
        self.console.print(f"[dim]{text}[/dim]", highlight=False)


# -- publish ---------------------------------------------------------------------------


def bench_publish(ctx: _Ctx) -> None:
    """Publish: single calls, publish_many 100 and 1,000; raw pipelined XADD of the same
    fields as the reference."""
    n_single = ctx.n(5_000, 1_000)
    n_many = ctx.n(50_000, 5_000)
    single = make_events(n_single)
    rates: dict[str, list[float]] = {"single": [], "many100": [], "many1000": [], "raw100": []}
    for r in range(ctx.rounds):
        ctx.say(f"publish: round {r + 1}/{ctx.rounds}")
        with temp_prefix(ctx.url) as p, EventBus(ctx.url, prefix=p) as bus:
            bus.publish_many(make_events(10))  # warm-up: connection, server check, script
            t = time.perf_counter()
            for ev in single:
                bus.publish(ev)
            rates["single"].append(n_single / (time.perf_counter() - t))
            for key, batch in (("many100", 100), ("many1000", 1000)):
                many = make_events(n_many)  # new ids: none is a duplicate
                t = time.perf_counter()
                publish_all(bus, many, batch)
                rates[key].append(n_many / (time.perf_counter() - t))
            fields = raw_fields(bus, make_events(n_many))
            log = QueueKeys(p, "all").stream
            raw_key = log + ":bench-raw"  # beside the log (one node of a cluster)
            with servers(ctx.url, log) as (client,):
                t = time.perf_counter()
                for i in range(0, n_many, 100):
                    pipe = client.pipeline(transaction=False)
                    for f in fields[i: i + 100]:
                        pipe.xadd(raw_key, f)
                    pipe.execute()
                rates["raw100"].append(n_many / (time.perf_counter() - t))
    ctx.add("publish", "publish(), one event per call", "events/s", rates["single"])
    ctx.add("publish", "publish_many, batches of 100", "events/s", rates["many100"])
    ctx.add("publish", "publish_many, batches of 1,000", "events/s", rates["many1000"])
    ctx.add("publish", "raw XADD pipelined ×100, same fields (reference)", "events/s",
            rates["raw100"])
    ratios = [m / r for m, r in zip(rates["many100"], rates["raw100"], strict=True)]
    ctx.add("publish", "publish_many 100 ÷ raw XADD", "%", [100 * x for x in ratios])


# -- consume ---------------------------------------------------------------------------


def preload(url: str, prefix: str, service: str, events: Sequence[Event],
            partitions: int | None = None) -> None:
    """Subscribe ``service`` to :class:`BenchEvent`, then publish ``events`` (so its
    subscription holds them all, waiting), on a bus of ``partitions``."""
    with EventBus(url, prefix=prefix, partitions=partitions) as bus:
        bus.subscribe(service, [BenchEvent])
        publish_all(bus, events, 1000)


def consume_round(url: str, child: ServiceProcess, events: Sequence[Event], concurrency: int = 1,
                  name: str = "bench-consume", front: str = "sync",
                  partitions: int | None = None) -> float:
    """Pre-load ``events`` into a fresh subscription (on a bus of ``partitions``), then
    have a new service of ``front`` in ``child`` handle them all; return events handled
    and acknowledged per second, from its ``start()`` call to the last acknowledgement.
    The service runs no maintenance (the log's trim), so only consuming is timed."""
    n = len(events)
    with temp_prefix(url) as p:
        preload(url, p, name, events, partitions)
        res = child.request("start", reply_within=wait_timeout(n) + 10, front=front, prefix=p,
                            services=[name], concurrency=concurrency, maintenance=False,
                            wait_n=n, timeout=wait_timeout(n))
        child.request("close")
    if min(res["handled"]) < n:
        raise RuntimeError(f"consume ({front}): handled {res['handled']} of {n} in time")
    return float(n / (res["t_end"] - res["t0"]))


def bench_consume(ctx: _Ctx) -> None:
    """A fresh service (in a child process) handles N pre-loaded events: start() to last ack."""
    n = ctx.n(20_000, 2_000)
    events = make_events(n)
    variants = [("sync", 1), ("sync", 8), ("async", 1)]
    rates: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    with contextlib.ExitStack() as stack:
        children = {front: stack.enter_context(ServiceProcess(ctx.url)) for front in FRONTS}
        for front, child in children.items():  # imports, connections, scripts: untimed
            consume_round(ctx.url, child, events[:200], 1, "bench-warm", front)
        for r in range(ctx.rounds):
            for front, concurrency in variants:
                ctx.say(f"consume: {front}, concurrency {concurrency}, "
                        f"round {r + 1}/{ctx.rounds}")
                rates[front, concurrency].append(
                    consume_round(ctx.url, children[front], events, concurrency, front=front))
    for (front, concurrency), values in rates.items():
        ctx.add("consume", f"{front}, concurrency {concurrency}, handled + acked", "events/s",
                values)
    ctx.ratio("consume", "async ÷ sync, concurrency 1", rates["async", 1], rates["sync", 1])


# -- fanout, e2e, payload: end to end at saturation ----------------------------------------


def _expect(child: ServiceProcess, n: int, publish: Callable[[], T], label: str,
            latencies: bool = False) -> tuple[float, T, dict[str, Any]]:
    """Arm ``child`` for ``n`` events per service, call ``publish``; return
    ``time.time()`` just before it, what it returned, and the child's result once
    every service acknowledged all ``n``."""
    timeout = wait_timeout(n)
    child.request("expect", n=n, timeout=timeout, latencies=latencies)
    t0 = time.time()
    value = publish()
    res = child.recv(timeout + 10)
    if min(res["handled"]) < n:
        raise RuntimeError(f"{label}: handled {res['handled']} of {n} each in time")
    return t0, value, res


def _saturation(ctx: _Ctx, scenario: str, n_services: int, n: int, payload: int, batch: int,
                label: str) -> dict[str, list[float]]:
    """End to end at saturation, per front: ``n_services`` services (each a subscription
    of its own) in one child process; this process publishes ``n`` events with
    ``publish_many(batch)`` as fast as it can; from ``time.time()`` before the first
    publish to the last service's last acknowledgement. Figure: N / elapsed."""
    rates: dict[str, list[float]] = {front: [] for front in FRONTS}
    with contextlib.ExitStack() as stack:
        runs: dict[str, tuple[ServiceProcess, EventBus]] = {}
        for front in FRONTS:
            p = stack.enter_context(temp_prefix(ctx.url))  # entered first: deleted last
            child = stack.enter_context(ServiceProcess(ctx.url))
            bus = stack.enter_context(EventBus(ctx.url, prefix=p))
            names = [f"bench-{scenario}-{i}" for i in range(n_services)]
            child.request("start", front=front, prefix=p, services=names)
            warm = make_events(min(200, n), payload)  # connections, scripts: untimed
            _expect(child, len(warm), partial(publish_all, bus, warm, batch),
                    f"{label} ({front}) warm-up")
            runs[front] = (child, bus)
        for r in range(ctx.rounds):
            for front, (child, bus) in runs.items():
                ctx.say(f"{label}: {front}, round {r + 1}/{ctx.rounds}")
                events = make_events(n, payload)  # new event ids: no dedup across rounds
                t0, _, res = _expect(child, n, partial(publish_all, bus, events, batch),
                                     f"{label} ({front})")
                rates[front].append(n / (res["t_end"] - t0))
    return rates


def bench_fanout(ctx: _Ctx) -> None:
    """Fan-out end to end to 1 and 3 subscribing services, all in one child process."""
    n = ctx.n(20_000, 2_000)
    for n_services in (1, 3):
        what = f"to {n_services} service{'s' if n_services > 1 else ''}"
        rates = _saturation(ctx, "fanout", n_services, n, DEFAULT_PAYLOAD, PUBLISH_BATCH,
                            f"fanout {what}")
        for front in FRONTS:
            ctx.add("fanout", f"{what}, {front} (per published event)", "events/s",
                    rates[front])
        ctx.ratio("fanout", f"{what}: async ÷ sync", rates["async"], rates["sync"])


def bench_e2e(ctx: _Ctx) -> None:
    """End to end at saturation, one service, ~265-byte events."""
    n = ctx.n(20_000, 2_000)
    rates = _saturation(ctx, "e2e", 1, n, DEFAULT_PAYLOAD, PUBLISH_BATCH, "e2e")
    for front in FRONTS:
        ctx.add("e2e", f"{front}, saturation, publish → handler → ack", "events/s",
                rates[front])
    ctx.ratio("e2e", "async ÷ sync", rates["async"], rates["sync"])


def bench_payload(ctx: _Ctx) -> None:
    """End to end at saturation with 2 KiB and 64 KiB payloads."""
    for size, label, n, batch in ((2048, "2 KiB", ctx.n(10_000, 1_000), PUBLISH_BATCH),
                                  (65536, "64 KiB", ctx.n(1_000, 100), 10)):
        rates = _saturation(ctx, "payload", 1, n, size, batch, f"payload {label}")
        for front in FRONTS:
            ctx.add("payload", f"{label}, {front}, end to end at saturation", "events/s",
                    rates[front])
            ctx.add("payload", f"{label}, {front}, end to end at saturation", "MB/s",
                    [r * size / 1e6 for r in rates[front]])


# -- latency ---------------------------------------------------------------------------


def bench_latency(ctx: _Ctx) -> None:
    """Publish call -> handler start, one event per publish call at a paced rate."""
    seconds = {200: ctx.n(5.0, 1.0), 1000: ctx.n(5.0, 1.0), 5000: ctx.n(3.0, 0.5)}
    for front in FRONTS:
        with temp_prefix(ctx.url) as p, ServiceProcess(ctx.url) as child, \
                EventBus(ctx.url, prefix=p) as bus:
            child.request("start", front=front, prefix=p, services=["bench-latency"])
            warm = make_events(300)
            _expect(child, len(warm), partial(paced_publish, bus, warm, 1000),
                    f"latency ({front}) warm-up")
            for rate, secs in seconds.items():
                n = int(rate * secs)
                p50, p95, p99, offered = [], [], [], []
                for r in range(ctx.rounds):
                    ctx.say(f"latency: {front}, {rate:,} events/s offered, "
                            f"round {r + 1}/{ctx.rounds}")
                    events = make_events(n)
                    _, achieved, res = _expect(child, n, partial(paced_publish, bus, events, rate),
                                               f"latency ({front})", latencies=True)
                    a, b, c = percentiles([x * 1000 for x in res["latencies"]])
                    p50.append(a)
                    p95.append(b)
                    p99.append(c)
                    offered.append(achieved)
                label = f"{front}, {rate:,}/s offered"
                ctx.add("latency", f"{label}: p50", "ms", p50)
                ctx.add("latency", f"{label}: p95", "ms", p95)
                ctx.add("latency", f"{label}: p99", "ms", p99)
                ctx.add("latency", f"{label}: rate achieved by the publisher", "events/s",
                        offered)


# -- memory ----------------------------------------------------------------------------


def _key_bytes(client: redis.Redis, *keys: str) -> int:
    return sum(int(client.memory_usage(k, samples=0) or 0) for k in keys)


def memory_round(url: str, n: int) -> dict[str, float]:
    """One memory measurement over ``n`` events published to one subscription.

    Bytes per event: ``log`` (``MEMORY USAGE`` of the event log: the entry every
    subscription reads; there are no copies), ``dedup`` (the publish-dedup records,
    kept for the dedup window: the ``P{all}:published`` zset and the
    ``P{all}:published:ids`` hash), ``waiting`` (the two together: what a waiting event
    costs), ``grown`` (``INFO memory`` ``used_memory`` growth over the publishing, as a
    cross-check), ``raw`` (plain XADD of the very fields relaybus wrote, into a stream
    of its own: the reference), ``done`` (the subscription's done records, kept for
    the dedup window, once every event is acknowledged the way a service does) and
    ``left`` (``used_memory`` after the acknowledgements minus before publishing: the
    log, the dedup and the done records). ``pending``: entries of the log still
    pending for the subscription after the acknowledgements (0 expected).
    """
    events = make_events(n)
    name = "bench-memory"
    with temp_prefix(url) as p, EventBus(url, prefix=p) as bus, \
            servers(url, QueueKeys(p, "all").stream) as (client,):  # the log's node
        bus.subscribe(name, [BenchEvent])
        queue, _ = bus.subscription_queue(name)
        log = QueueKeys(p, "all")
        m0 = used_memory(client)
        publish_all(bus, events, 1000)
        m1 = used_memory(client)
        log_bytes = _key_bytes(client, log.stream)
        dedup_bytes = _key_bytes(client, log.published, log.published_ids)
        fields = raw_fields(bus, events)
        raw_key = log.stream + ":bench-raw"  # beside the log (one node of a cluster)
        for i in range(0, n, 1000):
            pipe = client.pipeline(transaction=False)
            for f in fields[i: i + 1000]:
                pipe.xadd(raw_key, f)
            pipe.execute()
        raw_bytes = _key_bytes(client, raw_key)
        client.delete(raw_key)
        acked = 0
        while True:  # acknowledge everything, recording each event as done
            msgs = queue.get_messages(count=1000, consumer_id="bench")
            if not msgs:
                break
            acked += queue.acknowledge_messages(
                [m.id for m in msgs], record_done=[m.dedup_key or "" for m in msgs])
        if acked != n:
            raise RuntimeError(f"memory: acknowledged {acked} of {n}")
        m2 = used_memory(client)
        done_bytes = _key_bytes(client, QueueKeys(p, subscription_queue_name(name)).done)
        pending = int(client.xpending(log.stream, subscription_queue_name(name))["pending"])
    return {"log": log_bytes / n, "dedup": dedup_bytes / n,
            "waiting": (log_bytes + dedup_bytes) / n, "grown": (m1 - m0) / n,
            "raw": raw_bytes / n, "done": done_bytes / n, "left": (m2 - m0) / n,
            "pending": pending}


def bench_memory(ctx: _Ctx) -> None:
    """Bytes per waiting event: the log entry and the dedup records vs raw XADD; what
    is left after every event is acknowledged."""
    n = ctx.n(100_000, 10_000)
    rounds = []
    for r in range(ctx.rounds):
        ctx.say(f"memory: {n:,} events, round {r + 1}/{ctx.rounds}")
        rounds.append(memory_round(ctx.url, n))

    def col(key: str) -> list[float]:
        return [x[key] for x in rounds]

    ctx.add("memory", "per waiting event: log entry + publish-dedup records", "bytes",
            col("waiting"))
    ctx.add("memory", "  of which the log entry (MEMORY USAGE of the log)", "bytes", col("log"))
    ctx.add("memory", "  of which the dedup records (published zset + ids hash)", "bytes",
            col("dedup"))
    ctx.add("memory", "  used_memory growth while publishing (cross-check)", "bytes",
            col("grown"))
    ctx.add("memory", "raw XADD of the same fields, per entry (reference)", "bytes", col("raw"))
    ctx.ratio("memory", "per waiting event ÷ raw XADD", col("waiting"), col("raw"))
    ctx.ratio("memory", "log entry ÷ raw XADD", col("log"), col("raw"))
    ctx.add("memory", "subscription's done records after the acks, per event", "bytes",
            col("done"))
    ctx.add("memory", "left after every ack, per event (log + dedup + done records)", "bytes",
            col("left"))
    ctx.add("memory", "log entries still pending for the subscription after the acks",
            "entries", col("pending"))


# -- idle ------------------------------------------------------------------------------


def _client_cmds(nodes: list[redis.Redis], name: str) -> int:
    return sum(int(c.get("tot-cmds", 0)) for node in nodes for c in node.client_list()
               if c.get("name") == name)


def bench_idle(ctx: _Ctx) -> None:
    """An idle sync and an idle async service (default settings, maintenance on), each
    in a child process of its own, measured over consecutive windows: commands it sends
    (counted in its process), commands the server ran for its connections (CLIENT LIST
    tot-cmds, which counts the commands inside scripts too), and its CPU time over wall
    time."""
    window = ctx.n(10.0, 2.0)  # whole periods of the idle fetch (2 s)
    names = {front: f"relaybus-bench-idle-{front}" for front in FRONTS}
    rows: dict[tuple[str, str], list[float]] = {
        (front, k): [] for front in FRONTS for k in ("sent", "requests", "server", "cpu")}
    with temp_prefix(ctx.url) as p, contextlib.ExitStack() as stack:
        children = {front: stack.enter_context(ServiceProcess(named_url(ctx.url, name),
                                                              count_commands=True))
                    for front, name in names.items()}
        for front, child in children.items():
            child.request("start", front=front, prefix=p, services=[f"bench-idle-{front}"])
        nodes = stack.enter_context(servers(ctx.url))  # a cluster: every primary
        time.sleep(ctx.n(3.0, 1.0))  # let start-up traffic pass (first trim, first fetch)
        for r in range(ctx.rounds):
            ctx.say(f"idle: window {r + 1}/{ctx.rounds} of {window:g}s")
            before = {front: _client_cmds(nodes, name) for front, name in names.items()}
            for child in children.values():
                child.request("begin")
            time.sleep(window)
            ends = {front: c.request("end") for front, c in children.items()}
            after = {front: _client_cmds(nodes, name) for front, name in names.items()}
            for front, end in ends.items():
                rows[front, "sent"].append(end["commands"] / end["wall"])
                rows[front, "requests"].append(end["requests"] / end["wall"])
                rows[front, "server"].append((after[front] - before[front]) / end["wall"])
                rows[front, "cpu"].append(100 * end["cpu"] / end["wall"])
        for child in children.values():
            child.request("close")
    for front in FRONTS:
        ctx.add("idle", f"{front}: commands sent", "commands/s", rows[front, "sent"])
        ctx.add("idle", f"  {front}: requests (round trips) they went in", "requests/s",
                rows[front, "requests"])
        ctx.add("idle", f"  {front}: commands the server ran for it (scripts' included)",
                "commands/s", rows[front, "server"])
        ctx.add("idle", f"{front}: CPU", "%", rows[front, "cpu"])


# -- partitions ----------------------------------------------------------------------------

#: The partition counts the ``partitions`` scenario compares.
PARTITION_COUNTS = (1, 6)


def _exchanges(bus: EventBus, events: Sequence[Event]) -> tuple[int, int]:
    """Round trips and requests (one per node written) of one ``publish_many(events)``."""
    driver: Any = bus.mq.driver
    talk = driver._talk
    counted: list[int] = []

    def counting(batches: Any) -> Any:
        counted.append(len(batches))
        return talk(batches)

    driver._talk = counting
    try:
        bus.publish_many(events)
    finally:
        driver._talk = talk
    return len(counted), sum(counted)


def bench_partitions(ctx: _Ctx) -> None:
    """Publish (batches of 100) and consume (a fresh sync service, pre-loaded events)
    on buses of 1 and 6 partitions; with the round trips of one batch's publish."""
    n_pub = ctx.n(50_000, 5_000)
    n_con = ctx.n(20_000, 2_000)
    publish: dict[int, list[float]] = {n: [] for n in PARTITION_COUNTS}
    consume: dict[int, list[float]] = {n: [] for n in PARTITION_COUNTS}
    trips: dict[int, tuple[int, int]] = {}
    with ServiceProcess(ctx.url) as child:
        consume_round(ctx.url, child, make_events(200), name="bench-warm")  # untimed
        for r in range(ctx.rounds):
            for n in PARTITION_COUNTS:
                ctx.say(f"partitions: {n}, round {r + 1}/{ctx.rounds}")
                with temp_prefix(ctx.url) as p, EventBus(ctx.url, prefix=p, partitions=n) as bus:
                    bus.subscribe("bench-partitions", [BenchEvent])
                    trips[n] = _exchanges(bus, make_events(PUBLISH_BATCH))  # warm, counted
                    events = make_events(n_pub)
                    t = time.perf_counter()
                    publish_all(bus, events, PUBLISH_BATCH)
                    publish[n].append(n_pub / (time.perf_counter() - t))
                consume[n].append(consume_round(ctx.url, child, make_events(n_con),
                                                name="bench-partitions", partitions=n))
    for n in PARTITION_COUNTS:
        ctx.add("partitions", f"{n} partition{'s' if n > 1 else ''}: publish_many 100",
                "events/s", publish[n])
        ctx.add("partitions", f"{n} partition{'s' if n > 1 else ''}: consume, sync",
                "events/s", consume[n])
        exchanges, requests = trips[n]
        ctx.add("partitions", f"{n} partition{'s' if n > 1 else ''}: one batch's publish",
                "round trips", [exchanges])
        ctx.add("partitions", f"{n} partition{'s' if n > 1 else ''}: one batch's publish",
                "requests", [requests], "one per node written, side by side")


RUNNERS: dict[str, Callable[[_Ctx], None]] = {
    "publish": bench_publish,
    "consume": bench_consume,
    "fanout": bench_fanout,
    "e2e": bench_e2e,
    "latency": bench_latency,
    "payload": bench_payload,
    "memory": bench_memory,
    "idle": bench_idle,
    "partitions": bench_partitions,
}


# -- the entry point --------------------------------------------------------------------


def run_bench(scenarios: list[str] | None, *, url: str | None = None, quick: bool = False,
              json_file: str | None = None, console: Console | None = None,
              rounds: int | None = None) -> int:
    """Run ``scenarios`` (None or empty: all of :data:`SCENARIOS`) and print the table.

    ``url``: the server (default: a private embedded Valkey started and stopped here).
    ``quick``: 2 rounds on small counts (under a minute), for CI smoke runs.
    ``json_file``: also write every figure, every round, the machine and the versions.
    ``rounds``: override the number of rounds (5; 2 with ``quick``).
    Returns 0 when every scenario ran, 1 when one failed (the others still run and the
    table shows what was measured), 2 for an unknown scenario name.
    """
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log or a pipe: keep the table's rows on one line
            console = Console(width=150)
    known = [s.name for s in SCENARIOS]
    chosen = list(dict.fromkeys(scenarios or known))
    unknown = [s for s in chosen if s not in known]
    if unknown:
        console.print(f"[red]unknown scenario {', '.join(unknown)}[/red]; "
                      f"choose from {', '.join(known)}")
        return 2
    chosen = [s for s in known if s in chosen]
    gc.collect()  # the start-up heap out of the collector's sight, as in the children
    gc.freeze()
    with contextlib.ExitStack() as stack:
        embedded = url is None
        if embedded:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="relaybus-bench-"))
            server = EmbeddedServer(tmp, appendfsync="everysec")
            url = server.start().url
            stack.callback(server.stop)
        else:
            from ..connection import resolve_url

            url = resolve_url(url)
        assert url is not None
        env = environment(url, embedded)
        started = time.time()
        console.print(
            f"relaybus {env['relaybus']} benchmarks: {', '.join(chosen)}"
            f"{' (quick)' if quick else ''}\n"
            f"server {env.get('server')} ({env['server_url']}; "
            f"{env.get('server_persistence', '?')}), Python {env['python']}, "
            f"redis-py {env['redis_py']}, hiredis {env['hiredis'] or 'no'}\n"
            f"{env['nproc']} × {env['cpu']}, {env['memory']}, load average "
            f"{', '.join(f'{x:.2f}' for x in env['loadavg_at_start'] or [])}",
            highlight=False)
        ctx = _Ctx(url=url, quick=quick, console=console,
                   rounds=rounds if rounds else (2 if quick else 5))
        errors: dict[str, str] = {}
        durations: dict[str, float] = {}
        for name in chosen:
            t = time.monotonic()
            try:
                RUNNERS[name](ctx)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                console.print(f"[red]{name} failed: {errors[name]}[/red]", highlight=False)
            durations[name] = time.monotonic() - t
        elapsed = time.time() - started
        console.print(render_table(ctx.figures,
                                   title=f"relaybus benchmarks ({'quick, ' if quick else ''}"
                                         f"median of {ctx.rounds} rounds)"))
        console.print(f"took {elapsed:.0f}s; "
                      + ", ".join(f"{k} {v:.0f}s" for k, v in durations.items()),
                      highlight=False)
        if json_file:
            doc = {
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                "seconds": elapsed,
                "quick": quick,
                "rounds": ctx.rounds,
                "scenarios": chosen,
                "environment": env,
                "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                "figures": [f.as_dict() for f in ctx.figures],
                "errors": errors,
            }
            with open(json_file, "w") as fh:
                json.dump(doc, fh, indent=2)
            console.print(f"wrote {json_file}", highlight=False)
        return 1 if errors else 0
