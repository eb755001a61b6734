"""The scenario harness: a private server we may kill, and the child processes.

:class:`Server` runs the embedded engine's binary in the foreground (its own process
group, append-only file with ``appendfsync always``, no RDB) on a free loopback port,
so a scenario can SIGKILL it, SIGSTOP it, and restart it on the same port from its
append-only file. :class:`Cluster` starts producers, maintenance processes and
services of either front (:mod:`faults.procs`), each in its own process group, and
kills every one of them when the test ends, passed or failed. It also reads the
state of the bus as the server has it: the event log ``P{all}`` and each
subscription's consumer group ``sub:NAME`` on it (native fan-out: what the group has
read, what it has not, what is delivered and unacknowledged), and each subscription's
own stream and retries.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import redis

from faults.ledger import (
    DeadLetters,
    Ledger,
    bus_dlq_key,
    log_key,
    sub_dlq_key,
    sub_group,
    sub_key,
)
from faults.procs import FRONTS, command
from relaybus.embedded import find_server_binary
from relaybus.testing import plain_client, wait_for

T = TypeVar("T")

PREFIX = "events:"


def wait_until(predicate: Callable[[], T], timeout: float, what: str,
               interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    return wait_for(predicate, timeout, what, interval)


def skewed_clock(seconds: float) -> dict[str, str]:
    """The environment that puts a child's wall clock ``seconds`` off (libfaketime,
    preloaded; its monotonic clock is left alone, as another machine's would be)."""
    import importlib.util

    spec = importlib.util.find_spec("libfaketime")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the libfaketime package is needed (pip install -e '.[dev]')")
    lib = Path(spec.submodule_search_locations[0]) / "vendor" / "libfaketime" / "src"
    preload = str(lib / "libfaketime.so.1")
    if os.environ.get("LD_PRELOAD"):
        preload += ":" + os.environ["LD_PRELOAD"]
    return {"LD_PRELOAD": preload, "FAKETIME": f"{seconds:+.0f}", "DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server process of the scenario's own, on a fixed port across restarts."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout)

    def start(self, timeout: float = 30.0) -> float:
        """Start (or restart from the append-only file); return seconds until it answered."""
        assert self.proc is None, "already running"
        cmd = [find_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "always",
               "--save", "", "--daemonize", "no", "--logfile", str(self.data_dir / "server.log"),
               *self.args]
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.starts += 1
        client = self.client(timeout=0.5)

        def answers() -> bool:
            assert self.proc is not None and self.proc.poll() is None, \
                f"server exited: {self.log_tail()}"
            try:
                return bool(client.ping())
            except (redis.ConnectionError, redis.TimeoutError):  # BusyLoadingError included
                return False

        try:
            wait_until(answers, timeout, f"the server on port {self.port}", interval=0.02)
        finally:
            client.close()
        return time.monotonic() - t0

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final flush (appendfsync always has flushed each write)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.kill()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join((self.data_dir / "server.log").read_text().splitlines()[-lines:])
        except OSError:
            return "(no server log)"


class DeploymentServer:
    """A deployment of several servers (tests/sentinel.py, tests/cluster.py) in the place
    of :class:`Server`: children get its URL (``redis+sentinel://``, ``redis+cluster://``)."""

    def __init__(self, url: str, logs: Callable[[], str], stop: Callable[[], None]) -> None:
        self.url = url
        self._logs = logs
        self._stop = stop

    def client(self, timeout: float = 5.0) -> redis.Redis:
        """A client of the deployment (it follows a failover)."""
        return plain_client(self.url)

    def log_tail(self, lines: int = 15) -> str:
        return self._logs()

    def close(self) -> None:
        self._stop()


class Child:
    """One child process (its own process group), with its logs and status."""

    def __init__(self, kind: str, label: str, args: Sequence[str], root: Path,
                 ledger: Ledger, skew: float = 0.0) -> None:
        self.kind = kind
        self.label = label
        self.ledger = ledger
        self.err_path = root / "logs" / f"{label}.err"
        self.err_path.parent.mkdir(parents=True, exist_ok=True)
        #: the front of a service child (sync or async)
        self.front = ""
        env = {k: v for k, v in os.environ.items() if k not in ("RELAYBUS_URL",)}
        env["PYTHONUNBUFFERED"] = "1"
        if skew:
            env.update(skewed_clock(skew))
        with open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen(command(kind, *args, "--label", label,
                                                 "--ledger", str(ledger.root)),
                                         stdout=err, stderr=err, env=env,
                                         start_new_session=True)
        self.started = time.time()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def status(self) -> dict[str, Any] | None:
        return self.ledger.status().get(self.label)

    def ready(self) -> bool:
        if not self.alive():
            raise AssertionError(f"{self.label} exited ({self.proc.returncode}) before it was "
                                 f"ready:\n{self.log_tail()}")
        st = self.status()
        return bool(st and (st["ready"] or self.kind == "producer"))

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the process group and reap it."""
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful stop); SIGKILL if it has not exited within ``timeout``."""
        if self.alive():
            self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.label} did not stop within {timeout}s on SIGTERM:\n"
                                 f"{self.log_tail()}") from None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.err_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


class Cluster:
    """The processes of one scenario, all on one server; closed by the fixture."""

    def __init__(self, root: Path, server: Server | DeploymentServer, prefix: str = PREFIX
                 ) -> None:
        self.root = root
        self.server = server
        self.prefix = prefix
        self.ledger = Ledger(root / "ledger")
        self.children: list[Child] = []
        self._client: redis.Redis | None = None
        self._dead: DeadLetters | None = None
        self._n = 0

    @property
    def client(self) -> redis.Redis:
        """A plain client on the server (for inspecting; it survives restarts)."""
        if self._client is None:
            self._client = self.server.client()
        return self._client

    @property
    def dead(self) -> DeadLetters:
        if self._dead is None:
            self._dead = DeadLetters(self.client, [bus_dlq_key(self.prefix)])
        return self._dead

    def spawn(self, kind: str, label: str, *args: str, url: str | None = None,
              skew: float = 0.0) -> Child:
        """Start a child; ``skew`` seconds puts its wall clock that far off."""
        self._n += 1
        child = Child(kind, f"{label}-{self._n}", ["--url", url or self.server.url,
                                                   "--prefix", self.prefix, *args],
                      self.root, self.ledger, skew)
        self.children.append(child)
        return child

    def producer(self, label: str, count: int, *, rate: float = 0.0, types: str = "alpha",
                 batch: int = 1, retry_timeout: float = 10.0, on_oom: str = "retry",
                 pad: int = 0, url: str | None = None, id_seed: str = "",
                 skew: float = 0.0, durability: str = "primary", keys: int = 0) -> Child:
        """A producer; ``keys`` > 0 gives event n the partition key ``LABEL-k(n % keys)``."""
        return self.spawn("producer", label, "--count", str(count), "--rate", str(rate),
                          "--types", types, "--batch", str(batch),
                          "--retry-timeout", str(retry_timeout), "--on-oom", on_oom,
                          "--pad", str(pad), "--id-seed", id_seed,
                          "--durability", durability, "--keys", str(keys), url=url, skew=skew)

    def maintenance(self, label: str = "maint", *, max_len: int = 100_000,
                    max_age: float = 0.0, interval: float = 0.5, retry_timeout: float = 10.0,
                    url: str | None = None, skew: float = 0.0) -> Child:
        """A process running ``EventBus.run()`` (the log's retention trim every ``interval``)."""
        return self.spawn("maintenance", label, "--max-len", str(max_len),
                          "--max-age", str(max_age), "--interval", str(interval),
                          "--retry-timeout", str(retry_timeout), url=url, skew=skew)

    def service(self, name: str, *, front: str = "sync", types: str = "*", concurrency: int = 2,
                prefetch: int = 0, vt: float = 30.0, delay: float = 0.0, max_attempts: int = 5,
                block: float = 0.5, retry_timeout: float = 10.0, url: str | None = None,
                skew: float = 0.0, durability: str = "primary", ordered: bool = False,
                fail_every: int = 0) -> Child:
        """An instance of service ``name`` on ``front`` (``sync``: Microservice, ``async``:
        AsyncMicroservice); instances of one service share its subscription, whatever
        their front. ``ordered``: ``ordered=True``, and its runs recorded (ledger.runs);
        ``fail_every`` N: events whose n is a multiple of N fail once (on any instance)."""
        assert front in FRONTS, front
        self.dead.watch(sub_dlq_key(self.prefix, name))
        child = self.spawn("service", f"svc-{name}-{front}", "--service", name, "--front", front,
                           "--types", types, "--concurrency", str(concurrency),
                           "--prefetch", str(prefetch), "--vt", str(vt), "--delay", str(delay),
                           "--max-attempts", str(max_attempts), "--block", str(block),
                           "--retry-timeout", str(retry_timeout),
                           "--durability", durability, "--fail-every", str(fail_every),
                           *(["--ordered"] if ordered else []),
                           url=url, skew=skew)
        child.front = front
        return child

    def services(self, name: str, count: int, *, first: str = "sync", **options: Any
                 ) -> list[Child]:
        """``count`` instances of ``name``, their fronts alternating (``first`` first)."""
        order = [first] + [f for f in FRONTS if f != first]
        return [self.service(name, front=order[i % 2], **options) for i in range(count)]

    def wait_ready(self, children: Iterable[Child], timeout: float = 60.0) -> None:
        for child in children:
            wait_until(child.ready, timeout, f"{child.label} to be ready")

    def terminate(self, children: Iterable[Child], timeout: float = 15.0) -> None:
        """SIGTERM every child at once (graceful stops run in parallel); wait for each.

        Fails if one does not exit within ``timeout`` (it is SIGKILLed) or exits non-zero.
        """
        kids = list(children)
        for child in kids:
            if child.alive():
                child.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in kids:
            try:  # one signal only: a second one would cut its graceful stop short
                code = child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                raise AssertionError(f"{child.label} did not stop within {timeout}s on "
                                     f"SIGTERM:\n{child.log_tail()}") from None
            assert code == 0, f"{child.label} exited with {code} on SIGTERM:\n{child.log_tail()}"

    def wait_exit(self, children: Iterable[Child], timeout: float) -> None:
        """Wait for children that end on their own (producers with a count)."""
        for child in children:
            try:
                code = child.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{child.label} still running after {timeout:.0f}s:\n"
                                     f"{child.log_tail()}") from None
            assert code == 0, f"{child.label} exited with {code}:\n{child.log_tail()}"

    # -- the state of the queues -----------------------------------------------------------

    def groups(self) -> dict[str, dict[str, Any]]:
        """The consumer groups on the event log, by name (``sub:NAME``), as XINFO GROUPS
        gives them (``entries-read``, ``lag``, ``pending``, ``last-delivered-id``)."""
        rows = self.client.xinfo_groups(log_key(self.prefix))
        out = {}
        for g in rows:
            name = g["name"].decode() if isinstance(g["name"], bytes) else str(g["name"])
            out[name] = g
        return out

    def log_info(self) -> dict[str, Any]:
        return self.client.xinfo_stream(log_key(self.prefix))

    def backlog(self, services: Iterable[str]) -> dict[str, int]:
        """What is still in motion, per service: log entries its group has not read yet
        (``lag``) or has delivered and not acknowledged (``pending``), and entries of
        its own stream (retries due again) and retries waiting for their time."""
        c = self.client
        names = list(services)
        pipe = c.pipeline(transaction=False)
        pipe.xinfo_stream(log_key(self.prefix))
        pipe.xinfo_groups(log_key(self.prefix))
        for name in names:
            pipe.xlen(sub_key(self.prefix, name))
            pipe.zcard(sub_key(self.prefix, name) + ":delayed")
        res = pipe.execute()
        info, groups = res[0], res[1]
        last = info["last-generated-id"]
        by_name = {(g["name"].decode() if isinstance(g["name"], bytes) else g["name"]): g
                   for g in groups}
        out: dict[str, int] = {}
        for i, name in enumerate(names):
            g = by_name.get(sub_group(name))
            if g is None:
                out[f"{name}_no_group"] = 1
                continue
            lag = g.get("lag")
            out[f"{name}_unread"] = int(lag) if lag is not None else \
                int(g["last-delivered-id"] != last)
            out[f"{name}_pending"] = int(g["pending"])
            out[f"{name}_queued"] = int(res[2 + 2 * i])
            out[f"{name}_delayed"] = int(res[3 + 2 * i])
        return out

    def quiet(self, services: Iterable[str]) -> bool:
        """True when every event is settled: read by every group, and handled or
        dead-lettered (nothing pending, nothing queued or waiting to be retried)."""
        try:
            return not any(self.backlog(services).values())
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False

    def wait_quiet(self, services: Iterable[str], timeout: float) -> None:
        names = list(services)
        try:
            wait_until(lambda: self.quiet(names), timeout, "every event to be settled",
                       interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.backlog(names)}") from None

    def fan_out(self, services: Iterable[str]) -> dict[str, int]:
        """Each subscription's ``entries-read`` on the log (every log entry is read once
        by each group, of its types or not), and the log's ``entries-added``."""
        groups = self.groups()
        out = {"log entries": int(self.log_info()["entries-added"])}
        for name in services:
            g = groups.get(sub_group(name), {})
            read = g.get("entries-read")
            out[name] = int(read) if read is not None else -1
        return out

    def held_by(self, service: str, pid: int) -> int:
        """Entries delivered to the consumer of process ``pid`` and not yet acknowledged:
        log entries in the service's group, and entries of its own stream."""
        total = 0
        for stream, group in ((log_key(self.prefix), sub_group(service)),
                              (sub_key(self.prefix, service), "relaybus")):
            try:
                summary = self.client.xpending(stream, group)
            except redis.ResponseError:  # no such group (yet)
                continue
            for consumer in summary.get("consumers") or []:
                name = consumer["name"].decode() if isinstance(consumer["name"], bytes) \
                    else str(consumer["name"])
                if f"-{pid}-" in name or name.endswith(f"-{pid}"):
                    total += int(consumer["pending"])
        return total

    def in_flight(self, services: Iterable[str]) -> int:
        """Events delivered and not yet acknowledged, every service together."""
        total = 0
        for name in services:
            for stream, group in ((log_key(self.prefix), sub_group(name)),
                                  (sub_key(self.prefix, name), "relaybus")):
                try:
                    total += int(self.client.xpending(stream, group)["pending"])
                except redis.ResponseError:
                    continue
        return total

    def kill_holding(self, child: Child, service: str, rng: random.Random,
                     timeout: float = 10.0) -> int:
        """SIGKILL ``child`` at a moment it holds events of ``service``; return how many.

        Freezes it (SIGSTOP) at a random moment and looks at what it holds; thaws it and
        tries again if nothing. Falls back to a plain kill after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            child.signal(signal.SIGSTOP)
            held = self.held_by(service, child.pid)
            if held or time.monotonic() >= deadline:
                child.kill()
                return held
            child.signal(signal.SIGCONT)
            time.sleep(rng.uniform(0.001, 0.02))  # a random moment for the next try

    def cpu_seconds(self, children: Iterable[Child], window: float) -> float:
        """CPU seconds the children use over ``window`` seconds (to catch a hot loop)."""
        pids = [c.pid for c in children]

        def used() -> float:
            ticks = 0
            for pid in pids:
                with open(f"/proc/{pid}/stat") as fh:
                    parts = fh.read().rsplit(")", 1)[1].split()
                ticks += int(parts[11]) + int(parts[12])  # utime + stime
            return ticks / os.sysconf("SC_CLK_TCK")

        before = used()
        time.sleep(window)  # the measurement window
        return used() - before

    def check_threads(self, children: Iterable[Child], since: float = 0.0) -> None:
        """Every child is alive, its status is fresh, and its relaybus loops all run.

        A sync service: its fetch, settle and first handler threads are alive. An async
        service: its loop runs the fetch, settle and first handler tasks, and ran the
        heartbeat task after ``since`` (the loop is not stuck). A maintenance process:
        it completed a trim round after ``since``.
        """
        for child in children:
            assert child.alive(), f"{child.label} died:\n{child.log_tail()}"
            st = wait_until(lambda c=child: (s := c.status()) and s["time"] > since and s,
                            10, f"a fresh status from {child.label}")
            name = st.get("label", "")
            if child.kind == "service" and st.get("front") == "async":
                st = wait_until(lambda c=child: (s := c.status()) and
                                s.get("loop_beat", 0) > since and s, 10,
                                f"{child.label}'s event loop to run")
                tasks = st["tasks"]
                for part in ("-fetch", "-settle", "-h0"):
                    assert any(t.endswith(part) for t in tasks), \
                        f"{name}: no {part} task among {tasks}"
                assert st["running"], f"{name} is not running"
            elif child.kind == "service":
                threads = st["threads"]
                for part in ("fetch", "settle", "handler-0"):
                    assert any(t.startswith("relaybus-") and t.endswith(part) for t in threads), \
                        f"{name}: no {part} thread among {threads}"
                assert st["running"], f"{name} is not running"
            elif child.kind == "maintenance":
                wait_until(lambda c=child: (s := c.status()) and s.get("last_round", 0) > since,
                           15, f"a trim round of {child.label}")

    def close(self) -> None:
        for child in self.children:
            if child.alive():
                child.signal(signal.SIGKILL)
        for child in self.children:
            try:
                child.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self._client is not None:
            self._client.close()

    def logs(self) -> str:
        parts = []
        for child in self.children:
            tail = child.log_tail(30)
            if tail:
                parts.append(f"--- {child.label} (exit {child.proc.poll()}) ---\n{tail}")
        parts.append(f"--- server ---\n{self.server.log_tail()}")
        return "\n".join(parts)
