"""The CPU one event costs in the consumer core and a service, with no IO.

Messages are made as the fetch hands them over (decoded, not parsed), then run through
what a worker does with them: ``Consumer.fetched``, ``take``, the service's
``_process`` (validation, an empty handler, the outcome), ``finish``, a settle batch
and its result; for a sync service, then for an async one (its ``_process`` awaited,
an ``async def`` handler). The server is never reached (the services' URL points at
a closed port). Best of 5 runs of 20,000 events, in microseconds per event::

    .venv/bin/python bench/core_cost.py

Compare two checkouts side by side with ``PYTHONPATH=<checkout>/src`` (git worktree).
"""

from __future__ import annotations

import time
from typing import Any

from relaybus import Microservice

try:
    from relaybus import AsyncMicroservice
except ImportError:  # an older checkout
    AsyncMicroservice = None  # type: ignore[assignment,misc]
from relaybus._bench import BenchEvent, make_events
from relaybus._core import queue as q
from relaybus._core.consumer import Consumer
from relaybus.codec import Message, decode_entry, encode_entry
from relaybus.events import serialize_event

N = 20_000
BATCH = 100


def _entries(n: int) -> list[dict[bytes, bytes]]:
    """``n`` log entries as the server replies with them (bytes)."""
    out = []
    for event in make_events(n):
        fields = encode_entry(serialize_event(event), now=time.time(), dedup_key=event.event_id,
                              routing_key=event.event_type)
        out.append({k.encode(): str(v).encode() for k, v in fields.items()})
    return out


def run_once(svc: Any, entries: list[dict[bytes, bytes]]) -> float:
    """Microseconds per event for one pass over ``entries`` (a sync service's)."""
    return _pass(svc, entries, svc._process)


def run_once_async(svc: Any, entries: list[dict[bytes, bytes]]) -> float:
    """The same for an async service: its ``_process`` run as the loop would run a
    handler that never suspends (one ``send``), without the loop's own work."""
    return _pass(svc, entries, lambda m: _complete(svc._process(m)))


def _complete(coro: Any) -> Any:
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the handler suspended: not what this measures")


def _pass(svc: Any, entries: list[dict[bytes, bytes]], process: Any) -> float:
    ref = q.QueueRef(q.QueueSettings("bench:", 1 << 20, 5, 600.0), "sub:bench", False, 30.0,
                     True)
    counts = {"telemetry": svc._telemetry} if hasattr(svc, "_telemetry") else {}  # older
    core = Consumer(ref, "bench-1", prefetch=BATCH, counters=svc._counters, **counts)
    messages: list[Message] = [decode_entry(f"{i + 1}-0", raw, 1, parse=False)
                               for i, raw in enumerate(entries)]
    started = time.perf_counter()
    for first in range(0, len(messages), BATCH):
        core.fetched(messages[first: first + BATCH], time.monotonic())
        while (message := core.take()) is not None:
            core.finish(message, process(message), time.monotonic())
        batch = core.settle_batch(time.monotonic() + 10)  # due: settle now
        if batch is not None:
            core.settled(batch, q.Settled(acknowledged=len(batch.items)), time.monotonic())
    return (time.perf_counter() - started) / len(messages) * 1e6


def main() -> None:
    svc = Microservice("bench", url="redis://127.0.0.1:1/0")
    svc.on(BenchEvent)(lambda event: None)
    entries = _entries(N)
    best = min(run_once(svc, entries) for _ in range(5))
    print(f"consumer core + sync _process: {best:.2f} us per event ({N:,} events, best of 5)")
    if AsyncMicroservice is None:  # an older checkout
        return
    asvc = AsyncMicroservice("bench", url="redis://127.0.0.1:1/0")

    async def handle(event: BenchEvent) -> None:
        pass

    asvc.on(BenchEvent)(handle)
    best = min(run_once_async(asvc, entries) for _ in range(5))
    print(f"consumer core + async _process: {best:.2f} us per event ({N:,} events, best of 5)")


if __name__ == "__main__":
    main()
