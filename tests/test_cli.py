"""The ``relaybus`` command (issue 5), driven through typer's CliRunner on the real server.

Every command runs with ``--url`` and ``--prefix`` of this test, so nothing touches
./.relaybus. Waiting is polling a condition with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import types
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import redis
from typer.main import get_command
from typer.testing import CliRunner, Result

from cli_app import CliOrderPlaced
from relaybus import EventBus, MessageQueue, Microservice, Queue, QueueInfo, Reject
from relaybus.bus import EVENTS_QUEUE
from relaybus.cli import app
from relaybus.cli.live import Sample, rates, top_rows
from relaybus.embedded import EmbeddedServer
from relaybus.keys import QueueKeys
from relaybus.testing import one_server
from waiting import wait_for

T = TypeVar("T")


Invoke = Callable[..., Result]


@pytest.fixture
def cli(redis_url: str, prefix: str) -> Invoke:
    """Run ``relaybus ARGS --url <test server> --prefix <test prefix>``."""

    def invoke(*args: str, input: str | None = None, connect: bool = True) -> Result:
        extra = ["--url", redis_url, "--prefix", prefix] if connect else []
        return CliRunner().invoke(app, [*args, *extra], input=input)

    return invoke


@pytest.fixture
def bus(redis_url: str, prefix: str) -> Iterator[EventBus]:
    b = EventBus(redis_url, prefix=prefix, retry_timeout=5.0)
    yield b
    b.close()


def ok(result: Result) -> Result:
    """Assert exit 0 (showing the output and any traceback otherwise)."""
    if result.exit_code != 0:
        tb = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        raise AssertionError(f"exit {result.exit_code}\n{result.output}\n{tb}")
    return result


def rows(result: Result) -> list[dict[str, Any]]:
    data = json.loads(ok(result).stdout)
    assert isinstance(data, list)
    return data


def no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def fresh_reader(bus: EventBus, service: str) -> Queue:
    """A new reader of the subscription queue: its first fetch is a periodic one, which
    reads the queue's own stream (where requeued messages go), not only the log."""
    return bus.subscription_queue(service)[0]


def dead_letter(bus: EventBus, service: str, count: int = 1, *,
                reason: str = "ValueError: boom", event_type: str = "cli.Thing",
                details: dict[str, Any] | None = None) -> tuple[Queue, Queue, list[str]]:
    """Subscribe ``service``, put ``count`` events in its queue, dead-letter them all."""
    queue, dlq = bus.mq.create_queue_pair(f"sub:{service}")
    for n in range(count):
        queue.send_message({"event_type": event_type, "event_id": f"e{n}", "n": n})
    messages = queue.get_messages(count=count)
    assert len(messages) == count
    queue.move_to_dlq([m.id for m in messages], reason, details=details)
    return queue, dlq, [m.id for m in dlq.peek(count=count)]


# -- help, usage, exit codes ------------------------------------------------------------

def test_help_groups_commands_in_panels() -> None:
    result = ok(CliRunner().invoke(app, ["--help"], env={"COLUMNS": "120"}))
    out = result.stdout
    positions = {name: out.index(name) for name in ("Running", "Inspecting", "Repairing")}
    assert positions["Running"] < positions["Inspecting"] < positions["Repairing"]
    panels = {
        "Running": ["demo", "run", "maintain", "server"],
        "Inspecting": ["queues", "subscriptions", "tail", "top", "dashboard"],
        "Repairing": ["dlq", "publish"],
    }
    bounds = sorted(positions.values()) + [len(out)]
    for panel, commands in panels.items():
        start = positions[panel]
        section = out[start: min(b for b in bounds if b > start)]
        for command in commands:
            assert f" {command} " in section, (panel, command)


def test_bench_help_names_every_scenario_of_the_benchmarks() -> None:
    from relaybus._bench import SCENARIOS

    out = ok(CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "200"})).stdout
    listed = out.split("(default: all):", 1)[1].split(".", 1)[0]
    assert [n.strip() for n in listed.split(",")] == [s.name for s in SCENARIOS]


def test_every_command_and_option_has_a_one_line_help() -> None:
    def walk(command: Any, path: str) -> Iterator[tuple[str, Any]]:
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    for path, command in walk(get_command(app), "relaybus"):
        if path != "relaybus":
            assert (command.help or "").strip(), f"{path} has no help"
            assert len(command.help.strip().splitlines()[0]) <= 100, path
        for param in command.params:
            if param.name in ("install_completion", "show_completion"):
                continue
            assert (getattr(param, "help", None) or "").strip(), f"{path} {param.name}"


@pytest.mark.parametrize("args", [
    ["no-such-command"],
    ["queues", "--no-such-option"],
    ["dlq", "list"],
    ["dlq", "show", "sub:x"],
    ["dlq", "show", "sub:x", "not-an-id"],
    ["publish", "cli.Thing"],
    ["publish", "cli.Thing", "{not json"],
    ["publish", "cli.Thing", "[1, 2]"],
    ["tail", "--count", "0"],
    ["top", "--interval", "0"],
])
def test_usage_errors_exit_2(cli: Invoke, args: list[str]) -> None:
    result = cli(*args)
    assert result.exit_code == 2, result.output
    no_traceback(result)


def test_bad_prefix_is_a_usage_error(redis_url: str) -> None:
    result = CliRunner().invoke(app, ["queues", "--url", redis_url, "--prefix", "bad prefix"])
    assert result.exit_code == 2
    assert "prefix" in result.stderr
    no_traceback(result)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port bound by nobody listening: connections are refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("args", [
    ["queues"],
    ["subscriptions"],
    ["dlq", "list", "sub:x"],
    ["dlq", "requeue", "sub:x", "--all"],
    ["dlq", "purge", "sub:x", "--yes"],
    ["publish", "cli.Thing", "{}"],
    ["tail", "--count", "1"],
    ["top", "--iterations", "1"],
    ["maintain"],
])
def test_unreachable_broker_exits_1_naming_it(closed_port: int, args: list[str]) -> None:
    started = time.monotonic()
    result = CliRunner().invoke(app, [*args, "--url", f"redis://127.0.0.1:{closed_port}/0",
                                      "--timeout", "0.3"])
    assert time.monotonic() - started < 5
    assert result.exit_code == 1, result.output
    no_traceback(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{closed_port}" in lines[0], result.stderr


def test_an_inspecting_command_gives_up_on_a_wrong_url_within_two_seconds(
        closed_port: int) -> None:
    url = f"redis://:hidden-pw@127.0.0.1:{closed_port}/0"
    started = time.monotonic()
    result = CliRunner().invoke(app, ["queues", "--url", url])  # the default --timeout
    assert time.monotonic() - started < 3.5
    assert result.exit_code == 1, result.output
    assert f"redis://:***@127.0.0.1:{closed_port}/0" in result.stderr
    assert "hidden-pw" not in result.output


@pytest.mark.parametrize("args", [
    ["queues"],
    ["subscriptions"],
    ["dlq", "list", "sub:x"],
    ["dlq", "show", "sub:x", "1-0"],
    ["tail", "--count", "1"],
    ["top", "--iterations", "1"],
])
def test_read_only_commands_never_start_a_server(tmp_path: Path, args: list[str]) -> None:
    data_dir = tmp_path / "none"
    try:
        result = CliRunner().invoke(app, [*args, "--url", f"embedded://{data_dir}",
                                          "--timeout", "0.5"])
        assert result.exit_code == 1, result.output
        no_traceback(result)
        assert "no embedded server is running" in result.stderr
        assert str(data_dir) in result.stderr
        assert not data_dir.exists()  # nothing started there: no state, no lock, no AOF
    finally:
        EmbeddedServer(data_dir).stop()  # had one started, it ends with the test


def test_version_through_python_dash_m() -> None:
    proc = subprocess.run([sys.executable, "-m", "relaybus", "--version"], capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("relaybus "), proc.stderr


# -- queues, subscriptions --------------------------------------------------------------

def test_queues_json_and_table(cli: Invoke, mq: MessageQueue) -> None:
    orders, _ = mq.create_queue_pair("orders")
    orders.send_messages([{"n": n} for n in range(3)])
    assert len(orders.get_messages(count=1, consumer_id="c1")) == 1
    orders.move_to_dlq(orders.get_messages(count=1, consumer_id="c1")[0].id, "bad")
    mq.create_queue_pair("empty")

    data = {r["name"]: r for r in rows(cli("queues", "--json"))}
    assert set(data) == {"orders", "empty"}
    assert data["orders"] == {"name": "orders", "waiting": 1, "pending": 1, "delayed": 0,
                              "consumers": 1, "oldest_waiting": data["orders"]["oldest_waiting"],
                              "dlq": 1}
    assert isinstance(data["orders"]["oldest_waiting"], float)
    assert data["empty"]["waiting"] == 0 and data["empty"]["oldest_waiting"] is None

    out = ok(cli("queues")).stdout
    for word in ("Name", "Waiting", "Pending", "Consumers", "Oldest waiting", "DLQ", "orders"):
        assert word in out


def test_queues_counts_a_subscriptions_backlog_and_shows_the_log_without_one(
        cli: Invoke, bus: EventBus) -> None:
    bus.subscribe("billing", ["cli.A"])
    bus.subscribe("audit")
    for etype in ("cli.A", "cli.B", "cli.A"):
        bus.publish_raw(etype, {})
    billing, _ = bus.subscription_queue("billing")
    assert len(billing.get_messages(count=1)) == 1  # the first event: pending
    billing.send_message({"event_type": "cli.A", "n": 0})  # as a requeued one would wait

    data = {r["name"]: r for r in rows(cli("queues", "--json"))}
    assert set(data) == {"all", "sub:audit", "sub:billing"}
    # waiting: the log entries its group has not read (of every type) + its own stream's
    assert {k: data["sub:billing"][k] for k in ("waiting", "pending", "consumers")} == \
        {"waiting": 3, "pending": 1, "consumers": 1}
    assert {k: data["sub:audit"][k] for k in ("waiting", "pending", "consumers")} == \
        {"waiting": 3, "pending": 0, "consumers": 0}
    assert isinstance(data["sub:audit"]["oldest_waiting"], float)
    assert data["all"] == {"name": "all", "waiting": None, "pending": None, "delayed": None,
                           "consumers": None, "oldest_waiting": None, "dlq": 0}
    out = ok(cli("queues")).stdout
    assert "event log all: 3 events kept" in out and "sub:billing" in out


def test_queues_when_there_are_none(cli: Invoke) -> None:
    assert rows(cli("queues", "--json")) == []
    assert "no queues" in ok(cli("queues")).stdout


def test_subscriptions_remove_says_what_it_deletes_and_asks_first(
        cli: Invoke, bus: EventBus, raw: redis.Redis, prefix: str) -> None:
    bus.subscribe("retired", ["cli.Old"])
    bus.subscribe("kept", ["cli.Old"])
    for n in range(3):
        bus.publish_raw("cli.Old", {"n": n})
    queue, dlq = bus.subscription_queue("retired")
    [first] = queue.get_messages(count=1)
    queue.move_to_dlq(first.id, "bad")
    declined = cli("subscriptions", "remove", "retired", input="n\n")
    assert declined.exit_code == 1, declined.output
    assert "2 waiting" in declined.stdout and "1 in its dead-letter queue" in declined.stdout
    assert "retired" in bus.subscriptions() and dlq.peek() != []
    done = ok(cli("subscriptions", "remove", "retired", input="y\n"))
    assert "removed subscription 'retired'" in done.stdout
    assert list(bus.subscriptions()) == ["kept"]
    assert not raw.keys(QueueKeys(prefix, "sub:retired").stream + "*")  # no key of it left
    groups = {g["name"] for g in raw.xinfo_groups(QueueKeys(prefix, EVENTS_QUEUE).stream)}
    assert groups == {b"sub:kept"}  # its place in the log is gone, the other stays
    missing = cli("subscriptions", "remove", "retired", "--yes")
    assert missing.exit_code == 1 and "no subscription 'retired'" in missing.stderr
    assert rows(cli("subscriptions", "--json"))[0]["service"] == "kept"


def test_subscriptions_remove_counts_every_partition(cli: Invoke, redis_url: str,
                                                     raw: redis.Redis, prefix: str) -> None:
    with EventBus(redis_url, prefix=prefix, partitions=3) as parted:
        parted.subscribe("retired", ["cli.Old"])
        for n in range(12):  # keys spread over the partitions
            parted.publish_raw("cli.Old", {"n": n, "partition_key": f"k{n}"})
        assert sum(parted.mq.get_queue(f"sub:retired@{i}" if i else "sub:retired")
                   .get_info().waiting_messages > 0 for i in range(3)) > 1
    declined = cli("subscriptions", "remove", "retired", input="n\n")
    assert "12 waiting" in declined.stdout and "over 3 partitions" in declined.stdout
    ok(cli("subscriptions", "remove", "retired", "--yes"))
    assert not raw.keys(f"{prefix}*sub:retired*")  # every partition's keys are gone


def test_unreadable_subscription_entries_are_shown_apart_and_can_be_removed(
        cli: Invoke, bus: EventBus, raw: redis.Redis, prefix: str) -> None:
    """Entries another tool (or a hand) wrote that are no valid subscription: listed as
    warnings, the rest shown as usual, and removable by their stored name."""
    bus.subscribe("good", ["cli.A"])
    table = prefix + "subscriptions"
    raw.hset(table, mapping={"bad name": '["cli.A"]', "notjson": "{{{", "odd": "[1, null]"})
    raw.xgroup_create(QueueKeys(prefix, EVENTS_QUEUE).stream, "sub:bad name", "$")
    shown = ok(cli("subscriptions", "--json"))
    assert [r["service"] for r in rows(shown)] == ["good"]
    for name in ("bad name", "notjson", "odd"):
        assert f"subscription entry {name!r} is unreadable" in shown.stderr
    assert "relaybus subscriptions remove 'bad name'" in shown.stderr
    gone = ok(cli("subscriptions", "remove", "bad name", "--yes"))
    assert "an unreadable entry" in gone.stdout and "removed subscription 'bad name'" in gone.stdout
    assert not raw.hexists(table, "bad name")
    groups = {g["name"] for g in raw.xinfo_groups(QueueKeys(prefix, EVENTS_QUEUE).stream)}
    assert groups == {b"sub:good"}  # its group on the log (holding back the trim) is gone
    assert "bad name" not in ok(cli("subscriptions")).stderr


def test_subscriptions_json_table_and_no_side_effect(cli: Invoke, redis_url: str,
                                                     prefix: str, mq: MessageQueue) -> None:
    writer = EventBus(redis_url, prefix=prefix)
    writer.subscribe("billing", ["cli.B", "cli.A"])
    writer.subscribe("audit")
    writer.mq.delete_queue(EVENTS_QUEUE)  # the reader must not recreate the event log
    writer.close()

    assert rows(cli("subscriptions", "--json")) == [
        {"service": "audit", "queue": "sub:audit", "event_types": ["*"]},
        {"service": "billing", "queue": "sub:billing", "event_types": ["cli.A", "cli.B"]},
    ]
    out = ok(cli("subscriptions")).stdout
    assert "sub:billing" in out and "cli.A, cli.B" in out and " all" in out
    assert mq.get_queue(EVENTS_QUEUE) is None


# -- dlq --------------------------------------------------------------------------------

def test_dlq_list_reads_without_consuming(cli: Invoke, bus: EventBus) -> None:
    _, dlq, ids = dead_letter(bus, "billing", 3, details={"attempts": 5})
    for name in ("sub:billing", "sub:billing:dlq", "billing"):
        listed = rows(cli("dlq", "list", name, "--json"))
        assert [r["id"] for r in listed] == ids
    row = listed[0]
    assert row["event_type"] == "cli.Thing" and row["reason"] == "ValueError: boom"
    assert row["attempts"] == 5
    assert row["first_failure"].endswith("+00:00") and row["last_failure"]
    assert [r["id"] for r in rows(cli("dlq", "list", "billing", "--limit", "2", "--json"))] \
        == ids[:2]
    table = ok(cli("dlq", "list", "billing", "--limit", "2")).stdout
    assert "2 of 3 messages" in table and "ValueError: boom" in table and "Reason" in table
    info = dlq.get_info()
    assert info.message_count == 3 and info.pending_messages == 0


def test_dlq_show_has_payload_headers_and_history(cli: Invoke, bus: EventBus) -> None:
    queue, dlq = bus.mq.create_queue_pair("sub:billing")
    queue.send_message({"event_type": "cli.Thing", "amount": 12}, headers={"trace": "t-1"})
    msg = queue.get_messages()[0]
    queue.schedule_retry(msg.id, 0, "TimeoutError: first")
    msg = wait_for(lambda: queue.get_messages())[0]
    tb = 'Traceback (most recent call last):\n  File "billing.py", line 3\nKeyError: \'x\'\n'
    queue.move_to_dlq(msg.id, "KeyError: 'x'", details={"traceback": tb, "service": "billing"})
    entry_id = dlq.peek()[0].id

    out = ok(cli("dlq", "show", "billing", entry_id)).stdout
    for text in (entry_id, "cli.Thing", '"amount": 12', "trace", "t-1", "TimeoutError: first",
                 "KeyError: 'x'", 'File "billing.py", line 3', "service: billing", "#2"):
        assert text in out, text
    assert out.index("TimeoutError: first") < out.index("KeyError: 'x'")

    shown = rows(cli("dlq", "show", "sub:billing:dlq", entry_id, "--json"))[0]
    assert shown["payload"] == {"event_type": "cli.Thing", "amount": 12}
    assert shown["headers"] == {"trace": "t-1"}
    assert [f["reason"] for f in shown["failures"]] == ["TimeoutError: first", "KeyError: 'x'"]
    assert shown["failures"][-1]["traceback"] == tb

    missing = cli("dlq", "show", "billing", "1-1")
    assert missing.exit_code == 1 and "no message 1-1" in missing.stderr
    no_traceback(missing)


def test_dlq_requeue_by_id_brings_the_event_back_to_be_handled(
        cli: Invoke, bus: EventBus, redis_url: str, prefix: str) -> None:
    """A running service rejects each order once; requeued, it handles it (the requeued
    message waits in the subscription's own stream until the service's next periodic
    fetch: within a quarter of its visibility timeout when idle)."""
    runs: Counter[str] = Counter()
    handled: list[str] = []
    svc = Microservice("billing", url=redis_url, prefix=prefix, visibility_timeout=1.0,
                       block_for_seconds=0.2, maintenance=False)

    @svc.on(CliOrderPlaced)
    def charge(event: CliOrderPlaced) -> None:
        runs[event.order_id] += 1
        if runs[event.order_id] == 1:
            raise Reject("card declined")
        handled.append(event.order_id)

    svc.start()
    try:
        dlq = svc.subscription_dlq
        bus.publish_many([CliOrderPlaced(order_id=f"o-{n}", total=n) for n in range(2)])
        wait_for(lambda: len(dlq.peek()) == 2, what="two rejections")
        dead = {m.data["order_id"]: m for m in dlq.peek()}
        assert dead["o-0"].reason == "card declined"

        result = ok(cli("dlq", "requeue", "sub:billing", dead["o-0"].id))
        assert "requeued 1 message from sub:billing:dlq to sub:billing" in result.stdout
        wait_for(lambda: handled == ["o-0"], what="the requeued event to be handled")
        assert [m.id for m in dlq.peek()] == [dead["o-1"].id]

        assert rows(cli("dlq", "requeue", "billing", dead["o-1"].id, "--json")) == [
            {"queue": "sub:billing:dlq", "destination": "sub:billing", "requeued": 1}]
        wait_for(lambda: handled == ["o-0", "o-1"], what="the second one")
        assert dlq.peek() == [] and runs == {"o-0": 2, "o-1": 2}
    finally:
        svc.close()


def test_dlq_requeue_all_and_by_reason(cli: Invoke, bus: EventBus) -> None:
    queue, dlq, _ = dead_letter(bus, "billing", 2, reason="TimeoutError: slow")
    source, _ = bus.mq.create_queue_pair("sub:billing")
    source.send_message({"event_type": "cli.Thing", "n": 9})
    source.move_to_dlq(source.get_messages()[0].id, "ValueError: nope")

    assert rows(cli("dlq", "requeue", "billing", "--reason-contains", "TIMEOUT", "--json")
                )[0]["requeued"] == 2
    again = fresh_reader(bus, "billing").get_messages(count=10)  # its first fetch reads them
    assert sorted(m.data["n"] for m in again) == [0, 1]
    assert {m.reason for m in again} == {"TimeoutError: slow"}  # the history travels along
    assert [m.reason for m in dlq.peek()] == ["ValueError: nope"]
    assert "requeued 1 message" in ok(cli("dlq", "requeue", "billing", "--all")).stdout
    assert dlq.peek() == []
    assert [m.data["n"] for m in fresh_reader(bus, "billing").get_messages(count=10)] == [9]
    assert "requeued 0 messages" in ok(cli("dlq", "requeue", "billing", "--all")).stdout


def test_dlq_requeue_needs_exactly_one_selection_and_reports_missing_ids(
        cli: Invoke, bus: EventBus) -> None:
    _, dlq, ids = dead_letter(bus, "billing", 1)
    for args in ([], [ids[0], "--all"], ["--all", "--reason-contains", "x"]):
        result = cli("dlq", "requeue", "billing", *args)
        assert result.exit_code == 2, (args, result.output)
    result = cli("dlq", "requeue", "billing", ids[0], "1-1")
    assert result.exit_code == 1
    assert "requeued 1 message" in result.stdout and "1 of the given ids" in result.stderr


def test_dlq_purge_asks_unless_yes(cli: Invoke, bus: EventBus) -> None:
    _, dlq, _ = dead_letter(bus, "billing", 2)
    refused = cli("dlq", "purge", "billing", input="n\n")
    assert refused.exit_code == 1 and "Delete 2 messages from sub:billing:dlq?" in refused.output
    assert len(dlq.peek()) == 2
    assert "purged 2 messages" in ok(cli("dlq", "purge", "billing", input="y\n")).stdout
    assert dlq.peek() == []
    dead_letter(bus, "billing", 1)
    assert rows(cli("dlq", "purge", "billing", "--yes", "--json")) == [
        {"queue": "sub:billing:dlq", "purged": 1}]


def test_dlq_of_an_unknown_queue_exits_1(cli: Invoke) -> None:
    for args in (["list", "nope"], ["show", "nope", "1-0"], ["requeue", "nope", "--all"],
                 ["purge", "nope", "--yes"]):
        result = cli("dlq", *args)
        assert result.exit_code == 1, args
        assert "no queue named 'nope'" in result.stderr
        no_traceback(result)


# -- publish ----------------------------------------------------------------------------

def test_publish_without_app_sends_the_fields_as_given(cli: Invoke, bus: EventBus) -> None:
    queue, _ = bus.subscription_queue("audit")
    bus.subscribe("audit", ["cli.Anything"])
    out = rows(cli("publish", "cli.Anything", '{"a": [1, 2], "b": "x"}', "--json"))[0]
    assert out["event_type"] == "cli.Anything" and out["id"] and out["event_id"]
    (msg,) = queue.get_messages(count=10)
    assert msg.id == f"all/{out['id']}"
    assert msg.data["a"] == [1, 2] and msg.data["b"] == "x"
    assert msg.data["event_type"] == "cli.Anything" and msg.data["event_id"] == out["event_id"]
    assert isinstance(msg.data["timestamp"], float)
    result = ok(cli("publish", "cli.Anything", "{}"))
    assert result.stdout.startswith("published cli.Anything ")
    assert "no class validated this 'cli.Anything' event" in result.stderr


def test_publish_help_shows_a_real_example(cli: Invoke) -> None:
    text = ok(cli("publish", "--help", connect=False)).stdout
    assert "relaybus publish order.created '{\"order_id\"" in text


def test_publish_with_app_validates_then_publishes(cli: Invoke, bus: EventBus) -> None:
    queue, _ = bus.subscription_queue("shop")
    bus.subscribe("shop", ["cli.OrderPlaced"])
    result = ok(cli("publish", "cli.OrderPlaced", '{"order_id": "o-1", "total": "9.5"}',
                    "--app", "cli_app", "--json"))
    assert "no class validated" not in result.stderr
    out = json.loads(result.stdout)[0]
    (msg,) = queue.get_messages(count=10)
    data = msg.data
    assert data["order_id"] == "o-1" and data["total"] == 9.5 and data["quantity"] == 1
    assert data["event_id"] == out["event_id"]


def test_publish_with_app_shows_validation_errors_field_by_field(cli: Invoke,
                                                                 mq: MessageQueue) -> None:
    result = cli("publish", "cli.OrderPlaced", '{"total": "lots", "colour": "red"}',
                 "--app", "cli_app")
    assert result.exit_code == 1
    no_traceback(result)
    lines = result.stderr.strip().splitlines()
    assert "invalid 'cli.OrderPlaced' event" in lines[0]
    assert any(line.strip().startswith("order_id: Field required") for line in lines)
    assert any(line.strip().startswith("total: ") and "'lots'" in line for line in lines)
    assert any(line.strip().startswith("colour: ") for line in lines)
    log = Queue(mq, EVENTS_QUEUE)
    assert log.peek() == []  # nothing was published


def test_publish_with_app_unknown_type_or_module(cli: Invoke) -> None:
    unknown = cli("publish", "cli.Nope", "{}", "--app", "cli_app")
    assert unknown.exit_code == 1 and "cli.OrderPlaced" in unknown.stderr
    missing = cli("publish", "cli.Nope", "{}", "--app", "no_such_module_here")
    assert missing.exit_code == 2 and "no_such_module_here" in missing.output
    mismatch = cli("publish", "cli.A", '{"event_type": "cli.B"}')
    assert mismatch.exit_code == 2


# -- tail -------------------------------------------------------------------------------

def test_tail_from_start_renders_events_and_consumes_nothing(cli: Invoke, bus: EventBus,
                                                            raw: redis.Redis,
                                                            prefix: str) -> None:
    bus.subscribe("audit")
    ids = [bus.publish_raw(t, {"n": n}) for n, t in enumerate(["cli.A", "cli.B", "cli.A"])]
    started = time.monotonic()
    result = ok(cli("tail", "--from-start", "--count", "3", "--max-seconds", "10"))
    assert time.monotonic() - started < 5
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    for line, entry_id, etype, n in zip(lines, ids, ["cli.A", "cli.B", "cli.A"], range(3),
                                        strict=True):
        assert etype in line and entry_id in line and f'{{"n":{n}}}' in line
        assert line[2] == ":" and line[5] == ":"  # HH:MM:SS first

    only_a = ok(cli("tail", "--from-start", "--type", "cli.A", "--count", "2", "--json"))
    events = [json.loads(line) for line in only_a.stdout.splitlines()]
    assert [(e["type"], e["id"], e["payload"]["n"]) for e in events] == \
        [("cli.A", ids[0], 0), ("cli.A", ids[2], 2)]
    info = bus.subscription_queue("audit")[0].get_info()
    assert (info.waiting_messages, info.pending_messages) == (3, 0)  # all still for the service
    groups = raw.xinfo_groups(QueueKeys(prefix, EVENTS_QUEUE).stream)
    assert [g["name"] for g in groups] == [b"sub:audit"]  # tail joined no group


def test_tail_stops_after_max_seconds(cli: Invoke) -> None:
    started = time.monotonic()
    result = ok(cli("tail", "--max-seconds", "0.3"))
    assert time.monotonic() - started < 3 and result.stdout == ""


def test_tail_follows_events_published_after_it_started(cli: Invoke, bus: EventBus,
                                                        raw: redis.Redis, redis_url: str) -> None:
    if not one_server(redis_url):
        pytest.skip("inspects one server's connections (CLIENT LIST)")
    db = raw.connection_pool.connection_kwargs.get("db", 0)

    def publish_when_tail_blocks() -> None:
        wait_for(lambda: any(c.get("cmd") == "xread" and str(c.get("db")) == str(db)
                             for c in raw.client_list()), timeout=10)
        bus.publish_raw("cli.Live", {"n": 1})
        bus.publish_raw("cli.Live", {"n": 2})

    bus.publish_raw("cli.Old", {"n": 0})  # before the tail: not shown without --from-start
    thread = threading.Thread(target=publish_when_tail_blocks, daemon=True)
    thread.start()
    result = ok(cli("tail", "--count", "2", "--max-seconds", "15"))
    thread.join(timeout=10)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all("cli.Live" in line for line in lines), result.stdout


# -- top --------------------------------------------------------------------------------

def test_top_renders_frames(cli: Invoke, mq: MessageQueue) -> None:
    orders, _ = mq.create_queue_pair("orders")
    orders.send_messages([{"n": n} for n in range(4)])
    started = time.monotonic()
    result = ok(cli("top", "--iterations", "2", "--interval", "0.2"))
    assert time.monotonic() - started < 5
    out = result.stdout
    assert out.count("relaybus top") == 2
    for word in ("Rate in", "Rate out", "Waiting", "Pending", "DLQ", "Consumers", "orders"):
        assert word in out

    frames = [json.loads(line) for line in
              ok(cli("top", "--iterations", "2", "--interval", "0.2", "--json")
                 ).stdout.splitlines()]
    assert len(frames) == 2
    assert frames[0][0]["name"] == "orders" and frames[0][0]["rate_in"] is None
    assert frames[1][0]["waiting"] == 4 and frames[1][0]["rate_in"] == 0.0


def _info(name: str, *, count: int, waiting: int, pending: int = 0) -> QueueInfo:
    return QueueInfo(name=name, is_dlq=False, message_count=count, pending_messages=pending,
                     waiting_messages=waiting, consumer_group="relaybus", consumers=1,
                     created_at=None, oldest_waiting_age=None, visibility_timeout=30.0)


def test_top_rates_come_from_counter_deltas() -> None:
    before = Sample(10.0, {"q": _info("q", count=5, waiting=5)}, {"q": 100})
    # 2 s later: 20 more were added, 16 of them (plus 0 of the old) left; backlog 5 -> 9
    after = Sample(12.0, {"q": _info("q", count=9, waiting=6, pending=3)}, {"q": 120})
    assert rates(before, after, "q") == (10.0, 8.0)
    assert rates(None, after, "q") == (None, None)
    old_server = Sample(12.0, after.infos, {"q": None})  # no entries-added: length growth
    assert rates(before, old_server, "q") == (2.0, 0.0)


def test_top_counts_what_a_subscription_reads_from_the_log() -> None:
    """A subscription takes in every event published to the log (its waiting count holds
    them until its group reads them); the log itself has a rate in and nothing waiting."""
    before = Sample(10.0, {"all": _info("all", count=10, waiting=10),
                           "sub:s": _info("sub:s", count=0, waiting=4)},
                    {"all": 100, "sub:s": 0})
    # 2 s later: 20 published, 1 requeued into its own stream; backlog 4 -> 9: 16 went out
    after = Sample(12.0, {"all": _info("all", count=30, waiting=30),
                          "sub:s": _info("sub:s", count=1, waiting=7, pending=2)},
                   {"all": 120, "sub:s": 1})
    assert rates(before, after, "sub:s") == (10.5, 8.0)
    assert rates(before, after, "all") == (10.0, None)
    log_row = {r["name"]: r for r in top_rows(before, after)}["all"]
    assert (log_row["waiting"], log_row["pending"], log_row["consumers"]) == (None, None, None)


# -- server, maintain, run, demo ----------------------------------------------------------

def test_server_start_status_stop(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "srv")
    runner = CliRunner()
    try:
        status = runner.invoke(app, ["server", "status", "--data-dir", data_dir])
        assert status.exit_code == 1 and "not running" in status.stdout
        started = ok(runner.invoke(app, ["server", "start", "--data-dir", data_dir, "--json"]))
        state = json.loads(started.stdout)[0]
        # the server's password never shows: the URL is redacted
        assert state["running"] is True and state["url"].startswith("redis://:***@127.0.0.1:")
        password = EmbeddedServer(data_dir).status().password  # type: ignore[union-attr]
        assert password and password not in started.stdout
        again = ok(runner.invoke(app, ["server", "start", "--data-dir", data_dir]))
        assert "already running" in again.stdout and state["url"] in again.stdout
        assert password not in again.stdout
        assert json.loads(ok(runner.invoke(app, ["server", "status", "--data-dir", data_dir,
                                                 "--json"])).stdout)[0]["pid"] == state["pid"]
        embedded = ok(runner.invoke(app, ["queues", "--url", f"embedded://{data_dir}",
                                          "--json"]))
        assert json.loads(embedded.stdout) == []
        assert "stopped" in ok(runner.invoke(app, ["server", "stop", "--data-dir", data_dir])
                               ).stdout
        assert runner.invoke(app, ["server", "status", "--data-dir", data_dir]).exit_code == 1
        assert "not running" in ok(runner.invoke(app, ["server", "stop", "--data-dir",
                                                       data_dir])).stdout
    finally:
        EmbeddedServer(data_dir).stop()


def test_maintain_trims_the_log_by_retention_until_sigterm(redis_url: str, prefix: str,
                                                           bus: EventBus,
                                                           raw: redis.Redis) -> None:
    log = QueueKeys(prefix, EVENTS_QUEUE).stream
    old = [bus.publish_raw("cli.Old", {"n": n}) for n in range(6)]  # no subscriber holds them
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaybus", "maintain", "--max-len", "2", "--interval", "0.05",
         "--url", redis_url, "--prefix", prefix],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def log_ids() -> list[str]:
        return [i.decode() for i, _ in cast("list[tuple[bytes, Any]]", raw.xrange(log))]

    try:
        wait_for(lambda: log_ids() == old[-2:], timeout=15, what="the log trimmed to 2 events")
        bus.subscribe("billing", ["cli.Kept"])
        kept = [bus.publish_raw("cli.Kept", {"n": n}) for n in range(3)]
        # the older ones go; the unread ones stay, though over the limit (one trim does both)
        wait_for(lambda: log_ids() == kept, timeout=10, what="the older events trimmed")
        queue, _ = bus.subscription_queue("billing")
        read = queue.get_messages(count=10)
        assert [m.id for m in read] == [f"all/{i}" for i in kept]
        queue.acknowledge_messages([m.id for m in read])
        wait_for(lambda: log_ids() == kept[-2:], timeout=10, what="the read events trimmed")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "maintaining the event log under prefix" in err and "at most 2 events" in err
    assert "maintenance stopped on SIGTERM" in err
    assert "Traceback" not in err


def test_run_passes_target_and_url_to_the_runner(cli: Invoke, redis_url: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import relaybus.runner

    calls: list[Any] = []

    def load_service(target: str, url: str | None = None,
                     metrics_port: int | None = None) -> str:
        calls.append((target, url, metrics_port))
        return "svc"

    def run_service(service: str, *, start_timeout: float | None) -> None:
        calls.append((service, start_timeout))

    monkeypatch.setattr(relaybus.runner, "load_service", load_service)
    monkeypatch.setattr(relaybus.runner, "run_service", run_service)
    ok(cli("run", "pkg.mod:svc", connect=False))
    ok(cli("run", "pkg.mod:svc", "--url", redis_url, "--timeout", "2.5", "--metrics-port",
           "9464", connect=False))
    # without --url (or RELAYBUS_URL) the service keeps the URL its code gives it; without
    # --timeout it waits for its broker until it answers; without --metrics-port it
    # serves no metrics
    assert calls == [("pkg.mod:svc", None, None), ("svc", None),
                     ("pkg.mod:svc", redis_url, 9464), ("svc", 2.5)]


def test_run_with_a_bad_target_is_a_usage_error(cli: Invoke, redis_url: str) -> None:
    for target in ("no_colon_here", "no_such_module_xyz:svc", "cli_app:missing"):
        result = cli("run", target, "--url", redis_url, connect=False)
        assert result.exit_code == 2, (target, result.output)
        no_traceback(result)


def test_demo_passes_its_options_and_exit_code(cli: Invoke,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def run_demo(**kwargs: Any) -> int:
        calls.append(kwargs)
        return 3

    fake = types.ModuleType("relaybus.demo")
    fake.run_demo = run_demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "relaybus.demo", fake)
    result = cli("demo", "--orders", "4", "--seed", "1", "--processes", "--keep",
                 "--timeout", "9", connect=False)
    assert result.exit_code == 3
    assert calls == [{"url": None, "orders": 4, "seed": 1, "processes": True, "keep": True,
                      "timeout": 9.0}]
    ok(cli("demo", "--help", connect=False))
