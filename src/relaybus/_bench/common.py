"""What every benchmark shares: the event, the figures and their table, small helpers.

Nothing here starts a process or a service; :mod:`relaybus._bench.child` and
:mod:`relaybus._bench.scenarios` do.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis
from redis.cluster import RedisCluster

from ..bus import EventBus
from ..codec import dumps
from ..connection import cluster_seed_url, redact
from ..events import Event, serialize_event
from ..testing import delete_prefix, plain_client, unique_prefix

__all__ = ["BenchEvent", "DEFAULT_PAYLOAD", "Figure", "environment", "fmt", "make_events",
           "paced_publish", "payload_size", "percentiles", "publish_all", "raw_fields",
           "render_table", "temp_prefix", "used_memory", "version",
           "wait_timeout"]

#: Payload size asked for by default, in bytes of JSON: the event's own fields and
#: the envelope every event carries (id, timestamp, type, ...) come to about 265, so
#: the default event is not padded.
DEFAULT_PAYLOAD = 200


class BenchEvent(Event, event_type="relaybus.bench"):
    """The event every scenario sends (about 265 bytes of JSON unless padded)."""

    order_id: str
    customer: str
    total: float
    #: ``time.time()`` just before the publish call (latency scenarios), else 0.
    sent_at: float = 0.0
    #: Padding that brings the payload to the size a scenario asks for.
    note: str = ""


def payload_size(event: Event) -> int:
    """Bytes of ``event``'s JSON payload as relaybus writes it."""
    return len(dumps(serialize_event(event)).encode())


def make_events(n: int, payload_bytes: int = DEFAULT_PAYLOAD) -> list[BenchEvent]:
    """``n`` events whose JSON payload is ``payload_bytes`` long (at least the ~265 bytes
    of the unpadded event); every one has an event id of its own."""
    events = []
    for i in range(n):
        ev = BenchEvent(order_id=f"o-{i:06d}", customer="c-42", total=19.99 + i % 100)
        pad = payload_bytes - payload_size(ev)
        if pad > 0:
            ev.note = "x" * pad
        events.append(ev)
    return events


# -- figures and the table ----------------------------------------------------------


@dataclass
class Figure:
    """One row of the table: a measured figure and its value in every round."""

    scenario: str
    figure: str
    unit: str
    values: list[float]
    note: str = ""

    @property
    def median(self) -> float:
        return float(statistics.median(self.values)) if self.values else float("nan")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(median=self.median, min=min(self.values, default=None),
                 max=max(self.values, default=None))
        return d


def fmt(v: float) -> str:
    """A figure for the table: thousands separators, two or three significant decimals."""
    if v != v:  # nan
        return "-"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def render_table(figures: Sequence[Figure], title: str = "relaybus benchmarks") -> Any:
    """The rich table of ``figures``."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left")
    table.add_column("scenario", style="bold")
    table.add_column("figure", no_wrap=True)
    table.add_column("median", justify="right")
    table.add_column("min–max", justify="right")
    table.add_column("unit")
    last = ""
    for f in figures:
        span = f"{fmt(min(f.values))}–{fmt(max(f.values))}" if f.values else "-"
        table.add_row(f.scenario if f.scenario != last else "", f.figure, fmt(f.median), span,
                      f.unit)
        last = f.scenario
    return table


# -- helpers ----------------------------------------------------------------------------


@contextlib.contextmanager
def temp_prefix(url: str, label: str = "bench") -> Iterator[str]:
    """A fresh key prefix whose keys are deleted on exit."""
    p = unique_prefix(label)
    try:
        yield p
    finally:
        delete_prefix(url, p)


@contextlib.contextmanager
def servers(url: str, key: str | None = None) -> Iterator[list[redis.Redis]]:
    """Plain clients of the servers behind ``url``: the server itself, or each primary
    of a cluster; with ``key``, only the one that holds it."""
    client = plain_client(url)
    try:
        if not isinstance(client, RedisCluster):
            yield [client]
        elif key is not None:
            yield [client.get_node_from_key(key).redis_connection]
        else:
            yield [n.redis_connection for n in client.get_primaries()]
    finally:
        client.close()


def publish_all(bus: EventBus, events: Sequence[Event], batch: int) -> None:
    """Publish ``events`` with ``publish_many`` in batches of ``batch``."""
    for i in range(0, len(events), batch):
        bus.publish_many(events[i: i + batch])


def raw_fields(bus: EventBus, events: Sequence[Event]) -> list[dict[Any, Any]]:
    """The stream fields relaybus writes for ``events`` (what raw XADD sends as is)."""
    with bus._sending(events) as encoded:
        return [dict(fields) for fields in encoded]


def used_memory(client: redis.Redis) -> int:
    """``INFO memory`` ``used_memory`` after a short pause (buffers flushed)."""
    time.sleep(0.05)
    return int(client.info("memory")["used_memory"])


def wait_timeout(n: int, floor_rate: float = 300.0) -> float:
    """How long to wait for ``n`` events to be handled before calling it a failure."""
    return 30.0 + n / floor_rate


def paced_publish(bus: EventBus, events: Sequence[BenchEvent], rate: float) -> float:
    """Offer ``events`` at ``rate`` per second; return the rate achieved.

    Event ``i`` is due at ``start + i / rate``. The publisher sleeps until the next one
    is due, then publishes every event due by then: one ``publish`` call when it keeps
    up, one ``publish_many`` of the late ones when it fell behind (so the offered rate
    holds however slow one call is). ``sent_at`` is stamped just before the call.
    """
    interval = 1.0 / rate
    start = time.perf_counter() + 0.005
    i, n = 0, len(events)
    while i < n:
        now = time.perf_counter()
        delay = start + i * interval - now
        if delay > 0:
            time.sleep(delay)
            now = time.perf_counter()
        due = min(n, max(i + 1, int((now - start) / interval) + 1))
        stamp = time.time()
        if due == i + 1:
            events[i].sent_at = stamp
            bus.publish(events[i])
        else:
            for ev in events[i:due]:
                ev.sent_at = stamp
            bus.publish_many(events[i:due])
        i = due
    elapsed = time.perf_counter() - start
    return n / elapsed if elapsed > 0 else float("inf")


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    """p50, p95 and p99 of ``samples``."""
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return q[49], q[94], q[98]


# -- the environment ------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_total() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "?"


def version(module: str) -> str | None:
    """The installed version of distribution ``module`` (None: not installed)."""
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def environment(url: str, embedded: bool) -> dict[str, Any]:
    """The machine, the versions and the server: what a figure is only valid for."""
    from .. import __version__

    env: dict[str, Any] = {
        "relaybus": __version__,
        "python": platform.python_version(),
        "redis_py": version("redis"),
        "hiredis": version("hiredis"),
        "pydantic": version("pydantic"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory": _memory_total(),
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "server_url": "embedded (private, temporary)" if embedded else redact(url),
    }
    seed = cluster_seed_url(url)  # a cluster: its first node speaks for it
    client = plain_client(seed or url)  # (Sentinel: the primary)
    try:
        info = client.info("server")
        env["server"] = (f"valkey {info['valkey_version']}" if "valkey_version" in info
                         else f"redis {info.get('redis_version', '?')}")
        mem = client.info("memory")
        env["server_allocator"] = mem.get("mem_allocator")
        with contextlib.suppress(redis.RedisError):
            conf = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes)
                    else v for k, v in client.config_get("append*").items()}
            env["server_persistence"] = (f"appendonly {conf.get('appendonly')}, "
                                         f"appendfsync {conf.get('appendfsync')}")
    finally:
        client.close()
    return env
