"""Scenarios 3, 4 and 6: the server crashes, freezes, runs out of memory.

Each runs two instances of one service, one per front (a ``Microservice`` and an
``AsyncMicroservice`` sharing the subscription), and a maintenance process
(``EventBus.run()``: the log's retention trim).

3. SIGKILL the server mid-stream and restart it from its append-only file: producers
   see BrokerUnavailableError or succeed (never a silent loss), and every relaybus
   process carries on without being restarted. The maintenance process trims the log
   to a short retention all along: never past what the subscription has not
   acknowledged, crash or not.
4. SIGSTOP the server for 5 s (3 s at CI scale), then SIGCONT: no thread or task dies,
   nothing is lost, and the time until work resumes is reported.
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
from faults.ledger import Report, log_key, reconcile

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

SERVICES = {"durable": ["*"]}


def _no_tracebacks(children: list[Child]) -> None:
    for child in children:
        log = child.err_path.read_text(errors="replace")
        assert "Traceback" not in log, f"{child.label} logged a traceback:\n{child.log_tail(40)}"


def _start(cluster: Cluster, retry_timeout: float, total: int, seconds: float,
           vt: float = 10.0, retention: int = 100_000) -> tuple[list[Child], list[Child]]:
    """A maintenance process and two service instances (one per front), ready; then two
    producers, started.

    ``retry_timeout`` bounds how long every process retries before an operation raises
    BrokerUnavailableError (the relaybus loops then back off and try again);
    ``retention``: the log's ``retention_max_len``.
    """
    relaybus = [cluster.maintenance(max_len=retention, retry_timeout=retry_timeout)]
    # 3 ms of work per event: the instances hold events in flight when the fault hits
    relaybus += cluster.services("durable", 2, concurrency=2, prefetch=8, vt=vt, delay=0.003,
                                 retry_timeout=retry_timeout)
    cluster.wait_ready(relaybus)
    producers = [cluster.producer(f"p{i}", total // 2, rate=total / 2 / seconds,
                                  types="alpha,beta", batch=10,
                                  retry_timeout=retry_timeout) for i in range(2)]
    return relaybus, producers


def _check_concurrency(services: list[Child]) -> None:
    """Every instance ran as many handlers at once as its concurrency (3 ms each): the
    handler threads, or the handler tasks of an async instance, all worked."""
    for c in services:
        st = c.status() or {}
        assert st.get("max_running") == st.get("concurrency"), \
            f"{c.label}: at most {st.get('max_running')} handlers at once of {st.get('concurrency')}"


def _trimmed(maintenance: Child) -> int:
    return int((maintenance.status() or {}).get("trimmed", 0))


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
    seconds = 20.0 if scale.full else 4.5
    retention = max(200, total // 20)
    relaybus, producers = _start(cluster, retry_timeout=0.5, total=total, seconds=seconds,
                                 retention=retention)
    pids = [c.pid for c in relaybus]
    t0 = time.time()
    wait_until(lambda: cluster.ledger.refresh().handled_count("durable") > total // 10, 60,
               "a tenth of the events to be handled")
    time.sleep(rng.uniform(0.0, 0.2) * seconds)  # a random moment to kill at
    before = len(cluster.ledger.refresh().published)
    in_flight = cluster.in_flight(SERVICES)
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
    trimmed = _trimmed(relaybus[0])
    log_len = int(cluster.client.xlen(log_key(cluster.prefix)))
    fan_out = cluster.fan_out(SERVICES)
    report.notes["log trimmed by maintenance (retention)"] = (
        f"{trimmed:,} entries (retention {retention:,}, {log_len:,} left)")
    report.notes["log entries read by the subscription's group"] = \
        f"{fan_out['durable']:,} of {fan_out['log entries']:,}"
    report.faults += f" at {killed - t0:.1f} s"
    cluster.terminate(relaybus)
    record.append(report)
    _check_concurrency(relaybus[1:])
    assert totals["unavailable"] > 0, "no producer saw the outage"
    assert trimmed > 0, "the maintenance process never trimmed the log"
    assert fan_out["durable"] == fan_out["log entries"] == report.published, fan_out
    # nothing waited longer than one visibility timeout (10 s) after the restart, plus
    # the idle consumers' reclaim check (every visibility timeout / 4)
    assert caught_up is not None and caught_up < 10.0 * 1.25 + 2.0, caught_up
    assert report.dead_lettered == 0
    report.assert_ok()


def test_server_sigstop_five_seconds(cluster: Cluster, scale: Scale, rng: random.Random,
                                     record: list[Report]) -> None:
    total = scale.n(20_000)
    seconds = 20.0 if scale.full else 4.0
    freeze = 5.0 if scale.full else 3.0
    relaybus, producers = _start(cluster, retry_timeout=10.0, total=total, seconds=seconds)
    t0 = time.time()
    wait_until(lambda: cluster.ledger.refresh().handled_count("durable") > total // 10, 60,
               "a tenth of the events to be handled")
    time.sleep(rng.uniform(0.0, 0.1) * seconds)  # a random moment to freeze at
    in_flight = cluster.in_flight(SERVICES)
    cluster.server.freeze()
    frozen = time.time()
    time.sleep(freeze)  # the fault: frozen (below the visibility timeout, 10 s)
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
    fan_out = cluster.fan_out(SERVICES)
    report = reconcile(cluster.ledger, cluster.dead, SERVICES, "4. SIGSTOP the server",
                       prefix=cluster.prefix,
                       faults=f"server frozen {freeze:.0f} s at {frozen - t0:.1f} s",
                       duplicate_bound=0, seconds=time.time() - t0)
    totals = _producer_totals(producers)
    report.notes["in flight just before the freeze"] = in_flight
    report.notes["time to resume after SIGCONT"] = f"{first - thawed:.2f} s" if first else "-"
    report.notes["longest publish"] = f"{totals['max_publish_seconds']:.1f} s"
    cluster.terminate(relaybus)
    record.append(report)
    _no_tracebacks(relaybus + producers)
    _check_concurrency(relaybus[1:])
    assert totals["unavailable"] == 0
    assert fan_out["durable"] == fan_out["log entries"] == report.published, fan_out
    assert report.dead_lettered == 0
    report.assert_ok()


def test_server_out_of_memory(cluster: Cluster, scale: Scale, record: list[Report]) -> None:
    c = cluster.client
    relaybus = [cluster.maintenance()]
    # 10 ms of work per event: a little slower than the producer, so a backlog waits in
    # the log when the limit hits (do the instances drain it while writes are refused?)
    relaybus += cluster.services("durable", 2, concurrency=2, prefetch=8, delay=0.01)
    cluster.wait_ready(relaybus)
    t0 = time.time()
    producer = cluster.producer("steady", 0, rate=400, types="alpha,beta", batch=10,
                                on_oom="drop", pad=200)
    wait_until(lambda: cluster.ledger.refresh().handled_count("durable") >= 300, 60,
               "300 events to be handled")
    used = int(c.info("memory")["used_memory"])
    c.config_set("maxmemory-policy", "noeviction")
    c.config_set("maxmemory", used + 128 * 1024)
    limited = time.time()
    wait_until(lambda: cluster.ledger.refresh().refused_times, 60, "a publish to be refused")
    full = time.time()  # the server is full from about now
    group_when_full = cluster.groups()["sub:durable"]
    refused = scale.n(2_000, 50)
    wait_until(lambda: int((producer.status() or {}).get("refused", 0)) >= refused
               and time.time() - full >= 2.0, 60, f"{refused} publishes to be refused")
    held_at_limit = cluster.in_flight(SERVICES)
    group_at_free = cluster.groups()["sub:durable"]
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
                       faults=f"maxmemory {used // 1024 + 128} KB with noeviction for "
                              f"{freed - limited:.1f} s")
    st = producer.status() or {}
    error = str(st.get("errors", {}).get("BrokerOutOfMemoryError", ""))
    refused_ids = set(cluster.ledger.refused)
    # nothing of a refused publish was written: not in the log, not handled, not dead-lettered
    log_ids = {fields[b"k"].decode() for _, fields in c.xrange(log_key(cluster.prefix))}
    completed = set(cluster.ledger.completed.get("durable", {}))
    written = refused_ids & (log_ids | completed | set(cluster.dead.by_event))
    caught_up = cluster.ledger.caught_up_after(freed)
    during = sum(1 for t in cluster.ledger.completion_times.get("durable", [])
                 if full + 0.5 <= t < freed)
    def acked(g: dict) -> int:
        return int(g["entries-read"]) - int(g["pending"])

    report.notes["full for"] = f"{freed - full:.1f} s"
    report.notes["backlog when full"] = int(group_when_full["lag"] or 0)
    report.notes["handler completions while full (after its first 0.5 s)"] = during
    report.notes["acknowledged while full"] = acked(group_at_free) - acked(group_when_full)
    report.notes["delivered and unacknowledged when the limit was raised"] = held_at_limit
    report.notes["publishes refused (BrokerOutOfMemoryError)"] = len(refused_ids)
    report.notes["of them written anyway"] = len(written)
    report.notes["all events published before the limit was raised completed"] = (
        f"{caught_up:.2f} s after" if caught_up is not None else "-")
    report.notes["error"] = f'"{error[:90]}"'
    cluster.terminate(relaybus)
    record.append(report)
    assert len(refused_ids) >= refused
    assert not written, f"{len(written)} refused events were written"
    assert "out of memory" in error and "maxmemory" in error and len(error) < 300, error
    # acknowledging went on while the server was full (the settle script takes what the
    # transaction of the hot path cannot): the instances drained the log's backlog
    assert acked(group_at_free) > acked(group_when_full), (group_when_full, group_at_free)
    # and what they held when the limit was raised did not wait for its lease (30 s)
    assert caught_up is not None and caught_up < 10.0, caught_up
    assert report.dead_lettered == 0
    report.assert_ok()
