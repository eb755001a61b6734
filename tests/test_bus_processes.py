"""The EventBus across real OS processes: a publisher, competing service instances, SIGKILL.

Services, the reader and the publisher are ``tests/bus_procs.py`` run with
``sys.executable``; each service records what its handler ran on a Redis list (its
ledger), which the test compares with what was published. Nothing waits by
sleeping: every wait polls a condition up to a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from relaybus.keys import GROUP, QueueKeys
from streams import lag

HELPER = Path(__file__).with_name("bus_procs.py")
#: The services of the tests and their types (None: every type).
SERVICES: dict[str, list[str] | None] = {
    "orders": ["proc.order_placed", "proc.order_paid"],
    "shipping": ["proc.order_paid", "proc.order_shipped"],
    "audit": None,
}


class Proc:
    """A helper process whose stdout lines are collected by a thread."""

    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.stderr_path = log_dir / f"{name}.stderr"
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        with open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen([sys.executable, str(HELPER), *args],
                                          stdout=subprocess.PIPE, stderr=err, text=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, kind: str, timeout: float = 15.0) -> Any:
        """The payload of the next ``kind`` line (other lines are kept in ``seen``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"{self.name}: no {kind!r} line within {timeout}s; "
                            f"stderr: {self.stderr_path.read_text()[-2000:]}")
            try:
                line = self.lines.get(timeout=min(left, 0.2))
            except queue.Empty:
                if self.popen.poll() is not None and self.lines.empty():
                    pytest.fail(f"{self.name} exited ({self.popen.returncode}) before {kind!r}; "
                                f"stderr: {self.stderr_path.read_text()[-2000:]}")
                continue
            self.seen.append(line)
            head, _, payload = line.partition(" ")
            if head == kind:
                return json.loads(payload)

    def stop(self, timeout: float = 15.0) -> Any:
        """SIGTERM; the ``stopped`` payload, once the process exited 0."""
        self.popen.send_signal(signal.SIGTERM)
        stats = self.expect("stopped", timeout)
        assert self.popen.wait(timeout=timeout) == 0, self.stderr_path.read_text()[-2000:]
        return stats


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    procs: list[Proc] = []

    def start(name: str, *args: str) -> Proc:
        proc = Proc(name, list(args), tmp_path)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.popen.poll() is None:
            proc.popen.kill()
    for proc in procs:
        proc.popen.wait(timeout=10)


def service_args(redis_url: str, prefix: str, name: str, *extra: str) -> list[str]:
    types = SERVICES[name]
    return ["service", redis_url, prefix, name, *(["--types", ",".join(types)] if types else []),
            *extra]


def ledger(raw: redis.Redis, prefix: str, name: str) -> list[list[str]]:
    """``[event_id, event_type, consumer]`` per handler run of service ``name``, in order."""
    return [json.loads(x) for x in raw.lrange(f"{prefix}ledger:{name}", 0, -1)]


def expected_for(published: list[list[str]], types: list[str] | None) -> Counter[str]:
    return Counter(eid for eid, etype in published if types is None or etype in types)


def backlog(raw: redis.Redis, prefix: str, name: str) -> dict[str, Any]:
    """What is left for service ``name``: on the log (its group's pending entries and lag),
    in its own stream (entries, pending), in its retries and in its DLQ."""
    sub = QueueKeys(prefix, f"sub:{name}")
    groups = [g for g in raw.xinfo_groups(QueueKeys(prefix, "all").stream)
              if g["name"].decode() == f"sub:{name}"]
    return {"group": bool(groups),
            "log_pending": groups[0]["pending"] if groups else None,
            "log_lag": lag(raw, QueueKeys(prefix, "all").stream, groups[0]) if groups else None,
            "own": raw.xlen(sub.stream),
            "own_pending": raw.xpending(sub.stream, GROUP)["pending"]
            if raw.exists(sub.stream) else 0,
            "delayed": raw.zcard(sub.delayed), "dlq": raw.xlen(sub.dlq)}


def quiet(raw: redis.Redis, prefix: str, name: str) -> bool:
    """Nothing is left for service ``name`` anywhere: its group on the log has read
    every entry and holds none, and its own stream and retries are empty."""
    return backlog(raw, prefix, name) == {"group": True, "log_pending": 0, "log_lag": 0,
                                          "own": 0, "own_pending": 0, "delayed": 0, "dlq": 0}


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def wait_for_every_service(raw: redis.Redis, prefix: str, published: list[list[str]],
                           names: list[str], timeout: float = 15.0) -> None:
    """Until each service handled everything meant for it and nothing is left to deliver
    (then no further handler run can come: the counts are final)."""
    def done() -> bool:
        return all(set(expected_for(published, SERVICES[n])) <=
                   {eid for eid, _, _ in ledger(raw, prefix, n)} and quiet(raw, prefix, n)
                   for n in names)

    try:
        wait_until(done, timeout, "every service to handle every event of its types")
    except BaseException:
        for n in names:
            handled = Counter(eid for eid, _, _ in ledger(raw, prefix, n))
            want = expected_for(published, SERVICES[n])
            print(f"{n}: handled {len(handled)} of {len(want)} ({sum(handled.values())} runs);"
                  f" left: {backlog(raw, prefix, n)}")
        raise


def check_exactly_once(raw: redis.Redis, prefix: str, published: list[list[str]],
                       name: str) -> Counter[str]:
    """Service ``name`` handled each event of its types once, and no other; the consumers
    that handled them, with how many each."""
    runs = ledger(raw, prefix, name)
    got = Counter(eid for eid, _, _ in runs)
    want = expected_for(published, SERVICES[name])
    assert got == want, (
        f"{name}: {sum(got.values())} runs for {len(got)} events, expected {len(want)}; "
        f"duplicated: {[e for e, n in got.items() if n > 1][:5]}, "
        f"missing: {list(set(want) - set(got))[:5]}, extra: {list(set(got) - set(want))[:5]}")
    return Counter(consumer for _, _, consumer in runs)


def test_competing_instances_and_other_services_handle_each_event_once(
        redis_url: str, prefix: str, raw: redis.Redis, spawn: Callable[..., Proc]) -> None:
    """Two instances of orders compete for its events; shipping and audit take other
    (overlapping) type sets; one instance runs without maintenance."""
    services = [spawn("orders1", *service_args(redis_url, prefix, "orders")),
                spawn("orders2", *service_args(redis_url, prefix, "orders", "--no-maintenance")),
                spawn("shipping", *service_args(redis_url, prefix, "shipping")),
                spawn("audit", *service_args(redis_url, prefix, "audit"))]
    for proc in services:
        proc.expect("ready")  # subscribed: it receives what is published from now on
    publisher = spawn("publisher", "publish", redis_url, prefix, "1000",
                      "--chunk", "25", "--pause", "0.005")
    published = publisher.expect("published")
    assert publisher.popen.wait(timeout=15) == 0
    assert len(published) == 1000
    wait_for_every_service(raw, prefix, published, list(SERVICES))

    by_consumer = check_exactly_once(raw, prefix, published, "orders")
    assert len(by_consumer) == 2, by_consumer  # both instances took a share
    for name in ("shipping", "audit"):
        assert len(check_exactly_once(raw, prefix, published, name)) == 1
    stats = {proc.name: proc.stop() for proc in services}
    assert stats["orders1"]["handled"] + stats["orders2"]["handled"] == \
        sum(expected_for(published, SERVICES["orders"]).values())
    assert all(s["duplicates"] == 0 and s["dead_lettered"] == 0 for s in stats.values()), stats


def test_an_instance_killed_mid_stream_loses_nothing(
        redis_url: str, prefix: str, raw: redis.Redis, spawn: Callable[..., Proc]) -> None:
    """SIGKILL an orders instance while it holds events (one whose handler ran but was
    never settled, the rest prefetched). The other instance takes them over after the
    1 s visibility timeout: nothing is lost, and only events the killed instance held
    may be handled twice. The other services are not affected."""
    victim = spawn("victim", *service_args(redis_url, prefix, "orders", "--vt", "1",
                                           "--prefetch", "20", "--hold-after", "30"))
    survivor = spawn("survivor", *service_args(redis_url, prefix, "orders", "--vt", "1"))
    others = [spawn(n, *service_args(redis_url, prefix, n)) for n in ("shipping", "audit")]
    victim_id = victim.expect("ready")["consumer"]
    for proc in (survivor, *others):
        proc.expect("ready")
    publisher = spawn("publisher", "publish", redis_url, prefix, "1000",
                      "--chunk", "25", "--pause", "0.01")

    blocked = victim.expect("holding")  # its 30th event: handled, never to be settled
    log = QueueKeys(prefix, "all").stream
    held = {p["message_id"].decode() for p in raw.xpending_range(
        log, "sub:orders", "-", "+", 1000, consumername=victim_id)}
    os.kill(victim.popen.pid, signal.SIGKILL)
    assert victim.popen.wait(timeout=10) == -signal.SIGKILL
    assert held, "the victim died holding no event: the takeover was not exercised"
    held_events = {json.loads(raw.xrange(log, i, i)[0][1][b"d"])["event_id"] for i in held}
    assert blocked["event_id"] in held_events

    published = publisher.expect("published")
    assert publisher.popen.wait(timeout=15) == 0
    wait_for_every_service(raw, prefix, published, list(SERVICES))

    runs = Counter(eid for eid, _, _ in ledger(raw, prefix, "orders"))
    want = expected_for(published, SERVICES["orders"])
    assert set(runs) == set(want)  # nothing lost, nothing foreign
    duplicated = {eid for eid, n in runs.items() if n > 1}
    assert duplicated <= held_events, duplicated - held_events  # the documented bound
    assert max(runs.values()) <= 2
    assert blocked["event_id"] in duplicated  # its handler ran; the survivor ran it again
    for name in ("shipping", "audit"):
        check_exactly_once(raw, prefix, published, name)
    assert raw.xpending_range(log, "sub:orders", "-", "+", 10, consumername=victim_id) == []


def test_a_type_defined_after_a_wildcard_subscription_reaches_it(
        redis_url: str, prefix: str, raw: redis.Redis, spawn: Callable[..., Proc]) -> None:
    """Only the publisher has a class for the type, and only from when it runs: the
    wildcard subscriptions (made before) get its events all the same."""
    tap = spawn("tap", "reader", redis_url, prefix, "tap")  # reads with the queue API
    audit = spawn("audit", *service_args(redis_url, prefix, "audit"))
    tap.expect("ready")
    audit.expect("ready")
    late_type = f"proc.late.{uuid.uuid4().hex[:8]}"  # no process has a class for it yet
    publisher = spawn("publisher", "publish", redis_url, prefix, "5", "--late-type", late_type)
    published = publisher.expect("published")
    assert publisher.popen.wait(timeout=15) == 0
    assert {etype for _, etype in published} == {late_type}

    expected = [eid for eid, _ in published]
    wait_until(lambda: [r[0] for r in ledger(raw, prefix, "tap")] == expected, 10,
               "the reader to get every event")
    assert {r[1] for r in ledger(raw, prefix, "tap")} == {late_type}
    # the service has no class for the type: it dead-letters each event, with the reason
    dlq = QueueKeys(prefix, "sub:audit").dlq
    wait_until(lambda: raw.xlen(dlq) == 5, 10, "the service to dead-letter the events")
    rows = cast("list[tuple[bytes, dict[bytes, bytes]]]", raw.xrange(dlq))
    reasons = [json.loads(fields[b"f"])[-1]["reason"] for _, fields in rows]
    assert all(late_type in r for r in reasons), reasons
    assert ledger(raw, prefix, "audit") == []
    assert tap.stop()["read"] == 5
    assert audit.stop()["invalid"] == 5
