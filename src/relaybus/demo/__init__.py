"""The order-flow demo: four services talking only through events.

``relaybus demo`` runs it: an order service creates orders (``OrderCreated``); a
payment service charges them, declining about 10% (``PaymentProcessed``); a shipping
service ships paid orders (``OrderShipped``); a notification service subscribes to
every event. The order service follows each order to a final state (shipped or
payment failed). By default everything runs in one process on a private embedded
server that is removed afterwards; ``processes=True`` runs each service and a router
in its own OS process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from relaybus.connection import redact
from relaybus.embedded import EmbeddedServer
from relaybus.keys import QueueKeys
from relaybus.service import Microservice
from relaybus.testing import plain_client

from .services import (
    FINAL_STATES,
    SERVICES,
    build_service,
    create_orders,
    notifications_key,
    orders_key,
    retries_key,
)

__all__ = ["DemoResult", "run_demo"]

#: The environment variable the demo passes its server's URL to its processes in (a
#: command line is visible to every user of the machine; the URL may hold a password).
URL_ENV = "RELAYBUS_DEMO_URL"
#: Key prefix the demo uses: its own, so it never touches an application's subscriptions
#: on the same server (``relaybus queues --prefix demo:`` shows it after ``--keep``).
DEMO_PREFIX = "demo:"


@dataclass
class DemoResult:
    """What a demo run ended with."""

    orders: dict[str, dict[str, object]] = field(default_factory=dict)
    notifications: int = 0
    bounced: int = 0
    retries: int = 0
    elapsed: float = 0.0
    complete: bool = False

    @property
    def stuck(self) -> list[str]:
        """Order ids that did not reach a final state."""
        return sorted(o for o, r in self.orders.items() if r.get("status") not in FINAL_STATES)


@contextlib.contextmanager
def _server(url: str | None, keep: bool, console: Console) -> Iterator[str]:
    if url:
        yield url
        return
    if keep:
        state = EmbeddedServer().start()
        console.print(f"[dim]embedded server {redact(state.url)} (data in {state.data_dir}; "
                      "stop it with `relaybus server stop`)[/dim]")
        yield state.url
        return
    tmp = tempfile.mkdtemp(prefix="relaybus-demo-")
    server = EmbeddedServer(tmp)
    try:
        yield server.start().url
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _bounce_dlq(prefix: str) -> str:
    """The dead-letter queue the bounced confirmations land in."""
    return QueueKeys(prefix, "sub:notification").dlq


def _snapshot(client: redis.Redis, prefix: str, run: str, result: DemoResult,
              dlq_before: int) -> None:
    with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(orders_key(prefix, run))
        pipe.get(notifications_key(prefix, run))
        pipe.xlen(_bounce_dlq(prefix))
        pipe.get(retries_key(prefix, run))
        raw, notes, bounced, retries = pipe.execute()
    result.orders = {(k.decode() if isinstance(k, bytes) else k): json.loads(v)
                     for k, v in raw.items()}
    result.notifications = int(notes or 0)
    result.bounced = int(bounced or 0) - dlq_before  # this run's (a kept server has others)
    result.retries = int(retries or 0)


def _spawn(name: str, url: str, prefix: str, run: str, seed: int, orders: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "relaybus.demo.worker", name, prefix, run, str(seed),
           str(orders)]  # the URL (it may hold a password) goes in the environment
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=None,
                            env={**os.environ, URL_ENV: url})


def run_demo(*, url: str | None = None, orders: int = 10, seed: int = 1, processes: bool = False,
             keep: bool = False, timeout: float = 60.0, console: Console | None = None,
             prefix: str = DEMO_PREFIX) -> int:
    """Run the order flow; print progress and a table; return the exit code.

    0 when every order reached a final state within ``timeout`` seconds, 1 otherwise
    (the stuck orders are named). ``prefix`` is the key prefix of the bus.
    """
    console = console or Console()
    result = DemoResult()
    run = uuid.uuid4().hex[:8]
    with _server(url, keep, console) as server_url:
        client = plain_client(server_url)  # any URL relaybus takes, a cluster's too
        dlq_before = int(client.xlen(_bounce_dlq(prefix)))
        started = time.monotonic()
        services: list[Microservice] = []
        procs: list[subprocess.Popen[bytes]] = []
        try:
            if processes:
                procs.append(_spawn("maintenance", server_url, prefix, run, seed, orders))
                procs += [_spawn(n, server_url, prefix, run, seed, orders) for n in SERVICES]
            else:
                services = [build_service(n, url=server_url, prefix=prefix, run=run,
                                          seed=seed, maintenance=(n == "order"))
                            for n in SERVICES]
                for svc in services:
                    svc.start()
                create_orders(services[0], run, orders, seed)
            result = _watch(client, prefix, run, orders, timeout, started, console, procs,
                            dlq_before)
        finally:
            # stop the services side by side: each waits out its blocking read
            stoppers = [threading.Thread(target=svc.close) for svc in services]
            for t in stoppers:
                t.start()
            for t in stoppers:
                t.join()
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
            client.close()
    _report(result, orders, processes, console, prefix)
    return 0 if result.complete else 1


def _watch(client: redis.Redis, prefix: str, run: str, orders: int, timeout: float, started: float,
           console: Console, procs: list[subprocess.Popen[bytes]], dlq_before: int
           ) -> DemoResult:
    result = DemoResult()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("orders settled", total=orders, note="")
        while True:
            _snapshot(client, prefix, run, result, dlq_before)
            done = sum(1 for r in result.orders.values() if r.get("status") in FINAL_STATES)
            progress.update(task, completed=done,
                            note=f"{result.notifications} notifications")
            result.elapsed = time.monotonic() - started
            # complete once every order is final and every event has been notified
            expected_notes = len(result.orders) + sum(
                1 + (r.get("status") == "shipped") for r in result.orders.values()
                if r.get("status") in FINAL_STATES)
            if len(result.orders) == orders and done == orders and \
                    result.notifications + result.bounced >= expected_notes:
                result.complete = True
                return result
            if result.elapsed > timeout:
                return result
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                console.print(f"[red]{len(dead)} demo process(es) exited early[/red]")
                return result
            time.sleep(0.05)


def _report(result: DemoResult, orders: int, processes: bool, console: Console,
            prefix: str) -> None:
    table = Table(title=f"Orders ({'one process per service' if processes else 'one process'})")
    for col in ("order", "status", "amount", "payment", "carrier", "tracking"):
        table.add_column(col)
    for oid in sorted(result.orders):
        r = result.orders[oid]
        style = {"shipped": "green", "payment_failed": "red"}.get(str(r.get("status")), "yellow")
        table.add_row(oid, f"[{style}]{r.get('status')}[/{style}]", f"{r.get('amount', '')}",
                      str(r.get("payment", "")), str(r.get("carrier", "")),
                      str(r.get("tracking", "")))
    console.print(table)
    shipped = sum(1 for r in result.orders.values() if r.get("status") == "shipped")
    failed = sum(1 for r in result.orders.values() if r.get("status") == "payment_failed")
    # every order: created (payment, notification), payment (order, shipping,
    # notification), shipped (order, notification)
    handled = 2 * len(result.orders) + 3 * (shipped + failed) + 2 * shipped
    console.print(f"{orders} orders: {shipped} shipped, {failed} payment failed; "
                  f"{handled} events handled in {result.elapsed:.2f}s "
                  f"({handled / max(result.elapsed, 1e-9):.0f}/s)")
    console.print(f"{result.notifications} notifications sent, {result.bounced} bounced "
                  f"(dead-lettered: relaybus dlq list sub:notification --prefix {prefix}); "
                  f"{result.retries} "
                  "carrier time-outs retried")
    if not result.complete:
        stuck = result.stuck or ["(orders not all created)"]
        console.print(f"[red]not finished: stuck orders: {', '.join(stuck[:20])}[/red]")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo(processes=os.environ.get("DEMO_PROCESSES") == "1"))
