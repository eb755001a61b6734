"""Scenario 11: poison subscriptions, written beside running services.

Two services run as processes (``left``: a Microservice, ``right``: an
AsyncMicroservice), both subscribed to the good events' types, with a maintenance
process trimming the log to a short retention. Before a producer publishes, entries
that no relaybus service could have written are put in the subscriptions table, as
another tool, an older version or a hand would: a name with a space, one that is not
UTF-8, event types that are not JSON, not a list, or a list of non-names; and for the
one with a space a group on the event log, which reads nothing.

Nothing else may stop: every event is handled by both services, nothing is
dead-lettered; ``relaybus subscriptions`` lists the two services and names each bad
entry with how to delete it (exit 0); the group of the bad entry holds the log's
trim back (a subscription that never reads keeps what it has not read), and once
``relaybus subscriptions remove`` deleted it, the maintenance trims the log to its
retention.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from faults.conftest import Scale
from faults.harness import Cluster, wait_until
from faults.ledger import Report, log_key, reconcile

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

POISON = {
    b"bad name": b'["faults.alpha"]',
    b"\xff\xfe": b'["faults.alpha"]',
    b"notjson": b"{{{",
    b"notalist": b'"faults.alpha"',
    b"odd": b'[1, null, {"a": 2}, ""]',
}


def _cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relaybus", *args, "--url", cluster.server.url,
                           "--prefix", cluster.prefix], capture_output=True, text=True,
                          timeout=60)


def test_poison_subscriptions_stop_nothing_else(cluster: Cluster, scale: Scale,
                                                record: list[Report]) -> None:
    total = scale.n(10_000, ci=1_000)
    retention = 100
    services = [cluster.service("left", front="sync", types="alpha,beta"),
                cluster.service("right", front="async", types="alpha,beta")]
    maint = cluster.maintenance(max_len=retention, interval=0.2)
    cluster.wait_ready(services + [maint])
    client = cluster.client
    client.hset(cluster.prefix + "subscriptions", mapping=POISON)
    client.xgroup_create(log_key(cluster.prefix), "sub:bad name", "$")
    t0 = time.time()
    producer = cluster.producer("p", total, rate=total / 4, types="alpha,beta", batch=20)
    cluster.wait_exit([producer], timeout=120)
    cluster.wait_quiet(["left", "right"], timeout=60)
    held = client.xlen(log_key(cluster.prefix))
    listed = _cli(cluster, "subscriptions", "--json")
    removed = _cli(cluster, "subscriptions", "remove", "bad name", "--yes")
    wait_until(lambda: client.xlen(log_key(cluster.prefix)) <= retention, 30,
               "the maintenance to trim once the bad entry's group is gone")
    plan = {name: ["faults.alpha", "faults.beta"] for name in ("left", "right")}
    report = reconcile(cluster.ledger, cluster.dead, plan, "11. poison subscriptions",
                       prefix=cluster.prefix, faults=f"{len(POISON)} unreadable entries in "
                       "the subscriptions table, one with a group on the log",
                       seconds=time.time() - t0)
    report.notes["log held at"] = f"{held:,} entries (retention {retention})"
    report.notes["after the removal"] = f"{client.xlen(log_key(cluster.prefix)):,} entries"
    cluster.terminate(services + [maint])
    record.append(report)
    assert listed.returncode == 0, listed.stderr
    assert '"left"' in listed.stdout and '"right"' in listed.stdout
    assert listed.stderr.count("is unreadable and ignored") == len(POISON), listed.stderr
    assert "relaybus subscriptions remove 'bad name'" in listed.stderr
    assert removed.returncode == 0, removed.stderr
    assert held >= total  # the bad entry's group held the trim back, as a lagging one would
    assert report.dead_lettered == 0
    assert set(report.fronts) == {"sync", "async"}, report.fronts
    report.assert_ok()
