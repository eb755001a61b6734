"""Three services in one process consuming pre-loaded events (fan-out to 3).

The workload behind the fan-out profiles in docs/benchmarks.md, without a publisher
running beside it::

    python bench/fanout_consume.py [EVENTS] [--front sync|async]
    py-spy record -r 1000 --gil -f raw -o fanout3.txt -- python bench/fanout_consume.py

Each service has its own subscription and a typed handler; the rate is per service.
It also prints this process's CPU time per wall second while consuming (1.0: one core,
the GIL, saturated) and the server's command calls per event handled (from
``INFO commandstats``): round trips, which batching keeps well under one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import redis

from relaybus import AsyncMicroservice, EventBus, Microservice, testing
from relaybus._bench import BenchEvent, make_events, publish_all

PREFIX = "fanout3:"


def preload(url: str, n: int) -> None:
    """Subscribe the three services (start, then stop), then publish ``n`` events."""
    for i in range(3):
        svc = Microservice(f"s{i}", url=url, prefix=PREFIX, maintenance=False)
        svc.on(BenchEvent)(lambda e: None)
        svc.start()
        svc.stop()
    with EventBus(url, prefix=PREFIX) as bus:
        publish_all(bus, make_events(n), 100)


def report(n: int, dt: float, cpu: float) -> None:
    print(f"fan-out to 3, pre-loaded: {n / dt:,.0f} events/s per service "
          f"({3 * n / dt:,.0f} handled/s in all); CPU {cpu / dt:.2f} s per s")


def cpu_time() -> float:
    t = os.times()
    return t.user + t.system


def run_sync(url: str, n: int, prefetch: int | None = None) -> None:
    counts = [0, 0, 0]
    running = []
    for i in range(3):
        svc = Microservice(f"s{i}", url=url, prefix=PREFIX, maintenance=False,
                           prefetch=prefetch)

        def handle(event: BenchEvent, i: int = i) -> None:
            counts[i] += 1

        svc.on(BenchEvent)(handle)
        running.append(svc)
    t0, c0 = time.monotonic(), cpu_time()
    for svc in running:
        svc.start()
    while sum(counts) < 3 * n:
        time.sleep(0.01)  # polling for the end of the run
    report(n, time.monotonic() - t0, cpu_time() - c0)
    for svc in running:
        svc.stop()


async def run_async(url: str, n: int, prefetch: int | None = None) -> None:
    counts = [0, 0, 0]
    done = asyncio.Event()
    running = []
    for i in range(3):
        svc = AsyncMicroservice(f"s{i}", url=url, prefix=PREFIX, maintenance=False,
                                prefetch=prefetch)

        async def handle(event: BenchEvent, i: int = i) -> None:
            counts[i] += 1
            if sum(counts) == 3 * n:
                done.set()

        svc.on(BenchEvent)(handle)
        running.append(svc)
    t0, c0 = time.monotonic(), cpu_time()
    for svc in running:
        await svc.start()
    await done.wait()
    report(n, time.monotonic() - t0, cpu_time() - c0)
    for svc in running:
        await svc.stop()


def command_calls(url: str) -> dict[str, int]:
    """Calls per command since the last ``CONFIG RESETSTAT`` (without this bench's own)."""
    with redis.Redis.from_url(url) as r:
        stats = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()
            if k not in ("cmdstat_info", "cmdstat_config")}


def report_calls(url: str, n: int) -> None:
    calls = command_calls(url)
    top = ", ".join(f"{k} {v / (3 * n):.3f}" for k, v in
                    sorted(calls.items(), key=lambda kv: -kv[1])[:6])
    print(f"server calls per event handled: {sum(calls.values()) / (3 * n):.3f} ({top})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("events", nargs="?", type=int, default=60_000)
    parser.add_argument("--front", choices=("sync", "async"), default="sync")
    parser.add_argument("--prefetch", type=int, default=None,
                        help="each service's prefetch (default: the services' default)")
    args = parser.parse_args()
    with testing.embedded_server() as url:
        preload(url, args.events)
        with redis.Redis.from_url(url) as r:
            r.config_resetstat()
        if args.front == "sync":
            run_sync(url, args.events, args.prefetch)
        else:
            asyncio.run(run_async(url, args.events, args.prefetch))
        report_calls(url, args.events)


if __name__ == "__main__":
    main()
