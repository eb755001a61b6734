"""Scenarios 8 and 9: load, and a consumer slower than its producers.

8. Four producer processes, three services of two instances each (one per front),
   with overlapping subscriptions, a maintenance process trimming the log to a short
   retention, and 100,000 events (full scale): the ledger is exact, every log entry
   was read exactly once by each subscription's group, the log was trimmed while the
   services worked and never past what a subscription had not acknowledged (no
   event lost, no pending entry found gone), and the run's throughput is reported.
9. Two slow services, one per front, each a single instance slower than the
   producer: each holds at most ``prefetch`` events in memory while its backlog (its
   group's lag on the log) grows in Redis, and catches up once the load stops.
"""

from __future__ import annotations

import time

import pytest

from faults.conftest import Scale
from faults.harness import Cluster, wait_until
from faults.ledger import Report, log_key, reconcile, sub_group

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

PLAN = {"billing": ["faults.alpha", "faults.beta"], "shipping": ["faults.beta", "faults.gamma"],
        "audit": ["*"]}


def test_load(cluster: Cluster, scale: Scale, record: list[Report]) -> None:
    total = scale.n(100_000, ci=6_000)
    retention = max(500, total // 50)
    maintenance = cluster.maintenance(max_len=retention, interval=0.5)
    services = []
    for name, types in PLAN.items():
        short = ",".join(t.removeprefix("faults.") for t in types)
        services += cluster.services(name, 2, types=short, concurrency=2, prefetch=32)
    relaybus = [maintenance, *services]
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
                       faults="none: 4 producers, 3 services x 2 instances (one per front), "
                              f"log retention {retention:,}",
                       duplicate_bound=0, seconds=time.time() - t0)
    report.notes["throughput"] = f"{total / (last - first):,.0f} events/s end to end"
    report.notes["handler completions"] = f"{completions / (last - first):,.0f}/s"
    report.notes["publishing"] = f"{total / (published - t0):,.0f} events/s"
    fan_out = cluster.fan_out(PLAN)
    trimmed = int((maintenance.status() or {}).get("trimmed", 0))
    log_len = int(cluster.client.xlen(log_key(cluster.prefix)))
    gone = sum(int((c.status() or {}).get("queue_stats", {}).get("gone", 0)) for c in services)
    report.notes["log entries read by each group"] = ", ".join(
        f"{name} {fan_out[name]:,}" for name in PLAN) + f" of {fan_out['log entries']:,}"
    report.notes["log trimmed while in use"] = f"{trimmed:,} entries ({log_len:,} left)"
    per_service = {name: ", ".join(f"{f} {ledger.service_fronts.get(name, {}).get(f, 0):,}"
                                   for f in ("sync", "async")) for name in PLAN}
    report.notes["completions by front per service"] = per_service
    cluster.terminate(relaybus)
    record.append(report)
    for name in PLAN:
        assert fan_out[name] == fan_out["log entries"] == total, f"{name}: {fan_out}"
        assert set(ledger.service_fronts.get(name, {})) == {"sync", "async"}, per_service
    assert trimmed > 0 and log_len < total, "the log was never trimmed"
    assert gone == 0, f"{gone} pending entries were trimmed away"
    assert report.dead_lettered == 0
    report.assert_ok()


def test_slow_consumer(cluster: Cluster, scale: Scale, record: list[Report]) -> None:
    total = scale.n(30_000, ci=1_000)
    pad = 16 * 1024
    prefetch = 4
    rate = 2000
    slow = {front: cluster.service(f"slow-{front}", front=front, concurrency=1,
                                   prefetch=prefetch, delay=0.002) for front in ("sync", "async")}
    names = [f"slow-{front}" for front in slow]
    cluster.wait_ready(slow.values())
    rss_before = {front: int(wait_until(lambda c=c: (c.status() or {}).get("rss_kb"), 10,
                                        "a status")) for front, c in slow.items()}
    t0 = time.time()
    producer = cluster.producer("fast", total, rate=rate, types="alpha", batch=20, pad=pad)
    peak_backlog = dict.fromkeys(slow, 0)
    peak_used = peak_log = 0
    while producer.alive():  # sample the backlogs in Redis while the load lasts
        groups = cluster.groups()
        for front in slow:
            g = groups.get(sub_group(f"slow-{front}"), {})
            peak_backlog[front] = max(peak_backlog[front], int(g.get("lag") or 0))
        peak_log = max(peak_log, int(cluster.client.xlen(log_key(cluster.prefix))))
        peak_used = max(peak_used, int(cluster.client.info("memory")["used_memory"]))
        time.sleep(0.05)  # sampling interval
    cluster.wait_exit([producer], timeout=60)
    stopped = time.time()
    caught_up: dict[str, float] = {}
    while len(caught_up) < len(slow):  # each subscription on its own
        for front in slow:
            if front not in caught_up and cluster.quiet([f"slow-{front}"]):
                caught_up[front] = time.time()
        assert time.time() - stopped < 600, f"not caught up: {cluster.backlog(names)}"
        time.sleep(0.1)  # polling interval
    done = max(caught_up.values())
    st = {front: wait_until(lambda c=c: (s := c.status()) and s["time"] > done and s, 10,
                            "a fresh status") for front, c in slow.items()}
    grew_mb = {front: (int(st[front]["max_rss_kb"]) - rss_before[front]) / 1024 for front in slow}
    report = reconcile(cluster.ledger, cluster.dead, {n: ["*"] for n in names},
                       "9. slow consumer", prefix=cluster.prefix, duplicate_bound=0,
                       seconds=time.time() - t0,
                       faults=f"one instance per front at ~2 ms/event, producer at "
                              f"{rate}/s, {pad // 1024} KB events")

    def per_front(fmt: str, values: dict[str, object]) -> str:
        return ", ".join(f"{front} {fmt.format(v)}" for front, v in values.items())

    report.notes["peak backlog in Redis (group lag)"] = per_front(
        "{:,} events", peak_backlog)
    report.notes["log peak"] = (f"{peak_log:,} events ({peak_log * pad / 2**20:.0f} MB), "
                                "one copy for both subscriptions")
    report.notes["server memory peak"] = f"{peak_used / 2**20:.0f} MB"
    report.notes["events held by the consumer (max)"] = per_front(
        "{}", {f: st[f]["max_in_flight"] for f in slow}) + f" (prefetch {prefetch})"
    report.notes["consumer RSS growth"] = per_front("{:.1f} MB", grew_mb)
    report.notes["caught up after the load stopped"] = per_front(
        "{:.1f} s", {f: caught_up[f] - stopped for f in slow})
    cluster.terminate(slow.values())
    record.append(report)
    for front in slow:
        assert st[front]["max_in_flight"] <= prefetch, (front, st[front]["max_in_flight"])
        # the backlog grew in Redis far beyond what the consumer holds (prefetch x 16 KB)
        assert peak_backlog[front] * pad > 8 * 2**20, f"{front}: the backlog never grew much"
        assert grew_mb[front] < 20, f"the slow {front} consumer grew by {grew_mb[front]:.1f} MB"
    report.assert_ok()
