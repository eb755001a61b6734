"""OpenTelemetry: one trace across a publisher and a service in two other processes.

The processes (tests/tracing_procs.py) set the SDK's tracer provider with an
in-memory exporter, as an application would, and print their finished spans; this
process sets none, so here relaybus makes no span at all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from relaybus import EventBus, MessageQueue
from relaybus.testing import plain_client
from waiting import wait_for

pytest.importorskip("opentelemetry.sdk")

PROCS = Path(__file__).with_name("tracing_procs.py")


def _line(out: str, tag: str) -> Any:
    for line in out.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    raise AssertionError(f"no {tag!r} line in:\n{out}")


def _log_headers(url: str, prefix: str) -> list[dict[str, str]]:
    """The ``headers`` of every event in the log, in publishing order."""
    mq = MessageQueue(url, prefix=prefix)
    try:
        log = mq.get_queue("all")
        return [m.data.get("headers", {}) for m in log.peek(100)] if log is not None else []
    finally:
        mq.close()


@pytest.mark.parametrize("front", ["sync", "async"])
def test_one_trace_follows_an_event_through_retries_a_dlq_requeue_and_a_follow_up(
        front: str, redis_url: str, prefix: str) -> None:
    service = subprocess.Popen([sys.executable, str(PROCS), "serve", redis_url, prefix, front,
                                "6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        assert service.stdout is not None
        assert service.stdout.readline().strip() == "ready", service.stderr
        published = subprocess.run([sys.executable, str(PROCS), "publish", redis_url, prefix],
                                   capture_output=True, text=True, timeout=60, check=True)
        ids = _line(published.stdout, "published")
        mq = MessageQueue(redis_url, prefix=prefix)
        dlq = mq.get_dead_letter_queue("sub:traced")
        assert dlq is not None
        wait_for(lambda: dlq.get_info().message_count == 1, 30, "the rejected event's DLQ entry")
        plain_client(redis_url).set(prefix + "fixed", 1)
        assert dlq.requeue_messages([m.id for m in dlq.peek(10)]) == 1
        mq.close()
        out, err = service.communicate(timeout=60)
    finally:
        service.kill()
    assert service.returncode == 0, err
    sent = _line(published.stdout, "spans")
    served = _line(out, "spans")

    [root] = [s for s in sent if s["name"] == "checkout"]
    sends = {s["attributes"]["messaging.message.id"]: s for s in sent if s["name"] == "send all"}
    assert set(sends) == set(ids.values())
    for s in sends.values():
        assert s["kind"] == "PRODUCER" and s["parent_id"] == root["span_id"]
        assert s["trace_id"] == root["trace_id"]
        assert s["attributes"]["messaging.system"] == "redis"
        assert s["attributes"]["messaging.destination.name"] == "all"
        assert s["attributes"]["messaging.batch.message_count"] == 3
    assert {s["attributes"]["relaybus.event.type"] for s in sends.values()} == \
        {"test.tracing.order"}

    runs: dict[str, list[dict[str, Any]]] = {}
    for s in served:
        if s["name"] == "process sub:traced":
            runs.setdefault(s["attributes"]["messaging.message.id"], []).append(s)
    for mode, event_id in ids.items():
        for run in runs[event_id]:  # every run, retries and requeues too: the send's child
            assert run["kind"] == "CONSUMER", run
            assert run["trace_id"] == root["trace_id"], (mode, run)
            assert run["parent_id"] == sends[event_id]["span_id"], (mode, run)
            attrs = run["attributes"]
            assert attrs["messaging.consumer.group.name"] == "traced"
            assert attrs["messaging.destination.name"] == "sub:traced"
            assert attrs["relaybus.event.type"] == "test.tracing.order"

    def outcomes(mode: str) -> list[tuple[int, str, str]]:
        return sorted((r["attributes"]["relaybus.delivery.attempt"],
                       r["attributes"]["relaybus.outcome"], r["status"])
                      for r in runs[ids[mode]])

    assert outcomes("retry") == [(1, "retried", "ERROR"), (2, "handled", "UNSET")]
    assert "exception" in min(runs[ids["retry"]], key=lambda r: r["attributes"][
        "relaybus.delivery.attempt"])["events"]
    assert [o[1:] for o in outcomes("reject")] == [("dead_lettered", "ERROR"),
                                                   ("handled", "UNSET")]
    assert outcomes("ok") == [(1, "handled", "UNSET")]

    # the follow-up published by the "ok" handler: sent inside its run, handled after
    [ok_run] = runs[ids["ok"]]
    [follow_send] = [s for s in served if s["name"] == "send all"]
    assert follow_send["parent_id"] == ok_run["span_id"]
    [shipped_run] = [s for s in served if s["name"] == "process sub:traced"
                     and s["attributes"]["relaybus.event.type"] == "test.tracing.shipped"]
    assert shipped_run["parent_id"] == follow_send["span_id"]
    [ship] = [s for s in served if s["name"] == "ship"]  # the handler's own span
    assert ship["parent_id"] == shipped_run["span_id"]
    assert {s["trace_id"] for s in served} == {root["trace_id"]}

    # the context travels in the event's headers, W3C traceparent
    headers = _log_headers(redis_url, prefix)
    assert len(headers) == 4 and all(h["traceparent"].split("-")[1] == root["trace_id"]
                                     for h in headers)


def test_tracing_false_makes_no_span_and_adds_no_header(redis_url: str, prefix: str) -> None:
    published = subprocess.run([sys.executable, str(PROCS), "publish", redis_url, prefix,
                                "--no-tracing"], capture_output=True, text=True, timeout=60,
                               check=True)
    assert [s["name"] for s in _line(published.stdout, "spans")] == ["checkout"]
    assert _log_headers(redis_url, prefix) == [{}, {}, {}]


def test_without_a_tracer_provider_nothing_is_added(redis_url: str, prefix: str) -> None:
    from relaybus import Event

    class Quiet(Event, event_type="test.tracing.quiet"):
        pass

    bus = EventBus(redis_url, prefix=prefix)  # this process set no provider
    bus.publish(Quiet(headers={"mine": "kept"}))
    bus.close()
    assert _log_headers(redis_url, prefix) == [{"mine": "kept"}]
