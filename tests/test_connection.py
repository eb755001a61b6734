"""Connecting: URL resolution, RELAYBUS_URL precedence, bad URLs, the bounded retry."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis
from typer.testing import CliRunner

from relaybus import (
    AsyncEventBus,
    AsyncMessageQueue,
    BrokerAuthenticationError,
    BrokerError,
    BrokerOutOfMemoryError,
    BrokerRequestTooLargeError,
    BrokerUnavailableError,
    ConfigurationError,
    EventBus,
    MessageQueue,
    Queue,
    RelaybusError,
)
from relaybus._core.outage import Kind, classify, translate
from relaybus._core.queue import ping
from relaybus._sync.driver import Driver
from relaybus.cli import app
from relaybus.connection import (
    DEFAULT_RETRY_TIMEOUT,
    ConnectionSettings,
    address_of,
    is_nogroup,
    redact,
    resolve_url,
)
from relaybus.embedded import EmbeddedServer


def free_port() -> int:
    """A loopback port nobody listens on (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def closed_port() -> int:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # really nobody there
    return port


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections but never answers (a hung server)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield int(sock.getsockname()[1])
    sock.close()


# -- resolving the URL ------------------------------------------------------------------


def test_defaults_build_url_from_host_port_db() -> None:
    assert resolve_url() == "redis://localhost:6379/0"
    assert resolve_url(redis_host="h", redis_port=1234, redis_db=3) == "redis://h:1234/3"
    assert resolve_url(redis_host="h", redis_password="pw") == "redis://:pw@h:6379/0"
    assert resolve_url(redis_host="h", redis_password="p@ss/w") == "redis://:p%40ss%2Fw@h:6379/0"


def test_env_url_wins_over_host_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYBUS_URL", "redis://envhost:7000/4")
    assert resolve_url() == "redis://envhost:7000/4"
    assert resolve_url(redis_host="h", redis_port=1, redis_db=2) == "redis://envhost:7000/4"


def test_explicit_url_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYBUS_URL", "redis://envhost:7000/4")
    assert resolve_url("redis://mine:1/1") == "redis://mine:1/1"


def test_empty_env_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYBUS_URL", "")
    assert resolve_url(redis_port=7001) == "redis://localhost:7001/0"


@pytest.mark.parametrize("url", ["redis://h:1/0", "redis://:pw@h:1/2", "rediss://h:6380/0",
                                 "unix:///tmp/redis.sock", "unix:///tmp/redis.sock?db=2",
                                 "redis://h", "redis://h:1/"])
def test_supported_schemes_pass_through(url: str) -> None:
    assert resolve_url(url) == url


def test_tls_and_unix_clients_are_configured() -> None:
    tls = ConnectionSettings("rediss://example.invalid:6380/0").sync_client()
    assert address_of(tls) == "example.invalid:6380"
    assert "SSL" in tls.connection_pool.connection_class.__name__
    unix = ConnectionSettings("unix:///tmp/relaybus-test.sock").async_client()
    assert address_of(unix) == "/tmp/relaybus-test.sock"


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", "ftp://h/",
                                 "redis://localhost:notaport/0", "redis://localhost:6379/notadb",
                                 "redis://localhost:6379/1/2"])
def test_bad_url_raises_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        MessageQueue(url)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RelaybusError)


def test_a_host_with_a_port_is_not_taken_for_a_host_name() -> None:
    with pytest.raises(ConfigurationError, match="unsupported URL 'localhost:6379'"):
        EventBus("localhost:6379")


def test_bad_env_url_raises_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYBUS_URL", "http://nope")
    with pytest.raises(ConfigurationError):
        MessageQueue()


# -- connecting to the test server ------------------------------------------------------


def test_env_url_used_by_message_queue(monkeypatch: pytest.MonkeyPatch, redis_url: str,
                                       prefix: str, closed_port: int) -> None:
    monkeypatch.setenv("RELAYBUS_URL", redis_url)
    with MessageQueue(redis_host="127.0.0.1", redis_port=closed_port, prefix=prefix,
                      retry_timeout=1) as mq:
        assert mq.connection.url == redis_url
        q, _ = mq.create_queue_pair("env")
        q.send_message({"via": "env"})
        assert [m.data for m in q.get_messages()] == [{"via": "env"}]


@pytest.mark.single_server
def test_the_seeds_positional_form_connects_to_that_host(monkeypatch: pytest.MonkeyPatch,
                                                         redis_url: str, prefix: str,
                                                         closed_port: int) -> None:
    """``EventBus("localhost", 6379, 0, "events:")`` as the seed's signature allows, on
    both fronts; a host given so is as explicit as a URL (``RELAYBUS_URL`` does not win)."""
    monkeypatch.setenv("RELAYBUS_URL", f"redis://127.0.0.1:{closed_port}/0")
    parsed = urlparse(redis_url)
    host, port, db = parsed.hostname or "", parsed.port or 0, int(parsed.path.strip("/") or 0)
    password = parsed.password  # the test server's, if it has one
    auth = f":{password}@" if password else ""
    with EventBus(host, port, db, prefix, retry_timeout=1, redis_password=password) as bus:
        assert bus.mq.connection.url == f"redis://{auth}{host}:{port}/{db}"
        assert bus.prefix == prefix
        bus.subscribe("seed")
        assert "seed" in bus.subscriptions()

    async def scenario() -> list[str]:
        async with AsyncEventBus(host, port, db, prefix, retry_timeout=1,
                                 redis_password=password) as abus:
            assert abus.prefix == prefix
            return list(await abus.subscriptions())

    assert "seed" in asyncio.run(scenario())


def test_explicit_url_beats_env_in_message_queue(monkeypatch: pytest.MonkeyPatch,
                                                 redis_url: str, prefix: str,
                                                 closed_port: int) -> None:
    monkeypatch.setenv("RELAYBUS_URL", f"redis://127.0.0.1:{closed_port}/0")
    with MessageQueue(redis_url, prefix=prefix, retry_timeout=1) as mq:
        assert mq.ping()


def test_server_version_reported(mq: MessageQueue) -> None:
    name, version = mq.connection.server_version().split(" ")
    assert name in ("redis", "valkey")
    assert tuple(int(p) for p in version.split(".")[:2]) >= (6, 2)


@pytest.mark.single_server
def test_injected_client_is_used(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with MessageQueue(client=client, prefix=prefix) as mq:
        assert mq.client is client
        q, _ = mq.create_queue_pair("injected")
        q.send_message({"a": 1})
        assert client.xlen(q.key) == 1


# -- an unreachable server ---------------------------------------------------------------


def test_closed_port_raises_broker_unavailable_within_bound(closed_port: int) -> None:
    mq = MessageQueue(f"redis://127.0.0.1:{closed_port}/0", retry_timeout=0.5)  # lazy: no error
    start = time.monotonic()
    with pytest.raises(BrokerUnavailableError) as info:
        mq.create_queue_pair("orders")
    elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < 2.0  # retried with backoff, then gave up at the bound
    assert info.value.address == f"127.0.0.1:{closed_port}"
    assert f"127.0.0.1:{closed_port}" in str(info.value)
    assert isinstance(info.value, BrokerError) and isinstance(info.value, ConnectionError)
    mq.close()


def test_every_operation_is_bounded(closed_port: int) -> None:
    mq = MessageQueue(f"redis://127.0.0.1:{closed_port}/0", retry_timeout=0.2)
    queue = Queue(mq, "orders")  # built without asking the server
    for op in (mq.ping, mq.list_queues, lambda: queue.send_message({"a": 1}),
               lambda: queue.get_messages(block_for_seconds=5),
               lambda: queue.acknowledge_messages(["1-1"]), queue.get_info):
        start = time.monotonic()
        with pytest.raises(BrokerUnavailableError):
            op()
        assert time.monotonic() - start < 1.5


def test_default_retry_bound_is_at_most_ten_seconds(closed_port: int) -> None:
    assert DEFAULT_RETRY_TIMEOUT <= 10
    mq = MessageQueue(f"redis://127.0.0.1:{closed_port}/0")
    assert mq.connection.retry_timeout == DEFAULT_RETRY_TIMEOUT


def _driver(url: str, bound: float, socket_timeout: float = 10.0) -> Driver:
    settings = ConnectionSettings(url, bound, socket_timeout)
    return Driver(settings.sync_client(), retry_timeout=bound)


def test_silent_server_raises_broker_unavailable(silent_port: int) -> None:
    driver = _driver(f"redis://127.0.0.1:{silent_port}/0", 0.3, socket_timeout=0.3)
    start = time.monotonic()
    with pytest.raises(BrokerUnavailableError) as info:
        driver.run(ping())
    assert time.monotonic() - start < 2.0
    assert str(silent_port) in str(info.value)
    driver.close()


def test_missing_unix_socket_raises_broker_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    driver = _driver(f"unix://{path}", 0.2)
    with pytest.raises(BrokerUnavailableError) as info:
        driver.run(ping())
    assert str(path) in str(info.value)


def test_out_of_memory_raises_and_writes_nothing(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "oom")
    state = server.start()
    try:
        with MessageQueue(state.url, retry_timeout=1) as mq:
            q, dlq = mq.create_queue_pair("orders")
            held = q.send_message({"held": True})
            q.get_messages()
            mq.client.config_set("maxmemory", "1")
            mq.client.config_set("maxmemory-policy", "noeviction")
            with pytest.raises(BrokerOutOfMemoryError):
                q.send_message({"a": 1})
            with pytest.raises(BrokerOutOfMemoryError):
                q.send_messages([{"a": 1}, {"a": 2}])
            with pytest.raises(BrokerOutOfMemoryError):
                q.move_to_dlq(held, "no room")
            mq.client.config_set("maxmemory", "0")
            assert mq.client.xlen(q.key) == 1 and mq.client.xlen(dlq.key) == 0
            assert mq.client.xpending(q.key, "relaybus")["pending"] == 1  # still held
    finally:
        server.stop()


def test_is_nogroup_recognises_group_errors() -> None:
    assert is_nogroup(redis.ResponseError("NOGROUP No such key 'x' or consumer group 'g'"))
    assert is_nogroup(redis.ResponseError("UNBLOCKED the stream key no longer exists"))
    assert not is_nogroup(redis.ResponseError("BUSYGROUP Consumer Group name already exists"))
    assert not is_nogroup(ValueError("NOGROUP"))


# -- refused credentials and databases ---------------------------------------------------

SECRET = "s3cret-pw-9q"


@pytest.fixture(scope="module")
def locked_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private server that wants the password SECRET: ``redis://127.0.0.1:PORT``."""
    server = EmbeddedServer(tmp_path_factory.mktemp("locked"))
    state = server.start()
    try:
        redis.Redis.from_url(state.url).config_set("requirepass", SECRET)
        yield f"redis://127.0.0.1:{state.port}"
    finally:  # its own password back, so that stop() can shut it down
        redis.Redis(host="127.0.0.1", port=state.port, password=SECRET).config_set(
            "requirepass", state.password)
        server.stop()


def test_redact_hides_the_password() -> None:
    assert redact("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redact("redis://h:1/0") == "redis://h:1/0"


@pytest.mark.parametrize("auth", [":wrong-pw-7x@", ""], ids=["wrong", "none"])
def test_a_refused_password_is_an_authentication_error_at_once(locked_url: str,
                                                               auth: str) -> None:
    url = locked_url.replace("redis://", f"redis://{auth}") + "/0"
    started = time.monotonic()
    with MessageQueue(url, retry_timeout=5) as mq, \
            pytest.raises(BrokerAuthenticationError) as info:
        mq.create_queue_pair("x")
    assert time.monotonic() - started < 2  # not retried as an outage for 5 s
    assert "127.0.0.1" in str(info.value) and "wrong-pw-7x" not in str(info.value)
    with MessageQueue(locked_url.replace("redis://", f"redis://:{SECRET}@") + "/0") as ok:
        ok.create_queue_pair("x")  # the right one works


def test_the_cli_names_refused_credentials_and_databases(locked_url: str) -> None:
    wrong = CliRunner().invoke(app, ["queues", "--url", locked_url.replace(
        "redis://", "redis://:wrong-pw-7x@") + "/0", "--timeout", "5"])
    assert wrong.exit_code == 1 and "refused the credentials" in wrong.stderr, wrong.output
    assert "wrong-pw-7x" not in wrong.output
    url99 = locked_url.replace("redis://", f"redis://:{SECRET}@") + "/99"
    no_db = CliRunner().invoke(app, ["queues", "--url", url99, "--timeout", "5"])
    assert no_db.exit_code == 2, no_db.output
    assert redact(url99) in no_db.stderr and "no such database" in no_db.stderr
    assert SECRET not in no_db.output


def test_a_transaction_refused_at_exec_for_memory_is_out_of_memory() -> None:
    """The server can go over maxmemory between queueing and EXEC: it then refuses the
    whole transaction at EXEC, naming OOM inside EXECABORT. That is a full server (the
    settle batch goes through settle.lua), not a refused command."""
    exc = redis.exceptions.ExecAbortError(
        "Transaction discarded because of: OOM command not allowed when used memory > "
        "'maxmemory'.")
    assert classify(exc) is Kind.OOM
    assert isinstance(translate(exc, "127.0.0.1:1"), BrokerOutOfMemoryError)
    other = redis.exceptions.ExecAbortError("Transaction discarded because of previous errors.")
    assert classify(other) is Kind.REFUSED


@pytest.mark.parametrize("limit", ["client-query-buffer-limit", "proto-max-bulk-len"])
def test_a_request_too_large_for_the_server_is_a_clear_refusal_on_both_fronts(
        tmp_path: Path, limit: str) -> None:
    """A server whose limit is below a request refuses it (an error reply, or it closes
    the connection): a BrokerRequestTooLargeError naming the limits, not retried as an
    outage until "unavailable"; the connection works on afterwards."""
    server = EmbeddedServer(tmp_path / "small").start()
    try:
        admin = redis.Redis.from_url(server.url)
        admin.config_set(limit, 1024 * 1024)
        admin.close()
        big = {"x": "a" * (2 * 1024 * 1024)}
        with MessageQueue(server.url, prefix="big:", retry_timeout=30,
                          max_message_size=8 * 1024 * 1024) as mq:
            queue, _ = mq.create_queue_pair("big")
            with pytest.raises(BrokerRequestTooLargeError, match=limit):
                queue.send_message(big)
            assert queue.send_message({"x": "small"})  # the same client goes on

        async def front() -> None:
            async with AsyncMessageQueue(server.url, prefix="big:", retry_timeout=30,
                                         max_message_size=8 * 1024 * 1024) as amq:
                aqueue, _ = await amq.create_queue_pair("big")
                with pytest.raises(BrokerRequestTooLargeError, match=limit):
                    await aqueue.send_message(big)

        asyncio.run(front())
    finally:
        EmbeddedServer(tmp_path / "small").stop()
