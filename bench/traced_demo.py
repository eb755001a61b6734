"""The order-flow demo under OpenTelemetry: how many spans and traces it makes.

Sets the SDK's tracer provider with an in-memory exporter (as an application would;
relaybus is told nothing), runs the demo on a private embedded server, and prints the
spans by name and the number of traces (one per order: every event an order causes is
published from a handler, inside its ``process`` span)::

    .venv/bin/python bench/traced_demo.py
"""

from __future__ import annotations

import collections
import io

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from rich.console import Console

from relaybus.demo import run_demo


def main() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    code = run_demo(console=Console(file=io.StringIO()))
    spans = exporter.get_finished_spans()
    traces = {s.context.trace_id for s in spans if s.context is not None}
    print(f"demo exit {code}: {len(spans)} spans in {len(traces)} traces")
    for name, n in collections.Counter(s.name for s in spans).most_common():
        print(f"  {n:4d} {name}")


if __name__ == "__main__":
    main()
