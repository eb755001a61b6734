"""Services in a child process of their own: where ``relaybus bench`` runs what it measures.

:class:`ServiceProcess` starts ``python -c 'from relaybus._bench.child import main;
main()'`` (the server's URL in ``$RELAYBUS_BENCH_URL``, not on its command line) and
drives it over a pipe: requests are JSON lines on the child's stdin,
replies JSON lines on its original stdout (anything else it prints goes to its
stderr, kept in a temporary file whose tail is shown when something goes wrong; a
failed request replies ``{"error": ...}``, which :meth:`ServiceProcess.recv` raises).

The child runs any number of services at once, all of one *front*: ``sync``
(:class:`~relaybus.service.Microservice`, threads) or ``async``
(:class:`~relaybus.aio.AsyncMicroservice`, on an asyncio loop that runs in a thread
of the child while the main thread reads requests). Each service has a subscription
of its own and a typed handler (it gets the validated :class:`BenchEvent`, takes
``time.time()`` first, then counts it; an ``async def`` for the async front).

Requests (``op``):

- ``start`` ``{front, prefix, services: [names], concurrency, maintenance, wait_n,
  timeout}``: start one service per name (each subscribes when it starts). With
  ``wait_n``, reply once every one has handled *and acknowledged* that many events:
  ``{t0, t_end, handled: [...], first}`` (``t0``: ``time.time()`` just before the
  first ``start()``); else reply ``{t0, pid}`` at once.
- ``expect`` ``{n, timeout, latencies}``: reply ``{ok}`` at once, then, when every
  running service has handled and acknowledged ``n`` more events, ``{t_end, handled,
  first, latencies}`` (``latencies``: handler start minus the event's ``sent_at``, in
  seconds, every service's, when asked).
- ``begin`` / ``end``: a measurement window; ``end`` replies ``{cpu, wall, commands,
  requests}``: this process's CPU seconds and wall seconds over the window, and (when
  started with ``count_commands``) the commands it sent and the requests (writes to a
  socket: a pipeline or a MULTI/EXEC is one) they went in.
- ``close``: stop and close the services. ``exit``: the same, then the child ends.

"Acknowledged" is read from each service's ``stats["handled"]``, which moves after
the settle call that acknowledged the event returned: the child sleeps on the
handlers' count first (no polling while they run), then polls the counters every
0.5 ms.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import queue as queue_mod
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import IO, Any, TypeVar

from .common import BenchEvent

__all__ = ["ServiceProcess", "main", "install_command_counter", "COUNTS", "FRONTS", "URL_ENV"]

T = TypeVar("T")

#: The service fronts a child runs.
FRONTS = ("sync", "async")

#: The environment variable a child gets its server's URL in (the URL may hold a
#: password; a command line is visible to every user of the machine).
URL_ENV = "RELAYBUS_BENCH_URL"

#: What :func:`install_command_counter` counts in this process.
COUNTS = {"commands": 0, "requests": 0}

#: Seconds between two looks at the services' counters once the handlers saw all.
ACK_POLL = 0.0005


def install_command_counter() -> None:
    """Count, in this process, every command sent to a server and every request
    (socket write) they went in, for both redis-py's sync and asyncio connections.

    relaybus's drivers send what the core packs (``relaybus._core.steps.wire`` calls
    ``pack`` once per step, ``relaybus._core.cluster`` once per node of a step: one
    request, several commands when the step has several);
    redis-py's own commands (the connection handshake, health-check PINGs) go through
    ``send_command``, one request each.
    """
    from redis import connection as sync_conn
    from redis.asyncio import connection as async_conn

    from .._core import cluster, resp, steps

    def pack(commands: Iterable[Sequence[Any]]) -> bytes:  # one request per step
        cmds = list(commands)
        COUNTS["commands"] += len(cmds)
        COUNTS["requests"] += 1
        return resp.pack(cmds)

    for module in (steps, cluster):  # ``wire`` (one server) and a cluster's batches
        packing: Any = module
        packing.pack = pack

    sync_cls: Any = sync_conn.AbstractConnection
    sync_command = sync_cls.send_command

    def send_command(self: Any, *args: Any, **kwargs: Any) -> None:
        COUNTS["commands"] += 1
        COUNTS["requests"] += 1
        sync_command(self, *args, **kwargs)

    sync_cls.send_command = send_command

    async_cls: Any = async_conn.AbstractConnection
    async_command = async_cls.send_command

    async def asend_command(self: Any, *args: Any, **kwargs: Any) -> None:
        COUNTS["commands"] += 1
        COUNTS["requests"] += 1
        await async_command(self, *args, **kwargs)

    async_cls.send_command = asend_command


class _Recorder:
    """What one service's handler records: its first start, the count, latencies."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reached = threading.Event()
        self.latencies: list[float] = []
        self.first: float | None = None
        self.count = 0
        self.target = 0

    def reset(self, target: int = 0) -> None:
        with self.lock:
            self.latencies = []
            self.first = None
            self.count = 0
            self.target = target
            self.reached.clear()

    def handle(self, event: BenchEvent) -> None:
        now = time.time()
        with self.lock:
            if self.first is None:
                self.first = now
            self.count += 1
            if event.sent_at:
                self.latencies.append(now - event.sent_at)
            if self.count == self.target:
                self.reached.set()


def _async_handler(recorder: _Recorder) -> Callable[[BenchEvent], Coroutine[Any, Any, None]]:
    async def handle(event: BenchEvent) -> None:
        recorder.handle(event)

    return handle


class _Host:
    """The services this child runs (all of one front) and the loop of the async ones."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.front = "sync"
        self.services: list[Any] = []  # Microservice or AsyncMicroservice
        self.recorders: list[_Recorder] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def _await(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the child's asyncio loop (started on first use) and wait."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="bench-asyncio",
                             daemon=True).start()
            self._loop = loop
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self, req: dict[str, Any]) -> float:
        """Start the services of ``req``; return ``time.time()`` before the first start."""
        if self.services:
            raise RuntimeError("services are running: close them first")
        front = req.get("front", "sync")
        if front not in FRONTS:
            raise ValueError(f"unknown front {front!r}")
        names: list[str] = list(req["services"])
        options = {"url": self.url, "prefix": req["prefix"],
                   "concurrency": int(req.get("concurrency", 1)),
                   "maintenance": bool(req.get("maintenance", True))}
        self.recorders = [_Recorder() for _ in names]
        for rec in self.recorders:
            rec.reset(int(req.get("wait_n", 0)))
        self.front = front
        if front == "sync":
            from ..service import Microservice

            svcs = []
            for name, rec in zip(names, self.recorders, strict=True):
                svc = Microservice(name, **options)
                svc.on(BenchEvent)(rec.handle)
                svc.event_bus  # connect before the clock starts  # noqa: B018
                svcs.append(svc)
            self.services = svcs
            t0 = time.time()
            for svc in svcs:
                svc.start()
            return t0
        self.services = self._await(self._make_async(names, options), 60)
        t0 = time.time()
        self._await(self._start_async(), 60)
        return t0

    async def _make_async(self, names: list[str], options: dict[str, Any]) -> list[Any]:
        from ..aio import AsyncMicroservice

        svcs = []
        for name, rec in zip(names, self.recorders, strict=True):
            svc = AsyncMicroservice(name, **options)
            svc.on(BenchEvent)(_async_handler(rec))
            await svc.mq.ping()  # connect before the clock starts
            svcs.append(svc)
        return svcs

    async def _start_async(self) -> None:
        for svc in self.services:
            await svc.start()

    def handled(self) -> list[int]:
        """Every service's acknowledged count."""
        return [int(svc.stats["handled"]) for svc in self.services]

    def expect(self, n: int) -> list[int]:
        """Arm the handlers for ``n`` more events each; return the counts to add them to."""
        for rec in self.recorders:
            rec.reset(n)
        return self.handled()

    def wait(self, bases: list[int], n: int, timeout: float) -> tuple[list[int], float]:
        """Wait until every service has handled and acknowledged ``n`` events more than
        ``bases``; return how many each did and ``time.time()`` when the last was done."""
        deadline = time.monotonic() + timeout
        for rec in self.recorders:
            rec.reached.wait(max(0.0, deadline - time.monotonic()))
        while True:
            handled = [h - b for h, b in zip(self.handled(), bases, strict=True)]
            if min(handled, default=n) >= n or time.monotonic() > deadline:
                return handled, time.time()
            time.sleep(ACK_POLL)

    def first(self) -> float | None:
        firsts = [r.first for r in self.recorders if r.first is not None]
        return min(firsts) if firsts else None

    def latencies(self) -> list[float]:
        out: list[float] = []
        for rec in self.recorders:
            with rec.lock:
                out.extend(rec.latencies)
        return out

    def close(self) -> None:
        svcs, self.services = self.services, []
        if self.front == "async" and svcs:
            self._await(_close_all(svcs), 120)
            return
        threads = [threading.Thread(target=svc.close, daemon=True) for svc in svcs]
        for t in threads:  # in parallel: each stop waits for its fetcher
            t.start()
        for t in threads:
            t.join(120)


async def _close_all(svcs: list[Any]) -> None:
    await asyncio.gather(*(svc.close() for svc in svcs))


def main() -> None:
    """Entry of a child process (see the module docstring).

    ``argv[1]`` is JSON ``{"count_commands"}``; the server's URL is in ``$RELAYBUS_BENCH_URL``.
    """
    cfg = json.loads(sys.argv[1])
    # every implementation alike: the start-up heap out of the collector's sight
    gc.collect()
    gc.freeze()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if cfg.get("count_commands"):
        install_command_counter()
    host = _Host(os.environ[URL_ENV])
    window: dict[str, float] = {}

    def reply(**kw: Any) -> None:
        out.write(json.dumps(kw) + "\n")

    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "start":
                t0 = host.start(req)
                n = int(req.get("wait_n", 0))
                if n:
                    handled, t_end = host.wait([0] * len(host.services), n, req["timeout"])
                    reply(t0=t0, t_end=t_end, handled=handled, first=host.first())
                else:
                    reply(t0=t0, pid=os.getpid())
            elif op == "expect":
                bases = host.expect(int(req["n"]))
                reply(ok=True)
                handled, t_end = host.wait(bases, int(req["n"]), req["timeout"])
                reply(t_end=t_end, handled=handled, first=host.first(),
                      latencies=host.latencies() if req.get("latencies") else [])
            elif op == "begin":
                window = {"cpu": time.process_time(), "wall": time.monotonic(),
                          "commands": COUNTS["commands"], "requests": COUNTS["requests"]}
                reply(ok=True)
            elif op == "end":
                reply(cpu=time.process_time() - window["cpu"],
                      wall=time.monotonic() - window["wall"],
                      commands=COUNTS["commands"] - window["commands"],
                      requests=COUNTS["requests"] - window["requests"])
            elif op == "close":
                host.close()
                reply(ok=True)
            elif op == "exit":
                host.close()
                reply(ok=True)
                return
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as exc:
            traceback.print_exc()
            reply(error=f"{type(exc).__name__}: {exc}")


class ServiceProcess:
    """A child process running services (see the module docstring).

    ``url`` is the server its services connect to (a ``client_name`` in it names their
    connections); ``count_commands`` counts the commands they send (``end``).
    """

    def __init__(self, url: str, *, count_commands: bool = False) -> None:
        # appending: the child writes at the end whatever offset reading the tail left
        self._stderr = tempfile.TemporaryFile(mode="a+")
        env = dict(os.environ)
        # the relaybus this process runs (a source tree too), not whatever is installed
        src_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src_root, env.get("PYTHONPATH")) if p)
        env[URL_ENV] = url  # not on the command line, which every local user can read
        cfg = json.dumps({"count_commands": count_commands})
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from relaybus._bench.child import main; main()", cfg],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            bufsize=1, env=env)
        self._lines: queue_mod.Queue[str | None] = queue_mod.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, op: str, **kw: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(dict(kw, op=op)) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise RuntimeError(f"benchmark child is gone ({exc}){self._tail()}") from None

    def recv(self, timeout: float = 60.0) -> dict[str, Any]:
        """The next reply; RuntimeError when none comes in time, the child exited, or
        the reply is an error."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue_mod.Empty:
            raise RuntimeError(f"benchmark child gave no answer in {timeout:.0f}s"
                               f"{self._tail()}") from None
        if line is None:
            self.proc.wait(5)
            raise RuntimeError(f"benchmark child exited (status {self.proc.returncode})"
                               f"{self._tail()}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"benchmark child: {reply['error']}{self._tail()}")
        return reply

    def request(self, op: str, *, reply_within: float = 60.0, **kw: Any) -> dict[str, Any]:
        self.send(op, **kw)
        return self.recv(reply_within)

    def _tail(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().strip().splitlines()[-15:]
        return (":\n" + "\n".join(lines)) if lines else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request("exit", reply_within=60)
                self.proc.wait(10)
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        self._stderr.close()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
