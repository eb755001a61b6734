"""Scenarios 12 and 13: a failover mid-stream, for each ``durability``.

12, Sentinel: a deployment of its own (tests/sentinel.py: a primary with ``min-replicas-
to-write 1``, one replica, three sentinels). Mid-stream the primary is SIGKILLed, and the
sentinels promote the replica after 1 s (a coordinated ``SENTINEL FAILOVER``, which loses
nothing, is tests/test_sentinel.py's). The killed server is started again, empty, as the
new primary's replica.

13, Redis Cluster: a cluster of its own (tests/cluster.py: three primaries, a replica
each). Mid-stream the primary that serves the event log's slot is SIGKILLed; the other
nodes flag it failed after ``cluster-node-timeout`` (2 s) and its replica takes its
slots. The killed node is started again, empty, and rejoins as that replica's replica.

Each runs two instances of one service (one per front) and two producers, all on the
deployment's URL, none restarted. With ``durability="primary"``, what the primary
acknowledged and had not yet sent to the replica is gone: the scenario counts it
(docs/reliability.md states the window). With ``durability="replicated"``, a publish
returns only once the replica has the event, so nothing whose publish returned is lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster import cluster_deployment
from faults.conftest import Scale, _scale
from faults.harness import PREFIX, Cluster, DeploymentServer, wait_until
from faults.ledger import Report, reconcile
from relaybus.keys import QueueKeys
from sentinel import sentinel_cluster

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

SERVICES = {"durable": ["*"]}
#: Each scenario's service: two instances (one per front), each holding at most PREFETCH.
INSTANCES, PREFETCH = 2, 8
#: Duplicates allowed: what the instances held at the fault, twice (a settle the old
#: primary applied and lost with the replication window is redelivered once).
DUPLICATE_BOUND = 2 * INSTANCES * PREFETCH


#: The durabilities each scenario runs: "primary" is a measurement (what the replication
#: window loses), not a guarantee, so it runs at full scale only.
DURABILITIES = [
    pytest.param("primary", marks=pytest.mark.skipif(
        not _scale().full, reason="a measurement (what the replication window loses), not "
        "a guarantee: RELAYBUS_FAULTS_SCALE=full runs it")),
    "replicated",
]

#: What a scenario's fault does: kill the primary, wait for the takeover, bring the killed
#: server back as a replica; returns notes for the report.
Fault = Callable[[], dict[str, object]]


@pytest.mark.parametrize("durability", DURABILITIES)
def test_sentinel_failover(tmp_path: Path, scale: Scale, record: list[Report],
                           durability: str) -> None:
    root = tmp_path / "sentinel"
    root.mkdir()
    with sentinel_cluster(root) as deployment:
        def fault() -> dict[str, object]:
            at = time.time()
            old, new = deployment.kill_primary()
            promoted = time.time()
            deployment.restart(old, replica_of=new)  # a replica again: WAIT can succeed
            return {"until the sentinels named the new primary": f"{promoted - at:.1f} s"}

        _scenario(tmp_path, DeploymentServer(deployment.url(), deployment.logs,
                                             deployment.stop),
                  scale, record, "12. Sentinel failover", durability, fault)


@pytest.mark.parametrize("durability", DURABILITIES)
def test_cluster_failover(tmp_path: Path, scale: Scale, record: list[Report],
                          durability: str) -> None:
    root = tmp_path / "cluster"
    root.mkdir()
    with cluster_deployment(root) as deployment:
        def fault() -> dict[str, object]:
            old = deployment.owner(QueueKeys(PREFIX, "all").stream)
            at = time.time()
            deployment.kill(old)
            promoted = time.time()
            deployment.restart(old)  # a replica again: WAIT can succeed
            return {"until the replica served the log's slot": f"{promoted - at:.1f} s",
                    "until the killed node was a replica again": f"{time.time() - at:.1f} s"}

        _scenario(tmp_path, DeploymentServer(deployment.url, deployment.logs, deployment.stop),
                  scale, record, "13. Cluster primary SIGKILLed", durability, fault)


def _scenario(tmp_path: Path, server: DeploymentServer, scale: Scale, record: list[Report],
              title: str, durability: str, fault: Fault) -> None:
    cluster = Cluster(tmp_path, server)
    try:
        _run(cluster, scale, record, title, durability, fault)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()}") from exc
    finally:
        cluster.close()


def _run(cluster: Cluster, scale: Scale, record: list[Report], title: str,
         durability: str, fault: Fault) -> None:
    total = scale.n(20_000, ci=2_000)
    seconds = 20.0 if scale.full else 4.0
    services = cluster.services("durable", INSTANCES, concurrency=2, prefetch=PREFETCH, vt=5.0, delay=0.002,
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
    notes = fault()
    assert any(p.alive() for p in producers), "the producers had finished before the fault"
    cluster.wait_exit(producers, timeout=seconds * 4 + 60)
    cluster.wait_quiet(SERVICES, timeout=90)
    assert [c.pid for c in services] == pids and all(c.alive() for c in services)
    report = reconcile(cluster.ledger, cluster.dead, SERVICES,
                       f"{title}, durability={durability!r}", prefix=cluster.prefix,
                       faults=f"primary SIGKILLed at {at - t0:.1f} s",
                       duplicate_bound=DUPLICATE_BOUND, seconds=time.time() - t0)
    statuses = [p.status() or {} for p in producers]
    report.notes["published before the fault"] = before
    report.notes.update(notes)
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
