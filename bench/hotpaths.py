"""Where the time goes on relaybus's hot paths: the measurements behind docs/benchmarks.md.

Each subcommand isolates one path and prints what limits it; run it under py-spy for
a profile (``--gil`` samples only the thread holding the GIL, i.e. Python CPU)::

    .venv/bin/python bench/hotpaths.py encode            # publish: encoding vs the pipeline
    .venv/bin/python bench/hotpaths.py consume           # CPU shares, batched-ack prototype
    .venv/bin/python bench/hotpaths.py e2e               # service with its router: CPU, batches
    .venv/bin/python bench/hotpaths.py route --subs 16   # client vs server CPU, commandstats
    .venv/bin/python bench/hotpaths.py latency --rate 1000
    .venv/bin/python bench/hotpaths.py idle              # idle: commands by name
    .venv/bin/py-spy record -r 250 --gil --threads -f raw -o consume.txt -- \\
        .venv/bin/python bench/hotpaths.py consume --variant 0 --rounds 1

Everything runs against a private embedded Valkey unless ``--url`` names a server;
``consume`` and ``latency`` run the service in this process (so py-spy sees it).
The *prototypes* (``consume``'s batched acknowledgements, ``encode``'s
``model_dump_json``) patch relaybus in this process only, to size a possible change;
they are not how relaybus works.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis

from relaybus import EventBus, Microservice
from relaybus import bus as bus_module
from relaybus import worker as worker_module
from relaybus.benchmark import (
    BenchEvent,
    make_events,
    preload,
    publish_all,
    raw_fields,
    route_all,
)
from relaybus.embedded import EmbeddedServer
from relaybus.events import serialize_event
from relaybus.retry import Action
from relaybus.testing import delete_prefix, unique_prefix


@contextlib.contextmanager
def server(url: str | None) -> Iterator[tuple[str, int | None]]:
    """The server URL and, for a private embedded one, its pid (for its CPU time)."""
    if url:
        yield url, None
        return
    with tempfile.TemporaryDirectory(prefix="relaybus-hot-") as tmp:
        srv = EmbeddedServer(tmp)
        state = srv.start()
        try:
            yield state.url, state.pid
        finally:
            srv.stop()


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) of process ``pid`` so far; 0 when unknown."""
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- encode ---------------------------------------------------------------------------


def encode(url: str, spid: int | None, args: argparse.Namespace) -> None:
    n = 50_000
    events = make_events(n)
    prefix = unique_prefix("hot")
    bus = EventBus(url, prefix=prefix)
    try:
        bus.publish_many(events[:10])
        fields = raw_fields(bus, events)

        def per_event(fn: Any) -> float:
            t = time.perf_counter()
            fn()
            return 1e6 * (time.perf_counter() - t) / n

        print(f"per event, {n:,} events of {len(fields[0]['d'])} bytes:")
        print(f"  EventBus._fields (model_dump + json.dumps + envelope) "
              f"{per_event(lambda: [bus._fields(e) for e in events]):.1f} us")
        print(f"    serialize_event (model_dump(mode='json'))          "
              f"{per_event(lambda: [serialize_event(e) for e in events]):.1f} us")
        print(f"    model_dump_json (pydantic-core, for comparison)     "
              f"{per_event(lambda: [e.model_dump_json() for e in events]):.1f} us")

        def fast_fields(self: EventBus, event: Any) -> dict[str, Any]:
            return {"d": event.model_dump_json(), "t": int(time.time() * 1000),
                    "k": event.event_id, "e": event.event_type}

        client = bus.mq.client
        raw_key = prefix + "raw"
        rates: dict[str, list[float]] = collections.defaultdict(list)
        original = bus_module.EventBus._fields
        try:
            for _ in range(args.rounds):
                for label, impl in (("publish_many", original),
                                    ("publish_many, model_dump_json (prototype)", fast_fields)):
                    bus_module.EventBus._fields = impl  # type: ignore[method-assign]
                    t = time.perf_counter()
                    publish_all(bus, events, 100)
                    rates[label].append(n / (time.perf_counter() - t))
                t = time.perf_counter()
                for i in range(0, n, 100):
                    pipe = client.pipeline(transaction=False)
                    for f in fields[i: i + 100]:
                        pipe.xadd(raw_key, f)
                    pipe.execute()
                rates["raw pipelined XADD"].append(n / (time.perf_counter() - t))
                client.delete(raw_key)
        finally:
            bus_module.EventBus._fields = original  # type: ignore[method-assign]
        raw = statistics.median(rates["raw pipelined XADD"])
        print(f"batches of 100, median of {args.rounds} rounds:")
        for label, values in rates.items():
            med = statistics.median(values)
            print(f"  {label:45s} {med:9,.0f} events/s  {100 * med / raw:4.0f}% of raw")
    finally:
        bus.close()
        delete_prefix(url, prefix)


# -- consume --------------------------------------------------------------------------


def _install_batched_acks() -> None:
    """Prototype: handler threads hand ACK decisions to one settler thread, which
    acknowledges whatever has accumulated in one ack.lua call (group commit)."""
    original = worker_module.Worker._apply

    def _apply(self: Any, message: Any, decision: Any, done_key: Any, details: Any) -> None:
        if decision.action is not Action.ACK:
            original(self, message, decision, done_key, details)
            return None
        state = self.__dict__.get("_acks")
        if state is None:
            state = self._acks = {"cond": threading.Condition(), "items": []}

            def settle() -> None:
                while True:
                    with state["cond"]:
                        while not state["items"]:
                            state["cond"].wait()
                        batch, state["items"] = state["items"], []
                    self.queue.acknowledge_messages([i for i, _ in batch],
                                                    record_done=[k for _, k in batch if k])
                    self.counters.incr("handled", len(batch))

            threading.Thread(target=settle, daemon=True).start()
        with state["cond"]:
            state["items"].append((message.id, done_key))
            state["cond"].notify()
        return None

    worker_module.Worker._apply = _apply  # type: ignore[method-assign]


def _consume_once(url: str, spid: int | None, n: int, concurrency: int,
                  prefetch: int | None) -> tuple[float, float, float]:
    prefix = unique_prefix("hot")
    try:
        preload(url, prefix, "hot", make_events(n))
        svc = Microservice("hot", url=url, prefix=prefix, concurrency=concurrency,
                           prefetch=prefetch, run_router=False)
        svc.on(BenchEvent)(lambda e: None)
        svc.event_bus  # noqa: B018 - connect before the clock starts
        c0, s0, t0 = time.process_time(), cpu_seconds(spid), time.perf_counter()
        svc.start()
        while svc.stats["handled"] < n:
            time.sleep(0.001)
        dt = time.perf_counter() - t0
        client_cpu, server_cpu = time.process_time() - c0, cpu_seconds(spid) - s0
        svc.close()
        return n / dt, 100 * client_cpu / dt, 100 * server_cpu / dt
    finally:
        delete_prefix(url, prefix)


def consume(url: str, spid: int | None, args: argparse.Namespace) -> None:
    variants = [("plain", 1, None), ("plain", 1, 100), ("plain", 8, None),
                ("batched", 1, None), ("batched", 1, 100)]
    if args.only:
        variants = [v for v in variants if v[0] == args.only]
    if args.variant is not None:
        variants = [variants[args.variant]]
    print(f"consume {args.events:,} pre-loaded events, trivial handler "
          f"(median of {args.rounds}; client and server CPU in % of one core)")
    for mode, concurrency, prefetch in variants:
        if mode == "batched":
            _install_batched_acks()  # stays installed: batched variants come last
        runs = [_consume_once(url, spid, args.events, concurrency, prefetch)
                for _ in range(args.rounds)]
        rate, ccpu, scpu = (statistics.median(x) for x in zip(*runs, strict=True))
        label = (f"{'batched acks (prototype)' if mode == 'batched' else 'as shipped'}, "
                 f"concurrency {concurrency}, prefetch {prefetch or 2 * concurrency}")
        print(f"  {label:55s} {rate:8,.0f} events/s  client {ccpu:3.0f}%  server {scpu:3.0f}%")


# -- e2e ------------------------------------------------------------------------------


def e2e(url: str, spid: int | None, args: argparse.Namespace) -> None:
    """Saturation with the service (router thread included) in this process and a
    publisher process; prints the rate, CPU shares and the router's batches."""
    prefix = unique_prefix("hot")
    n = args.events
    svc = Microservice("hot", url=url, prefix=prefix, run_router=True)
    svc.on(BenchEvent)(lambda e: None)
    svc.start()
    code = ("from relaybus import EventBus\n"
            "from relaybus.benchmark import make_events, publish_all\n"
            f"publish_all(EventBus({url!r}, prefix={prefix!r}), make_events({n}), 100)\n")
    try:
        c0, s0, t0 = time.process_time(), cpu_seconds(spid), time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        while svc.stats["handled"] < n:
            time.sleep(0.001)
        dt = time.perf_counter() - t0
        ccpu, scpu = time.process_time() - c0, cpu_seconds(spid) - s0
        routed = dict(svc.event_bus.stats)
    finally:
        svc.close()
        delete_prefix(url, prefix)
    print(f"{n:,} events end to end: {n / dt:,.0f} events/s; service CPU {100 * ccpu / dt:.0f}%, "
          f"server CPU {100 * scpu / dt:.0f}%; router batches {routed.get('batches')} "
          f"({routed.get('routed', 0) / max(1, routed.get('batches', 1)):.0f} events each)")


# -- route ----------------------------------------------------------------------------


def route(url: str, spid: int | None, args: argparse.Namespace) -> None:
    stats = redis.Redis.from_url(url, decode_responses=True)
    for subs in args.subs:
        prefix = unique_prefix("hot")
        try:
            bus = EventBus(url, prefix=prefix)
            for i in range(subs):
                bus.subscribe(f"s{i}", [BenchEvent])
            publish_all(bus, make_events(args.events), 1000)
            stats.config_resetstat()
            c0, s0, t0 = time.process_time(), cpu_seconds(spid), time.perf_counter()
            route_all(bus, args.events)
            dt = time.perf_counter() - t0
            ccpu, scpu = time.process_time() - c0, cpu_seconds(spid) - s0
            cmd = stats.info("commandstats")
            bus.close()
        finally:
            delete_prefix(url, prefix)
        in_cmds = sum(v["usec"] for v in cmd.values()) / 1e6
        print(f"{subs} subscriptions: {args.events / dt:,.0f} events/s "
              f"({args.events * subs / dt:,.0f} copies/s); client CPU {100 * ccpu / dt:.0f}%, "
              f"server CPU {100 * scpu / dt:.0f}%, server time in commands "
              f"{100 * in_cmds / dt:.0f}% of wall")
        for name, v in sorted(cmd.items(), key=lambda kv: -kv[1]["usec"])[:6]:
            print(f"    {name.removeprefix('cmdstat_'):18s} calls {v['calls']:7d}  "
                  f"usec {v['usec']:8d}  per call {v['usec_per_call']:9.2f}")


# -- latency --------------------------------------------------------------------------


def latency(url: str, spid: int | None, args: argparse.Namespace) -> None:
    """Split publish -> handler start at the copy into the subscription queue (its
    stream id's millisecond, so that split is to +-1 ms)."""
    prefix = unique_prefix("hot")
    n = int(args.rate * args.seconds)
    samples: list[tuple[float, float, float]] = []
    original = Microservice._process

    def _process(self: Microservice, message: Any) -> Any:
        samples.append((time.time(), float(message.data.get("sent_at", 0.0)),
                        int(message.id.split("-")[0]) / 1000))
        return original(self, message)

    Microservice._process = _process  # type: ignore[method-assign]
    svc = Microservice("hot", url=url, prefix=prefix, run_router=True)
    svc.on(BenchEvent)(lambda e: None)
    svc.start()
    code = ("import sys\nfrom relaybus import EventBus\n"
            "from relaybus.benchmark import make_events, paced_publish\n"
            f"bus = EventBus({url!r}, prefix={prefix!r})\n"
            f"print(f'offered {{paced_publish(bus, make_events({n}), {args.rate}):,.0f}}/s')")
    try:
        subprocess.run([sys.executable, "-c", code], check=True)
        deadline = time.monotonic() + 60
        while svc.stats["handled"] < n and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        svc.close()
        Microservice._process = original  # type: ignore[method-assign]
        delete_prefix(url, prefix)
    kept = samples[len(samples) // 10:]  # the first tenth warms up

    def pct(xs: list[float]) -> str:
        q = statistics.quantiles(xs, n=100, method="inclusive")
        return f"p50 {q[49]:6.2f}  p95 {q[94]:6.2f}  p99 {q[98]:6.2f}  max {max(xs):7.2f} ms"

    print(f"{args.rate:,}/s for {args.seconds:g}s, {len(kept)} events after warm-up")
    print(f"  publish -> handler start        {pct([1e3 * (a - s) for a, s, _ in kept])}")
    print(f"  publish -> copy (stream id ms)  {pct([1e3 * (c - s) for _, s, c in kept])}")
    print(f"  copy -> handler start           {pct([1e3 * (a - c) for a, _, c in kept])}")


# -- idle -----------------------------------------------------------------------------


def idle(url: str, spid: int | None, args: argparse.Namespace) -> None:
    """Commands an idle service sends, by name (scripts by their first comment line)."""
    from redis import connection as rc

    counts: collections.Counter[str] = collections.Counter()
    originals = {}
    scripts: dict[str, str] = {}
    for cls in (rc.HiredisRespSerializer, rc.PythonRespSerializer):
        originals[cls] = cls.pack

        def pack(self: Any, *a: Any, _orig: Any = cls.pack) -> Any:
            name = str(a[0]).upper()
            if name in ("EVAL", "EVALSHA"):
                name += " " + scripts.get(str(a[1]), str(a[1])[:40].splitlines()[0])
            counts[name] += 1
            return _orig(self, *a)

        cls.pack = pack  # type: ignore[method-assign]
    from relaybus import scripts as scripts_module

    for name in scripts_module.SCRIPT_NAMES:
        scripts[hashlib.sha1(scripts_module.source(name).encode()).hexdigest()] = f"{name}.lua"
    try:
        for router in (True, False):
            svc = Microservice("hot", url=url, prefix=unique_prefix("hot"), run_router=router)
            svc.on(BenchEvent)(lambda e: None)
            svc.start()
            time.sleep(2)
            counts.clear()
            c0 = time.process_time()
            time.sleep(args.seconds)
            cpu = 100 * (time.process_time() - c0) / args.seconds
            window = collections.Counter(counts)  # before close() adds its own commands
            total = sum(window.values()) / args.seconds
            svc.close()
            print(f"idle service, run_router={router}: {total:.2f} commands/s, CPU {cpu:.3f}%")
            for name, c in window.most_common():
                print(f"    {c / args.seconds:5.2f}/s  {name}")
    finally:
        for cls, fn in originals.items():
            cls.pack = fn  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="server URL (default: a private embedded Valkey)")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("encode")
    p.add_argument("--rounds", type=int, default=5)
    p = sub.add_parser("consume")
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", choices=["plain", "batched"])
    p.add_argument("--variant", type=int, help="run only the Nth variant (0: as shipped)")
    p = sub.add_parser("e2e")
    p.add_argument("--events", type=int, default=20_000)
    p = sub.add_parser("route")
    p.add_argument("--events", type=int, default=10_000)
    p.add_argument("--subs", type=int, nargs="+", default=[1, 3, 16, 64])
    p = sub.add_parser("latency")
    p.add_argument("--rate", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=5.0)
    p = sub.add_parser("idle")
    p.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with server(args.url) as (url, spid):
        {"encode": encode, "consume": consume, "e2e": e2e, "route": route,
         "latency": latency, "idle": idle}[args.what](url, spid, args)


if __name__ == "__main__":
    main()
