"""Scenarios 1 and 2: service instances SIGKILLed at random moments, on either front.

Both scenarios have the same shape: three instances of one service share its
subscription (one consumer group on the event log), of both fronts; five times one
instance of the victim front is frozen at a moment it holds events, SIGKILLed, and
replaced by a new instance of the same front. The survivors, of either front, take
the dead instances' events over once their lease (2 s) runs out.

1. The victims are sync instances (``Microservice``): 2 sync + 1 async at the start.
2. The victims are asyncio instances (``AsyncMicroservice``): 2 async + 1 sync.

Native fan-out invariant: every log entry was read exactly once by the subscription's
group (``entries-read`` = the log's ``entries-added`` = events published); a taken-over
event is a redelivery of the same entry (its delivery count grows), never a new one.
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
    return 20.0 if scale.full else 5.0


def _kill_instances(cluster: Cluster, scale: Scale, rng: random.Random, victims: str,
                    scenario: str, record: list[Report]) -> None:
    total = scale.n(20_000)
    seconds = _run_seconds(scale)
    concurrency, prefetch, vt = 2, 8, 2.0
    name = "kill"
    options = dict(concurrency=concurrency, prefetch=prefetch, vt=vt)
    instances = cluster.services(name, 3, first=victims, **options)
    cluster.wait_ready(instances)
    t0 = time.time()
    producers = [cluster.producer(f"p{i}", total // 2, rate=total / 2 / seconds,
                                  types="alpha,beta", batch=20) for i in range(2)]
    wait_until(lambda: cluster.ledger.refresh().handled_count(name) > 0, 30,
               "the first completion")
    kills = held = 0
    while kills < 5:
        time.sleep(rng.uniform(0.05, 0.15) * seconds)  # a random moment to kill at
        # among the instances of the victim front that are up and working (a replacement
        # still starting holds nothing)
        victim = rng.choice(wait_until(lambda: [
            c for c in instances if c.alive() and c.front == victims
            and (c.status() or {}).get("ready")], 30, f"a {victims} instance to be up"))
        held += cluster.kill_holding(victim, name, rng)
        kills += 1
        instances.append(cluster.service(name, front=victims, **options))
    killed_during_run = sum(p.alive() for p in producers) > 0
    cluster.wait_exit(producers, timeout=seconds * 4 + 60)
    cluster.wait_quiet([name], timeout=60)
    live = [c for c in instances if c.alive()]
    cluster.check_threads(live)
    # an instance that dies after its handlers finished and before their batched
    # acknowledgement reached the server: at most what it held (prefetch) runs again
    report = reconcile(cluster.ledger, cluster.dead, {name: ["*"]}, scenario,
                       prefix=cluster.prefix, faults=f"{kills} {victims} instances SIGKILLed "
                       f"(replaced) among 3 of both fronts; concurrency {concurrency}, "
                       f"prefetch {prefetch}", duplicate_bound=kills * prefetch,
                       seconds=time.time() - t0)
    fan_out = cluster.fan_out([name])
    report.notes["events held by the killed instances"] = held
    report.notes["log entries read by the subscription's group"] = \
        f"{fan_out[name]:,} of {fan_out['log entries']:,}"
    if cluster.ledger.duplicate_fronts:
        report.notes["second completions ran by"] = dict(cluster.ledger.duplicate_fronts)
    cluster.terminate(live)
    record.append(report)
    assert killed_during_run, "the kills came after the producers had finished"
    assert held > 0, "no kill caught an instance holding events"
    assert report.dead_lettered == 0
    assert fan_out["log entries"] == report.published, fan_out
    assert fan_out[name] == fan_out["log entries"], f"the group read {fan_out}"
    assert set(report.fronts) == {"sync", "async"}, report.fronts
    report.assert_ok()


def test_sigkill_sync_service_instances(cluster: Cluster, scale: Scale, rng: random.Random,
                                        record: list[Report]) -> None:
    _kill_instances(cluster, scale, rng, "sync", "1. SIGKILL sync services", record)


def test_sigkill_asyncio_service_instances(cluster: Cluster, scale: Scale, rng: random.Random,
                                           record: list[Report]) -> None:
    _kill_instances(cluster, scale, rng, "async", "2. SIGKILL asyncio services", record)

