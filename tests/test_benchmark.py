"""Smoke tests of ``relaybus bench`` (relaybus.benchmark): it runs, prints, writes JSON.

Benchmarks are not tests: nothing here looks at how fast anything was, only that the
scenarios run end to end (including the service child process) and report figures.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from relaybus import benchmark
from relaybus.benchmark import SCENARIOS, Figure, make_events, run_bench


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, color_system=None), out


def test_scenarios_are_named_and_described() -> None:
    names = [s.name for s in SCENARIOS]
    assert len(names) == len(set(names))
    assert set(names) == set(benchmark._RUNNERS)
    assert all(s.description and "\n" not in s.description for s in SCENARIOS)


def test_events_have_the_payload_size_asked_for() -> None:
    for size in (512, 2048):
        ev = make_events(2, size)
        assert all(benchmark._payload_size(e) == size for e in ev)
        assert ev[0].event_id != ev[1].event_id
    assert 200 <= benchmark._payload_size(make_events(1)[0]) <= 260  # unpadded


def test_figure_target_and_format() -> None:
    fig = Figure("s", "f", "events/s", [1.0, 3.0, 2.0], target=">= 2")
    assert fig.median == 2.0 and fig.meets() is True
    assert Figure("s", "f", "ms", [4.0], target="<= 3").meets() is False
    assert Figure("s", "f", "ms", [4.0]).meets() is None
    assert benchmark.fmt(12_345.6) == "12,346" and benchmark.fmt(0) == "0"


def test_quick_run_prints_the_table_and_writes_json(redis_url: str, tmp_path: Path) -> None:
    console, out = _console()
    json_file = tmp_path / "bench.json"
    status = run_bench(["publish", "consume"], url=redis_url, quick=True,
                       json_file=str(json_file), console=console, rounds=1)
    text = out.getvalue()
    assert status == 0, text
    assert "publish_many, batches of 100" in text and "concurrency 1" in text
    doc = json.loads(json_file.read_text())
    assert doc["errors"] == {} and doc["rounds"] == 1 and doc["quick"] is True
    assert {f["scenario"] for f in doc["figures"]} == {"publish", "consume"}
    for fig in doc["figures"]:
        assert len(fig["values"]) == 1 and fig["median"] > 0, fig
    assert doc["environment"]["server"]


def test_default_server_is_private_and_stopped(tmp_path: Path) -> None:
    console, out = _console()
    assert run_bench(["memory"], quick=True, console=console, rounds=1) == 0, out.getvalue()
    assert "embedded (private, temporary)" in out.getvalue()
    assert "entries left in the subscription stream" in out.getvalue()


def test_unknown_scenario_is_a_usage_error() -> None:
    console, out = _console()
    assert run_bench(["nope"], url="redis://127.0.0.1:1/0", quick=True, console=console) == 2
    assert "unknown scenario nope" in out.getvalue()
