"""Scenario 14: an ordered service's instances SIGKILLed mid-stream, with retries.

Three instances of one ``ordered=True`` service (both fronts, concurrency 4 each) share
its subscription; two producers publish events over 20 partition keys each (event n of
producer P has the key ``P-k(n mod 20)``, so each key's publish order is ``n`` order).
Every event whose n is a multiple of 30 fails the first time it runs (on any instance),
and is retried (10 ms later).
Three times an instance is frozen at a moment it holds events, SIGKILLed and replaced
(fronts alternating). Every completed handler run is recorded with its key, ``n``, and
when it started and ended. Then, per key: no run started before the previous completed
run of its key had ended, and no event ran after a later one of its key; a killed
instance's event waits for its lease (2 s) and holds its key meanwhile. Every event is
handled (duplicates within what the killed instances held).
"""

from __future__ import annotations

import random
import time

import pytest

from faults.conftest import Scale
from faults.harness import Cluster, wait_until
from faults.ledger import Report, reconcile

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

NAME = "ordered"
KEYS_PER_PRODUCER = 20
KILLS = 3
FAIL_EVERY = 30


def test_ordered_service_instances_sigkilled(cluster: Cluster, scale: Scale,
                                             rng: random.Random, record: list[Report]) -> None:
    total = scale.n(20_000, ci=2_000)
    seconds = 20.0 if scale.full else 5.0
    prefetch = 16
    options = dict(concurrency=4, prefetch=prefetch, vt=2.0, delay=0.002, ordered=True,
                   fail_every=FAIL_EVERY)
    instances = cluster.services(NAME, 3, **options)
    cluster.wait_ready(instances)
    t0 = time.time()
    producers = [cluster.producer(f"p{i}", total // 2, rate=total / 2 / seconds,
                                  types="alpha,beta", batch=10, keys=KEYS_PER_PRODUCER)
                 for i in range(2)]
    wait_until(lambda: cluster.ledger.refresh().handled_count(NAME) > 0, 30,
               "the first completion")
    held = 0
    for _ in range(KILLS):
        time.sleep(rng.uniform(0.1, 0.25) * seconds)  # a random moment to kill at
        victim = rng.choice(wait_until(lambda: [
            c for c in instances if c.alive() and (c.status() or {}).get("ready")], 30,
            "an instance to be up"))
        held += cluster.kill_holding(victim, NAME, rng)
        instances.append(cluster.service(NAME, front=victim.front, **options))
    killed_during_run = sum(p.alive() for p in producers) > 0
    cluster.wait_exit(producers, timeout=seconds * 4 + 60)
    cluster.wait_quiet([NAME], timeout=90)
    live = [c for c in instances if c.alive()]
    cluster.check_threads(live)
    report = reconcile(cluster.ledger, cluster.dead, {NAME: ["*"]},
                       "14. SIGKILL ordered service instances", prefix=cluster.prefix,
                       faults=f"{KILLS} instances of an ordered service SIGKILLed (replaced) "
                       f"among 3 of both fronts; concurrency 4, prefetch {prefetch}; events "
                       f"n % {FAIL_EVERY} == 0 fail once",
                       duplicate_bound=KILLS * prefetch, seconds=time.time() - t0)
    faults = cluster.ledger.order_faults(NAME)
    runs = cluster.ledger.runs.get(NAME, [])
    report.notes["partition keys"] = len({r[0] for r in runs})
    report.notes["completed runs checked for order"] = len(runs)
    report.notes["order faults"] = len(faults)
    report.notes["handler failures (retried)"] = sum(
        int(((c.status() or {}).get("stats") or {}).get("retried", 0)) for c in instances)
    report.notes["events held by the killed instances"] = held
    cluster.terminate(live)
    record.append(report)
    assert killed_during_run, "the kills came after the producers had finished"
    assert held > 0, "no kill caught an instance holding events"
    assert faults == [], faults[:20]
    assert report.dead_lettered == 0
    assert set(report.fronts) == {"sync", "async"}, report.fronts
    report.assert_ok()
