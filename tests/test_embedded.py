"""The embedded server: start, reuse, status, stop, persistence (private servers in tmp dirs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from relaybus import EmbeddedServerError, Event, EventBus, MessageQueue, Microservice
from relaybus.connection import resolve_url
from relaybus.embedded import (
    SERVER_BINARY_ENV,
    EmbeddedServer,
    ServerState,
    find_server_binary,
)
from waiting import wait_for


class Restarted(Event, event_type="test.embedded.restarted"):
    n: int


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:  # a zombie has exited too
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive"
        time.sleep(0.01)


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[[str], EmbeddedServer]]:
    """EmbeddedServer objects on data dirs under tmp_path; every server is stopped after."""
    made: list[EmbeddedServer] = []

    def make(name: str = "data", appendfsync: str = "everysec") -> EmbeddedServer:
        server = EmbeddedServer(tmp_path / name, appendfsync=appendfsync)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


def test_find_server_binary_is_executable() -> None:
    path = find_server_binary()
    assert os.path.isfile(path) and os.access(path, os.X_OK)


def test_server_binary_named_in_the_environment_is_the_one_run(
        make_server: Callable[[str], EmbeddedServer], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = tmp_path / "my-server"
    chosen.symlink_to(find_server_binary())
    monkeypatch.setenv(SERVER_BINARY_ENV, str(chosen))
    assert find_server_binary() == str(chosen)
    assert make_server("data").start().binary == str(chosen)


def test_a_server_binary_named_in_the_environment_that_cannot_run_is_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "not-a-server").write_text("")
    monkeypatch.setenv(SERVER_BINARY_ENV, str(tmp_path / "not-a-server"))
    with pytest.raises(EmbeddedServerError, match="RELAYBUS_SERVER_BINARY.*not an executable"):
        find_server_binary()


def test_status_none_before_start(make_server: Callable[[str], EmbeddedServer]) -> None:
    server = make_server("data")
    assert server.status() is None
    assert server.stop() is False


def test_start_runs_a_server_on_loopback_with_aof(
        make_server: Callable[[str], EmbeddedServer], tmp_path: Path) -> None:
    server = make_server("data")
    state = server.start()
    assert isinstance(state, ServerState)
    assert not gone(state.pid)
    assert state.data_dir == str((tmp_path / "data").resolve())
    assert state.url == f"redis://:{state.password}@127.0.0.1:{state.port}/0"
    client = redis.Redis.from_url(state.url)
    try:
        assert client.ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert Path(client.config_get("dir")["dir"]) == (tmp_path / "data").resolve()
    finally:
        client.close()
    recorded = json.loads((tmp_path / "data" / "server.json").read_text())
    assert (recorded["pid"], recorded["port"]) == (state.pid, state.port)
    assert server.status() == state


def test_the_server_wants_its_random_password_and_keeps_it_private(
        make_server: Callable[[str], EmbeddedServer], tmp_path: Path) -> None:
    server = make_server("data")
    state = server.start()
    assert len(state.password) >= 24 and state.password not in repr(state)
    with pytest.raises(redis.AuthenticationError):  # no password: refused
        redis.Redis(host="127.0.0.1", port=state.port).ping()
    data = tmp_path / "data"
    assert data.stat().st_mode & 0o777 == 0o700
    for name in ("server.json", "server.conf"):
        assert (data / name).stat().st_mode & 0o777 == 0o600, name
    with open(f"/proc/{state.pid}/cmdline", "rb") as fh:
        assert state.password.encode() not in fh.read()  # not visible in ps
    server.stop()
    assert server.start().password == state.password  # kept: running clients reconnect


def test_a_state_file_is_trusted_only_when_its_server_answers_to_its_password(
        make_server: Callable[[str], EmbeddedServer], tmp_path: Path) -> None:
    server = make_server("data")
    state = server.start()
    state_file = tmp_path / "data" / "server.json"
    recorded = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**recorded, "password": "not-the-password"}))
    assert server.status() is None  # the port answers, but not to that password
    state_file.write_text(json.dumps(recorded))
    assert server.status() == state


def test_start_again_reuses_running_server(make_server: Callable[[str], EmbeddedServer]) -> None:
    server = make_server("data")
    first = server.start()
    assert server.start() == first
    other = EmbeddedServer(server.data_dir)  # a second object (another process's view)
    assert other.status() == first
    assert other.start() == first


def test_concurrent_starts_share_one_server(
        make_server: Callable[[str], EmbeddedServer]) -> None:
    server = make_server("data")
    states: list[ServerState] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        states.append(EmbeddedServer(server.data_dir).start())

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(states) == 4 and len(set(states)) == 1


def test_separate_dirs_get_separate_servers(
        make_server: Callable[[str], EmbeddedServer]) -> None:
    a = make_server("a").start()
    b = make_server("b").start()
    assert a.port != b.port and a.pid != b.pid


def test_stop_stops_the_server(make_server: Callable[[str], EmbeddedServer],
                               tmp_path: Path) -> None:
    server = make_server("data")
    state = server.start()
    start = time.monotonic()
    assert server.stop() is True
    assert time.monotonic() - start < 3.0
    wait_gone(state.pid)
    assert server.status() is None
    assert not (tmp_path / "data" / "server.json").exists()
    assert server.stop() is False


def test_stop_from_second_object(make_server: Callable[[str], EmbeddedServer]) -> None:
    server = make_server("data")
    state = server.start()
    assert EmbeddedServer(server.data_dir).stop() is True
    wait_gone(state.pid)
    assert server.status() is None


def test_messages_persist_across_stop_and_start(
        make_server: Callable[[str], EmbeddedServer]) -> None:
    server = make_server("data")
    with MessageQueue(server.start().url, prefix="p:") as mq:
        q, dlq = mq.create_queue_pair("orders", visibility_timeout=12)
        ids = q.send_messages([{"i": 1}, {"i": 2}, {"i": 3}])
        [first] = q.get_messages()
        q.acknowledge_messages(first.id)
        q.move_to_dlq(ids[1], "bad")
    server.stop()
    assert server.status() is None

    with MessageQueue(server.start().url, prefix="p:") as mq:
        q2 = mq.get_queue("orders")
        assert q2 is not None and q2.visibility_timeout == 12.0
        assert [m.id for m in q2.peek()] == [ids[2]]  # the acknowledged one stays gone
        assert [m.data for m in q2.get_messages(count=5)] == [{"i": 3}]
        dead = mq.get_dead_letter_queue("orders")
        assert dead is not None and [m.reason for m in dead.peek()] == ["bad"]


def test_a_restart_keeps_the_port_and_a_running_service_reconnects(
        make_server: Callable[[str], EmbeddedServer]) -> None:
    """``relaybus server stop`` then ``start``: the same port while it is free, so a
    service that ran through the restart carries on by itself."""
    server = make_server("data")
    first = server.start()
    seen: list[int] = []
    svc = Microservice("survivor", url=first.url, prefix="p:", maintenance=False,
                       block_for_seconds=0.2, retry_timeout=1.0)
    svc.on(Restarted)(lambda e: seen.append(e.n))
    bus = EventBus(first.url, prefix="p:", retry_timeout=5.0)
    try:
        svc.start()
        bus.publish(Restarted(n=1))
        wait_for(lambda: seen == [1], what="the first event handled")
        server.stop()
        again = server.start()
        assert again.port == first.port and again.pid != first.pid
        bus.publish(Restarted(n=2))
        wait_for(lambda: seen == [1, 2], timeout=20, what="handled after the restart")
    finally:
        svc.close()
        bus.close()


def test_acknowledged_writes_survive_sigkill(
        make_server: Callable[..., EmbeddedServer]) -> None:
    # appendfsync always: with everysec the server may hold a write back (up to 2 s,
    # while a slow background fsync runs) and still reply, so a SIGKILL can lose it
    server = make_server("data", appendfsync="always")
    state = server.start()
    with MessageQueue(state.url, prefix="p:") as mq:
        q, _ = mq.create_queue_pair("orders")
        ids = q.send_messages([{"i": i} for i in range(100)])
    os.kill(state.pid, signal.SIGKILL)
    wait_gone(state.pid)
    assert server.status() is None  # a stale state file is not trusted
    restarted = server.start()
    assert restarted.pid != state.pid
    with MessageQueue(restarted.url, prefix="p:") as mq:
        q2 = mq.require_queue("orders")
        assert [m.id for m in q2.peek(count=200)] == ids


def test_embedded_url_starts_and_reuses(make_server: Callable[[str], EmbeddedServer],
                                        tmp_path: Path) -> None:
    server = make_server("viaurl")
    url = resolve_url(f"embedded://{tmp_path / 'viaurl'}")
    state = server.status()
    assert state is not None and url == state.url
    assert resolve_url(f"embedded://{tmp_path / 'viaurl'}") == url
    with MessageQueue(f"embedded://{tmp_path / 'viaurl'}", prefix="p:") as mq:
        q, _ = mq.create_queue_pair("orders")
        q.send_message({"a": 1})
        assert [m.data for m in q.get_messages()] == [{"a": 1}]


def test_embedded_default_dir_is_relative_to_cwd(
        make_server: Callable[[str], EmbeddedServer], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    server = make_server(".relaybus")
    url = resolve_url("embedded")
    state = server.status()
    assert state is not None and url == state.url
    assert (tmp_path / ".relaybus" / "server.json").exists()


def test_another_process_reuses_the_server(make_server: Callable[[str], EmbeddedServer]) -> None:
    server = make_server("shared")
    state = server.start()
    code = ("import sys; from relaybus.connection import resolve_url; "
            "print(resolve_url('embedded://' + sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", code, str(server.data_dir)],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == state.url
    assert server.status() == state
