"""relaybus side by side with the raw redis-py ceiling and FastStream, same server, same run.

Run it with (needs the ``bench`` extra: ``pip install -e '.[bench]'``)::

    .venv/bin/python bench/compare.py                 # a private embedded Valkey
    .venv/bin/python bench/compare.py --quick         # small counts, 2 rounds
    .venv/bin/python bench/compare.py --url redis://127.0.0.1:6379/9 --json compare.json
    .venv/bin/python bench/compare.py --quick --only fanout1 fanout3 latency \\
        --impl "raw redis-py" FastStream

Each round runs every chosen workload (``--only``; default all) through every chosen
implementation (``--impl``; default all), one after the other, on the same server; the
table shows the median and min-max over the rounds and each figure as a ratio to
relaybus's (``× relaybus``: 2.00 means twice relaybus's figure; in the consume,
fan-out and latency rows the ratio is to "relaybus sync"). An implementation that
fails in a workload is reported under the table and not tried again in that workload;
one that does not exist ("relaybus async" while ``relaybus.AsyncMicroservice`` is
missing) is reported as n/a. Every wait on another process or on the server has a
time limit.

Workloads (payload: the ~265-byte JSON event of ``relaybus._bench``):

- ``publish1`` publish, one per call: raw ``XADD``; FastStream
  ``broker.publish(stream=...)``; relaybus ``EventBus.publish``.
- ``publish100`` publish, batches of 100: raw ``XADD`` x100 in one pipeline; FastStream
  ``broker.publish(..., pipeline=pipe)`` x100 then ``pipe.execute()``; relaybus
  ``publish_many``.
- ``consume`` consume, one consumer: N pre-loaded entries, handled and acknowledged, from
  the start of consuming to the last acknowledgement. Raw: ``XREADGROUP COUNT 100`` then
  one ``XACK`` of the batch's ids (no decoding: the ceiling), and the same with each
  entry decoded into the typed event (``BenchEvent.model_validate_json``, the fastest
  typed decode, which relaybus uses too). FastStream: a ``StreamSub`` subscriber with a
  consumer group (``group=``, ``consumer=``, ``max_records=100``), a typed pydantic
  handler, default ack policy (acknowledged after the handler), logging off. relaybus
  sync and async: a ``Microservice`` / ``AsyncMicroservice`` with concurrency 1 in a
  process of its own (``relaybus._bench.consume_round``, as ``relaybus bench
  consume``): the subscription is made first, the events published into the log, then
  the service started.
- ``memory`` memory per waiting entry: raw ``XADD`` of relaybus's own fields and
  FastStream's entries (its binary envelope): ``INFO memory`` ``used_memory`` delta
  over N entries; relaybus: what a waiting event costs, the log entry (``MEMORY
  USAGE`` of the log) plus its publish-dedup records (the ``published`` zset and hash,
  kept for the dedup window); there are no per-subscription copies.
- ``fanout1``, ``fanout3`` fan-out end to end, to 1 and to 3 subscribing services: this
  process publishes N events in batches of 100 as fast as it can, while ALL the
  subscribing services run in ONE child process of their own (``bench/fanout_child.py``,
  one per implementation per round, a fresh one after a failure, driven over a pipe;
  each starts with an untimed warm-up job: 300 events to 3 services); each service has a
  subscription of its own and a typed handler (it gets the validated model and counts
  it). The child says "ready" once every subscriber is started and its group exists;
  the clock runs from ``time.time()`` just before the first publish here to the
  ``time.time()`` in the child when the last service has handled *and acknowledged*
  all N. Figure: N / elapsed (per published event, not per delivery).
- ``latency`` latency at 1,000 events/s offered: one service, as above, one event per
  publish call, offered on a schedule (event i is due at start + i / 1,000 s; the
  publisher sleeps until the next one is due; one that fell behind publishes the
  late ones together in one batch, as ``relaybus._bench.paced_publish`` does).
  ``sent_at`` is ``time.time()`` taken just before the publish call (encoding is in);
  latency is the handler's first ``time.time()`` minus ``sent_at``; p50 and p99 over
  every event of the round, and the rate the publisher achieved.

How each implementation is driven in the fan-out and latency workloads:

- raw redis-py (redis-py + hiredis, the ceiling): one stream; one consumer group per
  service (``XGROUP CREATE ... 0 MKSTREAM`` before "ready"), each read by a thread of
  its own with its own connection: ``XREADGROUP COUNT 100 BLOCK 200``, every entry
  decoded into the typed event (``BenchEvent.model_validate_json``), the
  handler called, then one ``XACK`` of the whole batch's ids (one command, one round
  trip). Publishing: the very fields relaybus writes (``raw_fields``), fan-out
  pre-encoded and sent as pipelined ``XADD`` x100; latency one ``XADD`` per event,
  its payload encoded (``model_dump_json``) after ``sent_at`` is stamped.
- FastStream: one ``RedisBroker`` (logging off) in the child with one subscriber per
  service, ``StreamSub(stream, group=<service>, consumer="c1", max_records=100)``, an
  ``async def`` handler taking the pydantic model, default ack policy (one ``XACK``
  per message after the handler). The child creates the groups at ``0`` before the
  broker starts (FastStream would create a missing one at ``$``); "ready" follows
  ``broker.start()``. Its acknowledgements come after the last handler run: the child
  polls ``XPENDING`` of every group every 0.5 ms until none is pending and takes that
  as the end. Publishing: ``broker.publish(model, stream=..., pipeline=pipe)`` x100 then
  ``pipe.execute()`` (fan-out), one ``broker.publish(model, stream=...)`` per event
  (latency).
- relaybus sync: a ``relaybus.Microservice(name, url=..., prefix=...)`` per service
  (default settings: each reads the event log through a consumer group of its own,
  each runs the bus's maintenance), handler ``@svc.on(BenchEvent)``, all
  ``start()``-ed in the child before "ready"; a service is done when its
  ``stats["handled"]`` (moved after each acknowledgement) reaches N (polled every
  0.5 ms once every handler has seen N). Publishing: ``EventBus(url, prefix=...)``
  ``.publish_many`` of 100 (fan-out), ``.publish`` (latency).
- relaybus async: the same with ``relaybus.AsyncMicroservice`` (same arguments, an
  ``async def`` handler, ``await svc.start()`` / ``await svc.stop()``), every service
  in one asyncio loop in the child; published with the same sync ``EventBus``.

Event objects (relaybus events, FastStream's pydantic models) are built before the
clock starts; encoding them is timed, except raw's fan-out fields (the ceiling).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import redis
from fanout_child import ChildError, FanoutChild, FsEvent
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import relaybus
from relaybus import EventBus
from relaybus._bench import (
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

#: Fan-out: publish batch size and the XREADGROUP COUNT / max_records of the consumers.
FANOUT_BATCH = 100
#: Latency: events offered per second.
LATENCY_RATE = 1_000
#: Seconds to wait for the child's "ready"; seconds without progress before a job is
#: given up.
READY_TIMEOUT = 60.0
STALL_TIMEOUT = 15.0

PUBLISH_IMPLS = ("raw redis-py", "FastStream", "relaybus")
CONSUME_IMPLS = ("raw redis-py", "raw + typed decode", "FastStream", "relaybus sync",
                 "relaybus async")
FANOUT_IMPLS = ("raw redis-py", "FastStream", "relaybus sync", "relaybus async")
ALL_IMPLS = tuple(dict.fromkeys(PUBLISH_IMPLS + CONSUME_IMPLS + FANOUT_IMPLS))


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
                validate = BenchEvent.model_validate_json
                for _, raw in entries:
                    validate(raw[b"d"])
            client.xack(key, GROUP, *[entry_id for entry_id, _ in entries])
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


# -- fan-out and latency (subscribers in bench/fanout_child.py) -----------------------------


def _job_timeout(n: int) -> float:
    """How long the child waits for a job's N events (it gives up sooner when the count
    stops moving for STALL_TIMEOUT seconds)."""
    return 30.0 + n / 200


def _fanout_fields(url: str, prefix: str, events: Sequence[BenchEvent]) -> list[dict[Any, Any]]:
    """The stream fields relaybus writes for ``events`` (``raw_fields``); if relaybus
    cannot say (it is being changed), the fields it wrote so far: payload ``d``, time
    ``t`` (ms), dedup key ``k``, routing key ``e``."""
    try:
        with EventBus(url, prefix=prefix) as bus:
            return raw_fields(bus, events)
    except Exception as exc:
        print(f"raw_fields failed ({type(exc).__name__}: {exc}); raw redis-py writes "
              "d/t/k/e fields of its own", file=sys.stderr)
        now = int(time.time() * 1000)
        return [{"d": e.model_dump_json(), "t": now, "k": e.event_id, "e": e.event_type}
                for e in events]


def _pace(n: int, rate: float, one: Callable[[int, float], Any],
          late: Callable[[int, int, float], Any]) -> float:
    """Offer ``n`` events at ``rate``/s: ``one(i, stamp)`` publishes event i when it is due;
    ``late(i, j, stamp)`` publishes events i..j-1 together when the publisher fell behind
    (the schedule of ``relaybus._bench.paced_publish``). Returns the rate achieved."""
    interval = 1.0 / rate
    start = time.perf_counter() + 0.005
    i = 0
    while i < n:
        now = time.perf_counter()
        delay = start + i * interval - now
        if delay > 0:
            time.sleep(delay)
            now = time.perf_counter()
        due = min(n, max(i + 1, int((now - start) / interval) + 1))
        stamp = time.time()
        if due == i + 1:
            one(i, stamp)
        else:
            late(i, due, stamp)
        i = due
    return n / (time.perf_counter() - start)


async def _apace(n: int, rate: float, one: Callable[[int, float], Awaitable[Any]],
                 late: Callable[[int, int, float], Awaitable[Any]]) -> float:
    """:func:`_pace` for a coroutine publisher (this loop has nothing else to run, so
    it sleeps with ``time.sleep``, which keeps to the schedule more closely)."""
    interval = 1.0 / rate
    start = time.perf_counter() + 0.005
    i = 0
    while i < n:
        now = time.perf_counter()
        delay = start + i * interval - now
        if delay > 0:
            time.sleep(delay)
            now = time.perf_counter()
        due = min(n, max(i + 1, int((now - start) / interval) + 1))
        stamp = time.time()
        if due == i + 1:
            await one(i, stamp)
        else:
            await late(i, due, stamp)
        i = due
    return n / (time.perf_counter() - start)


class _Publisher:
    """This process's side of one job: connected before the child is asked to start."""

    def fanout(self) -> float:
        """Publish everything in batches of 100; return ``time.time()`` before the first."""
        raise NotImplementedError

    def paced(self, rate: float) -> float:
        """Offer everything at ``rate``, stamping ``sent_at``; return the rate achieved."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _RawPublisher(_Publisher):
    def __init__(self, url: str, stream: str, events: list[BenchEvent],
                 fields: list[dict[Any, Any]]) -> None:
        self.client = redis.Redis.from_url(url)
        self.client.ping()
        self.stream, self.events, self.fields = stream, events, fields

    def fanout(self) -> float:
        client, key, fields = self.client, self.stream, self.fields
        t0 = time.time()
        for i in range(0, len(fields), FANOUT_BATCH):
            pipe = client.pipeline(transaction=False)
            for f in fields[i: i + FANOUT_BATCH]:
                pipe.xadd(key, f)
            pipe.execute()
        return t0

    def _entry(self, i: int, stamp: float) -> dict[Any, Any]:
        ev = self.events[i]
        ev.sent_at = stamp
        return dict(self.fields[i], d=ev.model_dump_json())

    def paced(self, rate: float) -> float:
        client, key = self.client, self.stream

        def one(i: int, stamp: float) -> None:
            client.xadd(key, self._entry(i, stamp))

        def late(i: int, j: int, stamp: float) -> None:
            pipe = client.pipeline(transaction=False)
            for k in range(i, j):
                pipe.xadd(key, self._entry(k, stamp))
            pipe.execute()

        return _pace(len(self.events), rate, one, late)

    def close(self) -> None:
        self.client.close()


class _FsPublisher(_Publisher):
    def __init__(self, url: str, stream: str, models: list[FsEvent]) -> None:
        self.loop = asyncio.new_event_loop()
        self.broker = RedisBroker(url, logger=None)
        self.client = self.loop.run_until_complete(self.broker.connect())
        self.loop.run_until_complete(self.client.ping())
        self.stream, self.models = stream, models

    def fanout(self) -> float:
        async def run() -> float:
            broker, client, key, models = self.broker, self.client, self.stream, self.models
            t0 = time.time()
            for i in range(0, len(models), FANOUT_BATCH):
                async with client.pipeline(transaction=False) as pipe:
                    for m in models[i: i + FANOUT_BATCH]:
                        await broker.publish(m, stream=key, pipeline=pipe)
                    await pipe.execute()
            return t0

        return self.loop.run_until_complete(run())

    def paced(self, rate: float) -> float:
        broker, client, key, models = self.broker, self.client, self.stream, self.models

        async def one(i: int, stamp: float) -> None:
            models[i].sent_at = stamp
            await broker.publish(models[i], stream=key)

        async def late(i: int, j: int, stamp: float) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for m in models[i:j]:
                    m.sent_at = stamp
                    await broker.publish(m, stream=key, pipeline=pipe)
                await pipe.execute()

        return self.loop.run_until_complete(_apace(len(models), rate, one, late))

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.broker.stop())
        finally:
            self.loop.close()


class _RelaybusPublisher(_Publisher):
    def __init__(self, url: str, prefix: str, events: list[BenchEvent]) -> None:
        self.bus = EventBus(url, prefix=prefix)
        with contextlib.suppress(AttributeError):  # connect before the clock starts
            self.bus.mq.client.ping()
        self.events = events

    def fanout(self) -> float:
        bus, events = self.bus, self.events
        t0 = time.time()
        for i in range(0, len(events), FANOUT_BATCH):
            bus.publish_many(events[i: i + FANOUT_BATCH])
        return t0

    def paced(self, rate: float) -> float:
        bus, events = self.bus, self.events

        def one(i: int, stamp: float) -> None:
            events[i].sent_at = stamp
            bus.publish(events[i])

        def late(i: int, j: int, stamp: float) -> None:
            for ev in events[i:j]:
                ev.sent_at = stamp
            bus.publish_many(events[i:j])

        return _pace(len(events), rate, one, late)

    def close(self) -> None:
        self.bus.close()


def _publisher(impl: str, url: str, prefix: str, stream: str, events: list[BenchEvent]
               ) -> _Publisher:
    if impl == "raw redis-py":
        return _RawPublisher(url, stream, events, _fanout_fields(url, prefix, events))
    if impl == "FastStream":
        return _FsPublisher(url, stream, _fs_models(events))
    return _RelaybusPublisher(url, prefix, events)


def fanout_job(url: str, child: FanoutChild, impl: str, n_services: int, n: int, *,
               latency_rate: float | None = None) -> dict[str, Any]:
    """One job in ``child``: ``n_services`` subscribers of ``impl`` under a fresh prefix;
    publish ``n`` events (batches of 100, or paced at ``latency_rate`` one per call);
    return the child's result with ``elapsed`` (fan-out: first publish to the last
    acknowledgement) or ``offered`` (latency: the rate the publisher achieved)."""
    events = make_events(n)
    with temp_prefix(url, "cmpf") as p:
        stream = QueueKeys(p, "fanout").stream
        pub = _publisher(impl, url, p, stream, events)
        try:
            timeout = _job_timeout(n)
            child.send("run", impl=impl, url=url, prefix=p, stream=stream,
                       services=[f"svc{i}" for i in range(n_services)], n=n,
                       latencies=latency_rate is not None, max_records=FANOUT_BATCH,
                       timeout=timeout, stall=STALL_TIMEOUT)
            child.recv(READY_TIMEOUT)  # every subscriber started, its group there
            if latency_rate is None:
                t0 = pub.fanout()
                offered = float("nan")
            else:
                t0 = time.time()
                offered = pub.paced(latency_rate)
            res = child.recv(timeout + 30)  # the child gives up after `timeout` itself
        finally:
            pub.close()
    if min(res["handled"]) < n:
        raise RuntimeError(f"{impl}: handled {res['handled']} of {n} each")
    if res.get("acked") is not True:
        print(f"{impl}: {res.get('acked')}", file=sys.stderr)
    res["elapsed"] = res["t_end"] - t0
    res["offered"] = offered
    return res


def fanout_rate(url: str, child: FanoutChild, impl: str, n_services: int, n: int) -> float:
    """Fan-out end to end: N / (first publish -> every service acked all N)."""
    return n / fanout_job(url, child, impl, n_services, n)["elapsed"]


def latency_figures(url: str, child: FanoutChild, impl: str, n: int, rate: float
                    ) -> tuple[float, float, float]:
    """p50 and p99 (ms) of publish call -> handler start, and the rate achieved."""
    res = fanout_job(url, child, impl, 1, n, latency_rate=rate)
    ms = [x * 1000 for x in res["latencies"]]
    if len(ms) < n:
        raise RuntimeError(f"{impl}: {len(ms)} latencies for {n} events")
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return q[49], q[98], res["offered"]


# -- the run ---------------------------------------------------------------------------


PUB1 = "publish, one per call"
PUB100 = "publish, batches of 100"
CONSUME = "consume, one consumer"
MEMORY = "memory per waiting entry"
FAN1 = "fan-out to 1 service, end to end"
FAN3 = "fan-out to 3 services, end to end"
LAT50 = "latency at 1,000/s offered: p50"
LAT99 = "latency at 1,000/s offered: p99"
LATRATE = "latency at 1,000/s offered: rate achieved"

WORKLOADS = {
    PUB1: "events/s",
    PUB100: "events/s",
    CONSUME: "events/s",
    MEMORY: "bytes",
    FAN1: "events/s",
    FAN3: "events/s",
    LAT50: "ms",
    LAT99: "ms",
    LATRATE: "events/s",
}
#: --only names: each stands for these workloads (full names are accepted as well).
ALIASES = {
    "publish1": (PUB1,),
    "publish100": (PUB100,),
    "consume": (CONSUME,),
    "memory": (MEMORY,),
    "fanout1": (FAN1,),
    "fanout3": (FAN3,),
    "latency": (LAT50, LAT99, LATRATE),
}
FANOUT_WORKLOADS = (FAN1, FAN3, LAT50, LAT99, LATRATE)


def _short(ws: Sequence[str]) -> str:
    """Workload names as their --only names where all of an alias's are there."""
    out, left = [], list(ws)
    for alias, names in ALIASES.items():
        if all(w in left for w in names):
            out.append(alias)
            left = [w for w in left if w not in names]
    return ", ".join(out + left)


def workload_impls(workload: str) -> tuple[str, ...]:
    if workload in FANOUT_WORKLOADS:
        return FANOUT_IMPLS
    return CONSUME_IMPLS if workload == CONSUME else PUBLISH_IMPLS


def _error_text(exc: BaseException) -> str:
    text = str(exc)
    if text.startswith("n/a") or isinstance(exc, ChildError):
        return text
    return f"{type(exc).__name__}: {text}"


def _fs_publish_rate(url: str, key: str, models: list[FsEvent], batch: int) -> float:
    return asyncio.run(_fs_publish(url, key, models, batch))


def _fs_consume_rate(url: str, key: str, models: list[FsEvent]) -> float:
    return asyncio.run(_fs_consume(url, key, models))


def _relaybus_publish_rate(url: str, prefix: str, events: list[BenchEvent], batch: int
                           ) -> float:
    with EventBus(url, prefix=prefix) as bus:
        bus.publish_many(make_events(10))  # warm-up
        return relaybus_publish(bus, events, batch)


def run(url: str, rounds: int, quick: bool, say: Callable[[str], None],
        warn: Callable[[str], None] | None = None, workloads: Sequence[str] | None = None,
        impls: Sequence[str] | None = None
        ) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, str]]]:
    """Every round, every chosen workload through every chosen implementation.

    Returns ``(results, notes)``: ``results[workload][impl]`` is the list of figures, one
    per round (only chosen workloads and implementations are there); ``notes[workload]
    [impl]`` says why an implementation has none (n/a, or the error it failed with; it
    is not tried again in that workload)."""
    warn = warn or say
    n_single = 1_000 if quick else 5_000
    n_batch = 5_000 if quick else 50_000
    n_consume = 2_000 if quick else 20_000
    n_memory = 10_000 if quick else 100_000
    n_fanout = 2_000 if quick else 20_000
    n_latency = int(LATENCY_RATE * (2.0 if quick else 5.0))
    chosen = set(workloads or WORKLOADS)
    wanted = set(impls or ALL_IMPLS)
    if "relaybus" in wanted:
        wanted |= {"relaybus sync", "relaybus async"}
    res: dict[str, dict[str, list[float]]] = {
        w: {i: [] for i in workload_impls(w) if i in wanted} for w in WORKLOADS if w in chosen}
    notes: dict[str, dict[str, str]] = {}

    def on(workload: str, impl: str) -> bool:
        return impl in res.get(workload, {}) and impl not in notes.get(workload, {})

    def note(ws: Sequence[str], impl: str, text: str) -> None:
        for w in ws:
            notes.setdefault(w, {})[impl] = text
        warn(f"{impl} ({_short(ws)}): {text}")

    def attempt(ws: str | tuple[str, ...], impl: str, fn: Callable[..., Any], *args: Any
                ) -> bool:
        """Run ``fn(*args)`` and record its figure(s) (a tuple for several workloads)."""
        names = (ws,) if isinstance(ws, str) else ws
        if not all(on(w, impl) for w in names):
            return False
        try:
            value = fn(*args)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            note(names, impl, _error_text(exc))
            return False
        for w, v in zip(names, value if isinstance(ws, tuple) else (value,), strict=True):
            res[w][impl].append(float(v))
        return True

    services: dict[str, ServiceProcess] = {}  # relaybus's consumers, for "consume"

    def relaybus_consume(front: str, events: list[BenchEvent]) -> float:
        service = services.get(front)
        if service is None:
            service = services[front] = stack.enter_context(ServiceProcess(url))
            consume_round(url, service, make_events(200), 1, "bench-warm", front)
        return consume_round(url, service, events, 1, front=front)

    with contextlib.ExitStack() as stack:
        for r in range(rounds):
            if any(on(w, i) for w in (PUB1, PUB100, CONSUME) for i in ALL_IMPLS):
                events = make_events(n_batch)
                models = _fs_models(events)
                with temp_prefix(url, "cmp") as p, \
                        contextlib.closing(redis.Redis.from_url(url)) as client:
                    fields = _fanout_fields(url, p, events)
                    say(f"round {r + 1}/{rounds}: publish")
                    for workload, batch, n in ((PUB1, 1, n_single), (PUB100, 100, n_batch)):
                        attempt(workload, "raw redis-py", raw_publish, client,
                                QueueKeys(p, f"raw{batch}").stream, fields[:n], batch)
                        attempt(workload, "FastStream", _fs_publish_rate, url,
                                QueueKeys(p, f"fs{batch}").stream, models[:n], batch)
                        attempt(workload, "relaybus", _relaybus_publish_rate, url, p,
                                events[:n], batch)
                    say(f"round {r + 1}/{rounds}: consume")
                    attempt(CONSUME, "raw redis-py", raw_consume, client,
                            QueueKeys(p, "rawc").stream, fields[:n_consume], False)
                    attempt(CONSUME, "raw + typed decode", raw_consume, client,
                            QueueKeys(p, "rawd").stream, fields[:n_consume], True)
                    attempt(CONSUME, "FastStream", _fs_consume_rate, url,
                            QueueKeys(p, "fsc").stream, models[:n_consume])
                for front in ("sync", "async"):
                    attempt(CONSUME, f"relaybus {front}", relaybus_consume, front,
                            events[:n_consume])
            if any(on(MEMORY, i) for i in PUBLISH_IMPLS):
                say(f"round {r + 1}/{rounds}: memory")
                mem_events = make_events(n_memory)
                with temp_prefix(url, "cmp") as p:
                    if on(MEMORY, "raw redis-py"):
                        attempt(MEMORY, "raw redis-py", raw_memory, url,
                                QueueKeys(p, "rawm").stream,
                                _fanout_fields(url, p, mem_events))
                    if on(MEMORY, "FastStream"):
                        attempt(MEMORY, "FastStream", fs_memory, url,
                                QueueKeys(p, "fsm").stream, _fs_models(mem_events))
                if on(MEMORY, "relaybus"):
                    attempt(MEMORY, "relaybus", lambda: memory_round(url, n_memory)["waiting"])
            for impl in FANOUT_IMPLS:
                ws = [w for w in FANOUT_WORKLOADS if on(w, impl)]
                if ws:
                    _fanout_round(url, impl, ws, r, rounds, n_fanout, n_latency, say, note,
                                  attempt)
    return res, notes


def _fanout_round(url: str, impl: str, ws: list[str], r: int, rounds: int, n_fanout: int,
                  n_latency: int, say: Callable[[str], None],
                  note: Callable[[Sequence[str], str, str], None],
                  attempt: Callable[..., bool]) -> None:
    """One round of the fan-out and latency workloads ``ws`` for ``impl``, in a child
    process of its own (a fresh one after a failure: it may still be in the job)."""
    if impl == "relaybus async" and not hasattr(relaybus, "AsyncMicroservice"):
        note(ws, impl, "n/a: relaybus has no AsyncMicroservice")
        return
    say(f"round {r + 1}/{rounds}: {impl}: {_short(ws)}")
    child = FanoutChild(url)
    try:
        try:  # imports, connections, pydantic: not timed
            fanout_job(url, child, impl, 3, 300)
        except Exception as exc:
            note(ws, impl, f"warm-up: {_error_text(exc)}")
            return
        jobs: list[tuple[str | tuple[str, ...], Callable[..., Any], tuple[Any, ...]]] = []
        if FAN1 in ws:
            jobs.append((FAN1, fanout_rate, (1, n_fanout)))
        if FAN3 in ws:
            jobs.append((FAN3, fanout_rate, (3, n_fanout)))
        if LAT50 in ws:
            jobs.append(((LAT50, LAT99, LATRATE), latency_figures, (n_latency, LATENCY_RATE)))
        for names, fn, args in jobs:
            if not attempt(names, impl, fn, url, child, impl, *args):
                child.close(force=True)
                child = FanoutChild(url)
    finally:
        child.close()


def table(res: dict[str, dict[str, list[float]]], rounds: int,
          notes: dict[str, dict[str, str]] | None = None) -> Table:
    t = Table(title=f"relaybus vs raw redis-py and FastStream (median of {rounds} rounds)",
              box=box.SIMPLE_HEAVY, title_justify="left")
    for col, justify in (("workload", "left"), ("implementation", "left"), ("median", "right"),
                         ("min–max", "right"), ("unit", "left"), ("× relaybus", "right")):
        t.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    notes = notes or {}
    for workload, impls in res.items():
        ref = "relaybus" if "relaybus" in workload_impls(workload) else "relaybus sync"
        ref_values = impls.get(ref) or []
        base = statistics.median(ref_values) if ref_values else float("nan")
        first = True
        for impl, values in impls.items():
            why = notes.get(workload, {}).get(impl)
            if not values and not why:
                continue
            if values:
                med = statistics.median(values)
                cells = [fmt(med), f"{fmt(min(values))}–{fmt(max(values))}",
                         WORKLOADS[workload],
                         f"{med / base:.2f}" if base == base and base else "-"]
            else:
                cells = ["n/a" if why and why.startswith("n/a") else "[red]error[/]", "", "",
                         ""]
            t.add_row(workload if first else "", impl, *cells,
                      style="bold" if impl == ref else None)
            first = False
    return t


def checks(res: dict[str, dict[str, list[float]]]) -> list[tuple[str, str, bool | None]]:
    """The issue's targets that compare implementations (ok None: not measured). A
    check shows up only when its workloads and its relaybus implementation were chosen."""
    def med(w: str, i: str) -> float:
        v = res.get(w, {}).get(i)
        return statistics.median(v) if v else float("nan")

    def chosen(w: str, i: str) -> bool:
        return i in res.get(w, {})

    def have(*xs: float) -> bool:
        return all(x == x for x in xs)

    out: list[tuple[str, str, bool | None]] = []
    pub_rb, pub_raw = med(PUB100, "relaybus"), med(PUB100, "raw redis-py")
    if have(pub_rb, pub_raw):
        pub = pub_rb / pub_raw
        out.append(("publish_many ≥ 70% of raw pipelined XADD", f"{100 * pub:.0f}%", pub >= 0.7))
    c_fs = med(CONSUME, "FastStream")
    for rb in ("relaybus sync", "relaybus async"):
        c_rb = med(CONSUME, rb)
        if have(c_rb):
            out.append((f"consume (c=1), {rb} ≥ 25,000 events/s", f"{c_rb:,.0f}/s",
                        c_rb >= 25_000))
        if have(c_rb, c_fs):
            out.append((f"consume (c=1), {rb} ≥ 4× FastStream", f"{c_rb / c_fs:.2f}×",
                        c_rb / c_fs >= 4))
    m_rb, m_raw = med(MEMORY, "relaybus"), med(MEMORY, "raw redis-py")
    if have(m_rb, m_raw):
        mem = m_rb / m_raw
        out.append(("memory ≤ 1.5× raw XADD", f"{mem:.2f}×", mem <= 1.5))

    def add(text: str, needs: Sequence[float], value: Callable[[], str],
            ok: Callable[[], bool]) -> None:
        if have(*needs):
            out.append((text, value(), ok()))
        else:
            out.append((text, "not measured", None))

    fs1, raw3, fs3 = med(FAN1, "FastStream"), med(FAN3, "raw redis-py"), med(FAN3, "FastStream")
    fs99 = med(LAT99, "FastStream")
    for rb in ("relaybus sync", "relaybus async"):
        if chosen(FAN3, rb):
            x = med(FAN3, rb)
            add(f"fan-out to 3, {rb} ≥ 10× FastStream and ≥ 0.4× raw", (x, fs3, raw3),
                lambda x=x: f"{x / fs3:.2f}× FastStream, {x / raw3:.2f}× raw",
                lambda x=x: x / fs3 >= 10 and x / raw3 >= 0.4)
        if chosen(FAN1, rb):
            x = med(FAN1, rb)
            add(f"one service end to end (fan-out to 1), {rb} ≥ 5× FastStream", (x, fs1),
                lambda x=x: f"{x / fs1:.2f}× FastStream", lambda x=x: x / fs1 >= 5)
        if chosen(LAT99, rb):
            p50, p99 = med(LAT50, rb), med(LAT99, rb)
            add(f"latency at 1,000/s, {rb}: p99 ≤ FastStream's and ≤ 1.5 ms, p50 ≤ 0.5 ms",
                (p50, p99, fs99),
                lambda p50=p50, p99=p99: f"p50 {p50:.3f} ms, p99 {p99:.3f} ms (FastStream "
                                         f"p99 {fs99:.3f} ms)",
                lambda p50=p50, p99=p99: p99 <= fs99 and p99 <= 1.5 and p50 <= 0.5)
    pairs = [(w, med(w, "relaybus async"), med(w, "relaybus sync"))
             for w in (CONSUME, FAN1, FAN3)
             if chosen(w, "relaybus async") and chosen(w, "relaybus sync")]
    if pairs:
        measured = [(w, a, s) for w, a, s in pairs if have(a, s)]
        add("relaybus async ≥ sync (consume, fan-out to 1 and to 3)",
            [v for _, a, s in pairs for v in (a, s)],
            lambda: ", ".join(f"{w.split(',')[0]}: {a / s:.2f}×" for w, a, s in measured),
            lambda: all(a >= s for _, a, s in measured))
    return out


def _workloads(names: Sequence[str] | None) -> list[str] | None:
    if not names:
        return None
    out: list[str] = []
    for name in names:
        if name in ALIASES:
            out.extend(ALIASES[name])
        elif name in WORKLOADS:
            out.append(name)
        else:
            raise SystemExit(f"unknown workload {name!r}: choose from "
                             f"{', '.join(ALIASES)} (or a full name: {', '.join(WORKLOADS)})")
    return list(dict.fromkeys(out))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="server URL (default: a private embedded Valkey)")
    parser.add_argument("--quick", action="store_true", help="small counts, 2 rounds")
    parser.add_argument("--rounds", type=int, help="rounds (default 5, quick 2)")
    parser.add_argument("--json", dest="json_file", help="also write the figures to FILE")
    parser.add_argument("--only", nargs="+", metavar="WORKLOAD",
                        help=f"run only these workloads: {', '.join(ALIASES)} (default all)")
    parser.add_argument("--impl", nargs="+", metavar="IMPL", choices=ALL_IMPLS,
                        help="run only these implementations: "
                             f"{', '.join(repr(i) for i in ALL_IMPLS)} ('relaybus' also "
                             "selects 'relaybus sync' and 'relaybus async'; default all)")
    args = parser.parse_args()
    gc.collect()  # the start-up heap out of the collector's sight, as in the children
    gc.freeze()
    if RedisBroker is None:
        print("FastStream is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    workloads = _workloads(args.only)
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
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
        res, notes = run(url, rounds, args.quick,
                         lambda s: console.print(f"[dim]{escape(s)}[/dim]", highlight=False),
                         lambda s: console.print(f"[red]{escape(s)}[/red]", highlight=False),
                         workloads, args.impl)
    console.print(table(res, rounds, notes))
    grouped: dict[tuple[str, str], list[str]] = {}
    for workload, by_impl in notes.items():
        for impl, text in by_impl.items():
            grouped.setdefault((impl, text), []).append(workload)
    for (impl, text), ws in grouped.items():
        console.print(f"  {escape(impl)} ({escape(_short(ws))}): {escape(text)}",
                      highlight=False)
    found = checks(res)
    for text, value, ok in found:
        mark = "[dim]n/a [/]" if ok is None else "[green]ok  [/]" if ok else "[red]miss[/]"
        console.print(f"  {mark} {escape(text)}: {escape(value)}", highlight=False)
    console.print(f"took {time.time() - started:.0f}s", highlight=False)
    if args.json_file:
        with open(args.json_file, "w") as fh:
            json.dump({"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                   time.localtime(started)),
                       "rounds": rounds, "quick": args.quick, "environment": env,
                       "settings": {"workloads": list(res), "impls": args.impl or ALL_IMPLS,
                                    "fanout_batch": FANOUT_BATCH,
                                    "latency_rate": LATENCY_RATE},
                       "results": res, "notes": notes,
                       "checks": [{"check": c, "value": v, "ok": ok}
                                  for c, v, ok in found]}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
