"""Scenario 10: every client's clock is off, by up to ten minutes either way.

Each process runs with its wall clock skewed (libfaketime, preloaded; monotonic
clocks untouched, as on another machine): two producers (+10 min and -10 min) publish
the same events (same ids, from a shared seed), one service has an instance per front
(sync -10 min, async +10 min), a maintenance process (+10 min) trims the log by age
with a retention of five minutes, and a producer (+10 min) publishes events whose
handler asks for a retry in 300 s. Then every handled event is copied into the
subscription's own stream, as a requeued dead letter or an unsubscribe would.

Nothing may depend on those clocks: each event is in the log once and handled once
(publish dedup and the done records keep their window by the server's clock); nothing
is dead-lettered; the maintenance trims nothing (every event is seconds old by the
server's clock); each retry waits its 300 s (due by the server's clock, not at once);
and every copy of a handled event is dropped as a duplicate.
"""

from __future__ import annotations

import time

import pytest

from faults.conftest import Scale
from faults.harness import Cluster, wait_until
from faults.ledger import Report, log_key, reconcile, sub_key
from faults.procs import LATER_DELAY

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

SKEW = 600.0


def test_skewed_client_clocks_change_no_decision(cluster: Cluster, scale: Scale,
                                                 record: list[Report]) -> None:
    name = "clocks"
    total = scale.n(10_000, ci=1_000)
    later = scale.n(200, ci=20)
    services = [cluster.service(name, front="sync", skew=-SKEW),
                cluster.service(name, front="async", skew=+SKEW)]
    maint = cluster.maintenance(max_age=300, interval=0.2, skew=+SKEW)
    cluster.wait_ready(services + [maint])
    t0 = time.time()
    producers = [cluster.producer(f"p{sign}", total, rate=total / 4, types="alpha,beta",
                                  batch=20, id_seed="clocks", skew=skew)
                 for sign, skew in (("fast", +SKEW), ("slow", -SKEW))]
    producers.append(cluster.producer("later", later, types="later", skew=+SKEW))
    cluster.wait_exit(producers, timeout=120)
    client = cluster.client
    delayed = sub_key(cluster.prefix, name) + ":delayed"

    def settled() -> bool:
        backlog = cluster.backlog([name])
        return (backlog.pop(f"{name}_delayed") == later and not any(backlog.values()))

    wait_until(settled, 60, "every event handled and every retry waiting")
    server_ms = int(client.time()[0]) * 1000
    dues = [score for _, score in client.zrange(delayed, 0, -1, withscores=True)]
    # the copies: every handled event again, in the subscription's own stream
    copies = 0
    for _, fields in client.xrange(log_key(cluster.prefix)):
        if fields.get(b"e", b"") != b"faults.later":
            client.xadd(sub_key(cluster.prefix, name), fields)
            copies += 1
    try:
        wait_until(lambda: settled() and client.xlen(sub_key(cluster.prefix, name)) == 0, 60,
                   "the copies dropped")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {cluster.backlog([name])}, "
                             f"{[(s.status() or {}).get('stats') for s in services]}") from None
    wait_until(lambda: sum((s.status() or {}).get("stats", {}).get("duplicates", 0)
                           for s in services) >= copies, 10, "the instances' counts")
    dropped = sum((s.status() or {}).get("stats", {}).get("duplicates", 0) for s in services)
    maint_status = maint.status() or {}
    report = reconcile(cluster.ledger, cluster.dead, {name: ["faults.alpha", "faults.beta"]},
                       "10. skewed client clocks", prefix=cluster.prefix,
                       faults=f"clocks {SKEW / 60:+.0f}/{-SKEW / 60:+.0f} min: producers, "
                       "service instances (one per front), maintenance",
                       seconds=time.time() - t0)
    # the second producer published the first one's events again, on purpose: counted
    # here as what they were, repeats for publish dedup, not second completions
    repeats = cluster.ledger.republished
    report.duplicates -= repeats
    report.notes["events published by both producers"] = repeats
    report.notes["log entries"] = int(cluster.log_info()["entries-added"])
    report.notes["retries waiting"] = len(dues)
    report.notes["soonest retry due in"] = f"{(min(dues) - server_ms) / 1000:.0f}s"
    report.notes["copies dropped"] = f"{dropped} of {copies}"
    report.notes["maintenance rounds"] = maint_status.get("rounds")
    cluster.terminate(services + [maint])
    record.append(report)
    ledger = cluster.ledger
    stamped = [ledger.published_at[e] for e, t in ledger.published.items() if t == "faults.later"]
    assert min(stamped) > t0 + SKEW - 60  # the skew is real: that producer's clock is fast
    assert report.published == total + later and repeats == total  # the same ids, twice
    assert report.notes["log entries"] == total + later  # each event once in the log
    assert report.dead_lettered == 0  # nothing expired, nothing over-delivered
    assert len(dues) == later
    assert min(dues) - server_ms >= (LATER_DELAY - 60) * 1000  # due in 300 s, by the server
    assert dropped == copies
    assert maint_status.get("rounds", 0) > 0 and maint_status.get("trimmed") == 0
    report.assert_ok()
