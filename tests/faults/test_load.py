"""Scenarios 8 and 9: load, and a consumer slower than its producers.

8. Four producer processes, two routers, three services of two instances each, and
   100,000 events (full scale): the ledger is exact, and the run's throughput is
   reported.
9. A service slower than its producers holds at most ``prefetch`` events in memory
   while its queue grows in Redis, and catches up once the load stops.
"""

from __future__ import annotations

import time

import pytest

from faults.conftest import Scale
from faults.harness import Cluster, wait_until
from faults.ledger import Report, reconcile

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

PLAN = {"billing": ["faults.alpha", "faults.beta"], "shipping": ["faults.beta", "faults.gamma"],
        "audit": ["*"]}


def test_load(cluster: Cluster, scale: Scale, record: list[Report]) -> None:
    total = scale.n(100_000)
    relaybus = [cluster.router(f"router{i}") for i in range(2)]
    for name, types in PLAN.items():
        short = ",".join(t.removeprefix("faults.") for t in types)
        relaybus += [cluster.service(name, types=short, concurrency=2, prefetch=32)
                     for _ in range(2)]
    cluster.wait_ready(relaybus)
    t0 = time.time()
    producers = [cluster.producer(f"p{i}", total // 4, types="alpha,beta,gamma", batch=50)
                 for i in range(4)]
    cluster.wait_exit(producers, timeout=600)
    published = time.time()
    cluster.wait_quiet(PLAN, timeout=900)
    cluster.check_threads(relaybus)
    ledger = cluster.ledger.refresh()
    first = min(ledger.published_at.values())
    last = max(ledger.completed_at.values())
    completions = sum(sum(c.values()) for c in ledger.completed.values())
    report = reconcile(ledger, cluster.dead, PLAN, "8. load", prefix=cluster.prefix,
                       faults="none: 4 producers, 2 routers, 3 services x 2 instances",
                       duplicate_bound=0, seconds=time.time() - t0)
    report.notes["throughput"] = f"{total / (last - first):,.0f} events/s end to end"
    report.notes["handler completions"] = f"{completions / (last - first):,.0f}/s"
    report.notes["publishing"] = f"{total / (published - t0):,.0f} events/s"
    copies = {name: cluster.client.xinfo_stream(f"{cluster.prefix}{{sub:{name}}}")
              ["entries-added"] for name in PLAN}
    for child in relaybus:
        child.terminate()
    record.append(report)
    for name, types in PLAN.items():
        wanted = sum(1 for t in ledger.published.values() if "*" in types or t in types)
        assert copies[name] == wanted, f"{name}: {copies[name]} copies for {wanted} events"
    assert report.dead_lettered == 0
    report.assert_ok()


def test_slow_consumer(cluster: Cluster, scale: Scale, record: list[Report]) -> None:
    total = scale.n(30_000, 3_000)
    pad = 16 * 1024
    prefetch = 4
    relaybus = [cluster.router(),
                cluster.service("slow", concurrency=1, prefetch=prefetch, delay=0.002)]
    cluster.wait_ready(relaybus)
    slow = relaybus[1]
    rss_before = int(wait_until(lambda: (slow.status() or {}).get("rss_kb"), 10, "a status"))
    t0 = time.time()
    producer = cluster.producer("fast", total, rate=1000 if not scale.full else 2000,
                                types="alpha", batch=20, pad=pad)
    queue = f"{cluster.prefix}{{sub:slow}}"
    peak_backlog = peak_used = 0
    while producer.alive():  # sample the queue in Redis while the load lasts
        peak_backlog = max(peak_backlog, int(cluster.client.xlen(queue)))
        peak_used = max(peak_used, int(cluster.client.info("memory")["used_memory"]))
        time.sleep(0.05)  # sampling interval
    cluster.wait_exit([producer], timeout=60)
    stopped = time.time()
    cluster.wait_quiet(["slow"], timeout=600)
    caught_up = time.time()
    st = wait_until(lambda: (s := slow.status()) and s["time"] > caught_up and s, 10,
                    "a fresh status")
    grew_mb = (int(st["max_rss_kb"]) - rss_before) / 1024
    report = reconcile(cluster.ledger, cluster.dead, {"slow": ["*"]}, "9. slow consumer",
                       prefix=cluster.prefix, duplicate_bound=0, seconds=time.time() - t0,
                       faults=f"consumer at ~2 ms/event, producer at "
                              f"{1000 if not scale.full else 2000}/s, {pad // 1024} KB events")
    report.notes["peak backlog in Redis"] = (f"{peak_backlog:,} events "
                                             f"({peak_backlog * pad / 2**20:.0f} MB)")
    report.notes["server memory peak"] = f"{peak_used / 2**20:.0f} MB"
    report.notes["events held by the consumer (max)"] = f"{st['max_in_flight']} (prefetch {prefetch})"
    report.notes["consumer RSS growth"] = f"{grew_mb:.1f} MB"
    report.notes["caught up"] = f"{caught_up - stopped:.1f} s after the load stopped"
    slow.terminate()
    relaybus[0].terminate()
    record.append(report)
    assert st["max_in_flight"] <= prefetch
    # the queue grew in Redis far beyond what the consumer holds (prefetch x 16 KB)
    assert peak_backlog * pad > 16 * 2**20, "the queue never grew much in Redis"
    assert grew_mb < 20, f"the slow consumer grew by {grew_mb:.1f} MB"
    report.assert_ok()
