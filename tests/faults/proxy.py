"""A TCP proxy on loopback that understands RESP well enough to cut it where it hurts.

The test runs it in its own process (threads) and points a child at ``proxy.url``.
It forwards commands at once and replies one whole reply at a time, pairing each
reply with the command it answers, so a rule can act on "the reply to that
command"::

    proxy = RespProxy(server.url)
    proxy.drop_reply(is_exec, times=5, every=40, name="ack")  # it runs, its reply is lost
    proxy.cut_waiting(is_blocking_read)            # drop a connection blocked in a read

A dropped reply closes the client's connection (as a network failure would): the
server has run the command, the client never hears back.
"""

from __future__ import annotations

import collections
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

Command = list[bytes]


def _line_end(buf: bytes | bytearray, pos: int) -> int:
    return buf.find(b"\r\n", pos)


def parse_command(buf: bytearray, pos: int) -> tuple[Command, int] | None:
    """One client command (a RESP array of bulk strings, or an inline command) at ``pos``."""
    if pos >= len(buf):
        return None
    if buf[pos:pos + 1] != b"*":  # inline command
        end = _line_end(buf, pos)
        if end < 0:
            return None
        return bytes(buf[pos:end]).split(), end + 2
    end = _line_end(buf, pos)
    if end < 0:
        return None
    count = int(buf[pos + 1:end])
    p = end + 2
    args: Command = []
    for _ in range(max(count, 0)):
        end = _line_end(buf, p)
        if end < 0:
            return None
        size = int(buf[p + 1:end])
        start = end + 2
        if len(buf) < start + size + 2:
            return None
        args.append(bytes(buf[start:start + size]))
        p = start + size + 2
    return args, p


def reply_end(buf: bytearray, pos: int) -> int | None:
    """Where the RESP2/RESP3 reply starting at ``pos`` ends, or None if incomplete."""
    if pos >= len(buf):
        return None
    kind = buf[pos:pos + 1]
    end = _line_end(buf, pos)
    if end < 0:
        return None
    if kind in (b"+", b"-", b":", b"_", b",", b"#", b"("):
        return end + 2
    if kind in (b"$", b"!", b"="):
        size = int(buf[pos + 1:end])
        if size < 0:
            return end + 2
        stop = end + 2 + size + 2
        return stop if len(buf) >= stop else None
    if kind in (b"*", b"~", b">", b"%", b"|"):
        count = int(buf[pos + 1:end])
        if count < 0:
            return end + 2
        if kind in (b"%", b"|"):
            count *= 2
        p: int | None = end + 2
        for _ in range(count):
            assert p is not None
            p = reply_end(buf, p)
            if p is None:
                return None
        if kind == b"|":  # attributes precede the reply they annotate
            return reply_end(buf, p) if p is not None else None
        return p
    raise ValueError(f"not RESP: {bytes(buf[pos:pos + 20])!r}")


def name_of(cmd: Command) -> str:
    return cmd[0].decode("ascii", "replace").upper() if cmd else ""


@dataclass
class _Rule:
    match: Callable[[Command, bytes], bool]
    times: int
    every: int
    name: str = ""
    seen: int = 0
    fired: int = 0

    def fires(self, cmd: Command, reply: bytes) -> bool:
        if self.fired >= self.times or not self.match(cmd, reply):
            return False
        self.seen += 1
        if self.seen % self.every:
            return False
        self.fired += 1
        return True


class _Link:
    """One client connection and its upstream, with the commands awaiting replies."""

    def __init__(self, proxy: RespProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.waiting: collections.deque[Command] = collections.deque()
        self.lock = threading.Lock()
        self.closed = False

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def pump_commands(self) -> None:
        buf = bytearray()
        try:
            while True:
                data = self.client.recv(65536)
                if not data:
                    break
                buf += data
                pos = 0
                while (parsed := parse_command(buf, pos)) is not None:
                    cmd, pos = parsed
                    with self.lock:
                        self.waiting.append(cmd)
                del buf[:pos]
                self.upstream.sendall(data)
        except OSError:
            pass
        self.close()

    def pump_replies(self) -> None:
        buf = bytearray()
        try:
            while True:
                data = self.upstream.recv(65536)
                if not data:
                    break
                buf += data
                pos = 0
                out = bytearray()
                while (end := reply_end(buf, pos)) is not None:
                    reply = bytes(buf[pos:end])
                    pos = end
                    with self.lock:
                        cmd = self.waiting.popleft() if self.waiting else []
                    if self.proxy._should_drop(cmd, reply):
                        if out:
                            self.client.sendall(out)
                        self.close()
                        return
                    out += reply
                del buf[:pos]
                if out:
                    self.client.sendall(out)
        except OSError:
            pass
        self.close()


class RespProxy:
    """Forwards loopback connections to the server at ``target_url``; see the module doc."""

    def __init__(self, target_url: str) -> None:
        parsed = urlparse(target_url)
        self.target = (parsed.hostname or "127.0.0.1", parsed.port or 6379)
        self._db = parsed.path.strip("/") or "0"
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._links: list[_Link] = []
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._closed = False
        #: replies dropped, per command name
        self.dropped: collections.Counter[str] = collections.Counter()
        #: replies dropped, per rule name (``drop_reply(..., name=...)``)
        self.dropped_by: collections.Counter[str] = collections.Counter()
        #: connections cut while their command waited for a reply, per command name
        self.cut: collections.Counter[str] = collections.Counter()
        threading.Thread(target=self._accept_loop, name="faults-proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{self._db}"

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            link = _Link(self, client, upstream)
            with self._lock:
                self._links = [x for x in self._links if not x.closed] + [link]
            threading.Thread(target=link.pump_commands, daemon=True).start()
            threading.Thread(target=link.pump_replies, daemon=True).start()

    def _should_drop(self, cmd: Command, reply: bytes) -> bool:
        with self._lock:
            for rule in self._rules:
                if rule.fires(cmd, reply):
                    self.dropped[name_of(cmd)] += 1
                    self.dropped_by[rule.name or name_of(cmd)] += 1
                    return True
        return False

    def drop_reply(self, match: Callable[[Command, bytes], bool], *, times: int = 1,
                   every: int = 1, name: str = "") -> None:
        """Lose the reply of every ``every``-th command ``match`` accepts, ``times`` times.

        ``match(command, reply)`` sees the command's arguments and the server's reply;
        ``name`` counts the rule's drops in :attr:`dropped_by`.
        """
        with self._lock:
            self._rules.append(_Rule(match, times, max(1, every), name))

    def waiting(self, match: Callable[[Command], bool]) -> int:
        """Connections whose oldest unanswered command ``match`` accepts."""
        with self._lock:
            links = list(self._links)
        n = 0
        for link in links:
            with link.lock:
                if not link.closed and link.waiting and match(link.waiting[0]):
                    n += 1
        return n

    def cut_waiting(self, match: Callable[[Command], bool]) -> int:
        """Drop every connection whose oldest unanswered command ``match`` accepts."""
        with self._lock:
            links = list(self._links)
        n = 0
        for link in links:
            with link.lock:
                head = link.waiting[0] if link.waiting and not link.closed else None
            if head is not None and match(head):
                link.close()
                self.cut[name_of(head)] += 1
                n += 1
        return n

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()


def is_blocking_read(cmd: Command) -> bool:
    """XREADGROUP or XREAD with BLOCK."""
    return name_of(cmd) in ("XREADGROUP", "XREAD") and any(a.upper() == b"BLOCK" for a in cmd)


def is_xadd(cmd: Command, reply: bytes) -> bool:
    return name_of(cmd) == "XADD"


def is_exec(cmd: Command, reply: bytes) -> bool:
    """The EXEC of a MULTI/EXEC transaction (relaybus: the settle of acknowledgements)."""
    return name_of(cmd) == "EXEC"


def is_read_of(stream: bytes) -> Callable[[Command, bytes], bool]:
    """An XREADGROUP of new entries (``>``) of ``stream``, blocking or not, whose reply
    carries entries (not a timeout's null)."""

    def match(cmd: Command, reply: bytes) -> bool:
        return (name_of(cmd) == "XREADGROUP" and len(cmd) >= 2 and cmd[-2] == stream
                and cmd[-1] == b">" and reply[:3] not in (b"*-1", b"_\r\n", b"*0\r"))

    return match


def delivers_entries(cmd: Command, reply: bytes) -> bool:
    """A blocking XREADGROUP whose reply carries entries (not a timeout's null)."""
    return is_blocking_read(cmd) and reply[:3] not in (b"*-1", b"_\r\n", b"*0\r")
