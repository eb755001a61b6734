"""Fixtures of the fault suite: scale, a private server, the processes, the results table.

``RELAYBUS_FAULTS_SCALE``: ``ci`` (default: about a tenth of the issue's counts, some
scenarios smaller still and shorter, the whole suite in about 1.5 minutes on two
cores), ``full`` (the issue's counts), or a factor such as ``0.5``.
``RELAYBUS_FAULTS_REPORT=path.md`` also writes the table there.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from faults.harness import Cluster, Server
from faults.ledger import Report, markdown_table

_RESULTS: list[Report] = []


@dataclass(frozen=True)
class Scale:
    """How big the scenarios are: ``n(full_count)`` scales a count of the issue."""

    name: str
    factor: float

    @property
    def full(self) -> bool:
        return self.factor >= 1.0

    def n(self, count: int, minimum: int = 1, ci: int | None = None) -> int:
        """``count`` scaled; ``ci``, when given, is the count at CI scale instead of a
        tenth (other factors below 1 scale it alike)."""
        if ci is not None and not self.full:
            return max(minimum, int(ci * self.factor / 0.1))
        return max(minimum, int(count * self.factor))


def _scale() -> Scale:
    raw = os.environ.get("RELAYBUS_FAULTS_SCALE", "ci").strip().lower()
    if raw in ("", "ci"):
        return Scale("ci", 0.1)
    if raw == "full":
        return Scale("full", 1.0)
    try:
        return Scale(raw, float(raw))
    except ValueError:
        raise pytest.UsageError(f"RELAYBUS_FAULTS_SCALE={raw!r}: use ci, full or a number") \
            from None


@pytest.fixture(scope="session")
def scale() -> Scale:
    return _scale()


@pytest.fixture
def rng() -> random.Random:
    """The scenario's random source; its seed is printed (rerun with RELAYBUS_FAULTS_SEED)."""
    seed = int(os.environ.get("RELAYBUS_FAULTS_SEED") or random.randrange(1 << 30))
    print(f"RELAYBUS_FAULTS_SEED={seed}")
    return random.Random(seed)


@pytest.fixture
def server_args() -> list[str]:
    """Extra server options; a scenario overrides this fixture to change them."""
    return []


@pytest.fixture
def server(tmp_path: Path, server_args: list[str]) -> Iterator[Server]:
    srv = Server(tmp_path / "server", *server_args)
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def cluster(tmp_path: Path, server: Server, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(tmp_path, server)
    try:
        yield c
    finally:
        c.close()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(c.logs())  # shown with the failure


@pytest.fixture
def record() -> Iterator[list[Report]]:
    """Reports appended here end up in the summary table."""
    reports: list[Report] = []
    yield reports
    for r in reports:
        print(r.line())
    _RESULTS.extend(reports)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[None]:
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _RESULTS:
        return
    table = markdown_table(_RESULTS)
    terminalreporter.section(f"fault scenarios (scale {_scale().name})")
    terminalreporter.write(table)
    target = os.environ.get("RELAYBUS_FAULTS_REPORT")
    if target:
        Path(target).write_text(table)
