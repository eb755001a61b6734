"""What one command costs the client: redis-py's client wrapper, its connection, a socket.

Run it with::

    .venv/bin/python bench/driver_cost.py              # a private embedded Valkey
    .venv/bin/python bench/driver_cost.py --calls 50000 --url redis://127.0.0.1:6379/9

It backs two claims in relaybus's source (``relaybus/_sync/driver.py`` and
``relaybus/_core/resp.py``): the drivers bypass ``Redis.execute_command`` and talk to
the pool's connections directly (``send_packed_command`` / ``read_response``), and
they pack commands with ``hiredis.pack_command`` instead of redis-py's packers.

Per call, for redis-py's sync and ``redis.asyncio`` clients (relaybus's client
settings: RESP2, no retry wrapper; and redis-py's defaults, for reference), this
process's CPU time (``time.process_time``) and the wall time:

- a ``PING`` through ``Redis.execute_command`` (pool checkout, retry wrapper, response
  callbacks, hooks);
- a ``PING`` on one connection taken from the pool: ``send_packed_command`` of the
  command packed by hiredis, then ``read_response`` (what relaybus's drivers do);
- a ``PING`` through relaybus's driver (``Driver.run`` / ``AsyncDriver.run`` of a
  one-command step: the connection call plus the step's bookkeeping);
- a ``PING`` on a raw socket (``sendall`` + ``recv``; asyncio: ``write`` + ``drain``
  + ``readuntil``): the floor, the round trip itself;
- packing a settle-sized request (no IO): ``XACK`` of 100 ids plus ``ZADD`` of 100
  members, with the connection's ``pack_commands`` (redis-py's packer: through hiredis
  for the sync client, in Python for asyncio) and with ``hiredis.pack_command`` (what
  relaybus sends), per request and per argument.

The server runs on the same machine (a private embedded Valkey unless ``--url``), so
the wall time includes its share of the cores; the CPU column is the client's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlparse

import hiredis
import redis
import redis.asyncio

from relaybus._async.driver import AsyncDriver
from relaybus._core.queue import ping
from relaybus._core.resp import pack
from relaybus._sync.driver import Driver
from relaybus.connection import ConnectionSettings
from relaybus.embedded import EmbeddedServer

PING = b"*1\r\n$4\r\nPING\r\n"
#: A settle batch's commands: 100 acknowledgements and their 100 done records.
XACK = ("XACK", "ev:{all}", "sub:billing",
        *[f"{1795705750066 + i}-{i % 3}" for i in range(100)])
ZADD = ("ZADD", "ev:{all}:sub:billing:done",
        *[x for i in range(100) for x in (1795705750166, f"{i:08x}-5a1e-4c3b-9d7e-0123456789ab")])
SETTLE_ARGS = len(XACK) + len(ZADD)


@contextlib.contextmanager
def server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="relaybus-driver-cost-") as tmp:
        srv = EmbeddedServer(tmp, appendfsync="everysec")
        state = srv.start()
        try:
            yield state.url
        finally:
            srv.stop()


Row = tuple[str, float, float, str]  # what, CPU us, wall us, note


def _per_arg(cpu_us: float) -> str:
    """A packing cost per argument and per acknowledged message (its id in XACK, its
    score and member in ZADD: 3 arguments)."""
    per = cpu_us / SETTLE_ARGS
    return f"{1e3 * per:.0f} ns/argument, {3 * per:.2f} µs per acked message"


def timed(n: int, fn: Callable[[], Any]) -> tuple[float, float]:
    """(CPU us, wall us) per call of ``fn`` over ``n`` calls, after a warm-up."""
    for _ in range(min(1000, n)):
        fn()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        fn()
    return (1e6 * (time.process_time() - c0) / n, 1e6 * (time.perf_counter() - t0) / n)


async def atimed(n: int, fn: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    for _ in range(min(1000, n)):
        await fn()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        await fn()
    return (1e6 * (time.process_time() - c0) / n, 1e6 * (time.perf_counter() - t0) / n)


def _take(pool: Any) -> Any:
    try:
        return pool.get_connection()
    except TypeError:  # redis-py < 5.3 wants a command name
        return pool.get_connection("PING")


def sync_rows(url: str, n: int) -> list[Row]:
    rows: list[Row] = []
    settings = ConnectionSettings.from_options(url)
    ours = settings.sync_client()
    default = redis.Redis.from_url(url)
    try:
        rows.append(("Redis.execute_command('PING'), relaybus's client settings",
                     *timed(n, lambda: ours.execute_command("PING")), ""))
        rows.append(("Redis.execute_command('PING'), redis-py defaults",
                     *timed(n, lambda: default.execute_command("PING")), ""))
        conn = _take(ours.connection_pool)

        def on_connection() -> Any:
            conn.send_packed_command([pack([("PING",)])])
            return conn.read_response()

        rows.append(("connection: send_packed_command + read_response",
                     *timed(n, on_connection), "what the driver does"))
        ours.connection_pool.release(conn)
        driver = Driver(settings.sync_client(), retry_timeout=settings.retry_timeout)
        step = ping()
        rows.append(("relaybus Driver.run(PING step)", *timed(n, lambda: driver.run(step)), ""))
        driver.close()
        parsed = urlparse(url)
        sock = socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6379))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if parsed.password:  # an embedded server wants its password
            sock.sendall(pack([("AUTH", parsed.password)]))
            sock.recv(64)

        def on_socket() -> bytes:
            sock.sendall(PING)
            reply = sock.recv(64)
            while not reply.endswith(b"\r\n"):
                reply += sock.recv(64)
            return reply

        rows.append(("raw socket: sendall + recv", *timed(n, on_socket), "the floor"))
        sock.close()
        conn = _take(ours.connection_pool)
        m = max(1000, n // 10)
        cpu, wall = timed(m, lambda: conn.pack_commands([XACK, ZADD]))
        rows.append(("pack a settle request: conn.pack_commands (redis-py sync)", cpu, wall,
                     _per_arg(cpu)))
        ours.connection_pool.release(conn)
        cpu, wall = timed(m, lambda: hiredis.pack_command(XACK) + hiredis.pack_command(ZADD))
        rows.append(("pack a settle request: hiredis.pack_command (relaybus)", cpu, wall,
                     _per_arg(cpu)))
    finally:
        ours.close()
        default.close()
    return rows


async def async_rows(url: str, n: int) -> list[Row]:
    rows: list[Row] = []
    settings = ConnectionSettings.from_options(url)
    ours = settings.async_client()
    default = redis.asyncio.Redis.from_url(url)
    try:
        rows.append(("await Redis.execute_command('PING'), relaybus's client settings",
                     *await atimed(n, lambda: ours.execute_command("PING")), ""))
        rows.append(("await Redis.execute_command('PING'), redis-py defaults",
                     *await atimed(n, lambda: default.execute_command("PING")), ""))
        conn = await ours.connection_pool.get_connection()  # type: ignore[no-untyped-call]

        async def on_connection() -> Any:
            await conn.send_packed_command([pack([("PING",)])])
            return await conn.read_response()

        rows.append(("connection: send_packed_command + read_response",
                     *await atimed(n, on_connection), "the connection's own calls"))
        await conn.connect()
        parser = hiredis.Reader()

        async def on_streams() -> Any:
            conn._writer.write(pack([("PING",)]))
            while (reply := parser.gets()) is False:
                parser.feed(await conn._reader.read(65536))
            return reply

        rows.append(("connection's streams + a hiredis reader",
                     *await atimed(n, on_streams), "what the driver does"))
        m = max(1000, n // 10)
        cpu, wall = timed(m, lambda: conn.pack_commands([XACK, ZADD]))
        rows.append(("pack a settle request: conn.pack_commands (redis.asyncio)", cpu, wall,
                     _per_arg(cpu)))
        await ours.connection_pool.release(conn)
        driver = AsyncDriver(settings.async_client(), retry_timeout=settings.retry_timeout)
        step = ping()
        rows.append(("relaybus AsyncDriver.run(PING step)",
                     *await atimed(n, lambda: driver.run(step)), ""))
        await driver.close()
        parsed = urlparse(url)
        reader, writer = await asyncio.open_connection(parsed.hostname or "127.0.0.1",
                                                       parsed.port or 6379)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if parsed.password:  # an embedded server wants its password
            writer.write(pack([("AUTH", parsed.password)]))
            await reader.readuntil(b"\r\n")

        async def on_stream() -> bytes:
            writer.write(PING)
            await writer.drain()
            return await reader.readuntil(b"\r\n")

        rows.append(("asyncio streams: write + drain + readuntil",
                     *await atimed(n, on_stream), "the floor on asyncio"))
        writer.close()
        await writer.wait_closed()
    finally:
        await ours.aclose()
        await default.aclose()
    return rows


def show(title: str, rows: list[Row]) -> None:
    print(title)
    print(f"  {'':66s} {'CPU µs':>8s} {'wall µs':>8s}")
    for what, cpu, wall, note in rows:
        print(f"  {what:66s} {cpu:8.1f} {wall:8.1f}  {note}")
    by = {what: cpu for what, cpu, _, _ in rows}
    wrapper = next((c for w, c in by.items() if "execute_command" in w and "relaybus" in w),
                   None)
    direct = next((c for w, c in by.items() if w.startswith("connection:")), None)
    if wrapper is not None and direct is not None:
        print(f"  -> the client wrapper costs {wrapper - direct:.1f} µs of CPU per command over "
              "the connection call")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="server URL (default: a private embedded Valkey)")
    parser.add_argument("--calls", type=int, default=20_000, help="calls per row (PINGs)")
    args = parser.parse_args()
    with server(args.url) as url:
        from importlib import metadata

        import hiredis as _h

        print(f"redis-py {metadata.version('redis')}, hiredis {getattr(_h, '__version__', '?')}; "
              f"{args.calls:,} calls per PING row; settle request = XACK of 100 ids + ZADD "
              f"of 100 members ({SETTLE_ARGS} arguments)")
        print()
        show("redis-py sync", sync_rows(url, args.calls))
        show("redis.asyncio", asyncio.run(async_rows(url, args.calls)))


if __name__ == "__main__":
    main()
