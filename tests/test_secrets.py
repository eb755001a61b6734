"""Passwords never show: not in a ``repr``, an error, a log line, CLI output or a child
process's command line (#11 item 9).

Every test here is built from a URL that holds a password (the test server's own, or a
wrong one) and looks for that password in what relaybus shows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from typer.testing import CliRunner

from helpers_service import Ping, Proxy
from relaybus import (
    AsyncEventBus,
    AsyncMessageQueue,
    AsyncMicroservice,
    BrokerAuthenticationError,
    BrokerUnavailableError,
    ConfigurationError,
    EmbeddedServer,
    EventBus,
    MessageQueue,
    Microservice,
)
from relaybus._bench.child import ServiceProcess
from relaybus.cli import app
from relaybus.connection import ConnectionSettings, redact, scrub
from relaybus.embedded import ServerState
from waiting import wait_for

#: A password no server here takes: a command given it must never print it.
WRONG = "wr0ng-Pa55-x7Qz"
SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = str(Path(__file__).resolve().parent)


@pytest.fixture
def password(redis_url: str) -> str:
    """The test server's password (the embedded one always has one)."""
    found = urlparse(redis_url).password
    if not found:
        pytest.skip("the test server has no password")
    return found


@pytest.fixture
def wrong_url(redis_url: str, password: str) -> str:
    """The test server's URL with the wrong password."""
    return redis_url.replace(f":{password}@", f":{WRONG}@", 1)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def shown(exc: BaseException) -> str:
    """Everything a traceback of ``exc`` shows: its chain of causes and their messages."""
    return "".join(traceback.format_exception(exc)) + repr(exc)


def assert_hidden(secret: str, *texts: str) -> None:
    for text in texts:
        assert secret not in text, text


# -- redact ------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "redis://:S3cr-et@h:1/0",
    "redis://user:S3cr-et@h:1/0",
    "rediss://user:S3cr-et@h:6380/0?ssl_cert_reqs=none",
    "unix://:S3cr-et@/tmp/redis.sock?db=1",
    "redis://h:1/0?password=S3cr-et",
    "redis://h:1/0?db=2&password=S3cr-et&client_name=x",
    "rediss://h/0?ssl_password=S3cr-et",
    "redis://:S3cr%2Fet@h:1/0",       # percent-encoded
    "redis://:S3c#r-et@h:1/0",        # unencoded: urlsplit sees a port "S3c"
    "redis://:S3c/r-et@h:1/0",        # unencoded: urlsplit sees a path
    "redis://:S3c?r-et@h:1/0",        # unencoded: urlsplit sees a query
    "redis://:S3c@r-et@h:1/0",
    "redis://:S3cr-et@[::1/0",        # a malformed host: urlsplit raises
    "http://:S3cr-et@h/0",
], ids=["netloc", "user", "tls", "unix", "query", "query-middle", "ssl-query", "encoded",
        "hash", "slash", "question-mark", "at-sign", "bad-host", "other-scheme"])
def test_redact_hides_every_form_of_password(url: str) -> None:
    out = redact(url)
    assert "***" in out
    for piece in ("S3cr-et", "S3cr%2Fet", "S3c", "r-et"):
        assert piece not in out, out
    assert redact(out) == out  # redacting twice changes nothing


def test_redact_keeps_what_is_not_a_password() -> None:
    assert redact("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact("redis://user:pw@h:1/0?db=2") == "redis://user:***@h:1/0?db=2"
    for url in ("redis://h:1/0", "redis://user@h:1/0", "rediss://h:6380/0?ssl_cert_reqs=none",
                "unix:///tmp/a@b/redis.sock?db=1", "embedded", "embedded:///tmp/x", "client"):
        assert redact(url) == url


def test_scrub_hides_the_pieces_a_parser_quotes() -> None:
    url = "redis://:wrong#S3cret@h:1/0"
    assert scrub("Port could not be cast to integer value as 'wrong'", url) == (
        "Port could not be cast to integer value as '***'")
    assert scrub("Error 111 connecting to h:1.", url) == "Error 111 connecting to h:1."


# -- reprs ----------------------------------------------------------------------------------


@pytest.mark.single_server
def test_no_repr_shows_the_password(redis_url: str, password: str, prefix: str) -> None:
    mq = MessageQueue(redis_url, prefix=prefix, retry_timeout=5)
    bus = EventBus(redis_url, prefix=prefix, retry_timeout=5)
    svc = Microservice("secrets", url=redis_url, prefix=prefix, maintenance=False)
    amq = AsyncMessageQueue(redis_url, prefix=prefix)
    abus = AsyncEventBus(redis_url, prefix=prefix)
    asvc = AsyncMicroservice("secrets", url=redis_url, prefix=prefix, maintenance=False)
    parsed = urlparse(redis_url)
    seed = EventBus(parsed.hostname, parsed.port or 6379, int(parsed.path.strip("/") or 0),
                    prefix, redis_password=password, retry_timeout=5)  # the seed's form
    try:
        queue, dlq = mq.create_queue_pair("secrets")
        objects: list[Any] = [
            mq, bus, bus.mq, seed, svc, svc.event_bus, queue, dlq, amq, abus, abus.mq, asvc,
            asvc.event_bus, ConnectionSettings(redis_url),
            ConnectionSettings.from_options(redis_url), mq.driver.runner,
            ServerState(1, 2, "/d", "/bin/valkey-server", password),
            EmbeddedServer("/tmp/relaybus-secrets-never-started"),
        ]
        for obj in objects:
            assert_hidden(password, repr(obj), str(obj))
        assert "***" in repr(mq) and "***" in repr(bus) and "***" in repr(abus)
        assert "***" in repr(ConnectionSettings(redis_url))
    finally:
        for closable in (mq, bus, svc, seed):
            closable.close()
        asyncio.run(_close_async(amq, abus, asvc))


async def _close_async(*objects: Any) -> None:
    for obj in objects:
        await obj.close()


# -- errors and log lines -------------------------------------------------------------------


def test_a_refused_password_shows_in_no_error_and_no_log_line(
        wrong_url: str, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # relaybus's loggers and redis-py's
    with MessageQueue(wrong_url, prefix=prefix, retry_timeout=2) as mq, \
            pytest.raises(BrokerAuthenticationError) as info:
        mq.create_queue_pair("secrets")
    with pytest.raises(BrokerAuthenticationError) as on_bus:
        EventBus(wrong_url, prefix=prefix, retry_timeout=2)
    assert "refused the credentials" in str(info.value)
    assert_hidden(WRONG, shown(info.value), shown(on_bus.value), caplog.text)


def test_an_unreachable_server_shows_its_url_redacted(
        password: str, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    port = closed_port()
    for url in (f"redis://:{password}@127.0.0.1:{port}/0",
                f"redis://127.0.0.1:{port}/0?password={password}"):
        with MessageQueue(url, prefix=prefix, retry_timeout=0.2) as mq, \
                pytest.raises(BrokerUnavailableError) as info:
            mq.create_queue_pair("secrets")
        assert f"127.0.0.1:{port}" in str(info.value)
        assert_hidden(password, shown(info.value))
    assert_hidden(password, caplog.text)


@pytest.mark.single_server
def test_a_missing_database_names_the_url_redacted(redis_url: str, password: str,
                                                   prefix: str) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/99"
    with MessageQueue(url, prefix=prefix, retry_timeout=2) as mq, \
            pytest.raises(ConfigurationError) as info:
        mq.create_queue_pair("secrets")
    assert "no such database" in str(info.value) and redact(url) in str(info.value)
    assert_hidden(password, shown(info.value))


@pytest.mark.parametrize("url", [
    "http://:S3cret-pw@h/0",
    "redis://:S3cret-pw@h/abc",
    "redis://:S3cr#et-pw@127.0.0.1:1/0",   # redis-py: "Port could not be cast ... 'S3cr'"
    "redis://:S3cr/et-pw@127.0.0.1:1/0",   # the path holds half the password
    "redis://:S3cret-pw@[::1/0",           # urlparse: "Invalid IPv6 URL"
], ids=["scheme", "database", "hash", "slash", "ipv6"])
def test_a_bad_url_is_a_configuration_error_without_its_password(url: str) -> None:
    for make in (MessageQueue, AsyncMessageQueue, AsyncEventBus):
        with pytest.raises(ConfigurationError) as info:
            make(url)
        assert "***" in str(info.value)
        assert_hidden("S3cr", shown(info.value))
        assert_hidden("et-pw", shown(info.value))


def test_an_outage_logs_no_password(redis_url: str, password: str, prefix: str,
                                    caplog: pytest.LogCaptureFixture) -> None:
    """A service through a proxy that is cut and restored: its start line, the outage and
    the recovery are logged with the URL redacted, and so is a publish that gives up."""
    caplog.set_level(logging.DEBUG)
    proxy = Proxy(redis_url)
    assert password in proxy.url
    svc = Microservice("secrets", url=proxy.url, prefix=prefix, maintenance=False,
                       block_for_seconds=0.2, retry_timeout=0.2)
    seen: list[int] = []
    svc.on(Ping)(lambda e: seen.append(e.n))
    bus = EventBus(proxy.url, prefix=prefix, retry_timeout=0.2)
    try:
        svc.start()
        bus.publish(Ping(n=1))
        wait_for(lambda: seen == [1], what="the first event")
        proxy.cut()
        wait_for(lambda: "broker unavailable" in caplog.text, what="the outage's log line")
        with pytest.raises(BrokerUnavailableError) as info:
            bus.publish(Ping(n=2))
        proxy.restore()
        wait_for(lambda: "broker is back" in caplog.text, what="the recovery's log line")
    finally:
        svc.close()
        bus.close()
        proxy.close()
    assert redact(proxy.url) in caplog.text  # the start line names the server, redacted
    assert_hidden(password, caplog.text, shown(info.value))


def test_an_async_service_logs_no_password(redis_url: str, password: str, prefix: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        svc = AsyncMicroservice("secrets", url=redis_url, prefix=prefix, maintenance=False,
                                block_for_seconds=0.2)
        svc.on(Ping)(lambda e: None)
        await svc.start()
        await svc.stop()
        await svc.close()

    asyncio.run(main())
    assert redact(redis_url) in caplog.text
    assert_hidden(password, caplog.text)


# -- CLI output -------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["queues"], ["queues", "--json"], ["subscriptions"], ["dlq", "list", "orders"],
    ["dlq", "show", "orders", "1-0"], ["publish", "t.x", "{}"], ["maintain"], ["tail"],
    ["top"],
], ids=lambda a: "-".join(a))
def test_no_command_prints_a_refused_password(wrong_url: str, prefix: str,
                                              args: list[str]) -> None:
    result = CliRunner().invoke(app, [*args, "--url", wrong_url, "--prefix", prefix,
                                      "--timeout", "2"])
    assert result.exit_code == 1, result.output
    assert "refused the credentials" in result.stderr
    assert_hidden(WRONG, result.output)


def test_no_command_prints_the_password_of_a_url_it_cannot_use(password: str) -> None:
    port = closed_port()
    for url, code in ((f"redis://:{password}@127.0.0.1:{port}/0", 1),
                      (f"redis://127.0.0.1:{port}/0?password={password}", 1),
                      (f"http://:{password}@127.0.0.1:{port}/0", 2),
                      (f"redis://:{password}@127.0.0.1:{port}/x", 2)):
        result = CliRunner().invoke(app, ["queues", "--url", url, "--timeout", "0.2"])
        assert result.exit_code == code, result.output
        assert "***" in result.stderr
        assert_hidden(password, result.output)


def test_the_embedded_server_commands_print_no_password(tmp_path: Path) -> None:
    data = str(tmp_path / "srv")
    try:
        outputs = [CliRunner().invoke(app, ["server", *args, "--data-dir", data])
                   for args in (["start"], ["start", "--json"], ["status"],
                                ["status", "--json"])]
        state = EmbeddedServer(data).status()
        assert state is not None and state.password
        for result in outputs:
            assert result.exit_code == 0, result.output
            assert "***" in result.output
            assert_hidden(state.password, result.output)
    finally:
        CliRunner().invoke(app, ["server", "stop", "--data-dir", data])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYBUS_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, TESTS, env.get("PYTHONPATH")) if p)
    return {**env, **extra}


def test_relaybus_run_logs_no_password(redis_url: str, password: str, wrong_url: str,
                                       prefix: str) -> None:
    """``relaybus run`` given the URL in RELAYBUS_URL (not on its command line): its log
    names the server redacted; with a wrong password it fails without printing it."""
    env = _env(RELAYBUS_URL=redis_url, SVC_URL=redis_url, SVC_PREFIX=prefix,
               SVC_NAME="secrets-" + uuid.uuid4().hex[:6])
    cmd = [sys.executable, "-m", "relaybus", "run", "helpers_service:make_blocking_service"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=TESTS)
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        for line in proc.stderr:
            lines.append(line)
            if " started on " in line:
                break
        assert any(redact(redis_url) in line for line in lines), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_hidden(password, "".join(lines), out, err)
    failed = subprocess.run(cmd, env={**env, "RELAYBUS_URL": wrong_url}, capture_output=True,
                            text=True, cwd=TESTS, timeout=60)
    assert failed.returncode != 0
    assert_hidden(WRONG, failed.stdout, failed.stderr)


# -- child processes' command lines -----------------------------------------------------------


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _environ(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n").decode()


needs_proc = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(),
                                reason="no /proc to read command lines from")


@needs_proc
def test_the_demo_passes_the_url_to_its_processes_in_the_environment(
        redis_url: str, password: str, prefix: str) -> None:
    from relaybus.demo import URL_ENV, _spawn

    child = _spawn("maintenance", redis_url, prefix, "secrets", 1, 1)
    try:
        # just forked, the child's /proc entries are empty, then the parent's, until it
        # has exec'd: wait for its own environment (readable by its user only)
        wait_for(lambda: f"{URL_ENV}={redis_url}" in _environ(child.pid),
                 what="the URL in the child's environment")
        assert_hidden(password, _cmdline(child.pid))
    finally:
        child.terminate()
        child.wait(15)


@needs_proc
def test_bench_children_get_the_url_in_the_environment(redis_url: str, password: str) -> None:
    with ServiceProcess(redis_url) as child:
        pid = child.proc.pid
        assert_hidden(password, _cmdline(pid))
        assert redis_url in _environ(pid)
        child.request("close")  # the child works: it read the URL from its environment


def test_bench_environment_shows_the_url_redacted(redis_url: str, password: str) -> None:
    from relaybus._bench.common import environment

    env = environment(redis_url, embedded=False)
    assert env["server_url"] == redact(redis_url)
    assert_hidden(password, repr(env))

