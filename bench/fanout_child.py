"""The subscribing side of bench/compare.py's fan-out and latency workloads.

bench/compare.py starts this file as a child process of its own (:class:`FanoutChild`)
and sends it jobs as JSON lines on stdin; replies go back as JSON lines on the
original stdout (anything else the child prints goes to stderr, which the parent
keeps and shows the tail of when something goes wrong). One job::

    {"op": "run", "impl": "raw redis-py" | "FastStream" | "relaybus sync" | "relaybus async",
     "url": ..., "prefix": ..., "stream": ..., "services": ["svc0", ...], "n": N,
     "latencies": bool, "max_records": 100, "timeout": seconds, "stall": seconds}

The child starts one subscriber per service, all in this one process, each with a
subscription of its own (a consumer group per service on ``stream`` for raw redis-py
and FastStream; a ``Microservice`` / ``AsyncMicroservice`` per service for relaybus),
and replies ``{"ready": true}`` once every subscriber is started and its group exists.
It then waits (sleeping on the handlers' count, no polling while they run) until every
service has handled *and acknowledged* ``n`` events, stops the subscribers and replies
``{"t_end": <time.time() when the last service was done>, "handled": [...], ...}``
(with ``"latencies"``: handler start ``time.time()`` minus the event's ``sent_at``, in
seconds, when asked). Failures reply ``{"error": ...}`` (before or after "ready");
``{"op": "exit"}`` ends the child.

Every handler is typed: it receives the validated pydantic model (raw redis-py:
``BenchEvent.model_validate_json`` of the payload, the fastest typed decode there is
and the one relaybus uses too; FastStream: a handler argument annotated with
:class:`FsEvent`; relaybus: the ``BenchEvent`` it delivers), takes ``time.time()``
first, then counts the event.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import inspect
import json
import os
import queue as queue_mod
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import IO, Any

from pydantic import BaseModel

# How often the child polls for the acknowledgements that follow the last handler
# run (FastStream: XPENDING; relaybus: the services' "handled" counters).
ACK_POLL = 0.0005


class FsEvent(BaseModel):
    """FastStream's typed message: the same fields as the relaybus event's payload."""

    event_id: str
    timestamp: float
    event_type: str
    correlation_id: str | None = None
    causation_id: str | None = None
    headers: dict[str, str] = {}
    partition_key: str | None = None
    order_id: str
    customer: str
    total: float
    sent_at: float = 0.0
    note: str = ""


# -- the parent's handle on the child ------------------------------------------------------


class ChildError(RuntimeError):
    """The child's own report of a failed job (its traceback is on its stderr)."""


class FanoutChild:
    """This file running as a child process, driven over a pipe (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ)
        # The child imports the relaybus this process would (without importing it here).
        spec = importlib.util.find_spec("relaybus")
        src = (os.path.dirname(list(spec.submodule_search_locations)[0])
               if spec and spec.submodule_search_locations else None)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1, env=env)
        self._lines: queue_mod.Queue[str | None] = queue_mod.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, op: str, **kw: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(dict(kw, op=op)) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise RuntimeError(f"fan-out child is gone ({exc}){self.tail()}") from None

    def recv(self, timeout: float) -> dict[str, Any]:
        """The next reply; RuntimeError when none comes within ``timeout`` seconds, the
        child exited, or the reply is an error."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue_mod.Empty:
            raise RuntimeError(f"fan-out child gave no answer in {timeout:.0f}s"
                               f"{self.tail()}") from None
        if line is None:
            self.proc.wait(5)
            raise RuntimeError(f"fan-out child exited (status {self.proc.returncode})"
                               f"{self.tail()}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise ChildError(reply["error"])
        return reply

    def tail(self, lines: int = 15) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().strip().splitlines()[-lines:]
        return (":\n    " + "\n    ".join(text)) if text else ""

    def close(self, force: bool = False) -> None:
        """Ask the child to exit (kill it if it does not within 10s; ``force``: at once,
        for a child that may still be in a job)."""
        if self.proc.poll() is None:
            try:
                if force:
                    raise RuntimeError("forced")
                self.send("exit")
                self.proc.wait(10)
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        self._stderr.close()

    def __enter__(self) -> FanoutChild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the child ------------------------------------------------------------------------------


class Tally:
    """One service's handler count (and latencies); ``done`` is set at the n-th event."""

    def __init__(self, n: int, latencies: bool,
                 on_done: Callable[[], None] | None = None) -> None:
        self.n = n
        self.count = 0
        self.keep = latencies
        self.latencies: list[float] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.on_done = on_done
        self.t_done: float | None = None  # raw: when the n-th event was acknowledged

    def hit(self, event: Any) -> None:
        """The handler: the typed event in, its arrival counted."""
        now = time.time()
        with self.lock:
            self.count += 1
            if self.keep and event.sent_at:
                self.latencies.append(now - event.sent_at)
            if self.count == self.n:
                self.done.set()
                if self.on_done is not None:
                    self.on_done()


class Stalled(RuntimeError):
    pass


def _wait_counts(tallies: list[Tally], job: dict[str, Any]) -> None:
    """Block until every tally is done; Stalled when the count stops moving for
    ``stall`` seconds or ``timeout`` passes (wakes once a second to check)."""
    deadline = time.monotonic() + job["timeout"]
    last, last_move = -1, time.monotonic()
    for t in tallies:
        while not t.done.wait(1.0):
            total = sum(x.count for x in tallies)
            now = time.monotonic()
            if total != last:
                last, last_move = total, now
            if now > deadline or now - last_move > job["stall"]:
                raise Stalled(_stall_text(tallies, job))


async def _await_counts(tallies: list[Tally], flag: asyncio.Event, job: dict[str, Any]) -> None:
    deadline = time.monotonic() + job["timeout"]
    last, last_move = -1, time.monotonic()
    while not all(t.done.is_set() for t in tallies):
        try:
            await asyncio.wait_for(flag.wait(), 1.0)
            flag.clear()
        except asyncio.TimeoutError:
            pass
        total = sum(x.count for x in tallies)
        now = time.monotonic()
        if total != last:
            last, last_move = total, now
        if now > deadline or now - last_move > job["stall"]:
            raise Stalled(_stall_text(tallies, job))


def _stall_text(tallies: list[Tally], job: dict[str, Any]) -> str:
    return (f"handled {[t.count for t in tallies]} of {job['n']} each "
            f"(timeout {job['timeout']:.0f}s, stall limit {job['stall']:.0f}s)")


def _result(tallies: list[Tally], t_end: float, acked: bool | str) -> dict[str, Any]:
    lat = [x for t in tallies for x in t.latencies]
    return {"t_end": t_end, "handled": [t.count for t in tallies], "acked": acked,
            "latencies": lat}


def _stream_entries(reply: Any) -> list[Any]:
    """Entries of an XREADGROUP reply on one stream (RESP2 list or RESP3 dict)."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else [s[1] for s in reply]
    out: list[Any] = []
    for entries in streams:
        if entries and isinstance(entries[0], list) and entries[0] and \
                isinstance(entries[0][0], (list, tuple)):
            entries = entries[0]
        out.extend(entries)
    return out


# raw redis-py: a thread per service, XREADGROUP COUNT 100 BLOCK, decode, handle, XACK.


def run_raw(job: dict[str, Any], reply: Callable[..., None]) -> None:
    import redis

    from relaybus._bench import BenchEvent

    stream, n = job["stream"], job["n"]
    stop = threading.Event()
    failures: list[str] = []
    tallies = [Tally(n, job["latencies"]) for _ in job["services"]]
    clients = [redis.Redis.from_url(job["url"]) for _ in job["services"]]
    for client, group in zip(clients, job["services"], strict=True):
        client.xgroup_create(stream, group, id="0", mkstream=True)

    def consume(client: redis.Redis, group: str, tally: Tally) -> None:
        validate, handle = BenchEvent.model_validate_json, tally.hit
        try:
            while not stop.is_set() and tally.t_done is None:
                entries = _stream_entries(client.xreadgroup(
                    group, "c1", {stream: ">"}, count=job["max_records"], block=200))
                if not entries:
                    continue
                for _, fields in entries:
                    handle(validate(fields[b"d"]))
                client.xack(stream, group, *[entry_id for entry_id, _ in entries])
                if tally.count >= n:
                    tally.t_done = time.time()
        except Exception as exc:  # reported by the main thread
            failures.append(f"raw consumer {group}: {type(exc).__name__}: {exc}")
            for t in tallies:  # wake the main thread
                t.done.set()

    threads = [threading.Thread(target=consume, args=a, daemon=True)
               for a in zip(clients, job["services"], tallies, strict=True)]
    for t in threads:
        t.start()
    try:
        reply(ready=True)
        _wait_counts(tallies, job)
        if failures:
            raise RuntimeError("; ".join(failures))
        for t in threads:  # each exits once its n-th event is acknowledged
            t.join(job["timeout"])
        if failures:
            raise RuntimeError("; ".join(failures))
        if any(t.t_done is None for t in tallies):
            raise RuntimeError(f"acknowledged all {n}: {[t.t_done is not None for t in tallies]}")
        t_end = max(t.t_done for t in tallies if t.t_done is not None)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        for c in clients:
            c.close()
    reply(**_result(tallies, t_end, True))


# FastStream: one RedisBroker, a StreamSub (own group, consumer c1) per service.


async def _run_faststream(job: dict[str, Any], reply: Callable[..., None]) -> None:
    import redis.asyncio as aioredis
    from faststream.redis import RedisBroker, StreamSub

    stream, n = job["stream"], job["n"]
    loop = asyncio.get_running_loop()
    flag = asyncio.Event()
    tallies = [Tally(n, job["latencies"], lambda: loop.call_soon_threadsafe(flag.set))
               for _ in job["services"]]
    admin = aioredis.Redis.from_url(job["url"])
    # Groups at 0 before FastStream starts: it creates missing ones at "$" and treats
    # "already exists" as fine (its subscriber then reads ">" as usual).
    for group in job["services"]:
        await admin.xgroup_create(stream, group, id="0", mkstream=True)
    broker = RedisBroker(job["url"], logger=None)

    def handler(tally: Tally) -> Callable[[FsEvent], Any]:
        async def handle(body: FsEvent) -> None:
            tally.hit(body)
        return handle

    for group, tally in zip(job["services"], tallies, strict=True):
        broker.subscriber(stream=StreamSub(stream, group=group, consumer="c1",
                                           max_records=job["max_records"]))(handler(tally))
    try:
        await broker.start()  # returns once every subscriber's read loop is running
        reply(ready=True)
        await _await_counts(tallies, flag, job)
        # FastStream acknowledges (one XACK per message) after the handler returns:
        # done when no group has a pending entry left.
        deadline = time.monotonic() + 10
        while True:
            pipe = admin.pipeline(transaction=False)
            for group in job["services"]:
                pipe.xpending(stream, group)
            pending = [int(p["pending"]) for p in await pipe.execute()]
            if not any(pending):
                t_end = time.time()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{pending} entries still pending 10s after the last "
                                   "handler run")
            await asyncio.sleep(ACK_POLL)
    finally:
        await broker.stop()
        await admin.aclose()
    reply(**_result(tallies, t_end, True))


def run_faststream(job: dict[str, Any], reply: Callable[..., None]) -> None:
    asyncio.run(_run_faststream(job, reply))


# relaybus: a Microservice / AsyncMicroservice per service.


def _handled(svc: Any) -> int | None:
    """The service's acknowledged count, or None if it keeps none we know of."""
    stats = getattr(svc, "stats", None)
    if callable(stats):
        stats = stats()
    return _handled_of(stats)


def _handled_of(stats: Any) -> int | None:
    if isinstance(stats, Mapping) and "handled" in stats:
        return int(stats["handled"])
    return None


async def _ahandled(svc: Any) -> int | None:
    """:func:`_handled` for an async service (``stats`` may be a coroutine method)."""
    stats = getattr(svc, "stats", None)
    if callable(stats):
        stats = stats()
    if inspect.isawaitable(stats):
        stats = await stats
    return _handled_of(stats)


def _relaybus_services(cls: Any, job: dict[str, Any]) -> list[Any]:
    # Default settings, as deployed: each service reads the log through a group of its
    # own, and each runs the bus's maintenance (the log's retention trim).
    return [cls(name, url=job["url"], prefix=job["prefix"]) for name in job["services"]]


def _acked(svcs: list[Any], n: int, counts: list[int | None] | None = None
           ) -> tuple[bool, str | bool]:
    """(every service acknowledged n, how we know)."""
    counts = [_handled(s) for s in svcs] if counts is None else counts
    if any(c is None for c in counts):
        return True, "unknown (no stats['handled']): timed at the last handler run"
    return all(c is not None and c >= n for c in counts), True


def run_relaybus_sync(job: dict[str, Any], reply: Callable[..., None]) -> None:
    from relaybus import Microservice
    from relaybus._bench import BenchEvent

    n = job["n"]
    tallies = [Tally(n, job["latencies"]) for _ in job["services"]]
    svcs = _relaybus_services(Microservice, job)
    for svc, tally in zip(svcs, tallies, strict=True):
        svc.on(BenchEvent)(tally.hit)
    try:
        for svc in svcs:
            svc.start()  # subscribes (creates its queue and group), starts its threads
        reply(ready=True)
        _wait_counts(tallies, job)
        deadline = time.monotonic() + 10
        while True:  # "handled" moves after each acknowledgement
            ok, acked = _acked(svcs, n)
            if ok:
                t_end = time.time()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"handled counters {[_handled(s) for s in svcs]} 10s "
                                   f"after the last handler run, expected {n}")
            time.sleep(ACK_POLL)
    finally:
        for svc in svcs:
            svc.close()
    reply(**_result(tallies, t_end, acked))


async def _run_relaybus_async(job: dict[str, Any], reply: Callable[..., None]) -> None:
    import relaybus
    from relaybus._bench import BenchEvent

    cls = getattr(relaybus, "AsyncMicroservice", None)
    if cls is None:
        raise RuntimeError("n/a: relaybus has no AsyncMicroservice")
    n = job["n"]
    loop = asyncio.get_running_loop()
    flag = asyncio.Event()
    tallies = [Tally(n, job["latencies"], lambda: loop.call_soon_threadsafe(flag.set))
               for _ in job["services"]]
    svcs = _relaybus_services(cls, job)

    def handler(tally: Tally) -> Callable[[BenchEvent], Any]:
        async def handle(event: BenchEvent) -> None:
            tally.hit(event)
        return handle

    for svc, tally in zip(svcs, tallies, strict=True):
        svc.on(BenchEvent)(handler(tally))
    started = []
    try:
        for svc in svcs:
            await svc.start()
            started.append(svc)
        reply(ready=True)
        await _await_counts(tallies, flag, job)
        deadline = time.monotonic() + 10
        while True:
            counts = [await _ahandled(s) for s in svcs]
            ok, acked = _acked(svcs, n, counts)
            if ok:
                t_end = time.time()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"handled counters {counts} 10s after the last "
                                   f"handler run, expected {n}")
            await asyncio.sleep(ACK_POLL)
    finally:
        for svc in started:
            await svc.stop()
        for svc in svcs:
            close = getattr(svc, "close", None)
            if close is not None:
                res = close()
                if inspect.isawaitable(res):
                    await res
    reply(**_result(tallies, t_end, acked))


def run_relaybus_async(job: dict[str, Any], reply: Callable[..., None]) -> None:
    asyncio.run(_run_relaybus_async(job, reply))


RUNNERS: dict[str, Callable[[dict[str, Any], Callable[..., None]], None]] = {
    "raw redis-py": run_raw,
    "FastStream": run_faststream,
    "relaybus sync": run_relaybus_sync,
    "relaybus async": run_relaybus_async,
}


def main() -> None:
    # every implementation alike: the start-up heap out of the collector's sight
    gc.collect()
    gc.freeze()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def reply(**kw: Any) -> None:
        with lock:
            out.write(json.dumps(kw) + "\n")

    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "exit":
            return
        try:
            RUNNERS[req["impl"]](req, reply)
        except Exception as exc:
            traceback.print_exc()
            reply(error=str(exc) if str(exc).startswith("n/a") or isinstance(exc, Stalled)
                  else f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
