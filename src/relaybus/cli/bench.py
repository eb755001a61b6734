"""``relaybus bench``: measure relaybus on a server (see docs/benchmarks.md)."""

from __future__ import annotations

from typing import Annotated

import typer

from ._common import guarded


@guarded
def bench(
    scenarios: Annotated[list[str] | None, typer.Argument(
        metavar="[SCENARIO]...", show_default=False,
        help="Scenarios to run (default: all): publish, consume, fanout, e2e, latency, "
             "payload, memory, idle, partitions.")] = None,
    url: Annotated[str | None, typer.Option(
        "--url", show_default=False,
        help="Server to measure (default: a private embedded server, so nothing else "
             "loads it).")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick/--no-quick", help="Small counts and two rounds: under a minute (CI smoke run).")] = False,
    json_file: Annotated[str | None, typer.Option(
        "--json", metavar="FILE", help="Also write every figure to FILE as JSON.")] = None,
) -> None:
    """Run the benchmark scenarios and print median and min-max per figure."""
    from .._bench import run_bench  # imported late: it pulls in the services

    raise typer.Exit(run_bench(scenarios or None, url=url, quick=quick, json_file=json_file))
