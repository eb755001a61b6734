"""How long a full garbage collection takes in a service process, with and without
``gc.freeze()`` of the start-up heap (what ``relaybus.runner.run_service`` does).

    python bench/gc_pause.py

A full collection walks every tracked object; a service process holds tens of
thousands from its imports alone (pydantic, redis-py, asyncio, relaybus), and while it
runs, every event in flight waits: at 1,000 events/s one such pause every few seconds
is the p99. Freezing the start-up heap leaves only what the service makes later.
"""

from __future__ import annotations

import gc
import time

import pydantic  # noqa: F401 - what a service imports
import redis  # noqa: F401
import redis.asyncio  # noqa: F401

import relaybus  # noqa: F401


def full_collection_ms() -> float:
    started = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - started) * 1000


def report(label: str) -> None:
    samples = [full_collection_ms() for _ in range(5)]
    print(f"{label:18s} {len(gc.get_objects()):>8,} objects tracked; full collection "
          f"{min(samples):.2f}-{max(samples):.2f} ms")


if __name__ == "__main__":
    report("start-up heap")
    gc.freeze()
    report("after gc.freeze()")
