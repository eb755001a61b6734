"""The order-flow demo end to end, in one process and one process per service."""

from __future__ import annotations

import glob
import io
import os
import re
import tempfile

import pytest
from rich.console import Console

from relaybus import EventBus
from relaybus.demo import DEMO_PREFIX, run_demo
from relaybus.demo.services import DECLINE_RATE, _rng
from relaybus.testing import delete_prefix


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=120, force_terminal=False), out


@pytest.mark.parametrize("processes", [False, True], ids=["one-process", "processes"])
def test_demo_settles_every_order(redis_url: str, prefix: str, processes: bool) -> None:
    console, out = _console()
    code = run_demo(url=redis_url, orders=12, seed=3, processes=processes, timeout=60,
                    console=console, prefix=prefix)
    text = out.getvalue()
    assert code == 0, text
    assert "12 orders:" in text
    # the seeded generator declines the same orders, whoever handles them and when
    declined = sum(_rng(3, "payment", f"ORD-{i:04d}").random() < DECLINE_RATE
                   for i in range(1, 13))
    assert f"{12 - declined} shipped, {declined} payment failed" in text
    assert text.count("ORD-00") == 12


def test_demo_reports_stuck_orders_and_fails_on_timeout(redis_url: str, prefix: str) -> None:
    console, out = _console()
    code = run_demo(url=redis_url, orders=3, seed=7, timeout=0.0, console=console, prefix=prefix)
    assert code == 1
    assert "not finished" in out.getvalue()


def test_default_demo_leaves_no_server_and_no_files(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: os.PathLike[str]) -> None:
    monkeypatch.chdir(tmp_path)
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "relaybus-demo-*")))
    console, out = _console()
    assert run_demo(orders=3, console=console) == 0, out.getvalue()
    after = set(glob.glob(os.path.join(tempfile.gettempdir(), "relaybus-demo-*")))
    assert after == before
    assert os.listdir(tmp_path) == []


def test_the_demo_keeps_to_its_own_prefix_and_counts_its_own_run(redis_url: str) -> None:
    """Run twice on one server (as after ``--keep``): the second run's summary counts
    only its own dead letters, and an application's subscription of the same name under
    the default prefix is left as it was."""
    assert DEMO_PREFIX == "demo:"
    app_prefix = "events:"
    try:
        with EventBus(redis_url, prefix=app_prefix) as app:
            app.subscribe("notification", ["app.Something"])
            before = app.subscriptions()
            bounced = []
            for _ in range(2):
                console, out = _console()
                assert run_demo(url=redis_url, orders=30, seed=5, console=console) == 0, \
                    out.getvalue()
                found = re.search(r"(\d+) bounced", out.getvalue())
                assert found is not None, out.getvalue()
                bounced.append(int(found.group(1)))
            assert bounced[0] > 0 and bounced[1] == bounced[0]  # same seed, same bounces
            assert app.subscriptions() == before
    finally:
        delete_prefix(redis_url, app_prefix)
        delete_prefix(redis_url, DEMO_PREFIX)
