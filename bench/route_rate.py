"""Routed events per second: N events pre-published, routed to S subscriptions.

Publishes ``--events`` events with ``publish_many`` (not timed), then times one
in-process EventBus calling ``route_once`` from the first call until the last copy
is in every subscription queue. Prints events/s (and copies/s). By default it runs
against a private embedded Valkey in a temporary directory; ``--url`` names another
server (a unique key prefix is used and deleted afterwards)::

    .venv/bin/python bench/route_rate.py                       # 10,000 events, 3 subs
    .venv/bin/python bench/route_rate.py --subs 16 --repeat 3
    .venv/bin/python bench/route_rate.py --url redis://127.0.0.1:6379/9
    .venv/bin/python bench/route_rate.py --repeat 1 --profile 25   # cProfile of routing

The server does most of the work: compare its CPU time (``INFO cpu``) with the wall
time to see which side bounds the figure.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import Iterator

import redis

from relaybus import Event, EventBus
from relaybus.bus import DEFAULT_BATCH_SIZE
from relaybus.embedded import EmbeddedServer
from relaybus.keys import QueueKeys
from relaybus.testing import delete_prefix, unique_prefix


class BenchOrderPlaced(Event, event_type="bench.order_placed"):
    order_id: str
    customer: str
    total: float
    items: list[str]


@contextlib.contextmanager
def server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="relaybus-bench-") as tmp:
        srv = EmbeddedServer(tmp)
        state = srv.start()
        try:
            yield state.url
        finally:
            srv.stop()


def run_once(url: str, n_events: int, n_subs: int, batch_size: int | None,
             profile: int = 0) -> float:
    """One measurement; returns events routed per second (``profile``: print the top
    functions of the routing phase by own time)."""
    prefix = unique_prefix("bench")
    try:
        with EventBus(url, prefix=prefix, batch_size=batch_size or DEFAULT_BATCH_SIZE) as bus:
            subs = [f"svc{i}" for i in range(n_subs)]
            for name in subs:
                bus.subscribe(name, [BenchOrderPlaced])
            events = [BenchOrderPlaced(order_id=f"o-{i}", customer="c-42", total=19.99,
                                       items=["sku-1", "sku-2"]) for i in range(n_events)]
            for i in range(0, n_events, 1000):
                bus.publish_many(events[i: i + 1000])
            profiler = cProfile.Profile() if profile else None
            routed = 0
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            while routed < n_events:
                routed += bus.route_once()
            elapsed = time.perf_counter() - start
            if profiler:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(profile)
        check = redis.Redis.from_url(url)
        try:
            for name in subs:
                got = check.xlen(QueueKeys(prefix, f"sub:{name}").stream)
                if got != n_events:
                    raise SystemExit(f"subscription {name} holds {got} copies, not {n_events}")
        finally:
            check.close()
        return n_events / elapsed
    finally:
        delete_prefix(url, prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="server URL (default: a private embedded Valkey)")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--subs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="EventBus batch_size (default: the bus default)")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile the routing of the first run; print the top N functions")
    args = parser.parse_args()
    with server(args.url) as url:
        rates = [run_once(url, args.events, args.subs, args.batch_size,
                          args.profile if i == 0 else 0) for i in range(args.repeat)]
    median = statistics.median(rates)
    runs = ", ".join(f"{r:,.0f}" for r in rates)
    print(f"routed {args.events:,} events to {args.subs} subscriptions: "
          f"{median:,.0f} events/s ({median * args.subs:,.0f} copies/s); runs: {runs}")


if __name__ == "__main__":
    main()
