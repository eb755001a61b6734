"""Scenario 12: a Sentinel failover mid-stream, for each ``durability``.

A Sentinel deployment of its own (tests/sentinel.py: a primary with ``min-replicas-to-
write 1``, one replica, three sentinels); two instances of one service (one per front)
and two producers, all on its ``redis+sentinel://`` URL. Mid-stream the primary is
SIGKILLed, and the sentinels promote the replica after 1 s (a coordinated
``SENTINEL FAILOVER``, which loses nothing, is tests/test_sentinel.py's). With
``durability="primary"``, what the primary acknowledged and had not yet sent to the
replica is gone: the scenario counts it (docs/reliability.md states the window). With
``durability="replicated"``, a publish returns only once the replica has the event, so
nothing whose publish returned is lost.

The killed server is then started again, empty, as the new primary's replica. Every relaybus process carries on without a restart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from faults.conftest import Scale, _scale
from faults.harness import Cluster, SentinelServer, wait_until
from faults.ledger import Report, reconcile
from sentinel import SentinelCluster, sentinel_cluster

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

SERVICES = {"durable": ["*"]}


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[SentinelCluster]:
    root = tmp_path / "sentinel"
    root.mkdir()
    with sentinel_cluster(root) as started:
        yield started


@pytest.mark.parametrize(("fault", "durability"), [
    pytest.param("primary SIGKILLed", "primary", marks=pytest.mark.skipif(
        not _scale().full, reason="a measurement (what the replication window loses), not "
        "a guarantee: RELAYBUS_FAULTS_SCALE=full runs it")),
    ("primary SIGKILLed", "replicated"),
])
def test_sentinel_failover(tmp_path: Path, deployment: SentinelCluster, scale: Scale,
                           record: list[Report], fault: str, durability: str) -> None:
    cluster = Cluster(tmp_path, SentinelServer(deployment))
    try:
        _run(cluster, deployment, scale, record, fault, durability)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()}") from exc
    finally:
        cluster.close()


def _run(cluster: Cluster, deployment: SentinelCluster, scale: Scale, record: list[Report],
         fault: str, durability: str) -> None:
    total = scale.n(20_000, ci=2_000)
    seconds = 20.0 if scale.full else 4.0
    services = cluster.services("durable", 2, concurrency=2, prefetch=8, vt=5.0, delay=0.002,
                                retry_timeout=30.0, durability=durability)
    cluster.wait_ready(services)
    producers = [cluster.producer(f"p{i}", total // 2, rate=total / 2 / seconds,
                                  types="alpha,beta", batch=10, retry_timeout=30.0,
                                  durability=durability) for i in range(2)]
    pids = [c.pid for c in services]
    t0 = time.time()
    wait_until(lambda: cluster.ledger.refresh().handled_count("durable") > total // 5, 60,
               "a fifth of the events to be handled")
    before = len(cluster.ledger.refresh().published)
    at = time.time()
    old, new = deployment.kill_primary()
    promoted = time.time()
    deployment.restart(old, replica_of=new)  # a replica again: WAIT can succeed again
    assert any(p.alive() for p in producers), "the producers had finished before the fault"
    cluster.wait_exit(producers, timeout=seconds * 4 + 60)
    cluster.wait_quiet(SERVICES, timeout=90)
    assert [c.pid for c in services] == pids and all(c.alive() for c in services)
    report = reconcile(cluster.ledger, cluster.dead, SERVICES,
                       f"12. Sentinel failover, durability={durability!r}",
                       prefix=cluster.prefix, faults=f"{fault} at {at - t0:.1f} s",
                       duplicate_bound=total, seconds=time.time() - t0)
    statuses = [p.status() or {} for p in producers]
    report.notes["published before the fault"] = before
    report.notes["until the sentinels named the new primary"] = f"{promoted - at:.1f} s"
    report.notes["publishes retried (no replica in time)"] = sum(
        int(s.get("unreplicated", 0)) for s in statuses)
    report.notes["BrokerUnavailableError seen by producers"] = sum(
        int(s.get("unavailable", 0)) for s in statuses)
    report.notes["acknowledged publishes lost"] = report.missing
    cluster.terminate(services)
    record.append(report)
    assert report.dead_lettered == 0
    if durability == "replicated":
        report.assert_ok()  # nothing whose publish returned is lost
