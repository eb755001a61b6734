"""Helpers for the Microservice tests: events, polling, a TCP proxy, child processes.

:func:`child_command` builds the command line of a child process running :func:`main`::

    hold URL PREFIX SERVICE VISIBILITY_TIMEOUT
        a service whose handler prints "started N" and then never returns
        (the test SIGKILLs it)
    run URL PREFIX SERVICE
        ``run_service(load_service("helpers_service:make_blocking_service"))``: the
        handler prints "started N", waits for an item on the list PREFIX + "release",
        prints "finished N" (the test sends SIGTERM while it waits)
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from urllib.parse import urlparse

import pytest
import redis

from relaybus import Event, EventBus, Microservice
from relaybus.testing import one_server, plain_client


class Ping(Event, event_type="test.service.ping"):
    """The event most service tests send."""

    n: int = 0
    tag: str = ""


class Pong(Event, event_type="test.service.pong"):
    """A second event type."""

    n: int = 0


class Proxy:
    """A TCP forwarder to a real server whose link can be cut and restored.

    ``cut()`` closes every connection and stops listening (clients get refused);
    ``restore()`` listens again on the same port. Used to simulate a broker outage
    without touching the server other tests share.
    """

    def __init__(self, target_url: str) -> None:
        if not one_server(target_url):
            pytest.skip("a proxy in front of one server, reached directly")
        parsed = urlparse(target_url)
        self.target = (parsed.hostname or "127.0.0.1", parsed.port or 6379)
        self._db = parsed.path.strip("/") or "0"
        self._auth = f":{parsed.password}@" if parsed.password else ""  # the server's
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._up = threading.Event()
        self._closed = False
        self._listen()
        threading.Thread(target=self._accept_loop, daemon=True, name="test-proxy").start()

    @property
    def url(self) -> str:
        return f"redis://{self._auth}127.0.0.1:{self.port}/{self._db}"

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        sock.settimeout(0.05)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._up.set()

    def _accept_loop(self) -> None:
        while not self._closed:
            listener = self._listener
            if listener is None or not self._up.is_set():
                self._up.wait(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                if not self._up.is_set():  # cut while we were connecting: drop it
                    client.close()
                    upstream.close()
                    continue
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        with self._lock:
            self._up.clear()
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        """Listen again on the same port."""
        self._listen()

    def close(self) -> None:
        self._closed = True
        self.cut()


# -- child processes ----------------------------------------------------------------


def make_blocking_service() -> Microservice:
    """Factory for ``run``: settings come from the environment (see the module docstring)."""
    url, prefix, name = (os.environ["SVC_URL"], os.environ["SVC_PREFIX"], os.environ["SVC_NAME"])
    client = plain_client(url)
    svc = Microservice(name, prefix=prefix, visibility_timeout=1.0, maintenance=False, prefetch=2,
                       block_for_seconds=0.2, shutdown_timeout=20.0)

    @svc.on(Ping)
    def handle(event: Ping) -> None:
        print(f"started {event.n}", flush=True)
        client.blpop([prefix + "release"], timeout=20)
        print(f"finished {event.n}", flush=True)

    return svc


def _hold(url: str, prefix: str, name: str, vt: str) -> None:
    svc = Microservice(name, url=url, prefix=prefix, visibility_timeout=float(vt),
                       maintenance=False, block_for_seconds=0.2, concurrency=1, prefetch=2)

    @svc.on(Ping)
    def handle(event: Ping) -> None:
        print(f"started {event.n}", flush=True)
        threading.Event().wait()  # never returns: the test kills this process

    svc.start()
    print("ready", flush=True)
    threading.Event().wait()


def _run(url: str, prefix: str, name: str) -> None:
    import logging

    from relaybus.runner import load_service, run_service

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.update(SVC_URL=url, SVC_PREFIX=prefix, SVC_NAME=name)
    service = load_service("helpers_service:make_blocking_service", url=url)
    print("ready", flush=True)
    run_service(service)
    print(f"exited stats={service.stats}", flush=True)


class SignalledInStart(Microservice):
    """A service that gets SIGTERM from itself while its start() has not returned."""

    def start(self, *, start_timeout: float | None = None) -> None:
        super().start(start_timeout=start_timeout)
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before the next line
        print(f"start returned running={self.running}", flush=True)


def _signal_in_start(url: str, prefix: str, name: str) -> None:
    import logging

    from relaybus.runner import run_service

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    svc = SignalledInStart(name, url=url, prefix=prefix, maintenance=False,
                           block_for_seconds=0.2)
    svc.on(Ping)(lambda event: None)
    run_service(svc)
    print(f"exited running={svc.running}", flush=True)


def main(argv: list[str]) -> None:
    """Entry point of a child process (see the module docstring)."""
    command, *args = argv
    commands: dict[str, Callable[..., None]] = {"hold": _hold, "run": _run,
                                                "signal-in-start": _signal_in_start}
    commands[command](*args)


def child_command(*args: str) -> list[str]:
    """The command line of a child process running ``main(args)``.

    The child imports this module by name (not as ``__main__``), so its event classes
    register once under the same identity as in a service loaded from it.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import helpers_service; "
            "helpers_service.main(sys.argv[1:])")
    return [sys.executable, "-c", code, *args]


def hold_the_gil(seconds: float) -> None:
    """A long C call that keeps the GIL (ctypes.PyDLL does not release it): no other
    thread of this process runs meanwhile, the lease extending one included."""
    ctypes.PyDLL(None).usleep(int(seconds * 1_000_000))


def blocked_reads(client: redis.Redis, name: str) -> int:
    """How many connections named ``name`` wait in a blocking XREADGROUP on the server
    (by name: other tests' services share the server)."""
    return sum(1 for c in client.client_list()
               if c.get("name") == name and "b" in c.get("flags", "")
               and c.get("cmd") == "xreadgroup")


class SteadyPublisher:
    """Publishes ``Ping(n)`` for n = 0, 1, ... about every 5 ms in a thread, until
    :meth:`stop`: ``published`` holds the n whose publish returned (acknowledged),
    ``ids`` their log ids, ``failed`` the errors of the others (those need not be
    handled)."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix
        self.published: list[int] = []
        self.ids: list[str] = []
        self.failed: list[BaseException] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._publish, name="steady-publisher")

    def start(self) -> SteadyPublisher:
        self._thread.start()
        return self

    def _publish(self) -> None:
        with EventBus(self.url, prefix=self.prefix) as bus:
            n = 0
            while not self._done.is_set():
                try:
                    self.ids.append(bus.publish(Ping(n=n)))
                    self.published.append(n)
                except Exception as exc:  # not acknowledged: need not be handled
                    self.failed.append(exc)
                n += 1
                self._done.wait(0.005)  # a steady stream, not a synchronisation

    def stop(self) -> None:
        self._done.set()
        if self._thread.ident:
            self._thread.join(15)
