"""OpenTelemetry spans for publishing and handling, when the application traces.

Spans follow the messaging semantic conventions: ``send {destination}`` (PRODUCER)
per event published, ``process {subscription}`` (CONSUMER) around each handler run.
The producer span's context travels in the event's ``headers`` as W3C
``traceparent``/``tracestate`` (the global propagator), so it survives the log,
retries and DLQ requeues: every run of the handler, on any instance, is a child of it.

On when ``opentelemetry-api`` is installed and the application has set a tracer
provider (a proxy provider with nothing behind it means off: no span is built), and
the bus or service was not given ``tracing=False``. Both fronts call these; nothing
here does IO.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # the extra is not installed: tracing is off
    trace = None  # type: ignore[assignment]

__all__ = ["active", "sending", "processing", "record_outcome", "SYSTEM"]

#: ``messaging.system`` of every span.
SYSTEM = "redis"


#: Seconds a "no provider set" answer is kept: a provider the application sets later
#: is noticed within this time, and the hot path does not ask for every event.
RECHECK_SECONDS = 1.0
_provider_set = False
_unset_until = 0.0


def active(enabled: bool) -> bool:
    """True when spans are to be made: enabled, the API installed, a provider set."""
    global _provider_set, _unset_until
    if not enabled or trace is None:
        return False
    if _provider_set:
        return True  # a provider, once set, stays set
    now = time.monotonic()
    if now < _unset_until:
        return False
    _provider_set = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    _unset_until = now + RECHECK_SECONDS
    return _provider_set


def _tracer() -> Any:
    from .. import __version__  # late: the package is still importing when this is
    return trace.get_tracer("relaybus", __version__)


@contextlib.contextmanager
def sending(enabled: bool, events: Sequence[Any], destination: str
            ) -> Iterator[list[Mapping[str, str]] | None]:
    """A PRODUCER span per event for the duration of the block; yields the headers to
    add to each event (the span's context), or None when not tracing. The spans end
    when the block does, with an error status when it raised."""
    if not events or not active(enabled):
        yield None
        return
    tracer = _tracer()
    spans: list[Any] = []
    carriers: list[Mapping[str, str]] = []
    for event in events:
        span = tracer.start_span(f"send {destination}", kind=SpanKind.PRODUCER, attributes={
            "messaging.system": SYSTEM, "messaging.operation.type": "send",
            "messaging.operation.name": "send", "messaging.destination.name": destination,
            "messaging.message.id": str(getattr(event, "event_id", "")),
            "relaybus.event.type": str(getattr(event, "event_type", "")),
            **({"messaging.batch.message_count": len(events)} if len(events) > 1 else {})})
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        spans.append(span)
        carriers.append(carrier)
    try:
        yield carriers
    except BaseException as exc:
        for span in spans:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            span.set_attribute("error.type", type(exc).__qualname__)
        raise
    finally:
        for span in spans:
            span.end()


@contextlib.contextmanager
def processing(enabled: bool, headers: Mapping[str, str], *, event_id: str, event_type: str,
               subscription: str, service: str, attempt: int) -> Iterator[bool]:
    """The CONSUMER span of one handler run, current for the block (spans the handler
    makes are its children; events it publishes carry its context); its parent is
    the producer's span, from ``headers``. Yields whether it traces."""
    if not active(enabled):
        yield False
        return
    parent = propagate.extract(dict(headers))
    with _tracer().start_as_current_span(
            f"process {subscription}", context=parent, kind=SpanKind.CONSUMER,
            record_exception=False, set_status_on_exception=False, attributes={
                "messaging.system": SYSTEM, "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": subscription,
                "messaging.destination.subscription.name": service,
                "messaging.consumer.group.name": service, "messaging.message.id": event_id,
                "relaybus.event.type": event_type, "relaybus.delivery.attempt": attempt}):
        yield True


def record_outcome(outcome: str, error: BaseException | None) -> None:
    """Mark the current ``process`` span with the run's outcome (``handled``,
    ``retried``, ``dead_lettered``) and, when the handler raised, its exception (call it
    only where :func:`processing` traces)."""
    span = trace.get_current_span()
    span.set_attribute("relaybus.outcome", outcome)
    if error is not None:
        span.record_exception(error)
        span.set_attribute("error.type", type(error).__qualname__)
    if outcome != "handled":
        span.set_status(Status(StatusCode.ERROR, outcome))
