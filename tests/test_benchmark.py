"""Smoke tests of ``relaybus bench`` (relaybus._bench): it runs, prints, writes JSON.

Benchmarks are not tests: nothing here looks at how fast anything was, only that the
scenarios run end to end (including the service child process, both fronts) and
report figures.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from relaybus._bench import (
    RUNNERS,
    SCENARIOS,
    Figure,
    ServiceProcess,
    fmt,
    make_events,
    payload_size,
    render_table,
    run_bench,
    temp_prefix,
)
from relaybus._bench.scenarios import preload


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, color_system=None), out


def test_scenarios_are_named_and_described() -> None:
    names = [s.name for s in SCENARIOS]
    assert len(names) == len(set(names))
    assert set(names) == set(RUNNERS)
    assert "route" not in names and {"fanout", "consume", "idle"} <= set(names)
    assert all(s.description and "\n" not in s.description for s in SCENARIOS)


def test_events_have_the_payload_size_asked_for() -> None:
    for size in (512, 2048):
        ev = make_events(2, size)
        assert all(payload_size(e) == size for e in ev)
        assert ev[0].event_id != ev[1].event_id
    assert 200 <= payload_size(make_events(1)[0]) <= 290  # unpadded


def test_figure_median_and_format() -> None:
    fig = Figure("s", "f", "events/s", [1.0, 3.0, 2.0])
    assert fig.median == 2.0 and fig.as_dict()["min"] == 1.0
    assert fmt(12_345.6) == "12,346" and fmt(0) == "0"


def test_the_table_shows_figures_not_targets() -> None:
    console, out = _console()
    console.print(render_table([Figure("consume", "sync", "events/s", [20_000.0])]))
    text = out.getvalue()
    assert "20,000" in text and "target" not in text and "miss" not in text


def test_child_runs_several_services_of_either_front(redis_url: str) -> None:
    """Both fronts, three services in one child: each gets every event once."""
    with ServiceProcess(redis_url) as child:
        for front in ("sync", "async"):
            with temp_prefix(redis_url) as p:
                names = [f"svc{i}" for i in range(3)]
                child.request("start", front=front, prefix=p, services=names)
                child.request("expect", n=50, timeout=30)
                preload(redis_url, p, "other", make_events(50))  # publishes 50
                res = child.recv(40)
                assert res["handled"] == [50, 50, 50], (front, res)
                child.request("close")


def test_quick_run_prints_the_table_and_writes_json(redis_url: str, tmp_path: Path) -> None:
    console, out = _console()
    json_file = tmp_path / "bench.json"
    status = run_bench(["publish", "consume", "fanout"], url=redis_url, quick=True,
                       json_file=str(json_file), console=console, rounds=1)
    text = out.getvalue()
    assert status == 0, text
    assert "publish_many, batches of 100" in text and "async, concurrency 1" in text
    assert "to 3 services: async ÷ sync" in text
    doc = json.loads(json_file.read_text())
    assert doc["errors"] == {} and doc["rounds"] == 1 and doc["quick"] is True
    assert {f["scenario"] for f in doc["figures"]} == {"publish", "consume", "fanout"}
    for fig in doc["figures"]:
        assert len(fig["values"]) == 1 and fig["median"] > 0, fig
    assert doc["environment"]["server"]


def test_idle_counts_commands_in_the_children(redis_url: str, tmp_path: Path) -> None:
    console, out = _console()
    json_file = tmp_path / "idle.json"
    assert run_bench(["idle"], url=redis_url, quick=True, json_file=str(json_file),
                     console=console, rounds=1) == 0, out.getvalue()
    figures = {f["figure"]: f for f in json.loads(json_file.read_text())["figures"]}
    for front in ("sync", "async"):
        # an idle service waits on the server: it sends something every period
        assert figures[f"{front}: commands sent"]["median"] > 0, figures
        assert figures[f"{front}: CPU"]["median"] >= 0


def test_default_server_is_private_and_stopped() -> None:
    console, out = _console()
    assert run_bench(["memory"], quick=True, console=console, rounds=1) == 0, out.getvalue()
    assert "embedded (private, temporary)" in out.getvalue()
    assert "log entries still pending for the subscription" in out.getvalue()


def test_unknown_scenario_is_a_usage_error() -> None:
    console, out = _console()
    assert run_bench(["nope"], url="redis://127.0.0.1:1/0", quick=True, console=console) == 2
    assert "unknown scenario nope" in out.getvalue()


def test_partitions_scenario_compares_one_and_six(redis_url: str, tmp_path: Path) -> None:
    console, out = _console()
    json_file = tmp_path / "partitions.json"
    assert run_bench(["partitions"], url=redis_url, quick=True, json_file=str(json_file),
                     console=console, rounds=1) == 0, out.getvalue()
    figures = {(f["figure"], f["unit"]): f["median"]
               for f in json.loads(json_file.read_text())["figures"]}
    for n in ("1 partition", "6 partitions"):
        assert figures[f"{n}: publish_many 100", "events/s"] > 0
        assert figures[f"{n}: consume, sync", "events/s"] > 0
        assert figures[f"{n}: one batch's publish", "round trips"] == 1  # a step is one exchange
