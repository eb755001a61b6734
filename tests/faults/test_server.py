"""Scenarios 3, 4 and 6: the server crashes, freezes, runs out of memory.

3. SIGKILL the server mid-stream and restart it from its append-only file: producers
   see BrokerUnavailableError or succeed (never a silent loss), and every relaybus
   process carries on without being restarted.
4. SIGSTOP the server for 5 s, then SIGCONT: no thread dies, nothing is lost, and
   the time until work resumes is reported.
6. ``maxmemory`` set low with ``noeviction``: publish raises BrokerOutOfMemoryError,
   nothing of a refused publish is written, and everything flows again once the
   limit is raised.
"""

from __future__ import annotations

import random
import time

import pytest

from faults.conftest import Scale
from faults.harness import Child, Cluster, wait_until
from faults.ledger import Report, reconcile

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

SERVICES = {"durable": ["*"]}


def _no_tracebacks(children: list[Child]) -> None:
    for child in children:
        log = child.err_path.read_text(errors="replace")
        assert "Traceback" not in log, f"{child.label} logged a traceback:\n{child.log_tail(40)}"


def _start(cluster: Cluster, retry_timeout: float, total: int, seconds: float,
           vt: float = 10.0) -> tuple[list[Child], list[Child]]:
    """Two routers and two service instances, ready; then two producers, started.

    ``retry_timeout`` bounds how long every process retries before an operation raises
    BrokerUnavailableError (the relaybus loops then back off and try again).
    """
    relaybus = [cluster.router(f"router{i}", vt=vt, retry_timeout=retry_timeout)
                for i in range(2)]
    # 3 ms of work per event: the instances hold events in flight when the fault hits
    relaybus += [cluster.service("durable", concurrency=2, prefetch=8, vt=vt, delay=0.003,
                                 retry_timeout=retry_timeout) for _ in range(2)]
    cluster.wait_ready(relaybus)
    producers = [cluster.producer(f"p{i}", total // 2, rate=total / 2 / seconds,
                                  types="alpha,beta", batch=10,
                                  retry_timeout=retry_timeout) for i in range(2)]
    return relaybus, producers


def _in_flight(cluster: Cluster) -> int:
    """Events delivered and not yet acknowledged, in the log and the service's queue."""
    return sum(int(cluster.client.xpending(f"{cluster.prefix}{{{q}}}", "relaybus")["pending"])
               for q in ("all", "sub:durable"))


def _producer_totals(producers: list[Child]) -> dict[str, float]:
    totals: dict[str, float] = {"unavailable": 0, "oom": 0, "refused": 0,
                                "max_publish_seconds": 0.0}
    for p in producers:
        st = p.status() or {}
        for k in ("unavailable", "oom", "refused"):
            totals[k] += int(st.get(k, 0))
        totals["max_publish_seconds"] = max(totals["max_publish_seconds"],
                                            float(st.get("max_publish_seconds", 0.0)))
    return totals


def test_server_sigkill_and_restart_from_aof(cluster: Cluster, scale: Scale,
                                             rng: random.Random, record: list[Report]) -> None:
    total = scale.n(20_000)
    seconds = 20.0 if scale.full else 6.0
    relaybus, producers = _start(cluster, retry_timeout=0.5, total=total, seconds=seconds)
    pids = [c.pid for c in relaybus]
    t0 = time.time()
    wait_until(lambda: cluster.ledger.refresh().handled_count("durable") > total // 10, 60,
               "a tenth of the events to be handled")
    time.sleep(rng.uniform(0.0, 0.2) * seconds)  # a random moment to kill at
    before = len(cluster.ledger.refresh().published)
    in_flight = _in_flight(cluster)
    cluster.server.kill()
    killed = time.time()
    time.sleep(1.5)  # the outage: longer than every process's retry bound (0.5 s)
    restart_seconds = cluster.server.start()
    up = time.time()
    assert any(p.alive() for p in producers), "the producers had finished before the crash"
    cluster.wait_exit(producers, timeout=seconds * 4 + 60)
    cluster.wait_quiet(SERVICES, timeout=90)
    assert [c.pid for c in relaybus] == pids and all(c.alive() for c in relaybus)
    cluster.check_threads(relaybus, since=up)
    report = reconcile(cluster.ledger, cluster.dead, SERVICES, "3. SIGKILL the server",
                       prefix=cluster.prefix, faults="server SIGKILLed, down 1.5 s, restarted "
                       "from its AOF", duplicate_bound=0, seconds=time.time() - t0)
    first = cluster.ledger.first_completion_after(up)
    totals = _producer_totals(producers)
    report.notes["published before the crash"] = before
    report.notes["in flight just before the crash"] = in_flight
    report.notes["BrokerUnavailableError seen by producers"] = int(totals["unavailable"])
    report.notes["restart (AOF load)"] = f"{restart_seconds:.2f} s"
    report.notes["first completion after restart"] = (f"{first - up:.2f} s" if first else "-")
    caught_up = cluster.ledger.caught_up_after(up)
    report.notes["all events published before the crash completed"] = (
        f"{caught_up:.2f} s after restart" if caught_up is not None else "-")
    # a read the server ran just before dying, whose reply it never sent: its events
    # are pending for a consumer that never saw them, and wait for their lease (10 s)
    late = [eid for eid, at in cluster.ledger.published_at.items()
            if at <= killed and cluster.ledger.completed_at.get(eid, 0.0) > up + 3.0]
    report.notes["of them, waited for their lease (reply lost in the crash)"] = len(late)
    report.notes["longest publish"] = f"{totals['max_publish_seconds']:.1f} s"
    report.faults += f" at {killed - t0:.1f} s"
    for c in relaybus:
        c.terminate()
    record.append(report)
    assert totals["unavailable"] > 0, "no producer saw the outage"
    # nothing waited longer than one visibility timeout (10 s) after the restart, plus
    # the idle consumers' reclaim check (every visibility timeout / 4)
    assert caught_up is not None and caught_up < 10.0 * 1.25 + 2.0, caught_up
    assert report.dead_lettered == 0
    report.assert_ok()


def test_server_sigstop_five_seconds(cluster: Cluster, scale: Scale, rng: random.Random,
                                     record: list[Report]) -> None:
    total = scale.n(20_000)
    seconds = 20.0 if scale.full else 8.0
    relaybus, producers = _start(cluster, retry_timeout=10.0, total=total, seconds=seconds)
    t0 = time.time()
    wait_until(lambda: cluster.ledger.refresh().handled_count("durable") > total // 10, 60,
               "a tenth of the events to be handled")
    time.sleep(rng.uniform(0.0, 0.1) * seconds)  # a random moment to freeze at
    in_flight = _in_flight(cluster)
    cluster.server.freeze()
    frozen = time.time()
    time.sleep(5.0)  # the fault: five seconds frozen
    cluster.server.thaw()
    thawed = time.time()
    assert any(p.alive() for p in producers), "the producers had finished before the freeze"
    # one completion after the thaw of an event published after it: the whole path works
    handled_before = cluster.ledger.refresh().handled_count("durable")
    wait_until(lambda: cluster.ledger.refresh().handled_count("durable") > handled_before, 30,
               "handling to resume")
    first = cluster.ledger.first_completion_after(thawed)
    cluster.check_threads(relaybus, since=thawed)
    cluster.wait_exit(producers, timeout=seconds * 4 + 60)
    cluster.wait_quiet(SERVICES, timeout=90)
    cluster.check_threads(relaybus, since=time.time())
    report = reconcile(cluster.ledger, cluster.dead, SERVICES, "4. SIGSTOP the server 5 s",
                       prefix=cluster.prefix, faults=f"server frozen 5 s at {frozen - t0:.1f} s",
                       duplicate_bound=0, seconds=time.time() - t0)
    totals = _producer_totals(producers)
    report.notes["in flight just before the freeze"] = in_flight
    report.notes["time to resume after SIGCONT"] = f"{first - thawed:.2f} s" if first else "-"
    report.notes["longest publish"] = f"{totals['max_publish_seconds']:.1f} s"
    for c in relaybus:
        c.terminate()
    record.append(report)
    _no_tracebacks(relaybus + producers)
    assert totals["unavailable"] == 0
    assert report.dead_lettered == 0
    report.assert_ok()


def test_server_out_of_memory(cluster: Cluster, scale: Scale, record: list[Report]) -> None:
    c = cluster.client
    relaybus = [cluster.router()]
    relaybus += [cluster.service("durable", concurrency=2, prefetch=8) for _ in range(2)]
    cluster.wait_ready(relaybus)
    t0 = time.time()
    producer = cluster.producer("steady", 0, rate=400, types="alpha,beta", batch=10,
                                on_oom="drop", pad=200)
    wait_until(lambda: cluster.ledger.refresh().handled_count("durable") >= 300, 60,
               "300 events to be handled")
    used = int(c.info("memory")["used_memory"])
    c.config_set("maxmemory-policy", "noeviction")
    c.config_set("maxmemory", used + 256 * 1024)
    limited = time.time()
    refused = scale.n(2_000, 50)
    wait_until(lambda: int((producer.status() or {}).get("refused", 0)) >= refused, 60,
               f"{refused} publishes to be refused")
    c.config_set("maxmemory", 0)
    freed = time.time()
    published_then = len(cluster.ledger.refresh().published)
    wait_until(lambda: len(cluster.ledger.refresh().published) >= published_then + 400, 30,
               "publishing to flow again")
    producer.terminate()
    cluster.wait_quiet(SERVICES, timeout=90)
    cluster.check_threads(relaybus, since=time.time())
    report = reconcile(cluster.ledger, cluster.dead, SERVICES, "6. server out of memory",
                       prefix=cluster.prefix, duplicate_bound=0, seconds=time.time() - t0,
                       faults=f"maxmemory {used // 1024 + 256} KB with noeviction for "
                              f"{freed - limited:.1f} s")
    st = producer.status() or {}
    error = str(st.get("errors", {}).get("BrokerOutOfMemoryError", ""))
    refused_ids = set(cluster.ledger.refused)
    # nothing of a refused publish was written: not in the log, not handled, not dead-lettered
    log_ids = {fields[b"k"].decode() for _, fields in c.xrange(f"{cluster.prefix}{{all}}")}
    completed = set(cluster.ledger.completed.get("durable", {}))
    written = refused_ids & (log_ids | completed | set(cluster.dead.by_event))
    caught_up = cluster.ledger.caught_up_after(freed)
    report.notes["publishes refused (BrokerOutOfMemoryError)"] = len(refused_ids)
    report.notes["of them written anyway"] = len(written)
    report.notes["all events published before the limit was raised completed"] = (
        f"{caught_up:.2f} s after" if caught_up is not None else "-")
    report.notes["error"] = f'"{error[:90]}"'
    for child in relaybus:
        child.terminate()
    record.append(report)
    assert len(refused_ids) >= refused
    assert not written, f"{len(written)} refused events were written"
    assert "out of memory" in error and "maxmemory" in error and len(error) < 300, error
    # the batch a router was routing when the limit hit did not wait for its lease (30 s)
    assert caught_up is not None and caught_up < 10.0, caught_up
    assert report.dead_lettered == 0
    report.assert_ok()
