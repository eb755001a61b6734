"""Delayed and scheduled events: ``publish(delay=...)`` / ``publish(at=...)``.

"Never early" is checked by the server's clock: the log entry's id is the server's
time when the event was appended, and the due time comes from the server too.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from faults.harness import skewed_clock
from helpers_service import Ping
from relaybus import AsyncEventBus, EventBus
from relaybus.cli import app
from relaybus.embedded import EmbeddedServer
from relaybus.errors import ConfigurationError
from relaybus.testing import plain_client, wait_for_async
from waiting import wait_for

#: How late a scheduled event may reach the log here: a loaded CI machine's slack (the
#: maintainers here know each event's time, or round every 0.3 s).
LATE_MS = 2500


def _log_ids(bus: EventBus) -> list[str]:
    log = bus.mq.get_queue("all")
    return [m.id for m in log.peek(100)] if log is not None else []


def _ms(entry_id: str) -> int:
    return int(entry_id.split("-")[0])


def _server_ms(url: str) -> int:
    client = plain_client(url)
    try:
        secs, micros = client.time()
        return int(secs) * 1000 + int(micros) // 1000
    finally:
        client.close()


@pytest.fixture
def bus(redis_url: str, prefix: str) -> Any:
    b = EventBus(redis_url, prefix=prefix)
    yield b
    b.close()


def test_a_delayed_event_reaches_the_log_at_its_time_never_before(bus: EventBus) -> None:
    bus.subscribe("later", None)
    event = Ping(n=1)
    schedule_id = bus.publish(event, delay=1.0)
    assert schedule_id == event.event_id
    [waiting] = bus.scheduled()
    assert (waiting.schedule_id, waiting.event_type, waiting.event_id) == \
        (event.event_id, "test.service.ping", event.event_id)
    assert _log_ids(bus) == []  # nothing published yet
    bus.start()  # its maintenance promotes scheduled events
    [entry] = wait_for(lambda: _log_ids(bus), 15, "the scheduled event in the log")
    assert waiting.due_ms <= _ms(entry) <= waiting.due_ms + LATE_MS
    assert bus.scheduled() == []
    assert not bus.cancel_scheduled(schedule_id)  # published already


def test_an_event_scheduled_elsewhere_is_found_at_the_next_maintenance_round(
        redis_url: str, prefix: str, bus: EventBus) -> None:
    bus.maintenance_interval = 0.3  # the maintainer's rounds (5 s by default)
    bus.start()
    with EventBus(redis_url, prefix=prefix) as publisher:  # runs no maintenance
        publisher.publish(Ping(n=5), delay=0.5)
        [waiting] = publisher.scheduled()
    [entry] = wait_for(lambda: _log_ids(bus), 15, "the event, promoted by the maintainer")
    assert waiting.due_ms <= _ms(entry) <= waiting.due_ms + LATE_MS


def test_an_async_bus_promotes_a_delayed_event_at_its_time(redis_url: str, prefix: str,
                                                          bus: EventBus) -> None:
    async def main() -> tuple[int, list[str]]:
        async with AsyncEventBus(redis_url, prefix=prefix) as abus:
            await abus.start()  # its maintenance task promotes scheduled events
            await abus.publish(Ping(n=4), delay=0.5)
            [waiting] = await abus.scheduled()
            ids = await wait_for_async(lambda: _log_ids(bus), 15, "the event in the log")
            return waiting.due_ms, ids

    due, ids = asyncio.run(main())
    [entry] = ids
    assert due <= _ms(entry) <= due + LATE_MS


def test_an_async_bus_schedules_publishes_many_and_cancels(redis_url: str, prefix: str) -> None:
    async def main() -> tuple[list[str], bool, bool, list[str]]:
        async with AsyncEventBus(redis_url, prefix=prefix) as abus:
            await abus.subscribe("later", None)
            at = datetime.now(timezone.utc) + timedelta(hours=1)
            ids = await abus.publish_many([Ping(n=1), Ping(n=2)], at=at)
            first = await abus.cancel_scheduled(ids[0])
            again = await abus.cancel_scheduled(ids[0])
            left = [e.schedule_id for e in await abus.scheduled()]
            return ids, first, again, left

    ids, first, again, left = asyncio.run(main())
    assert first and not again
    assert left == [ids[1]]


def test_scheduling_an_event_already_published_delivers_it_once(bus: EventBus) -> None:
    event = Ping(n=3)
    bus.publish(event)
    bus.publish(event, delay=0)  # due at once: deduplicated when it reaches the log
    bus.start()
    wait_for(lambda: bus.scheduled() == [], 15, "the scheduled copy promoted")
    assert len(_log_ids(bus)) == 1


def test_bad_times_are_refused_and_nothing_is_scheduled(bus: EventBus) -> None:
    naive = datetime.now() + timedelta(minutes=1)
    for kwargs in ({"at": naive}, {"delay": -1}, {"delay": math.nan}, {"delay": True},
                   {"delay": 1, "at": datetime.now(timezone.utc)}, {"at": "tomorrow"}):
        with pytest.raises(ConfigurationError):
            bus.publish(Ping(), **kwargs)
    with pytest.raises(ConfigurationError, match="naive datetime"):
        bus.publish_many([Ping()], at=naive)
    assert bus.scheduled() == [] and _log_ids(bus) == []


def test_the_cli_shows_and_cancels_scheduled_events(redis_url: str, prefix: str,
                                                    bus: EventBus) -> None:
    keep, drop = Ping(n=1), Ping(n=2)
    bus.publish_many([keep, drop], delay=timedelta(hours=1))

    def cli(*args: str) -> Any:
        return CliRunner().invoke(app, [*args, "--url", redis_url, "--prefix", prefix])

    listed = cli("scheduled", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert {row["id"] for row in json.loads(listed.output)} == \
        {keep.event_id, drop.event_id}
    assert cli("scheduled", "cancel", drop.event_id).exit_code == 0
    gone = cli("scheduled", "cancel", drop.event_id)
    assert gone.exit_code == 1 and "no scheduled event" in gone.output
    queues = cli("queues")
    assert queues.exit_code == 0 and "1 scheduled" in queues.output


def test_raw_events_are_scheduled_too_on_both_fronts_and_by_the_cli(
        redis_url: str, prefix: str, bus: EventBus) -> None:
    data = {"n": 7, "event_id": "raw-1"}
    assert bus.publish_raw("test.service.ping", data, delay=3600) == "raw-1"

    async def schedule_async() -> str:
        async with AsyncEventBus(redis_url, prefix=prefix) as abus:
            return await abus.publish_raw("test.service.ping", {"n": 8, "event_id": "raw-2"},
                                          at=datetime.now(timezone.utc) + timedelta(hours=1))

    assert asyncio.run(schedule_async()) == "raw-2"
    shown = CliRunner().invoke(app, ["publish", "test.service.ping",
                                     '{"n": 9, "event_id": "raw-3"}', "--delay", "3600",
                                     "--url", redis_url, "--prefix", prefix])
    assert shown.exit_code == 0, shown.output
    assert "scheduled test.service.ping raw-3 in 3600 s as raw-3" in shown.output
    assert {(e.schedule_id, e.event_type) for e in bus.scheduled()} == \
        {(i, "test.service.ping") for i in ("raw-1", "raw-2", "raw-3")}
    assert _log_ids(bus) == []  # none published yet
    refused = CliRunner().invoke(app, ["publish", "test.service.ping", "{}", "--delay", "-1",
                                       "--url", redis_url, "--prefix", prefix])
    assert refused.exit_code == 2  # a usage error: nothing scheduled
    assert len(bus.scheduled()) == 3


def test_a_scheduled_event_survives_a_server_restart(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "server", appendfsync="always")
    url = server.start().url
    try:
        with EventBus(url, prefix="restart:") as first:
            event = Ping(n=7)
            first.publish(event, delay=1.5)
            [waiting] = first.scheduled()
        server.stop()  # the append-only file holds the schedule
        url = server.start().url
        with EventBus(url, prefix="restart:") as bus:
            assert [e.event_id for e in bus.scheduled()] == [event.event_id]
            bus.start()
            [entry] = wait_for(lambda: _log_ids(bus), 15, "the event after the restart")
            assert _ms(entry) >= waiting.due_ms  # never early, across the restart
            [message] = bus.mq.get_queue("all").peek(1)  # type: ignore[union-attr]
            assert message.data["event_id"] == event.event_id
    finally:
        server.stop()


CHILD = """
import sys
sys.path.insert(0, sys.argv[3])
from helpers_service import Ping
from relaybus import EventBus
from waiting import wait_for
bus = EventBus(sys.argv[1], prefix=sys.argv[2])
event = Ping(n=9)
bus.publish(event, delay=2)
[due] = [e.due_ms for e in bus.scheduled()]
print(due, flush=True)
bus.start()  # this process's maintenance promotes it, by the server's clock
log = bus.mq.get_queue("all")
wait_for(lambda: log.peek(1), 20, "the event in the log")
bus.close()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="libfaketime preloads on Linux")
@pytest.mark.parametrize("skew", [-3600, +3600])
def test_a_client_with_a_skewed_clock_schedules_by_the_servers_clock(
        redis_url: str, prefix: str, skew: int, bus: EventBus) -> None:
    before = _server_ms(redis_url)
    child = subprocess.run([sys.executable, "-c", CHILD, redis_url, prefix,
                            str(Path(__file__).parent)],
                           env={**os.environ, **skewed_clock(skew)},
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    after = _server_ms(redis_url)
    due = int(child.stdout.split()[0])
    assert before + 2000 <= due <= after + 2000  # two seconds by the server's clock
    [entry] = _log_ids(bus)
    assert due <= _ms(entry) <= due + LATE_MS
