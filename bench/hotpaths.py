"""Where the time goes on relaybus's hot paths: the measurements behind docs/benchmarks.md.

Each subcommand isolates one path and prints what limits it, for the sync front
(``Microservice``, threads), the asyncio front (``AsyncMicroservice``) or both
(``--front``, default both); run it under py-spy for a profile (``--gil`` samples
only the thread holding the GIL, i.e. Python CPU)::

    .venv/bin/python bench/hotpaths.py encode            # publish: encoding vs the pipeline
    .venv/bin/python bench/hotpaths.py consume           # rate, CPU shares, requests by kind
    .venv/bin/python bench/hotpaths.py e2e               # service + a publisher process
    .venv/bin/python bench/hotpaths.py latency --rate 1000
    .venv/bin/python bench/hotpaths.py idle              # idle: requests by kind, CPU
    .venv/bin/py-spy record -r 250 --gil --threads -f raw -o consume.txt -- \\
        .venv/bin/python bench/hotpaths.py consume --front sync --variant 0 --rounds 1

Everything runs against a private embedded Valkey unless ``--url`` names a server.
The service runs in this process (so py-spy sees it); ``e2e`` and ``latency``
publish from a child process. "Requests by kind" counts the driver's steps (one
round trip each): ``XREADGROUP`` (a fetch of new log entries; ``BLOCK`` when it
waits), ``fetch.lua`` (the periodic work), ``MULTI XACK ...`` (a settle batch of
acknowledgements), ``settle.lua``, ``trim.lua`` (the bus's maintenance), ...
``encode`` measures what encoding an event costs (pydantic-core's text, and the dict path
it replaces where it can) against the publish rate and raw pipelined ``XADD``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from relaybus import AsyncEventBus, AsyncMicroservice, EventBus, Microservice
from relaybus._bench import BenchEvent, make_events, preload, publish_all, raw_fields
from relaybus._core.steps import ScriptCall, Step
from relaybus.codec import dumps
from relaybus.embedded import EmbeddedServer
from relaybus.events import event_json, serialize_event
from relaybus.testing import delete_prefix, unique_prefix

FRONTS = ("sync", "async")


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


def fronts(args: argparse.Namespace) -> tuple[str, ...]:
    return FRONTS if args.front == "both" else (args.front,)


# -- requests by kind ---------------------------------------------------------------------


def step_label(step: Step[Any]) -> str:
    """What a step sends, for a tally: ``XREADGROUP``, ``fetch.lua``, ``MULTI XACK ZADD ...``."""
    names = []
    for c in step.commands:
        names.append(f"{c.script.name}.lua" if isinstance(c, ScriptCall) else str(c.args[0]))
    label = " ".join(dict.fromkeys(names))
    if step.transaction:
        label = f"MULTI {label} EXEC"
    if step.block:
        label += " (BLOCK)"
    return label


def count_steps(driver: Any, tally: collections.Counter[str]) -> None:
    """Tally every step ``driver`` (sync or asyncio) runs from now on, by kind.

    Both drivers run each step, and each step of a flow, through their core
    ``StepRunner.run``: counting there counts both fronts alike.
    """
    runner = driver.runner
    original = runner.run

    def run(step: Step[Any], retry_timeout: float | None = None) -> Any:
        tally[step_label(step)] += 1
        return original(step, retry_timeout)

    runner.run = run


def print_tally(tally: collections.Counter[str], seconds: float | None = None,
                events: int | None = None) -> None:
    for label, n in tally.most_common():
        extra = f"  {n / seconds:6.2f}/s" if seconds else ""
        if events and label.startswith(("XREADGROUP", "MULTI XACK")):
            extra += f"  ({events / n:.0f} events each)"
        print(f"      {n:7d}  {label}{extra}")


# -- services in this process ---------------------------------------------------------


class Service:
    """A service of either front running in this process: a ``Microservice`` on its
    threads, or an ``AsyncMicroservice`` on an asyncio loop in a thread of its own (so
    the measuring code is the same for both, and py-spy sees both)."""

    def __init__(self, front: str, url: str, prefix: str, **options: Any) -> None:
        self.front = front
        self._loop: asyncio.AbstractEventLoop | None = None
        self.svc: Any
        if front == "sync":
            self.svc = Microservice("hot", url=url, prefix=prefix, **options)
            self.svc.on(BenchEvent)(lambda e: None)
            self.svc.event_bus  # noqa: B018 - connect before the clock starts
        else:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="hot-asyncio",
                             daemon=True).start()
            self.svc = self._await(self._make(url, prefix, options))

    def _await(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(120)

    @staticmethod
    async def _make(url: str, prefix: str, options: dict[str, Any]) -> AsyncMicroservice:
        svc = AsyncMicroservice("hot", url=url, prefix=prefix, **options)

        @svc.on(BenchEvent)
        async def handle(event: BenchEvent) -> None:
            pass

        await svc.mq.ping()  # connect before the clock starts
        return svc

    @property
    def driver(self) -> Any:
        return self.svc.mq.driver

    def start(self) -> None:
        if self._loop is None:
            self.svc.start()
        else:
            self._await(self.svc.start())

    def handled(self) -> int:
        return int(self.svc.stats["handled"])

    def wait(self, n: int, timeout: float = 120.0) -> bool:
        """Wait until ``n`` events are handled and acknowledged (False: not in time)."""
        deadline = time.monotonic() + timeout
        while self.handled() < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def close(self) -> None:
        if self._loop is None:
            self.svc.close()
            return
        self._await(self.svc.close())
        self._loop.call_soon_threadsafe(self._loop.stop)


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
        print(f"  EventBus._sending (event_json + envelope)           "
              f"{per_event(lambda: raw_fields(bus, events)):.1f} us")
        print(f"    event_json (pydantic-core's model_dump_json)        "
              f"{per_event(lambda: [event_json(e) for e in events]):.1f} us")
        print(f"    serialize_event + dumps (the dict path)            "
              f"{per_event(lambda: [dumps(serialize_event(e)) for e in events]):.1f} us")

        client = bus.mq.client
        raw_key = prefix + "raw"
        abus = AsyncEventBus(url, prefix=prefix)
        loop = asyncio.new_event_loop()

        async def apublish(batch: list[BenchEvent]) -> None:
            for i in range(0, len(batch), 100):
                await abus.publish_many(batch[i: i + 100])

        loop.run_until_complete(apublish(make_events(10)))
        one = n // 5  # one per call: fewer

        def raw_xadd(batch: list[BenchEvent]) -> None:  # the same fields each round
            for i in range(0, n, 100):
                pipe = client.pipeline(transaction=False)
                for f in fields[i: i + 100]:
                    pipe.xadd(raw_key, f)
                pipe.execute()

        def publish_each(batch: list[BenchEvent]) -> None:
            for event in batch:
                bus.publish(event)

        def raw_xadd_each(batch: list[BenchEvent]) -> None:
            for f in fields[:one]:
                client.xadd(raw_key, f)

        groups: dict[str, tuple[int, dict[str, Any]]] = {
            "batches of 100": (n, {
                "publish_many": lambda batch: publish_all(bus, batch, 100),
                "AsyncEventBus.publish_many": lambda batch: loop.run_until_complete(
                    apublish(batch)),
                "raw pipelined XADD": raw_xadd}),
            "one per call": (one, {"publish": publish_each, "raw XADD": raw_xadd_each})}
        figures: dict[str, list[tuple[float, float, float]]] = collections.defaultdict(list)
        try:
            for _ in range(args.rounds):
                for count, runs in groups.values():
                    for label, run in runs.items():
                        batch = make_events(count)  # new ids: none is a duplicate
                        c0, s0, t = (time.process_time(), cpu_seconds(spid),
                                     time.perf_counter())
                        run(batch)
                        figures[label].append((count / (time.perf_counter() - t),
                                               1e6 * (time.process_time() - c0) / count,
                                               1e6 * (cpu_seconds(spid) - s0) / count))
                    client.delete(raw_key)
        finally:
            loop.run_until_complete(abus.close())
            loop.close()
        print(f"median of {args.rounds} rounds (CPU per event: this process / the server"
              f"{'' if spid else ', unknown for --url'}):")
        for title, (_, runs) in groups.items():
            labels = list(runs)
            raw = statistics.median(f[0] for f in figures[labels[-1]])
            print(f"  {title}:")
            for label in labels:
                rate, ccpu, scpu = (statistics.median(f[k] for f in figures[label])
                                    for k in range(3))
                print(f"    {label:28s} {rate:9,.0f} events/s  {100 * rate / raw:4.0f}% of raw"
                      f"   CPU {ccpu:5.1f} / {scpu:5.1f} us")
    finally:
        bus.close()
        delete_prefix(url, prefix)


# -- consume --------------------------------------------------------------------------


def _consume_once(url: str, spid: int | None, front: str, n: int, concurrency: int,
                  tally: collections.Counter[str]) -> tuple[float, float, float]:
    prefix = unique_prefix("hot")
    try:
        preload(url, prefix, "hot", make_events(n))  # subscribed first, then published
        svc = Service(front, url, prefix, concurrency=concurrency, maintenance=False)
        count_steps(svc.driver, tally)
        c0, s0, t0 = time.process_time(), cpu_seconds(spid), time.perf_counter()
        svc.start()
        svc.wait(n)
        dt = time.perf_counter() - t0
        client_cpu, server_cpu = time.process_time() - c0, cpu_seconds(spid) - s0
        svc.close()
        return n / dt, 100 * client_cpu / dt, 100 * server_cpu / dt
    finally:
        delete_prefix(url, prefix)


def consume(url: str, spid: int | None, args: argparse.Namespace) -> None:
    variants = [(f, c) for f in fronts(args) for c in (1, 8)]
    if args.variant is not None:
        variants = [variants[args.variant]]
    print(f"consume {args.events:,} pre-loaded events, trivial handler (median of "
          f"{args.rounds}; client and server CPU in % of one core)")
    for front, concurrency in variants:
        tally: collections.Counter[str] = collections.Counter()
        runs = [_consume_once(url, spid, front, args.events, concurrency, tally)
                for _ in range(args.rounds)]
        rate, ccpu, scpu = (statistics.median(x) for x in zip(*runs, strict=True))
        print(f"  {front:5s} concurrency {concurrency}: {rate:8,.0f} events/s  "
              f"client {ccpu:3.0f}%  server {scpu:3.0f}%; requests over all rounds:")
        print_tally(tally, events=args.events * args.rounds)


# -- e2e ------------------------------------------------------------------------------


def _publisher(url: str, prefix: str, code: str) -> dict[str, Any]:
    """``subprocess.run`` arguments of a publisher process: connects, prints
    ``T0 <time.time()>`` just before it starts publishing, runs ``code`` (``bus``,
    ``events`` are there). The URL (it may hold a password) goes in its environment:
    a command line is visible to every user of the machine."""
    head = ("import os, time\n"
            "from relaybus import EventBus\n"
            "from relaybus._bench import make_events, paced_publish, publish_all\n"
            f"bus = EventBus(os.environ['RELAYBUS_BENCH_URL'], prefix={prefix!r})\n")
    return {"args": [sys.executable, "-c", head + code],
            "env": {**os.environ, "RELAYBUS_BENCH_URL": url}}


def _t0(output: str) -> float:
    return next(float(line.split()[1]) for line in output.splitlines() if line.startswith("T0 "))


def e2e(url: str, spid: int | None, args: argparse.Namespace) -> None:
    """Saturation with the service in this process and a publisher process
    (publish_many of 100); prints the rate, CPU per event and requests by kind."""
    n = args.events
    cmd = (f"events = make_events({n})\nprint('T0', time.time(), flush=True)\n"
           "publish_all(bus, events, 100)\n")
    for front in fronts(args):
        prefix = unique_prefix("hot")
        tally: collections.Counter[str] = collections.Counter()
        try:
            svc = Service(front, url, prefix)
            count_steps(svc.driver, tally)
            svc.start()
            try:
                c0, s0 = time.process_time(), cpu_seconds(spid)
                out = subprocess.run(**_publisher(url, prefix, cmd), check=True,
                                     capture_output=True, text=True).stdout
                svc.wait(n)
                dt = time.time() - _t0(out)
                ccpu, scpu = time.process_time() - c0, cpu_seconds(spid) - s0
            finally:
                svc.close()
        finally:
            delete_prefix(url, prefix)
        print(f"{front}: {n:,} events end to end: {n / dt:,.0f} events/s; CPU per event: "
              f"service {1e6 * ccpu / n:.0f} us, server {1e6 * scpu / n:.0f} us (publisher "
              "not counted); requests:")
        print_tally(tally, events=n)


# -- latency --------------------------------------------------------------------------


def latency(url: str, spid: int | None, args: argparse.Namespace) -> None:
    """Split publish -> handler start at the log entry (its stream id's millisecond, so
    that split is to +-1 ms)."""
    n = int(args.rate * args.seconds)
    cmd = (f"events = make_events({n})\n"
           f"print(f'offered {{paced_publish(bus, events, {args.rate}):,.0f}}/s')\n")
    for front in fronts(args):
        prefix = unique_prefix("hot")
        # handler start, payload, message id: three lists of objects the garbage
        # collector does not track (a tuple per event would make it run a full
        # collection, a pause of tens of ms, while the test runs)
        samples: tuple[list[float], list[Any], list[str]] = ([], [], [])
        cls: Any = Microservice if front == "sync" else AsyncMicroservice
        original = cls._process
        cls._process = _recording(original, samples, front == "async")
        try:
            svc = Service(front, url, prefix)
            svc.start()
            try:
                subprocess.run(**_publisher(url, prefix, cmd), check=True)
                svc.wait(n, 60)
            finally:
                svc.close()
        finally:
            cls._process = original
            delete_prefix(url, prefix)
        kept = [(t, json.loads(p)["sent_at"], int(str(i).rsplit("/", 1)[-1].split("-")[0]) / 1e3)
                for t, p, i in list(zip(*samples, strict=True))[len(samples[0]) // 10:]]  # 1/10: warm-up

        def pct(xs: list[float]) -> str:
            q = statistics.quantiles(xs, n=100, method="inclusive")
            return f"p50 {q[49]:6.2f}  p95 {q[94]:6.2f}  p99 {q[98]:6.2f}  max {max(xs):7.2f} ms"

        print(f"{front}: {args.rate:,}/s for {args.seconds:g}s, {len(kept)} events after "
              "warm-up")
        print(f"  publish -> handler start            {pct([1e3 * (a - s) for a, s, _ in kept])}")
        print(f"  publish -> log entry (stream id ms) {pct([1e3 * (c - s) for _, s, c in kept])}")
        print(f"  log entry -> handler start          {pct([1e3 * (a - c) for a, _, c in kept])}")


def _recording(original: Any, samples: tuple[list[float], list[Any], list[str]],
               awaited: bool) -> Any:
    """``_process`` that first records (handler start, payload, message id)."""
    times, payloads, ids = samples
    if awaited:
        async def aprocess(self: Any, message: Any) -> Any:
            times.append(time.time())
            payloads.append(message.payload)
            ids.append(message.id)
            return await original(self, message)

        return aprocess

    def process(self: Any, message: Any) -> Any:
        times.append(time.time())
        payloads.append(message.payload)
        ids.append(message.id)
        return original(self, message)

    return process


# -- idle -----------------------------------------------------------------------------


def idle(url: str, spid: int | None, args: argparse.Namespace) -> None:
    """Requests an idle service sends, by kind, and its CPU (default settings:
    maintenance on)."""
    for front in fronts(args):
        prefix = unique_prefix("hot")
        tally: collections.Counter[str] = collections.Counter()
        try:
            svc = Service(front, url, prefix)
            svc.start()
            time.sleep(2)  # start-up traffic
            count_steps(svc.driver, tally)
            c0 = time.process_time()
            time.sleep(args.seconds)
            cpu = 100 * (time.process_time() - c0) / args.seconds
            window = collections.Counter(tally)  # before close() adds its own
            svc.close()
        finally:
            delete_prefix(url, prefix)
        total = sum(window.values()) / args.seconds
        print(f"idle {front} service: {total:.2f} requests/s, CPU {cpu:.3f}%")
        print_tally(window, seconds=args.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="server URL (default: a private embedded Valkey)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--front", choices=["sync", "async", "both"], default="both",
                        help="which service front to run (default both)")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("encode")
    p.add_argument("--rounds", type=int, default=5)
    p = sub.add_parser("consume", parents=[common])
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variant", type=int, help="run only the Nth (front, concurrency) variant")
    p = sub.add_parser("e2e", parents=[common])
    p.add_argument("--events", type=int, default=20_000)
    p = sub.add_parser("latency", parents=[common])
    p.add_argument("--rate", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=5.0)
    p = sub.add_parser("idle", parents=[common])
    p.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with server(args.url) as (url, spid):
        {"encode": encode, "consume": consume, "e2e": e2e, "latency": latency,
         "idle": idle}[args.what](url, spid, args)


if __name__ == "__main__":
    main()
