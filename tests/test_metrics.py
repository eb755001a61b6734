"""Prometheus metrics, the metrics port's health endpoints and ``relaybus health``."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from helpers_aio import running_service
from helpers_service import Ping
from relaybus import EventBus, MessageQueue, Microservice, Reject
from relaybus.cli import app
from relaybus.errors import ConfigurationError
from relaybus.metrics import RelaybusCollector, serve
from relaybus.runner import load_service
from waiting import wait_for

PING = "test.service.ping"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(got: Samples, name: str, **labels: str) -> float | None:
    return got.get((name, frozenset(labels.items())))


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def bus(redis_url: str, prefix: str) -> Iterator[EventBus]:
    b = EventBus(redis_url, prefix=prefix)
    yield b
    b.close()


def handle(event: Any) -> None:
    if isinstance(event, Ping) and event.n == 1:
        raise Reject("n is 1")


@pytest.mark.parametrize("front", ["sync", "async"])
def test_a_service_serves_its_counts_by_type_and_outcome_and_its_queues(
        front: str, redis_url: str, prefix: str, bus: EventBus) -> None:
    name = f"metrics-{front}"
    with running_service(front, redis_url, prefix, name, "*", handle,  # type: ignore[arg-type]
                         metrics_port=0) as svc:
        port = svc._metrics_server.port
        bus.publish_many([Ping(n=0), Ping(n=0), Ping(n=0), Ping(n=1)])
        bus.publish_raw(PING, {"n": "not a number"})  # fails validation
        bus.publish_raw("test.metrics.unknown", {"x": 1})  # no class for its type
        wait_for(lambda: svc.stats["handled"] == 3 and svc.stats["dead_lettered"] == 3, 15,
                 "every event settled")
        status, text = get(port, "/metrics")
    assert status == 200
    got = samples(text)
    ping = PING
    counted = {outcome: value(got, "relaybus_events_handled_total", service=name,
                              event_type=ping, outcome=outcome)
               for outcome in ("handled", "dead_lettered", "invalid")}
    assert counted == {"handled": 3, "dead_lettered": 1, "invalid": 1}
    assert value(got, "relaybus_events_handled_total", service=name, event_type="other",
                 outcome="invalid") == 1  # an unknown type's label is bounded: "other"
    assert value(got, "relaybus_events_received_total", service=name, event_type=ping) == 5
    # the handler ran for the four valid Pings (three returned, one rejected)
    assert value(got, "relaybus_handler_duration_seconds_count", service=name,
                 event_type=ping) == 4
    assert value(got, "relaybus_handler_duration_seconds_bucket", service=name,
                 event_type=ping, le="+Inf") == 4
    settles = value(got, "relaybus_settle_round_trips_total", service=name)
    assert settles is not None and 1 <= settles <= 6
    assert value(got, "relaybus_events_in_flight", service=name) == 0
    queue = f"sub:{name}"
    assert value(got, "relaybus_broker_up") == 1
    assert value(got, "relaybus_queue_dlq_messages", queue=queue) == 3
    assert value(got, "relaybus_queue_waiting_messages", queue=queue) == 0
    assert value(got, "relaybus_queue_consumers", queue=queue) == 1
    # a service's port reports its own queues only: every instance of every service
    # would report the same figures for the others
    assert {dict(labels).get("queue") for name, labels in got
            if name.startswith("relaybus_queue_")} == {queue}


def test_the_metrics_port_answers_healthz_and_readyz_within_bounds(
        redis_url: str, prefix: str, bus: EventBus) -> None:
    release = threading.Event()
    with running_service("sync", redis_url, prefix, "probed", Ping,
                         lambda event: release.wait(30), metrics_port=0, prefetch=1) as svc:
        port = svc._metrics_server.port
        bus.publish_many([Ping(n=0) for _ in range(4)])
        wait_for(lambda: svc.stats["received"] == 1, 15, "the first event delivered")
        assert get(port, "/healthz") == (200, "ok: running\n")
        status, body = get(port, "/readyz")
        assert status == 200 and body.startswith("ok: ") and "1 queue" in body
        # one event runs (prefetch 1): three wait
        status, body = get(port, "/readyz?max_lag=2")
        assert status == 503 and "sub:probed has 3 messages waiting (more than 2)" in body
        assert get(port, "/readyz?max_lag=3")[0] == 200
        assert get(port, "/readyz?max_lag=many")[0] == 503
        release.set()
        wait_for(lambda: svc.stats["handled"] == 4, 15, "every event handled")
        assert get(port, "/readyz?max_lag=0&max_oldest=60")[0] == 200
        svc.stop()
        assert get(port, "/healthz") == (503, "unhealthy: not running\n")
        assert get(port, "/readyz")[0] == 503


def test_the_exporter_serves_every_queue_of_the_bus(redis_url: str, prefix: str,
                                                    bus: EventBus) -> None:
    bus.subscribe("idle", None)  # a subscription no one reads: its lag grows
    bus.subscribe("other", [PING])
    bus.publish_many([Ping(n=0) for _ in range(3)])
    mq = MessageQueue(redis_url, prefix=prefix)
    server = serve(port=0, host="127.0.0.1", queues=mq)  # what `relaybus metrics` runs
    try:
        status, text = get(server.port, "/metrics")
        assert get(server.port, "/healthz")[0] == 200
        assert "sub:idle has 3" in get(server.port, "/readyz?max_lag=1")[1]
    finally:
        server.close()
        mq.close()
    assert status == 200
    got = samples(text)
    assert value(got, "relaybus_queue_waiting_messages", queue="sub:idle") == 3
    assert value(got, "relaybus_queue_waiting_messages", queue="sub:other") == 3
    assert value(got, "relaybus_queue_consumers", queue="sub:idle") == 0
    assert value(got, "relaybus_event_log_entries", queue="all") == 3
    assert value(got, "relaybus_queue_dlq_messages", queue="all") == 0
    assert value(got, "relaybus_queue_waiting_messages", queue="all") is None
    result = CliRunner().invoke(app, ["metrics", "--help"])
    assert result.exit_code == 0 and "--port" in result.output


def test_a_collector_in_the_applications_registry_counts_publishes(
        redis_url: str, prefix: str, bus: EventBus) -> None:
    registry = CollectorRegistry()
    registry.register(RelaybusCollector(bus))
    first = Ping(n=1)
    bus.publish_many([first, Ping(n=2)])
    bus.publish(first)  # a repeat within the dedup window: not appended
    got = samples(generate_latest(registry).decode())
    assert value(got, "relaybus_events_published_total", event_type=PING) == 2
    assert value(got, "relaybus_publish_duplicates_total") == 1
    assert value(got, "relaybus_event_log_entries", queue="all") == 2


def test_a_broker_down_at_scrape_time_costs_only_the_queue_metrics(bus: EventBus) -> None:
    dead = MessageQueue("redis://127.0.0.1:1/0", retry_timeout=0.1)
    registry = CollectorRegistry()
    registry.register(RelaybusCollector(bus, queues=dead))
    got = samples(generate_latest(registry).decode())
    assert value(got, "relaybus_broker_up") == 0
    assert not any(name.startswith("relaybus_queue_") for name, _ in got)
    assert value(got, "relaybus_publish_duplicates_total") == 0
    dead.close()


def test_metrics_port_is_validated_and_relaybus_run_sets_it(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="metrics_port must be a port number"):
        Microservice("m", url="redis://127.0.0.1:1/0", metrics_port=70000)
    module = tmp_path / "metrics_app.py"
    module.write_text("from relaybus import Microservice\n"
                      "svc = Microservice('m', url='redis://127.0.0.1:1/0')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    svc = load_service("metrics_app:svc", metrics_port=9464)
    assert svc.metrics_port == 9464


def test_relaybus_health_exits_by_the_bounds_and_says_why(
        redis_url: str, prefix: str, bus: EventBus) -> None:
    bus.subscribe("idle", None)
    bus.publish_many([Ping(n=0) for _ in range(3)])

    def health(*args: str, url: str = redis_url) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["health", *args, "--url", url, "--prefix", prefix])
        return result.exit_code, result.output

    code, out = health()
    assert code == 0 and out.startswith("ok: ") and "1 queue" in out
    code, out = health("--max-lag", "2")
    assert code == 1 and "unhealthy: " in out and "sub:idle has 3 messages waiting" in out
    assert health("--max-lag", "3", "--max-oldest", "3600")[0] == 0
    code, out = health("--timeout", "0.2", url="redis://:secret@127.0.0.1:1/0")
    assert code == 1 and "does not answer" in out and "secret" not in out
    assert len(out.strip().splitlines()) == 1
