"""The EventBus across real OS processes: competing routers, a publisher, SIGKILL.

Routers and the publisher are ``tests/bus_procs.py`` run with ``sys.executable``; the
test process only subscribes and then reads the subscription queues. Nothing waits by
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

from relaybus import EventBus
from relaybus.keys import GROUP, QueueKeys

HELPER = Path(__file__).with_name("bus_procs.py")
SERVICES: dict[str, list[str] | None] = {
    "orders": ["proc.order_placed", "proc.order_paid"],
    "shipping": ["proc.order_paid", "proc.order_shipped"],
    "audit": None,  # every type
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

    def expect(self, kind: str, timeout: float = 20.0) -> Any:
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

    def finish(self, timeout: float = 20.0) -> int:
        return self.popen.wait(timeout=timeout)


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
            proc.popen.terminate()
    for proc in procs:
        try:
            proc.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()


def subscribe_services(redis_url: str, prefix: str) -> None:
    with EventBus(redis_url, prefix=prefix) as bus:
        for service, types in SERVICES.items():
            bus.subscribe(service, types)


def copies_in(raw: redis.Redis, prefix: str, service: str) -> Counter[str]:
    """How many copies of each event id the service's subscription queue holds."""
    rows = cast("list[tuple[bytes, dict[bytes, bytes]]]",
                raw.xrange(QueueKeys(prefix, f"sub:{service}").stream))
    return Counter(fields[b"k"].decode() for _, fields in rows)


def expected_for(published: list[list[str]], types: list[str] | None) -> Counter[str]:
    return Counter(eid for eid, etype in published if types is None or etype in types)


def log_settled(raw: redis.Redis, prefix: str) -> bool:
    """Every log entry delivered to a router and acknowledged."""
    key = QueueKeys(prefix, "all").stream
    last = cast("list[tuple[bytes, Any]]", raw.xrevrange(key, count=1))
    groups = [g for g in raw.xinfo_groups(key) if g["name"].decode() == GROUP]
    return bool(last) and bool(groups) and groups[0]["pending"] == 0 \
        and groups[0]["last-delivered-id"] == last[0][0]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def check_exactly_once(raw: redis.Redis, prefix: str, published: list[list[str]]) -> None:
    wait_until(lambda: log_settled(raw, prefix), 30, "every event to be routed")
    for service, types in SERVICES.items():
        got = copies_in(raw, prefix, service)
        want = expected_for(published, types)
        assert got == want, (
            f"{service}: {sum(got.values())} copies of {len(got)} events, expected "
            f"{len(want)}; duplicated: {[e for e, n in got.items() if n > 1][:5]}, "
            f"missing: {list(set(want) - set(got))[:5]}, extra: {list(set(got) - set(want))[:5]}")


def test_two_routers_three_services_each_event_exactly_once(
        redis_url: str, prefix: str, raw: redis.Redis, spawn: Callable[..., Proc]) -> None:
    subscribe_services(redis_url, prefix)
    routers = [spawn(f"router{i}", "router", redis_url, prefix, "--batch", "50")
               for i in range(2)]
    for r in routers:
        assert not any(t.startswith("proc.") for t in r.expect("ready")["event_classes"])
    publisher = spawn("publisher", "publish", redis_url, prefix, "1000",
                      "--chunk", "50", "--pause", "0.005")
    published = publisher.expect("published")
    assert publisher.finish() == 0
    assert len(published) == 1000
    check_exactly_once(raw, prefix, published)

    for r in routers:
        r.popen.send_signal(signal.SIGTERM)
    stats = [r.expect("stopped") for r in routers]
    assert all(r.finish() == 0 for r in routers)
    assert sum(s.get("routed", 0) for s in stats) == 1000  # no entry routed twice


@pytest.mark.parametrize("hold_at", ["copy", "ack"])
def test_router_killed_mid_stream_loses_and_duplicates_nothing(
        redis_url: str, prefix: str, raw: redis.Redis, spawn: Callable[..., Proc],
        hold_at: str) -> None:
    """SIGKILL a router holding a batch: before copying it, or after copying it but
    before acknowledging it. The survivor takes the batch over after the 1 s
    visibility timeout; every service still gets every event exactly once."""
    subscribe_services(redis_url, prefix)
    victim = spawn("victim", "router", redis_url, prefix, "--vt", "1", "--batch", "20",
                   "--consumer", "victim", "--hold", "5", "--hold-at", hold_at)
    survivor = spawn("survivor", "router", redis_url, prefix, "--vt", "1", "--batch", "20",
                     "--consumer", "survivor")
    victim.expect("ready")
    survivor.expect("ready")
    publisher = spawn("publisher", "publish", redis_url, prefix, "1000",
                      "--chunk", "25", "--pause", "0.01")

    held = victim.expect("holding")  # the victim sits on a fetched batch for 5 s
    assert held["at"] == hold_at
    os.kill(victim.popen.pid, signal.SIGKILL)
    assert victim.finish() == -signal.SIGKILL
    pending = raw.xpending_range(QueueKeys(prefix, "all").stream, GROUP, "-", "+", 1000,
                                 consumername="victim")
    assert pending, "the victim died holding no entry: the takeover was not exercised"

    published = publisher.expect("published")
    assert publisher.finish() == 0
    check_exactly_once(raw, prefix, published)


def test_type_defined_after_wildcard_subscription_reaches_it(
        redis_url: str, prefix: str, raw: redis.Redis, spawn: Callable[..., Proc]) -> None:
    subscribe_services(redis_url, prefix)  # audit takes every type, from now on
    router = spawn("router", "router", redis_url, prefix)
    router.expect("ready")
    late_type = f"proc.late.{uuid.uuid4().hex[:8]}"  # no process has a class for it yet
    publisher = spawn("publisher", "publish", redis_url, prefix, "5", "--late-type", late_type)
    published = publisher.expect("published")
    assert publisher.finish() == 0
    assert {etype for _, etype in published} == {late_type}
    check_exactly_once(raw, prefix, published)
    assert sum(copies_in(raw, prefix, "audit").values()) == 5
