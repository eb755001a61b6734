"""A service started before its broker: it says once what it waits for and keeps trying.

Every test talks to real servers: the session's (behind :class:`helpers_service.Proxy`,
which can refuse connections and then let them through on the same port), a port
nobody listens on, and a port that accepts connections and drops them at once (a
broker that is not ready yet). No broker is mocked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from helpers_service import Ping, Proxy
from relaybus import (
    AsyncMicroservice,
    BrokerAuthenticationError,
    BrokerUnavailableError,
    ConfigurationError,
    EventBus,
    Microservice,
)
from relaybus._core.service import DEFAULT_START_TIMEOUT
from relaybus.connection import redact
from waiting import wait_for

SECRET = "s3cret-start-pw"


@pytest.fixture
def closed_port() -> int:
    """A local port nobody listens on: connections are refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # really nobody there
    return port


class Dropper:
    """Listens on ``port`` and closes every connection at once, counting them: a broker
    that accepts connections but is not ready (what a service sees while it retries)."""

    def __init__(self, port: int) -> None:
        self.accepted = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name="test-dropper")
        self._thread.start()

    def _loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def proxy(redis_url: str) -> Iterator[Proxy]:
    """A proxy to the session's server that refuses connections until ``restore()``."""
    p = Proxy(redis_url)
    p.cut()
    yield p
    p.close()


@pytest.fixture
def bus(redis_url: str, prefix: str) -> Iterator[EventBus]:
    b = EventBus(redis_url, prefix=prefix)
    yield b
    b.close()


def waiting_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("relaybus.") and "waiting for the broker" in r.getMessage()]


def started_lines(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith(f"service {name} started on ")]


def assert_redacted(line: str, url: str) -> None:
    assert f"at {redact(url)} " in line, line
    password = urlparse(url).password
    if password:  # the session's embedded server has one; it never shows
        assert password not in line and ":***@" in line, line


def bring_up(proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    """Refused until the waiting line shows, then dropped (the service keeps trying,
    silently), then the real server."""
    wait_for(lambda: waiting_lines(caplog), what="the waiting line")
    proxy_port = proxy.port
    dropper = Dropper(proxy_port)
    try:
        wait_for(lambda: dropper.accepted >= 3, what="the service to keep trying")
    finally:
        dropper.close()
    proxy.restore()
    assert proxy.port == proxy_port


def _options(prefix: str) -> dict[str, Any]:
    return dict(prefix=prefix, maintenance=False, block_for_seconds=0.2)


# -- the sync front -------------------------------------------------------------------


def test_a_sync_service_waits_for_its_broker_then_starts_and_handles(
        proxy: Proxy, bus: EventBus, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relaybus")
    svc = Microservice("waiter", url=proxy.url, **_options(prefix))
    seen: list[int] = []
    svc.on(Ping)(lambda e: seen.append(e.n))
    runner = threading.Thread(target=svc.run_forever, daemon=True)  # waits for ever
    runner.start()
    try:
        bring_up(proxy, caplog)
        wait_for(lambda: svc.running, what="the service to start")
        bus.publish(Ping(n=7))
        wait_for(lambda: seen == [7], what="the event handled")
        [line] = waiting_lines(caplog)  # said once, however many attempts
        assert line.startswith("service waiter: waiting for the broker at ")
        assert line.endswith("retrying until it answers")
        assert_redacted(line, proxy.url)
        assert len(started_lines(caplog, "waiter")) == 1
    finally:
        svc.stop()
        runner.join(10)
        svc.close()
    assert not runner.is_alive()


def test_a_sync_start_timeout_gives_up_naming_the_redacted_url(
        closed_port: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relaybus")
    url = f"redis://:{SECRET}@127.0.0.1:{closed_port}/0"
    svc = Microservice("gives-up", url=url, maintenance=False)
    svc.on(Ping)(lambda e: None)
    started = time.monotonic()
    try:
        with pytest.raises(BrokerUnavailableError) as info:
            svc.start(start_timeout=0.5)
        elapsed = time.monotonic() - started
        assert 0.5 <= elapsed < 3.0, elapsed
        message = str(info.value)
        assert f"broker at redis://:***@127.0.0.1:{closed_port}/0 is unavailable after " \
               "waiting" in message, message
        assert SECRET not in message
        assert info.value.url == f"redis://:***@127.0.0.1:{closed_port}/0"
        assert info.value.address == f"127.0.0.1:{closed_port}"
        assert info.value.waited is not None and info.value.waited >= 0.5
        [line] = waiting_lines(caplog)
        assert line.endswith("retrying for up to 0.5s") and SECRET not in line
        assert not svc.running
    finally:
        svc.close()
    assert SECRET not in caplog.text


def test_run_forever_gives_its_timeout_to_an_overridden_start(
        closed_port: int, caplog: pytest.LogCaptureFixture) -> None:
    """A subclass's ``start()`` without parameters, calling ``super().start()``."""
    caplog.set_level(logging.INFO, logger="relaybus")
    calls: list[str] = []

    class Service(Microservice):
        def start(self) -> None:  # type: ignore[override]
            calls.append("start")
            super().start()

    svc = Service("overridden", url=f"redis://127.0.0.1:{closed_port}/0", maintenance=False)
    svc.on(Ping)(lambda e: None)
    started = time.monotonic()
    try:
        with pytest.raises(BrokerUnavailableError, match="after waiting"):
            svc.run_forever(start_timeout=0.5)
    finally:
        svc.close()
    assert 0.5 <= time.monotonic() - started < 3.0
    assert calls == ["start"]
    [line] = waiting_lines(caplog)
    assert line.endswith("retrying for up to 0.5s")


def test_plain_start_waits_ten_seconds_by_default_and_checks_the_bound() -> None:
    assert DEFAULT_START_TIMEOUT == 10.0
    svc = Microservice("bounded", url="redis://127.0.0.1:1/0")
    svc.on(Ping)(lambda e: None)
    for bad in (-1, "5", True):
        with pytest.raises(ConfigurationError, match="start_timeout"):
            svc.start(start_timeout=bad)  # type: ignore[arg-type]
    svc.close()


def test_a_stop_ends_the_wait_of_run_forever(closed_port: int,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relaybus")
    svc = Microservice("stopped-waiting", url=f"redis://127.0.0.1:{closed_port}/0",
                       maintenance=False)
    svc.on(Ping)(lambda e: None)
    runner = threading.Thread(target=svc.run_forever, daemon=True)
    runner.start()
    try:
        wait_for(lambda: waiting_lines(caplog), what="the waiting line")
        svc.stop()  # from another thread, while start() waits
        runner.join(10)
        assert not runner.is_alive() and not svc.running
        assert any("stop requested while waiting for the broker" in r.getMessage()
                   for r in caplog.records)
    finally:
        svc.close()


@pytest.mark.single_server
def test_refused_credentials_and_a_missing_database_fail_at_once(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Not outages: no waiting, even with no bound."""
    caplog.set_level(logging.INFO, logger="relaybus")
    parsed = urlparse(redis_url)
    host, port = parsed.hostname, parsed.port
    auth = f":{parsed.password}@" if parsed.password else ""
    cases: list[tuple[str, type[Exception]]] = [
        (f"redis://{auth}{host}:{port}/999", ConfigurationError)]
    if parsed.password:  # the embedded server asks for one
        cases.append((f"redis://:wrong-{SECRET}@{host}:{port}/0", BrokerAuthenticationError))
    for url, error in cases:
        svc = Microservice("refused", url=url, maintenance=False)
        svc.on(Ping)(lambda e: None)
        started = time.monotonic()
        try:
            with pytest.raises(error):
                svc.start(start_timeout=None)
        finally:
            svc.close()
        assert time.monotonic() - started < 3.0
    assert waiting_lines(caplog) == []


# -- the asyncio front ----------------------------------------------------------------


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[BaseException]]:
    failed: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: B036 - handed to the test thread
            failed.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, failed


def test_an_async_service_waits_for_its_broker_then_starts_and_handles(
        proxy: Proxy, bus: EventBus, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relaybus")
    svc = AsyncMicroservice("async-waiter", url=proxy.url, **_options(prefix))
    seen: list[int] = []

    @svc.on(Ping)
    async def handle(event: Ping) -> None:
        seen.append(event.n)

    runner, failed = _in_thread(lambda: asyncio.run(svc.run(install_signals=False)))
    try:
        bring_up(proxy, caplog)
        wait_for(lambda: svc.running, what="the service to start")
        bus.publish(Ping(n=8))
        wait_for(lambda: seen == [8], what="the event handled")
        [line] = waiting_lines(caplog)
        assert line.startswith("service async-waiter: waiting for the broker at ")
        assert line.endswith("retrying until it answers")
        assert_redacted(line, proxy.url)
        assert len(started_lines(caplog, "async-waiter")) == 1
    finally:
        svc.request_stop()
        runner.join(10)
    assert not runner.is_alive() and failed == []


def test_an_async_start_timeout_gives_up_naming_the_redacted_url(
        closed_port: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relaybus")
    url = f"redis://:{SECRET}@127.0.0.1:{closed_port}/0"

    class Service(AsyncMicroservice):  # an override, as in tests/faults/procs.py
        async def start(self) -> None:  # type: ignore[override]
            await super().start()

    svc = Service("async-gives-up", url=url, maintenance=False)
    svc.on(Ping)(lambda e: None)

    async def main() -> None:
        await svc.run(install_signals=False, start_timeout=0.5)

    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError) as info:
        asyncio.run(asyncio.wait_for(main(), 10))
    assert 0.5 <= time.monotonic() - started < 3.0
    assert f"broker at redis://:***@127.0.0.1:{closed_port}/0 is unavailable after " \
           "waiting" in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in caplog.text
    [line] = waiting_lines(caplog)
    assert line.endswith("retrying for up to 0.5s")


def test_a_stop_ends_the_wait_of_an_async_run(closed_port: int,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relaybus")
    svc = AsyncMicroservice("async-stopped-waiting", url=f"redis://127.0.0.1:{closed_port}/0",
                            maintenance=False)
    svc.on(Ping)(lambda e: None)
    runner, failed = _in_thread(lambda: asyncio.run(svc.run(install_signals=False)))
    wait_for(lambda: waiting_lines(caplog), what="the waiting line")
    svc.request_stop()
    runner.join(10)
    assert not runner.is_alive() and failed == [] and not svc.running
    assert any("stop requested while waiting for the broker" in r.getMessage()
               for r in caplog.records)


# -- relaybus run ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Microservice", "AsyncMicroservice"])
def test_relaybus_run_timeout_exits_1_naming_the_redacted_url(
        tmp_path: Path, closed_port: int, kind: str) -> None:
    url = f"redis://:{SECRET}@127.0.0.1:{closed_port}/0"
    (tmp_path / "deadbroker.py").write_text(textwrap.dedent(f'''
        from relaybus import {kind}
        svc = {kind}("dead-broker", url={url!r}, maintenance=False)
        svc.on("test.service.ping")(print)
    '''))
    env = {k: v for k, v in os.environ.items() if k != "RELAYBUS_URL"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "relaybus", "run", "deadbroker:svc",
                           "--timeout", "1"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=30, check=False)
    assert time.monotonic() - started < 15
    assert proc.returncode == 1, proc.stderr
    redacted = f"redis://:***@127.0.0.1:{closed_port}/0"
    waiting = [line for line in proc.stderr.splitlines() if "waiting for the broker" in line]
    assert len(waiting) == 1 and redacted in waiting[0], proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot reach the broker at {redacted} "
                           f"(127.0.0.1:{closed_port}) after waiting "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert SECRET not in proc.stderr + proc.stdout


@pytest.mark.parametrize("kind", ["Microservice", "AsyncMicroservice"])
def test_relaybus_run_waits_until_sigterm_and_then_exits_0(
        tmp_path: Path, closed_port: int, kind: str) -> None:
    """A container stopped before its broker came up: the wait ends at SIGTERM."""
    (tmp_path / "waitingbroker.py").write_text(textwrap.dedent(f'''
        from relaybus import {kind}
        svc = {kind}("waits", url="redis://127.0.0.1:{closed_port}/0", maintenance=False)
        svc.on("test.service.ping")(print)
    '''))
    env = {k: v for k, v in os.environ.items() if k != "RELAYBUS_URL"}
    child = subprocess.Popen([sys.executable, "-m", "relaybus", "run", "waitingbroker:svc"],
                             cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stderr is not None
        logged = [child.stderr.readline()]
        while "waiting for the broker" not in logged[-1]:
            assert logged[-1], "".join(logged)
            logged.append(child.stderr.readline())
        assert logged[-1].rstrip().endswith("retrying until it answers")
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=20)
        err = "".join(logged) + err
        assert child.returncode == 0, err
        assert "stop requested while waiting for the broker" in err
        assert "stopped on SIGTERM" in err and "started on" not in err
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
