"""Benchmarks of relaybus: ``relaybus bench`` and the scripts in ``bench/``.

A private package, outside the runtime's import path: only ``relaybus bench``
(:func:`run_bench`, imported when the command runs) and the benchmark scripts import
it. :mod:`.common` holds the event, the figures and small helpers,
:mod:`.child` the child process services are measured in, :mod:`.scenarios` the
scenarios and :func:`run_bench`.
"""

from __future__ import annotations

from .child import FRONTS, ServiceProcess
from .common import (
    DEFAULT_PAYLOAD,
    BenchEvent,
    Figure,
    environment,
    fmt,
    make_events,
    paced_publish,
    payload_size,
    percentiles,
    publish_all,
    raw_fields,
    render_table,
    temp_prefix,
    used_memory,
    wait_timeout,
)
from .scenarios import RUNNERS, SCENARIOS, Scenario, consume_round, memory_round, preload, run_bench

__all__ = ["DEFAULT_PAYLOAD", "FRONTS", "RUNNERS", "SCENARIOS", "BenchEvent", "Figure", "Scenario",
           "ServiceProcess", "consume_round", "environment", "fmt", "make_events",
           "memory_round", "paced_publish", "payload_size", "percentiles", "preload",
           "publish_all", "raw_fields", "render_table", "run_bench", "temp_prefix",
           "used_memory", "wait_timeout"]
