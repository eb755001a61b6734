"""Processes for tests/test_bus_processes.py: services, a reader and a publisher, as real programs.

    python tests/bus_procs.py service URL PREFIX NAME [--types T1,T2] [--vt S]
                                      [--prefetch N] [--hold-after N] [--no-maintenance]
    python tests/bus_procs.py reader URL PREFIX NAME
    python tests/bus_procs.py publish URL PREFIX N [--chunk C] [--pause S] [--late-type NAME]

- service: a :class:`relaybus.Microservice` named NAME (every type without
  ``--types``). Its handler records each event it handles on the Redis list
  ``PREFIX + "ledger:" + NAME`` as ``[event_id, event_type, consumer]`` (the
  service's side effect, which survives a SIGKILL). ``--hold-after N``: after
  recording its Nth event the handler never returns (the instance then holds that
  event and everything it prefetched: the moment a SIGKILL is aimed at).
- reader: reads the wildcard subscription NAME with the queue API (no event
  classes involved) and records every message on the same kind of ledger.
- publisher: publishes N events cycling through :data:`PUBLISHED_TYPES` (or, with
  ``--late-type``, of a type it defines at run time, which no other process knows).

Each writes lines on stdout: ``ready {json}`` once subscribed (``consumer``: its
consumer name), ``holding {json}`` when ``--hold-after`` blocks its handler,
``stopped {json}`` with its counters after SIGTERM; ``published {json}``:
``[[event_id, event_type], ...]`` in publishing order.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from typing import Any

from relaybus import Event, EventBus, Microservice
from relaybus.testing import plain_client

#: Event types the publisher cycles through (the services subscribe by these names).
PUBLISHED_TYPES = ("proc.order_placed", "proc.order_paid", "proc.order_shipped",
                   "proc.refunded")


class OrderPlaced(Event, event_type="proc.order_placed"):
    order_id: str


class OrderPaid(Event, event_type="proc.order_paid"):
    order_id: str


class OrderShipped(Event, event_type="proc.order_shipped"):
    order_id: str


class Refunded(Event, event_type="proc.refunded"):
    order_id: str


CLASSES: list[type[Event]] = [OrderPlaced, OrderPaid, OrderShipped, Refunded]


def say(kind: str, payload: Any) -> None:
    print(f"{kind} {json.dumps(payload)}", flush=True)


def ledger_key(prefix: str, name: str) -> str:
    """The Redis list where service ``name`` records what it handled."""
    return f"{prefix}ledger:{name}"


def service(args: argparse.Namespace) -> None:
    types = args.types.split(",") if args.types else None
    svc = Microservice(args.name, url=args.url, prefix=args.prefix, event_types=types,
                       visibility_timeout=args.vt, prefetch=args.prefetch,
                       block_for_seconds=0.5, shutdown_timeout=5.0,
                       maintenance=not args.no_maintenance, retry_timeout=10.0)
    ledger = plain_client(args.url)
    key = ledger_key(args.prefix, args.name)
    handled = 0
    lock = threading.Lock()
    never = threading.Event()

    @svc.on("*")
    def record(event: Event) -> None:
        nonlocal handled
        ledger.rpush(key, json.dumps([event.event_id, event.event_type, svc.consumer_id]))
        with lock:
            handled += 1
            hold = handled == args.hold_after
        if hold:
            say("holding", {"event_id": event.event_id, "handled": handled})
            never.wait()  # the instance holds this event (its lease kept alive) until killed

    signal.signal(signal.SIGTERM, lambda signum, frame: svc.stop())
    svc.start()
    say("ready", {"consumer": svc.consumer_id})
    svc.run_forever()
    stats = svc.stats
    svc.close()
    say("stopped", stats)


def reader(args: argparse.Namespace) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    with EventBus(args.url, prefix=args.prefix, retry_timeout=10.0) as bus:
        bus.subscribe(args.name, None)
        queue, _ = bus.subscription_queue(args.name)
        ledger = plain_client(args.url)
        key = ledger_key(args.prefix, args.name)
        say("ready", {"consumer": bus.mq.consumer_id})
        read = 0
        while not stop.is_set():
            batch = queue.get_messages(count=100, block_for_seconds=0.5)
            for message in batch:
                ledger.rpush(key, json.dumps([message.data.get("event_id"),
                                              message.data.get("event_type"),
                                              bus.mq.consumer_id]))
            if batch:
                queue.acknowledge_messages([m.id for m in batch])
                read += len(batch)
    say("stopped", {"read": read})


def publish(args: argparse.Namespace) -> None:
    classes: list[type[Any]] = list(CLASSES)
    if args.late_type:
        class DefinedLate(Event, event_type=args.late_type):  # defined now, at run time
            order_id: str

        classes = [DefinedLate]
    events = [classes[i % len(classes)](order_id=f"o-{i}") for i in range(args.count)]
    with EventBus(args.url, prefix=args.prefix, retry_timeout=10.0) as bus:
        for start in range(0, len(events), args.chunk):
            bus.publish_many(events[start: start + args.chunk])
            if args.pause:
                time.sleep(args.pause)  # pace the stream (a workload, not a synchronisation)
    say("published", [[e.event_id, e.event_type] for e in events])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("service")
    s.add_argument("url")
    s.add_argument("prefix")
    s.add_argument("name")
    s.add_argument("--types", default=None, help="comma-separated; default: every type")
    s.add_argument("--vt", type=float, default=30.0, help="visibility timeout, seconds")
    s.add_argument("--prefetch", type=int, default=None)
    s.add_argument("--hold-after", type=int, default=0,
                   help="block the handler for good after recording this many events")
    s.add_argument("--no-maintenance", action="store_true")
    r = sub.add_parser("reader")
    r.add_argument("url")
    r.add_argument("prefix")
    r.add_argument("name")
    p = sub.add_parser("publish")
    p.add_argument("url")
    p.add_argument("prefix")
    p.add_argument("count", type=int)
    p.add_argument("--chunk", type=int, default=100)
    p.add_argument("--pause", type=float, default=0.0)
    p.add_argument("--late-type", default=None)
    args = parser.parse_args(argv)
    {"service": service, "reader": reader, "publish": publish}[args.command](args)


if __name__ == "__main__":
    main()
