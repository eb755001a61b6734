"""Scenarios 1 and 2: relaybus processes SIGKILLed at random moments.

1. Five service instances killed during a run of 20,000 events (full scale); each is
   replaced, and the replacements and survivors finish the work.
2. One of two routers killed mid-stream; the other keeps routing and takes over the
   dead one's batch.
"""

from __future__ import annotations

import random
import time

import pytest

from faults.conftest import Scale
from faults.harness import Cluster, wait_until
from faults.ledger import Report, reconcile

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]


def _run_seconds(scale: Scale) -> float:
    """How long the producers of a kill scenario run: long enough to kill five times."""
    return 20.0 if scale.full else 6.0


def test_sigkill_service_instances(cluster: Cluster, scale: Scale, rng: random.Random,
                                   record: list[Report]) -> None:
    total = scale.n(20_000)
    seconds = _run_seconds(scale)
    concurrency, vt = 2, 2.0
    router = cluster.router()
    instances = [cluster.service("kill", concurrency=concurrency, prefetch=8, vt=vt)
                 for _ in range(3)]
    cluster.wait_ready([router, *instances])
    t0 = time.time()
    producers = [cluster.producer(f"p{i}", total // 2, rate=total / 2 / seconds,
                                  types="alpha,beta", batch=20) for i in range(2)]
    wait_until(lambda: cluster.ledger.refresh().handled_count("kill") > 0, 30,
               "the first completion")
    queue = f"{cluster.prefix}{{sub:kill}}"
    kills = held = 0
    while kills < 5:
        time.sleep(rng.uniform(0.05, 0.15) * seconds)  # a random moment to kill at
        victim = rng.choice([c for c in instances if c.alive()])
        held += cluster.kill_holding(victim, queue, rng)
        kills += 1
        instances.append(cluster.service("kill", concurrency=concurrency, prefetch=8, vt=vt))
    killed_during_run = sum(p.alive() for p in producers) > 0
    cluster.wait_exit(producers, timeout=seconds * 4 + 60)
    cluster.wait_quiet(["kill"], timeout=60)
    live = [c for c in instances if c.alive()]
    cluster.check_threads(live)
    report = reconcile(cluster.ledger, cluster.dead, {"kill": ["*"]}, "1. SIGKILL services",
                       prefix=cluster.prefix, faults=f"{kills} service instances SIGKILLed "
                       f"(replaced); concurrency {concurrency}",
                       duplicate_bound=kills * concurrency, seconds=time.time() - t0)
    report.notes["events held by the killed instances"] = held
    for c in live:
        c.terminate()
    record.append(report)
    assert killed_during_run, "the kills came after the producers had finished"
    assert held > 0, "no kill caught an instance holding events"
    assert report.dead_lettered == 0
    report.assert_ok()


def test_sigkill_a_router(cluster: Cluster, scale: Scale, rng: random.Random,
                          record: list[Report]) -> None:
    total = scale.n(20_000)
    seconds = _run_seconds(scale)
    router_vt = 2.0
    routers = [cluster.router(f"router{i}", vt=router_vt) for i in range(2)]
    services = [cluster.service("routed", concurrency=2, prefetch=16) for _ in range(2)]
    cluster.wait_ready([*routers, *services])
    t0 = time.time()
    producers = [cluster.producer(f"p{i}", total // 2, rate=total / 2 / seconds,
                                  types="alpha,beta,gamma", batch=20) for i in range(2)]
    wait_until(lambda: cluster.ledger.refresh().handled_count("routed") > total // 10, 60,
               "a tenth of the events to be handled")
    time.sleep(rng.uniform(0.0, 0.3) * seconds)  # a random moment to kill at
    victim, survivor = rng.sample(routers, 2)
    victim_stats = (victim.status() or {}).get("stats", {})
    held = cluster.kill_holding(victim, f"{cluster.prefix}{{all}}", rng)
    killed_at = time.time()
    assert any(p.alive() for p in producers), "the kill came after the producers had finished"
    cluster.wait_exit(producers, timeout=seconds * 4 + 60)
    cluster.wait_quiet(["routed"], timeout=60)
    cluster.check_threads([survivor, *services])
    report = reconcile(cluster.ledger, cluster.dead, {"routed": ["*"]}, "2. SIGKILL a router",
                       prefix=cluster.prefix, faults="1 of 2 routers SIGKILLed mid-stream",
                       duplicate_bound=0, seconds=time.time() - t0)
    # every event was copied into the subscription exactly once, whoever routed it
    copies = cluster.client.xinfo_stream(f"{cluster.prefix}{{sub:routed}}")["entries-added"]
    survivor_stats = (survivor.status() or {}).get("stats", {})
    report.notes["copies written"] = copies
    report.notes["routed by the killed router"] = victim_stats.get("routed", 0)
    report.notes["routed by the survivor"] = survivor_stats.get("routed", 0)
    report.notes["killed at"] = f"{killed_at - t0:.1f} s"
    report.notes["log entries the killed router held"] = held
    for c in [survivor, *services]:
        c.terminate()
    record.append(report)
    assert copies == report.published, f"{copies} copies for {report.published} events"
    assert held > 0, "the router was not killed holding a batch"
    assert report.dead_lettered == 0
    report.assert_ok()
