"""The runner: loading a service by import path, running it until a signal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis

from helpers_service import Ping, child_command
from relaybus import ConfigurationError, EventBus, Microservice, load_service, run_service
from relaybus.connection import redact
from relaybus.keys import QueueKeys
from waiting import wait_for

MODULE = '''
from relaybus import Microservice
from helpers_service import Ping

instance = Microservice("from-instance", url="redis://127.0.0.1:1/0")  # nothing listens

class Service(Microservice):
    def __init__(self):
        super().__init__("from-class", url="redis://127.0.0.1:1/0")

class NeedsArgs(Microservice):
    pass

def factory():
    return Microservice("from-factory")

def not_a_factory():
    return 42

class Holder:
    service = Microservice("nested")

number = 7
'''


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    """Write a module importable under a fresh name; return that name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"svcmod_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


def test_load_service_accepts_an_instance_a_subclass_and_a_factory(
        module: Callable[[str], str]) -> None:
    mod = module(MODULE)
    assert load_service(f"{mod}:instance").service_name == "from-instance"
    made = load_service(f"{mod}:Service")
    assert type(made).__name__ == "Service" and made.service_name == "from-class"
    assert load_service(f"{mod}:factory").service_name == "from-factory"
    assert load_service(f"{mod}:Holder.service").service_name == "nested"


@pytest.mark.parametrize("attr, message", [
    ("nothing", "has no attribute 'nothing'"),
    ("number", "is a int, not a Microservice"),
    ("not_a_factory", "returned int, not a Microservice"),
    ("NeedsArgs", "cannot be built without arguments"),
    ("Ping", None),
])
def test_load_service_says_what_is_wrong(module: Callable[[str], str], attr: str,
                                         message: str | None) -> None:
    mod = module(MODULE + "\nfrom helpers_service import Ping\n")
    with pytest.raises(ConfigurationError) as info:
        load_service(f"{mod}:{attr}")
    assert message is None or message in str(info.value)


def test_load_service_rejects_bad_targets_and_modules(module: Callable[[str], str]) -> None:
    for target in ("no_colon", ":svc", "mod:"):
        with pytest.raises(ConfigurationError, match="module:attribute"):
            load_service(target)
    with pytest.raises(ConfigurationError, match="cannot import module 'no_such_module_x'"):
        load_service("no_such_module_x:svc")
    broken = module("import no_such_dependency_y\n")
    with pytest.raises(ConfigurationError, match="importing .* failed") as info:
        load_service(f"{broken}:svc")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    raising = module("raise RuntimeError('config missing')\n")
    with pytest.raises(ConfigurationError, match="RuntimeError: config missing"):
        load_service(f"{raising}:svc")


def test_an_import_error_names_the_file_and_line(module: Callable[[str], str],
                                                 tmp_path: Path) -> None:
    broken = module("x = 1\nimport no_such_dependency_y\n")
    with pytest.raises(ConfigurationError) as info:
        load_service(f"{broken}:svc")
    assert f"at {tmp_path / broken}.py:2:" in str(info.value)
    raising = module("\n\nraise RuntimeError('config missing')\n")
    with pytest.raises(ConfigurationError, match=r"\.py:3: RuntimeError: config missing"):
        load_service(f"{raising}:svc")
    bad_syntax = module("def f(:\n")
    with pytest.raises(ConfigurationError, match=r"\.py:1: SyntaxError"):
        load_service(f"{bad_syntax}:svc")


def test_url_applies_to_a_service_that_has_not_connected(module: Callable[[str], str],
                                                         redis_url: str, prefix: str) -> None:
    mod = module(f'''
        from relaybus import Microservice
        svc = Microservice("pointed", url="redis://127.0.0.1:1/0", prefix={prefix!r},
                           maintenance=False, block_for_seconds=0.2)
        svc.on("test.service.ping")(print)
    ''')
    svc = load_service(f"{mod}:svc", url=redis_url)  # importing it connected nowhere
    try:
        svc.start()
        assert svc.running and svc.mq.ping()
        with pytest.raises(ConfigurationError, match="already connected"):
            load_service(f"{mod}:svc", url=redis_url)
    finally:
        svc.close()


def test_a_second_sigterm_stops_at_once_and_says_how_long_it_waited(
        redis_url: str, prefix: str) -> None:
    """The sync front: the first SIGTERM starts a graceful stop, the second cuts it
    short; the log gives the time actually waited, not the shutdown timeout."""
    bus = EventBus(redis_url, prefix=prefix)
    child = subprocess.Popen(child_command("run", redis_url, prefix, "hasty"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stderr is not None
        assert child.stdout.readline().strip() == "ready"
        logged = [child.stderr.readline()]
        while "started on" not in logged[-1]:  # its start() is done: it waits for signals
            assert logged[-1], "".join(logged)
            logged.append(child.stderr.readline())
        bus.publish_many([Ping(n=n) for n in range(2)])
        assert child.stdout.readline().strip() == "started 0"  # it now waits for "release"
        child.send_signal(signal.SIGTERM)
        while "stop requested" not in logged[-1]:
            logged.append(child.stderr.readline())
            assert logged[-1], "".join(logged)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=20)
        err = "".join(logged) + err
        assert child.returncode == 0, err
        found = re.search(r"service hasty stopped after (\d+\.\d)s \(forced\): "
                          r"0 in-flight event\(s\) finished, \d+ abandoned", err)
        assert found is not None, err
        assert float(found.group(1)) < 5  # what it waited, not the shutdown timeout
        still = re.search(r"\d+ events still with running handlers after (\d+\.\d)s", err)
        assert still is not None and float(still.group(1)) < 5, err
        assert "stopped on SIGTERM (forced)" in err
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        bus.close()


def test_relaybus_run_uses_the_url_in_the_code_and_says_where_it_runs(
        tmp_path: Path, redis_url: str, prefix: str, raw: redis.Redis) -> None:
    """No --url, no RELAYBUS_URL: the service connects where its code says (not to an
    embedded server), and logs once at start which server and prefix it uses."""
    (tmp_path / "coded.py").write_text(textwrap.dedent(f'''
        from relaybus import Microservice
        svc = Microservice("coded", url={redis_url!r}, prefix={prefix!r},
                           maintenance=False, block_for_seconds=0.2)
        svc.on("test.service.ping")(print)
    '''))
    env = {k: v for k, v in os.environ.items() if k != "RELAYBUS_URL"}
    child = subprocess.Popen([sys.executable, "-m", "relaybus", "run", "coded:svc"],
                             cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stderr is not None
        logged = [child.stderr.readline()]
        while "started on" not in logged[-1]:
            assert logged[-1], "".join(logged)
            logged.append(child.stderr.readline())
        assert f"started on {redact(redis_url)}, prefix {prefix!r}" in logged[-1]
        if urlparse(redis_url).password:  # the server's password never shows
            assert urlparse(redis_url).password not in "".join(logged)
        assert sum("started on" in line for line in logged) == 1
        assert raw.exists(QueueKeys(prefix, "sub:coded").meta)  # it subscribed there
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=20)
        assert child.returncode == 0, err
        assert not (tmp_path / ".relaybus").exists()  # no embedded server was started
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _service(redis_url: str, prefix: str, name: str) -> Microservice:
    svc = Microservice(name, url=redis_url, prefix=prefix, maintenance=False,
                       block_for_seconds=0.2)
    svc.on(Ping)(lambda e: None)
    return svc


def test_run_service_stops_on_sigterm_and_restores_handlers(redis_url: str,
                                                            prefix: str) -> None:
    svc = _service(redis_url, prefix, "signalled")
    before = signal.getsignal(signal.SIGTERM)

    def kill_when_running() -> None:
        wait_for(lambda: svc.running)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=kill_when_running)
    killer.start()
    run_service(svc)  # returns after the signal
    killer.join()
    assert not svc.running
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(Exception, match="closed"):
        svc.start()


def test_run_service_without_signals_in_a_thread(redis_url: str, prefix: str) -> None:
    svc = _service(redis_url, prefix, "threaded")
    failed: list[BaseException] = []
    t = threading.Thread(target=_capture, args=(failed, lambda: run_service(svc)))
    t.start()
    t.join()
    assert isinstance(failed[0], ConfigurationError) and "main thread" in str(failed[0])
    t = threading.Thread(target=run_service, args=(svc,), kwargs={"install_signals": False})
    t.start()
    wait_for(lambda: svc.running)
    svc.stop()
    t.join(5)
    assert not t.is_alive()


def _capture(into: list[BaseException], fn: Callable[[], object]) -> None:
    try:
        fn()
    except BaseException as exc:  # noqa: B036 - handed to the test thread
        into.append(exc)


def test_a_signal_while_start_runs_only_asks_for_the_stop(redis_url: str, prefix: str) -> None:
    """SIGTERM before run_forever's start() returned: start() finishes with the service
    running (the stop is not run inside the signal handler), then it stops gracefully."""
    done = subprocess.run(child_command("signal-in-start", redis_url, prefix, "early"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["start returned running=True", "exited running=False"]
    assert "stop requested; stopping gracefully" in done.stderr
    assert "stopped on SIGTERM" in done.stderr


def test_sigterm_lets_the_in_flight_handler_finish(redis_url: str, prefix: str,
                                                   raw: redis.Redis) -> None:
    """A real process: SIGTERM while a handler runs; it finishes, is acked, the rest stays."""
    bus = EventBus(redis_url, prefix=prefix)
    child = subprocess.Popen(child_command("run", redis_url, prefix, "term"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        assert child.stderr is not None
        early = [child.stderr.readline()]
        while "started on" not in early[-1]:  # its start() is done: it waits for signals
            assert early[-1], "".join(early)
            early.append(child.stderr.readline())
        bus.publish_many([Ping(n=n) for n in range(3)])
        assert child.stdout.readline().strip() == "started 0"
        # the child holds its prefetch (2): event 1 read and waiting, event 2 not read
        log = QueueKeys(prefix, "all").stream
        wait_for(lambda: raw.xpending(log, "sub:term")["pending"] == 2,
                 what="the child to hold two events")
        child.send_signal(signal.SIGTERM)
        logged = [*early, child.stderr.readline()]
        while "stop requested" not in logged[-1]:
            assert logged[-1], "".join(logged)
            logged.append(child.stderr.readline())
        raw.rpush(prefix + "release", "go")  # let the running handler finish
        out, err = child.communicate(timeout=20)
        err = "".join(logged) + err
        assert child.returncode == 0, err
        assert out.splitlines()[0] == "finished 0"
        assert "'handled': 1" in out
        assert "stopped on SIGTERM" in err and "1 in-flight event(s) finished" in err
        queue = bus.mq.get_queue("sub:term")
        assert queue is not None
        info = queue.get_info()
        assert (info.pending_messages, info.waiting_messages) == (1, 1)
    finally:
        child.kill()
        child.wait()

    survivor = Microservice("term", url=redis_url, prefix=prefix, maintenance=False,
                            block_for_seconds=0.2, visibility_timeout=1.0)
    seen: list[int] = []
    survivor.on(Ping)(lambda e: seen.append(e.n))
    try:
        survivor.start()
        wait_for(lambda: len(seen) == 2, what="the two unfinished events")
        assert sorted(seen) == [1, 2]  # event 0 was acknowledged: not redelivered
    finally:
        survivor.close()
        bus.close()
