"""Benchmarks: the scenarios behind ``relaybus bench`` and ``docs/benchmarks.md``.

``run_bench`` runs the chosen scenarios against a server (by default a private
embedded Valkey in a temporary directory, ``appendfsync everysec``, started and
stopped here, so nothing else's load is measured), repeats each one for several
rounds (5; 2 with ``quick``, on smaller counts) and prints one table row per figure:
scenario, figure, median and min-max over the rounds, unit, and the issue's target
where there is one. ``json_file`` gets the same figures with every round's value,
the machine and the versions.

Where the time goes, per scenario:

- ``publish``, ``route``, ``memory`` run in this process (the bus's own API, timed
  around the calls; building the events is not timed, encoding them is);
- ``consume``, ``e2e``, ``latency``, ``payload`` and ``idle`` run the
  :class:`~relaybus.service.Microservice` in a child process of its own (started
  with ``python -c``, driven over a pipe), as a deployment would, while this
  process publishes; times that cross the two processes use the wall clock
  (``time.time()``), which both read from the same kernel clock.

Every key goes under a fresh prefix that is deleted afterwards, so ``--url`` may
name a shared server (whose other load then shows up in the figures).
Nothing here asserts a time: the figures are for reading, not for failing a build.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import queue as queue_mod
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, TYPE_CHECKING, Any, NamedTuple, TypeVar

import redis

from .bus import EventBus, subscription_queue_name
from .codec import dumps
from .embedded import EmbeddedServer
from .events import Event, serialize_event
from .keys import QueueKeys
from .testing import delete_prefix, unique_prefix

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["SCENARIOS", "Scenario", "Figure", "BenchEvent", "ServiceProcess", "run_bench",
           "make_events", "consume_round", "memory_round", "environment", "render_table",
           "temp_prefix", "publish_all", "route_all", "preload", "raw_fields", "used_memory",
           "paced_publish", "fmt"]

_N = TypeVar("_N", int, float)


class Scenario(NamedTuple):
    """A scenario ``relaybus bench`` can run: its name and a one-line description."""

    name: str
    description: str


#: Every scenario, in the order they run.
SCENARIOS: list[Scenario] = [
    Scenario("publish", "publish one event per call; publish_many in batches of 100 and 1,000"),
    Scenario("route", "events routed per second to 1, 3, 16 and 64 subscriptions"),
    Scenario("consume", "a service handling pre-loaded events, concurrency 1 and 8 (acked/s)"),
    Scenario("e2e", "publish -> route -> handler at saturation (service in its own process)"),
    Scenario("latency", "publish call -> handler start p50/p95/p99 at 200, 1,000, 5,000 events/s"),
    Scenario("payload", "end to end at saturation with 2 KiB and 64 KiB payloads"),
    Scenario("memory", "Redis bytes per waiting event vs raw XADD; what is left after the acks"),
    Scenario("idle", "an idle service: Redis commands per second it sends, CPU percent"),
]

#: Payload size asked for by default, in bytes of JSON: the event's own fields and
#: the envelope every event carries (id, timestamp, type, ...) come to about 245, so
#: the default event is not padded.
DEFAULT_PAYLOAD = 200


class BenchEvent(Event, event_type="relaybus.bench"):
    """The event every scenario sends (about 245 bytes of JSON unless padded)."""

    order_id: str
    customer: str
    total: float
    #: ``time.time()`` just before the publish call (latency scenario), else 0.
    sent_at: float = 0.0
    #: Padding that brings the payload to the size a scenario asks for.
    note: str = ""


def _payload_size(event: Event) -> int:
    return len(dumps(serialize_event(event)).encode())


def make_events(n: int, payload_bytes: int = DEFAULT_PAYLOAD) -> list[BenchEvent]:
    """``n`` events whose JSON payload is ``payload_bytes`` long (at least the ~245 bytes
    of the unpadded event)."""
    events = []
    for i in range(n):
        ev = BenchEvent(order_id=f"o-{i:06d}", customer="c-42", total=19.99 + i % 100)
        pad = payload_bytes - _payload_size(ev)
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
    #: The issue's target, e.g. ``">= 30000"`` (compared with the median), or "".
    target: str = ""
    note: str = ""

    @property
    def median(self) -> float:
        return float(statistics.median(self.values)) if self.values else float("nan")

    def meets(self) -> bool | None:
        """Whether the median meets the target (None: no target)."""
        if not self.target or not self.values:
            return None
        op, value = self.target.split()
        x, v = self.median, float(value)
        return {">=": x >= v, "<=": x <= v, "<": x < v, ">": x > v, "==": x == v}[op]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(median=self.median, min=min(self.values, default=None),
                 max=max(self.values, default=None), meets_target=self.meets())
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


def _target_text(target: str) -> str:
    if not target:
        return ""
    op, value = target.split()
    sym = {">=": "≥", "<=": "≤", "<": "<", ">": ">", "==": "="}[op]
    return f"{sym} {fmt(float(value))}"


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
    table.add_column("target", justify="right")
    last = ""
    for f in figures:
        ok = f.meets()
        target = _target_text(f.target)
        if ok is not None:
            target = f"[{'green' if ok else 'red'}]{target} {'ok' if ok else 'miss'}[/]"
        span = f"{fmt(min(f.values))}–{fmt(max(f.values))}" if f.values else "-"
        table.add_row(f.scenario if f.scenario != last else "", f.figure, fmt(f.median), span,
                      f.unit, target)
        last = f.scenario
    return table


# -- the run context -------------------------------------------------------------------


@dataclass
class _Ctx:
    url: str
    quick: bool
    console: Console
    rounds: int
    figures: list[Figure] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def n(self, full: _N, quick: _N) -> _N:
        return quick if self.quick else full

    def add(self, scenario: str, figure: str, unit: str, values: list[float],
            target: str = "", note: str = "") -> Figure:
        fig = Figure(scenario, figure, unit, [float(v) for v in values], target, note)
        self.figures.append(fig)
        return fig

    def say(self, text: str) -> None:
        self.console.print(f"[dim]{text}[/dim]", highlight=False)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@contextlib.contextmanager
def temp_prefix(url: str, label: str = "bench") -> Iterator[str]:
    """A fresh key prefix whose keys are deleted on exit."""
    p = unique_prefix(label)
    try:
        yield p
    finally:
        delete_prefix(url, p)


def route_all(bus: EventBus, n: int) -> None:
    """Call ``bus.route_once()`` until ``n`` log entries are settled (RuntimeError if it
    stalls)."""
    routed = 0
    while routed < n:
        got = bus.route_once()
        if got == 0:
            raise RuntimeError(f"routing stalled after {routed} of {n} events")
        routed += got


def publish_all(bus: EventBus, events: Sequence[Event], batch: int) -> None:
    """Publish ``events`` with ``publish_many`` in batches of ``batch``."""
    for i in range(0, len(events), batch):
        bus.publish_many(events[i: i + batch])


# -- the child process (a service in a process of its own) -------------------------------


_COUNTS = {"commands": 0, "requests": 0}


def _install_command_counter() -> None:
    """Count, in this process, commands packed (top-level, pipelines included) and
    requests written to a socket (a pipeline is one)."""
    from redis import connection as rc

    for cls_name in ("HiredisRespSerializer", "PythonRespSerializer"):
        cls = getattr(rc, cls_name, None)
        if cls is None:
            continue
        original_pack = cls.pack

        def pack(self: Any, *args: Any, _orig: Any = original_pack) -> Any:
            _COUNTS["commands"] += 1
            return _orig(self, *args)

        cls.pack = pack
    original_send: Any = rc.AbstractConnection.send_packed_command

    def send(self: Any, command: Any, check_health: bool = True) -> None:
        _COUNTS["requests"] += 1
        original_send(self, command, check_health)

    rc.AbstractConnection.send_packed_command = send  # type: ignore[method-assign]


class _Recorder:
    """What the child's handler records: the first handler start, the count, latencies."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reached = threading.Event()
        self.latencies: list[float] = []
        self.first: float | None = None
        self.count = 0
        self.target = 0

    def reset(self, target: int = 0) -> None:
        with self.lock:
            self.latencies = []
            self.first = None
            self.count = 0
            self.target = target
            self.reached.clear()

    def handle(self, event: BenchEvent) -> None:
        now = time.time()
        with self.lock:
            if self.first is None:
                self.first = now
            self.count += 1
            if event.sent_at:
                self.latencies.append(now - event.sent_at)
            if self.count == self.target:
                self.reached.set()


def _child_main() -> None:
    """Entry of a child process: ``python -c 'from relaybus.benchmark import _child_main; ...'``.

    ``argv[1]`` is JSON ``{"url", "count_commands"}``; requests come as JSON lines on
    stdin, replies go as JSON lines on the original stdout (anything else printed goes
    to stderr).
    """
    cfg = json.loads(sys.argv[1])
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if cfg.get("count_commands"):
        _install_command_counter()
    from .service import Microservice

    recorder = _Recorder()
    svc: Microservice | None = None
    window: dict[str, float] = {}

    def reply(**kw: Any) -> None:
        out.write(json.dumps(kw) + "\n")

    def wait_handled(base: int, n: int, timeout: float) -> tuple[int, float]:
        """Wait until ``n`` more events are handled *and acknowledged*; return how many
        were and when. Sleeps on the handler's count first (no polling while it runs),
        then polls the service's counter, which moves after each acknowledgement."""
        assert svc is not None
        deadline = time.monotonic() + timeout
        recorder.reached.wait(timeout)
        while True:
            handled = svc.stats["handled"] - base
            if handled >= n or time.monotonic() > deadline:
                return handled, time.time()
            time.sleep(0.0005)

    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "start":
            svc = Microservice(req["name"], url=cfg["url"], prefix=req["prefix"],
                               concurrency=req.get("concurrency", 1),
                               run_router=req.get("run_router", True))
            svc.on(BenchEvent)(recorder.handle)
            svc.event_bus  # connect before the clock starts  # noqa: B018
            recorder.reset(req.get("wait_n", 0))
            t0 = time.time()
            svc.start()
            if req.get("wait_n"):
                handled, t_end = wait_handled(0, req["wait_n"], req["timeout"])
                reply(t0=t0, t_end=t_end, handled=handled, first=recorder.first)
            else:
                reply(t0=t0, pid=os.getpid())
        elif op == "expect":
            assert svc is not None
            recorder.reset(req["n"])
            base = svc.stats["handled"]
            reply(ok=True)
            handled, t_end = wait_handled(base, req["n"], req["timeout"])
            with recorder.lock:
                lat = list(recorder.latencies) if req.get("latencies") else []
            reply(t_end=t_end, handled=handled, first=recorder.first, latencies=lat)
        elif op == "begin":
            window = {"cpu": time.process_time(), "wall": time.monotonic(),
                      "commands": _COUNTS["commands"], "requests": _COUNTS["requests"]}
            reply(ok=True)
        elif op == "end":
            reply(cpu=time.process_time() - window["cpu"],
                  wall=time.monotonic() - window["wall"],
                  commands=_COUNTS["commands"] - window["commands"],
                  requests=_COUNTS["requests"] - window["requests"])
        elif op == "close":
            if svc is not None:
                svc.close()
                svc = None
            reply(ok=True)
        elif op == "exit":
            if svc is not None:
                svc.close()
            reply(ok=True)
            return


class ServiceProcess:
    """A child process running one service at a time (see :func:`_child_main`)."""

    def __init__(self, url: str, *, count_commands: bool = False) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ)
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        cfg = json.dumps({"url": url, "count_commands": count_commands})
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from relaybus.benchmark import _child_main; _child_main()",
             cfg],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            bufsize=1, env=env)
        self._lines: queue_mod.Queue[str | None] = queue_mod.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, op: str, **kw: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(dict(kw, op=op)) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = 60.0) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue_mod.Empty:
            raise RuntimeError(f"benchmark child gave no answer in {timeout:.0f}s"
                               f"{self._tail()}") from None
        if line is None:
            self.proc.wait(5)
            raise RuntimeError(f"benchmark child exited (status {self.proc.returncode})"
                               f"{self._tail()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def request(self, op: str, *, reply_within: float = 60.0, **kw: Any) -> dict[str, Any]:
        self.send(op, **kw)
        return self.recv(reply_within)

    def _tail(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().strip().splitlines()[-15:]
        return (":\n" + "\n".join(lines)) if lines else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request("exit", reply_within=30)
                self.proc.wait(10)
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        self._stderr.close()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_timeout(n: int, floor_rate: float = 300.0) -> float:
    return 30.0 + n / floor_rate


# -- scenarios --------------------------------------------------------------------------


def raw_fields(bus: EventBus, events: Sequence[Event]) -> list[dict[Any, Any]]:
    """The stream fields relaybus writes for ``events`` (what raw XADD sends as is)."""
    return [dict(bus._fields(e)) for e in events]


def bench_publish(ctx: _Ctx) -> None:
    """Publish: single calls, publish_many 100 and 1,000; raw pipelined XADD of the same
    fields as the reference."""
    n_single = ctx.n(5_000, 1_000)
    n_many = ctx.n(50_000, 5_000)
    single = make_events(n_single)
    many = make_events(n_many)
    rates: dict[str, list[float]] = {"single": [], "many100": [], "many1000": [], "raw100": []}
    for r in range(ctx.rounds):
        ctx.say(f"publish: round {r + 1}/{ctx.rounds}")
        with temp_prefix(ctx.url) as p, EventBus(ctx.url, prefix=p) as bus:
            bus.publish_many(make_events(10))  # warm-up: connection, server check
            t = time.perf_counter()
            for ev in single:
                bus.publish(ev)
            rates["single"].append(n_single / (time.perf_counter() - t))
            for key, batch in (("many100", 100), ("many1000", 1000)):
                t = time.perf_counter()
                publish_all(bus, many, batch)
                rates[key].append(n_many / (time.perf_counter() - t))
            fields = raw_fields(bus, many)
            raw_key = QueueKeys(p, "raw").stream
            client = bus.mq.client
            t = time.perf_counter()
            for i in range(0, n_many, 100):
                pipe = client.pipeline(transaction=False)
                for f in fields[i: i + 100]:
                    pipe.xadd(raw_key, f)
                pipe.execute()
            rates["raw100"].append(n_many / (time.perf_counter() - t))
    ctx.add("publish", "publish(), one event per call", "events/s", rates["single"])
    ctx.add("publish", "publish_many, batches of 100", "events/s", rates["many100"])
    ctx.add("publish", "publish_many, batches of 1,000", "events/s", rates["many1000"])
    ctx.add("publish", "raw XADD pipelined ×100, same fields (reference)", "events/s",
            rates["raw100"])
    ratios = [m / r for m, r in zip(rates["many100"], rates["raw100"], strict=True)]
    ctx.add("publish", "publish_many 100 ÷ raw XADD", "%", [100 * x for x in ratios],
            target=">= 70")


def bench_route(ctx: _Ctx) -> None:
    """Route N pre-published events to S subscriptions: first route call to last copy."""
    targets = {3: ">= 30000", 16: ">= 10000"}
    for n_subs in (1, 3, 16, 64):
        n = ctx.n({1: 20_000, 3: 20_000, 16: 10_000, 64: 4_000}[n_subs], 2_000)
        events = make_events(n)
        rates = []
        for r in range(ctx.rounds):
            ctx.say(f"route: {n_subs} subscriptions, round {r + 1}/{ctx.rounds}")
            with temp_prefix(ctx.url) as p, EventBus(ctx.url, prefix=p) as bus:
                names = [f"svc{i}" for i in range(n_subs)]
                for name in names:
                    bus.subscribe(name, [BenchEvent])
                publish_all(bus, events, 1000)
                bus.subscriptions()  # warm-up
                t = time.perf_counter()
                route_all(bus, n)
                rates.append(n / (time.perf_counter() - t))
                client = bus.mq.client
                pipe = client.pipeline(transaction=False)
                for name in names:
                    pipe.xlen(QueueKeys(p, subscription_queue_name(name)).stream)
                lengths = pipe.execute()
                if any(int(x) != n for x in lengths):
                    raise RuntimeError(f"routing left {lengths} copies, expected {n} each")
        ctx.add("route", f"to {n_subs} subscription{'s' if n_subs > 1 else ''}", "events/s",
                rates, target=targets.get(n_subs, ""))


def preload(url: str, prefix: str, service: str, events: Sequence[Event]) -> None:
    """Subscribe ``service`` to :class:`BenchEvent` and route ``events`` into its queue."""
    with EventBus(url, prefix=prefix) as bus:
        bus.subscribe(service, [BenchEvent])
        publish_all(bus, events, 1000)
        route_all(bus, len(events))


def consume_round(url: str, child: ServiceProcess, events: Sequence[Event], concurrency: int,
                  name: str = "bench-consume") -> float:
    """Pre-load ``events`` into a fresh subscription, then have a new service in ``child``
    handle them all; return events handled and acknowledged per second, from its
    ``start()`` call to the last acknowledgement."""
    n = len(events)
    with temp_prefix(url) as p:
        preload(url, p, name, events)
        res = child.request("start", reply_within=_wait_timeout(n) + 10, prefix=p, name=name,
                            concurrency=concurrency, run_router=False, wait_n=n,
                            timeout=_wait_timeout(n))
        child.request("close")
    if res["handled"] < n:
        raise RuntimeError(f"consume: handled {res['handled']} of {n} in time")
    return float(n / (res["t_end"] - res["t0"]))


def bench_consume(ctx: _Ctx) -> None:
    """A fresh service (in a child process) handles N pre-loaded events: start() to last ack."""
    n = ctx.n(20_000, 2_000)
    events = make_events(n)
    with ServiceProcess(ctx.url) as child:
        consume_round(ctx.url, child, events[:200], 1, "bench-warm")  # imports, scripts
        for concurrency in (1, 8):
            rates = []
            for r in range(ctx.rounds):
                ctx.say(f"consume: concurrency {concurrency}, round {r + 1}/{ctx.rounds}")
                rates.append(consume_round(ctx.url, child, events, concurrency))
            ctx.add("consume", f"concurrency {concurrency}, handled + acked", "events/s", rates,
                    target=">= 20000" if concurrency == 1 else "")


def _e2e_rates(ctx: _Ctx, label: str, n: int, payload: int, batch: int) -> list[float]:
    """Saturation through publish -> route -> handler; the service (router included) runs
    in a child process, this process publishes with publish_many."""
    events = make_events(n, payload)
    rates = []
    with ServiceProcess(ctx.url) as child, temp_prefix(ctx.url) as p, \
            EventBus(ctx.url, prefix=p) as bus:
        child.request("start", prefix=p, name="bench-e2e", run_router=True)
        warm = make_events(min(200, n), payload)
        child.send("expect", n=len(warm), timeout=60)
        child.recv()
        publish_all(bus, warm, batch)
        if child.recv(90)["handled"] < len(warm):
            raise RuntimeError(f"{label}: warm-up events were not handled")
        for r in range(ctx.rounds):
            ctx.say(f"{label}: round {r + 1}/{ctx.rounds}")
            child.send("expect", n=n, timeout=_wait_timeout(n))
            child.recv()
            t0 = time.time()
            publish_all(bus, events, batch)
            res = child.recv(_wait_timeout(n) + 10)
            if res["handled"] < n:
                raise RuntimeError(f"{label}: handled {res['handled']} of {n} in time")
            rates.append(n / (res["t_end"] - t0))
            events = make_events(n, payload)  # new event ids: no dedup across rounds
    return rates


def bench_e2e(ctx: _Ctx) -> None:
    """End to end at saturation, ~245-byte events."""
    n = ctx.n(20_000, 2_000)
    rates = _e2e_rates(ctx, "e2e", n, DEFAULT_PAYLOAD, 100)
    ctx.add("e2e", "saturation, publish → route → handler", "events/s", rates,
            target=">= 10000")


def bench_payload(ctx: _Ctx) -> None:
    """End to end at saturation with 2 KiB and 64 KiB payloads."""
    for size, label, n, batch in ((2048, "2 KiB", ctx.n(10_000, 1_000), 100),
                                  (65536, "64 KiB", ctx.n(1_000, 100), 10)):
        rates = _e2e_rates(ctx, f"payload {label}", n, size, batch)
        ctx.add("payload", f"{label} payload, end to end at saturation", "events/s", rates)
        ctx.add("payload", f"{label} payload, end to end at saturation", "MB/s",
                [r * size / 1e6 for r in rates])


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


def _percentiles(samples: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return q[49], q[94], q[98]


def bench_latency(ctx: _Ctx) -> None:
    """Publish call -> handler start, one event per publish call at a paced rate."""
    seconds = {200: ctx.n(5.0, 1.0), 1000: ctx.n(5.0, 1.0), 5000: ctx.n(3.0, 0.5)}
    with ServiceProcess(ctx.url) as child, temp_prefix(ctx.url) as p, \
            EventBus(ctx.url, prefix=p) as bus:
        child.request("start", prefix=p, name="bench-latency", run_router=True)
        warm = make_events(300)
        child.send("expect", n=len(warm), timeout=60, latencies=True)
        child.recv()
        paced_publish(bus, warm, 1000)
        child.recv(90)
        for rate, secs in seconds.items():
            n = int(rate * secs)
            p50, p95, p99, offered = [], [], [], []
            for r in range(ctx.rounds):
                ctx.say(f"latency: {rate:,} events/s offered, round {r + 1}/{ctx.rounds}")
                events = make_events(n)
                child.send("expect", n=n, timeout=_wait_timeout(n), latencies=True)
                child.recv()
                offered.append(paced_publish(bus, events, rate))
                res = child.recv(_wait_timeout(n) + 10)
                if res["handled"] < n:
                    raise RuntimeError(f"latency: handled {res['handled']} of {n} in time")
                a, b, c = _percentiles([x * 1000 for x in res["latencies"]])
                p50.append(a)
                p95.append(b)
                p99.append(c)
            label = f"{rate:,}/s offered"
            ctx.add("latency", f"{label}: p50", "ms", p50)
            ctx.add("latency", f"{label}: p95", "ms", p95)
            ctx.add("latency", f"{label}: p99", "ms", p99, target="<= 3" if rate == 1000 else "")
            ctx.add("latency", f"{label}: rate achieved by the publisher", "events/s", offered)


def used_memory(client: redis.Redis) -> int:
    """``INFO memory`` ``used_memory`` after a short pause (buffers flushed)."""
    time.sleep(0.05)
    return int(client.info("memory")["used_memory"])


def memory_round(url: str, n: int) -> dict[str, float]:
    """One memory measurement over ``n`` events (``INFO memory`` ``used_memory`` deltas).

    Returns bytes per event for: ``log`` (the event log after publishing), ``sub`` (a
    subscription queue after routing: its stream and its routed-id set), ``stream``
    (``MEMORY USAGE`` of that stream alone), ``raw`` (plain XADD of the very fields
    relaybus wrote, into a stream of its own), ``left`` (what the subscription still
    holds once every event is acknowledged the way a service does, recording each
    event id as done), and ``left_entries`` (entries left in its stream).
    """
    events = make_events(n)
    with temp_prefix(url) as p, EventBus(url, prefix=p) as bus:
        client = redis.Redis.from_url(url)
        try:
            bus.subscribe("bench-memory", [BenchEvent])
            queue, _ = bus.subscription_queue("bench-memory")
            m0 = used_memory(client)
            publish_all(bus, events, 1000)
            m1 = used_memory(client)
            route_all(bus, n)
            m2 = used_memory(client)
            stream_bytes = int(client.memory_usage(queue.key, samples=0) or 0)
            fields = raw_fields(bus, events)
            raw_key = QueueKeys(p, "raw").stream
            m3 = used_memory(client)
            for i in range(0, n, 1000):
                pipe = client.pipeline(transaction=False)
                for f in fields[i: i + 1000]:
                    pipe.xadd(raw_key, f)
                pipe.execute()
            m4 = used_memory(client)
            client.delete(raw_key)
            while True:  # acknowledge everything, recording each event as done
                msgs = queue.get_messages(count=1000, consumer_id="bench")
                if not msgs:
                    break
                queue.acknowledge_messages([m.id for m in msgs],
                                           record_done=[m.dedup_key or "" for m in msgs])
            m5 = used_memory(client)
            left_entries = int(client.xlen(queue.key))
        finally:
            client.close()
    return {"log": (m1 - m0) / n, "sub": (m2 - m1) / n, "stream": stream_bytes / n,
            "raw": (m4 - m3) / n, "left": (m5 - m1) / n, "left_entries": left_entries}


def bench_memory(ctx: _Ctx) -> None:
    """Bytes per waiting event: subscription queue vs raw XADD; the log; what is left."""
    n = ctx.n(100_000, 10_000)
    rounds = []
    for r in range(ctx.rounds):
        ctx.say(f"memory: {n:,} events, round {r + 1}/{ctx.rounds}")
        rounds.append(memory_round(ctx.url, n))

    def col(key: str) -> list[float]:
        return [x[key] for x in rounds]

    ctx.add("memory", "subscription queue, per waiting event (stream + routed-id set)", "bytes",
            col("sub"))
    ctx.add("memory", "  of which the stream (MEMORY USAGE)", "bytes", col("stream"))
    ctx.add("memory", "raw XADD of the same fields, per entry", "bytes", col("raw"))
    ctx.add("memory", "subscription queue ÷ raw XADD", "×",
            [x["sub"] / x["raw"] for x in rounds], target="<= 1.5")
    ctx.add("memory", "event log, per event (kept for retention)", "bytes", col("log"))
    ctx.add("memory", "left after every ack, per event (dedup sets)", "bytes", col("left"))
    ctx.add("memory", "entries left in the subscription stream after the acks", "entries",
            col("left_entries"), target="== 0")


def _named_url(url: str, name: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}client_name={name}"


def _client_cmds(client: redis.Redis, name: str) -> int:
    return sum(int(c.get("tot-cmds", 0)) for c in client.client_list() if c.get("name") == name)


def bench_idle(ctx: _Ctx) -> None:
    """Two idle services in child processes (router on, router off), measured over
    consecutive windows: commands each sends (counted in its process), commands the
    server ran for its connections (CLIENT LIST tot-cmds, which counts the commands
    inside scripts too), and its CPU time over wall time."""
    window = ctx.n(6.0, 1.5)
    names = {"router": "relaybus-bench-idle-router", "plain": "relaybus-bench-idle-plain"}
    rows: dict[str, list[float]] = {k: [] for k in (
        "sent", "server", "cpu", "sent_plain", "server_plain", "cpu_plain")}
    with contextlib.ExitStack() as stack, temp_prefix(ctx.url) as p:
        children = {k: stack.enter_context(ServiceProcess(_named_url(ctx.url, n),
                                                          count_commands=True))
                    for k, n in names.items()}
        for key, child in children.items():
            child.request("start", prefix=p, name=f"bench-idle-{key}",
                          run_router=key == "router")
        client = stack.enter_context(contextlib.closing(ctx.client()))
        time.sleep(ctx.n(2.0, 0.5))  # let start-up traffic pass
        for r in range(ctx.rounds):
            ctx.say(f"idle: window {r + 1}/{ctx.rounds} of {window:g}s")
            before = {k: _client_cmds(client, n) for k, n in names.items()}
            for child in children.values():
                child.request("begin")
            time.sleep(window)
            ends = {k: c.request("end") for k, c in children.items()}
            after = {k: _client_cmds(client, n) for k, n in names.items()}
            for key, suffix in (("router", ""), ("plain", "_plain")):
                end = ends[key]
                rows["sent" + suffix].append(end["commands"] / end["wall"])
                rows["server" + suffix].append((after[key] - before[key]) / end["wall"])
                rows["cpu" + suffix].append(100 * end["cpu"] / end["wall"])
    ctx.add("idle", "commands sent (service + its router)", "commands/s", rows["sent"],
            target="<= 2")
    ctx.add("idle", "  commands the server ran for it (scripts' included)", "commands/s",
            rows["server"])
    ctx.add("idle", "CPU (service + its router)", "%", rows["cpu"], target="< 1")
    ctx.add("idle", "commands sent (run_router=False)", "commands/s", rows["sent_plain"])
    ctx.add("idle", "  commands the server ran for it (scripts' included)", "commands/s",
            rows["server_plain"])
    ctx.add("idle", "CPU (run_router=False)", "%", rows["cpu_plain"])


_RUNNERS: dict[str, Callable[[_Ctx], None]] = {
    "publish": bench_publish,
    "route": bench_route,
    "consume": bench_consume,
    "e2e": bench_e2e,
    "latency": bench_latency,
    "payload": bench_payload,
    "memory": bench_memory,
    "idle": bench_idle,
}


# -- environment ------------------------------------------------------------------------


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


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def environment(url: str, embedded: bool) -> dict[str, Any]:
    """The machine, the versions and the server: what a figure is only valid for."""
    from . import __version__

    env: dict[str, Any] = {
        "relaybus": __version__,
        "python": platform.python_version(),
        "redis_py": _version("redis"),
        "hiredis": _version("hiredis"),
        "pydantic": _version("pydantic"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory": _memory_total(),
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "server_url": "embedded (private, temporary)" if embedded else url,
    }
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        info = client.info("server")
        env["server"] = (f"valkey {info['valkey_version']}" if "valkey_version" in info
                         else f"redis {info.get('redis_version', '?')}")
        mem = client.info("memory")
        env["server_allocator"] = mem.get("mem_allocator")
        with contextlib.suppress(redis.RedisError):
            conf = client.config_get("append*")
            env["server_persistence"] = (f"appendonly {conf.get('appendonly')}, "
                                         f"appendfsync {conf.get('appendfsync')}")
    finally:
        client.close()
    return env


# -- the entry point --------------------------------------------------------------------


def run_bench(scenarios: list[str] | None, *, url: str | None = None, quick: bool = False,
              json_file: str | None = None, console: Console | None = None,
              rounds: int | None = None) -> int:
    """Run ``scenarios`` (None or empty: all of :data:`SCENARIOS`) and print the table.

    ``url``: the server (default: a private embedded Valkey started and stopped here).
    ``quick``: 2 rounds on small counts (under a minute), for CI smoke runs.
    ``json_file``: also write every figure, every round, the machine and the versions.
    ``rounds``: override the number of rounds (5; 2 with ``quick``).
    Returns 0 when every scenario ran, 1 when one failed (the others still run and the
    table shows what was measured), 2 for an unknown scenario name.
    """
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log or a pipe: keep the table's rows on one line
            console = Console(width=150)
    known = [s.name for s in SCENARIOS]
    chosen = list(dict.fromkeys(scenarios or known))
    unknown = [s for s in chosen if s not in known]
    if unknown:
        console.print(f"[red]unknown scenario {', '.join(unknown)}[/red]; "
                      f"choose from {', '.join(known)}")
        return 2
    chosen = [s for s in known if s in chosen]
    if _version("hiredis") is None:
        console.print("[yellow]hiredis is not installed: redis-py parses replies in pure "
                      "Python and every figure is lower (pip install 'relaybus[hiredis]')"
                      "[/yellow]")
    with contextlib.ExitStack() as stack:
        embedded = url is None
        if embedded:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="relaybus-bench-"))
            server = EmbeddedServer(tmp, appendfsync="everysec")
            url = server.start().url
            stack.callback(server.stop)
        else:
            from .connection import resolve_url

            url = resolve_url(url)
        assert url is not None
        env = environment(url, embedded)
        started = time.time()
        console.print(
            f"relaybus {env['relaybus']} benchmarks: {', '.join(chosen)}"
            f"{' (quick)' if quick else ''}\n"
            f"server {env.get('server')} ({env['server_url']}; "
            f"{env.get('server_persistence', '?')}), Python {env['python']}, "
            f"redis-py {env['redis_py']}, hiredis {env['hiredis'] or 'no'}\n"
            f"{env['nproc']} × {env['cpu']}, {env['memory']}, load average "
            f"{', '.join(f'{x:.2f}' for x in env['loadavg_at_start'] or [])}",
            highlight=False)
        ctx = _Ctx(url=url, quick=quick, console=console,
                   rounds=rounds if rounds else (2 if quick else 5))
        errors: dict[str, str] = {}
        durations: dict[str, float] = {}
        for name in chosen:
            t = time.monotonic()
            try:
                _RUNNERS[name](ctx)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                console.print(f"[red]{name} failed: {errors[name]}[/red]", highlight=False)
            durations[name] = time.monotonic() - t
        elapsed = time.time() - started
        console.print(render_table(ctx.figures,
                                   title=f"relaybus benchmarks ({'quick, ' if quick else ''}"
                                         f"median of {ctx.rounds} rounds)"))
        console.print(f"took {elapsed:.0f}s; "
                      + ", ".join(f"{k} {v:.0f}s" for k, v in durations.items()),
                      highlight=False)
        if json_file:
            doc = {
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                "seconds": elapsed,
                "quick": quick,
                "rounds": ctx.rounds,
                "scenarios": chosen,
                "environment": env,
                "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                "figures": [f.as_dict() for f in ctx.figures],
                "errors": errors,
            }
            with open(json_file, "w") as fh:
                json.dump(doc, fh, indent=2)
            console.print(f"wrote {json_file}", highlight=False)
        return 1 if errors else 0
