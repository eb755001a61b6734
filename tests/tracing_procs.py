"""Processes for tests/test_tracing.py: a traced publisher and a traced service.

    python tests/tracing_procs.py publish URL PREFIX [--no-tracing]
    python tests/tracing_procs.py serve URL PREFIX FRONT SPANS

Each sets the OpenTelemetry SDK's tracer provider with an in-memory exporter (as an
application does; relaybus itself is not told), does its part, and prints one line:
``spans [...]``, every finished span as JSON (name, kind, ids, parent, status,
attributes).

- publish: under a root span ``checkout``, publishes three :class:`Traced` events
  (``mode`` ``retry``, ``reject`` and ``ok``) with one ``publish_many``; prints
  ``published {mode: event_id}`` first. ``--no-tracing``: the bus is given
  ``tracing=False``.
- serve: runs a service ``traced`` of FRONT (sync or async) until SPANS ``process``
  spans have ended. Its handler raises on the first attempt of ``retry``, rejects
  ``reject`` until the key PREFIX + ``fixed`` exists (the test sets it, then
  requeues the DLQ), and for ``ok`` publishes a :class:`Shipped` event, which the
  same service handles in a plain ``def`` handler that opens a span ``ship`` of its
  own. Prints ``ready`` once subscribed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

sys.path.insert(0, str(Path(__file__).parent))

from relaybus import AsyncMicroservice, Event, EventBus, Microservice, Reject  # noqa: E402
from relaybus.testing import plain_client  # noqa: E402
from waiting import wait_for  # noqa: E402


class Traced(Event, event_type="test.tracing.order"):
    mode: str


class Shipped(Event, event_type="test.tracing.shipped"):
    order_id: str


def _install() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


def _span(s: ReadableSpan) -> dict[str, Any]:
    ctx = s.get_span_context()
    assert ctx is not None
    return {"name": s.name, "kind": s.kind.name, "trace_id": f"{ctx.trace_id:032x}",
            "span_id": f"{ctx.span_id:016x}",
            "parent_id": f"{s.parent.span_id:016x}" if s.parent is not None else None,
            "status": s.status.status_code.name, "attributes": dict(s.attributes or {}),
            "events": [e.name for e in s.events]}


def _print_spans(exporter: InMemorySpanExporter) -> None:
    print("spans " + json.dumps([_span(s) for s in exporter.get_finished_spans()]), flush=True)


def publish(url: str, prefix: str, tracing: bool = True) -> None:
    exporter = _install()
    bus = EventBus(url, prefix=prefix, tracing=tracing)
    events = [Traced(mode=m) for m in ("retry", "reject", "ok")]
    with trace.get_tracer("checkout-app").start_as_current_span("checkout"):
        bus.publish_many(events)
    bus.close()
    print("published " + json.dumps({e.mode: e.event_id for e in events}), flush=True)
    _print_spans(exporter)


def serve(url: str, prefix: str, front: str, wanted: int) -> None:
    exporter = _install()
    client = plain_client(url)
    attempts: dict[str, int] = {}

    def processed() -> int:
        return sum(1 for s in exporter.get_finished_spans() if s.name.startswith("process "))

    def on_order(event: Traced) -> Event | None:
        attempts[event.event_id] = attempts.get(event.event_id, 0) + 1
        if event.mode == "retry" and attempts[event.event_id] == 1:
            raise RuntimeError("first attempt fails")
        if event.mode == "reject" and not client.exists(prefix + "fixed"):
            raise Reject("not fixed yet")
        return Shipped(order_id=event.event_id) if event.mode == "ok" else None

    def ship() -> None:  # the application's own span, inside the handler's
        with trace.get_tracer("shipping-app").start_as_current_span("ship"):
            pass

    options: dict[str, Any] = dict(url=url, prefix=prefix, maintenance=False,
                                   block_for_seconds=0.2, retry_backoff=0.01,
                                   retry_backoff_max=0.05)
    if front == "sync":
        svc = Microservice("traced", **options)

        @svc.on(Traced)
        def handle_order(event: Traced) -> None:
            follow = on_order(event)
            if follow is not None:
                svc.publish_event(follow)

        @svc.on(Shipped)
        def handle_shipped(event: Shipped) -> None:
            ship()

        svc.start()
        print("ready", flush=True)
        wait_for(lambda: processed() >= wanted, 30, f"{wanted} process spans")
        svc.close()
    else:
        async def main() -> None:
            asvc = AsyncMicroservice("traced", **options)

            @asvc.on(Traced)
            async def handle_order(event: Traced) -> None:
                follow = on_order(event)
                if follow is not None:
                    await asvc.publish_event(follow)

            @asvc.on(Shipped)
            def handle_shipped(event: Shipped) -> None:  # a plain def: run in a thread
                ship()

            await asvc.start()
            print("ready", flush=True)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: wait_for(
                lambda: processed() >= wanted, 30, f"{wanted} process spans"))
            await asvc.close()

        asyncio.run(main())
    client.close()
    _print_spans(exporter)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "publish":
        publish(args[0], args[1], tracing="--no-tracing" not in args)
    else:
        serve(args[0], args[1], args[2], int(args[3]))
