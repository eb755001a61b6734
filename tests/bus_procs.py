"""Processes for tests/test_bus_processes.py: a router and a publisher, as real programs.

    python tests/bus_procs.py router URL PREFIX [--vt S] [--batch N] [--consumer NAME]
                                                [--hold S] [--hold-at copy|ack]
    python tests/bus_procs.py publish URL PREFIX N [--chunk C] [--pause S] [--late-type NAME]

Each writes one line per event of interest on stdout:

- router: ``ready {json}`` once it is connected (``event_classes`` lists the event
  classes it knows: a router needs none), ``holding {json}`` when ``--hold`` makes it
  pause with a fetched batch (before copying it, or after copying and before
  acknowledging it: the window a SIGKILL is aimed at), ``stopped {json}`` with its
  counters after SIGTERM.
- publisher: ``published {json}``: ``[[event_id, event_type], ...]`` in publishing order.

The event classes are defined inside the publisher only, after the test subscribed.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from collections.abc import Mapping, Sequence
from typing import Any

from relaybus import EVENT_TYPES, Event, EventBus

#: Event types the publisher cycles through (the test subscribes by these names).
PUBLISHED_TYPES = ("proc.order_placed", "proc.order_paid", "proc.order_shipped",
                   "proc.refunded")


def say(kind: str, payload: Any) -> None:
    print(f"{kind} {json.dumps(payload)}", flush=True)


class HoldingBus(EventBus):
    """An EventBus that pauses with a batch in hand, so that a kill lands right there."""

    hold = 0.0
    hold_at = "copy"

    def _copy(self, copies: Mapping[str, Sequence[Any]], now_ms: int) -> int:
        if self.hold_at == "copy":
            say("holding", {"at": "copy", "events": max(len(b) for b in copies.values())})
            time.sleep(self.hold)
        return super()._copy(copies, now_ms)

    def _settle(self, good: Sequence[Any], bad: Mapping[str, list[bytes]], n_copies: int,
                n_unrouted: int) -> None:
        if self.hold_at == "ack":
            say("holding", {"at": "ack", "events": len(good), "copies": n_copies})
            time.sleep(self.hold)
        super()._settle(good, bad, n_copies, n_unrouted)


def router(args: argparse.Namespace) -> None:
    cls = HoldingBus if args.hold else EventBus
    bus = cls(args.url, prefix=args.prefix, visibility_timeout=args.vt,
              batch_size=args.batch, consumer_id=args.consumer, retry_timeout=10.0)
    if isinstance(bus, HoldingBus):
        bus.hold, bus.hold_at = args.hold, args.hold_at
    signal.signal(signal.SIGTERM, lambda signum, frame: bus.stop())
    say("ready", {"consumer": bus.mq.consumer_id, "event_classes": sorted(EVENT_TYPES)})
    try:
        bus.run()
    finally:
        bus.close()
    say("stopped", bus.stats)


def publish(args: argparse.Namespace) -> None:
    class OrderPlaced(Event, event_type="proc.order_placed"):
        order_id: str

    class OrderPaid(Event, event_type="proc.order_paid"):
        order_id: str

    class OrderShipped(Event, event_type="proc.order_shipped"):
        order_id: str

    class Refunded(Event, event_type="proc.refunded"):
        order_id: str

    classes: list[type[Any]] = [OrderPlaced, OrderPaid, OrderShipped, Refunded]
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
    r = sub.add_parser("router")
    r.add_argument("url")
    r.add_argument("prefix")
    r.add_argument("--vt", type=float, default=30.0, help="visibility timeout, seconds")
    r.add_argument("--batch", type=int, default=50)
    r.add_argument("--consumer", default=None)
    r.add_argument("--hold", type=float, default=0.0, help="pause with each batch, seconds")
    r.add_argument("--hold-at", choices=["copy", "ack"], default="copy")
    p = sub.add_parser("publish")
    p.add_argument("url")
    p.add_argument("prefix")
    p.add_argument("count", type=int)
    p.add_argument("--chunk", type=int, default=100)
    p.add_argument("--pause", type=float, default=0.0)
    p.add_argument("--late-type", default=None)
    args = parser.parse_args(argv)
    {"router": router, "publish": publish}[args.command](args)


if __name__ == "__main__":
    main()
