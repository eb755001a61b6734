"""Helpers for testing users' handlers: ``svc.handle``, ``wait_until_handled``,
``relaybus.testing.wait_for`` and the pytest plugin's fixtures (also through the
examples of docs/testing.md, run as a user runs them)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

import relaybus
from relaybus import (
    AsyncMicroservice,
    Event,
    HandleResult,
    Microservice,
    Reject,
    Retry,
)
from relaybus.retry import backoff_ceiling
from relaybus.testing import plain_client, wait_for, wait_for_async

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


class Order(Event, event_type="test.testing.order"):
    """What the handlers under test receive; ``mode`` says what they do."""

    n: int = 0
    mode: str = "ok"


class Unhandled(Event, event_type="test.testing.unhandled"):
    """A type no service here has a handler for."""


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


def behave(event: Order) -> object:
    """The handler's behaviour, by ``event.mode``."""
    if event.mode == "reject":
        raise Reject(f"order {event.n} rejected")
    if event.mode == "false":
        return False
    if event.mode == "raise":
        raise ValueError(f"boom {event.n}")
    if event.mode == "retry":
        raise Retry(delay=7.0, reason="not yet")
    if event.mode == "interrupt":
        raise KeyboardInterrupt
    return f"done {event.n}"


@pytest.fixture
def nowhere() -> Iterator[tuple[str, socket.socket]]:
    """A URL on a port that listens but is never answered, and its socket: a test
    checks that nobody connected."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0", listener
    listener.close()


def assert_never_connected(listener: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        listener.accept()


Handle = Callable[..., HandleResult]


@pytest.fixture(params=["sync", "async"])
def make(request: pytest.FixtureRequest, nowhere: tuple[str, socket.socket]
         ) -> Iterator[Callable[..., tuple[Microservice | AsyncMicroservice, Handle]]]:
    """``make(**options)``: a service of either front whose URL points nowhere, with
    ``behave`` as its handler of Order, and a plain function calling its ``handle``."""
    made: list[Microservice | AsyncMicroservice] = []

    def factory(**options: Any) -> tuple[Microservice | AsyncMicroservice, Handle]:
        if request.param == "sync":
            svc = Microservice("tester", url=nowhere[0], **options)
            svc.on(Order)(behave)
            made.append(svc)
            return svc, svc.handle
        asvc = AsyncMicroservice("tester", url=nowhere[0], **options)

        @asvc.on(Order)
        async def handler(event: Order) -> object:
            return behave(event)

        made.append(asvc)
        return asvc, lambda event, **kw: run(asvc.handle(event, **kw))

    yield factory
    for svc in made:
        assert svc._event_bus is None  # no bus was even made
    assert_never_connected(nowhere[1])


# -- svc.handle(event) ------------------------------------------------------------------


def test_handled_returns_the_handlers_value_and_the_event_as_received(make: Any) -> None:
    _, handle = make()
    order = Order(n=1, correlation_id="c-1", headers={"k": "v"})
    result = handle(order)
    assert result == HandleResult("handled", result="done 1", event=order, attempt=1)
    assert result.handled and result.reason is None and result.retry_delay is None
    assert result.event is not order  # it went through the wire format, as delivered
    assert result.details == {}


def test_a_failure_is_retried_with_the_policys_delay_then_dead_lettered(make: Any) -> None:
    _, handle = make(max_attempts=4, retry_backoff=1.0, retry_backoff_max=100.0)
    first = handle(Order(n=2, mode="raise"))
    assert first.outcome == "retried" and not first.handled
    assert first.reason == "ValueError: boom 2"
    assert isinstance(first.error, ValueError)
    assert first.retry_delay is not None and 0 <= first.retry_delay <= 1.0
    assert first.details["exception_type"] == "builtins.ValueError"
    assert "boom 2" in first.details["traceback"]
    # attempt 3: the delay is drawn from [0, 4] (it would be [0, 2] at attempt 2)
    delays = [handle(Order(mode="raise"), attempt=3).retry_delay for _ in range(40)]
    assert all(d is not None and 0 <= d <= backoff_ceiling(3, 1.0, 100.0) for d in delays)
    assert max(d for d in delays if d is not None) > 2.0
    last = handle(Order(n=2, mode="raise"), attempt=4)
    assert last.outcome == "dead_lettered" and last.retry_delay is None
    assert last.reason == "max attempts (4) reached: ValueError: boom 2"
    assert last.attempt == 4 and last.details["max_attempts"] == 4


def test_an_explicit_retry_keeps_its_delay(make: Any) -> None:
    _, handle = make()
    result = handle(Order(mode="retry"))
    assert (result.outcome, result.retry_delay) == ("retried", 7.0)
    assert result.reason == "retry requested: not yet"


def test_reject_and_false_dead_letter_with_their_reason(make: Any) -> None:
    _, handle = make()
    rejected = handle(Order(n=3, mode="reject"))
    assert (rejected.outcome, rejected.reason) == ("dead_lettered", "order 3 rejected")
    assert isinstance(rejected.error, Reject)
    returned = handle(Order(mode="false"))
    assert (returned.outcome, returned.reason) == ("dead_lettered", "handler returned False")
    assert returned.result is False and returned.error is None


def test_delivered_past_max_attempts_is_dead_lettered_without_running(make: Any) -> None:
    _, handle = make(max_attempts=2)
    result = handle(Order(mode="interrupt"), attempt=3)  # the handler would raise
    assert result.outcome == "dead_lettered" and result.event is None
    assert result.reason is not None and result.reason.startswith("max attempts (2) reached")


def test_an_event_without_a_handler_is_dead_lettered(make: Any) -> None:
    _, handle = make()
    result = handle(Unhandled())
    assert result.outcome == "dead_lettered"
    assert result.reason == "no handler for event type 'test.testing.unhandled' in service " \
                            "'tester'"


def test_invalid_payloads_and_unknown_types_are_invalid(make: Any) -> None:
    svc, handle = make()
    bad = handle({"event_type": "test.testing.order", "n": "many", "event_id": "e-1"})
    assert bad.outcome == "invalid" and bad.event is None
    assert bad.reason is not None and "valid integer" in bad.reason
    assert bad.details["error_type"] == "EventValidationError"
    assert [e["loc"] for e in bad.details["errors"]] == ["n"]
    unknown = handle({"event_type": "test.testing.nope"})
    assert (unknown.outcome, unknown.reason) == ("invalid", "unknown event type 'test.testing.nope'")
    assert handle({"n": 1}).outcome == "invalid"  # no event_type at all
    assert svc.stats["invalid"] == 3 and svc.stats["handled"] == 0
    assert handle(Order().model_dump(mode="json")).handled  # a valid payload is handled


def test_arguments_are_checked(make: Any) -> None:
    _, handle = make()
    with pytest.raises(ValueError, match="attempt"):
        handle(Order(), attempt=0)
    with pytest.raises(TypeError, match="Event or a payload dict"):
        handle(42)


def test_an_exception_that_is_not_an_exception_propagates(make: Any) -> None:
    _, handle = make()
    with pytest.raises(KeyboardInterrupt):
        handle(Order(mode="interrupt"))


def test_the_result_is_frozen_and_exported() -> None:
    assert relaybus.HandleResult is HandleResult is relaybus.testing.HandleResult
    with pytest.raises(dataclasses.FrozenInstanceError):
        HandleResult("handled").outcome = "invalid"  # type: ignore[misc]


def test_subclassing_forms_are_handled_too(nowhere: tuple[str, socket.socket]) -> None:
    class Sync(Microservice):
        def handle_event(self, event: Event) -> bool:
            return isinstance(event, Order) and event.n > 0

    class Async(AsyncMicroservice):
        async def handle_event(self, event: Event) -> bool:
            return isinstance(event, Order) and event.n > 0

    sync, asyn = Sync("sub-sync", url=nowhere[0]), Async("sub-async", url=nowhere[0])
    assert sync.handle(Order(n=1)).handled
    assert sync.handle(Order(n=0)).reason == "handler returned False"
    assert run(asyn.handle(Order(n=1))).handled
    assert run(asyn.handle(Order(n=0))).outcome == "dead_lettered"
    assert_never_connected(nowhere[1])


def test_an_async_services_plain_handler_runs_in_a_thread(
        nowhere: tuple[str, socket.socket]) -> None:
    svc = AsyncMicroservice("threads", url=nowhere[0])
    ran_in: list[threading.Thread] = []
    svc.on(Order)(lambda event: ran_in.append(threading.current_thread()))
    assert run(svc.handle(Order())).handled
    assert ran_in and ran_in[0] is not threading.main_thread()


# -- wait_until_handled -----------------------------------------------------------------


def service(redis_url: str, prefix: str, name: str = "waiter") -> Microservice:
    svc = Microservice(name, url=redis_url, prefix=prefix, maintenance=False,
                       block_for_seconds=0.2, max_attempts=1)
    svc.on(Order)(behave)
    return svc


def test_wait_until_handled_by_count(redis_url: str, prefix: str) -> None:
    with service(redis_url, prefix) as svc:
        svc.start()
        for n in range(3):
            svc.publish_event(Order(n=n))
        svc.wait_until_handled(count=3, timeout=10)
        assert svc.stats["handled"] == 3
        svc.wait_until_handled(count=0)  # already there


def test_wait_until_handled_by_ids_returns_once_acknowledged(redis_url: str, prefix: str
                                                             ) -> None:
    with service(redis_url, prefix) as svc:
        svc.start()
        first, second = Order(n=1), Order(n=2)
        svc.publish_event(first)
        svc.publish_event(second)
        svc.wait_until_handled(event_ids=[first.event_id, second], timeout=10)
        assert svc.stats["handled"] == 2
        assert svc.subscription_queue.get_info().pending_messages == 0
        svc.wait_until_handled(event_ids=first.event_id, count=2)  # one id; both goals


def test_wait_until_handled_times_out_naming_what_is_missing(redis_url: str, prefix: str
                                                             ) -> None:
    with service(redis_url, prefix) as svc:
        svc.start()
        handled, rejected = Order(n=1), Order(n=2, mode="reject")
        svc.publish_event(handled)
        svc.publish_event(rejected)
        wait_for(lambda: svc.stats["dead_lettered"] == 1, what="the rejected order")
        with pytest.raises(AssertionError) as failed:
            svc.wait_until_handled(event_ids=[handled, rejected], timeout=0.2)
        message = str(failed.value)
        assert message.startswith("timed out after 0.2s waiting for service 'waiter' to "
                                  "handle 2 listed event(s) (1 handled; not handled: ")
        assert f"not handled: {rejected.event_id}" in message
        assert handled.event_id not in message.split("not handled:")[1]
        with pytest.raises(AssertionError, match=r"to handle 5 event\(s\) in all \(handled so "
                                                 r"far: 1\)$"):
            svc.wait_until_handled(count=5, timeout=0.1)
    with pytest.raises(AssertionError, match="the service is not running"):
        svc.wait_until_handled(count=5, timeout=0)


def test_wait_until_handled_checks_its_arguments(nowhere: tuple[str, socket.socket]) -> None:
    svc = Microservice("args", url=nowhere[0])
    with pytest.raises(TypeError, match="count or event_ids"):
        svc.wait_until_handled()
    with pytest.raises(ValueError, match="count"):
        svc.wait_until_handled(count=-1)
    with pytest.raises(TypeError, match="event_ids"):
        svc.wait_until_handled(event_ids=[1])  # type: ignore[list-item]
    svc.handle(Order())  # handle() is not the worker: not counted as handled here
    with pytest.raises(AssertionError):
        svc.wait_until_handled(count=1, timeout=0)


def test_wait_until_handled_on_the_async_front(redis_url: str, prefix: str) -> None:
    async def scenario() -> None:
        svc = AsyncMicroservice("waiter", url=redis_url, prefix=prefix, maintenance=False,
                                block_for_seconds=0.2, max_attempts=1)

        @svc.on(Order)
        async def handler(event: Order) -> object:
            return behave(event)

        async with svc:
            orders = [Order(n=n) for n in range(3)]
            for order in orders:
                await svc.publish_event(order)
            await svc.wait_until_handled(count=3, timeout=10)
            await svc.wait_until_handled(event_ids=orders, timeout=10)
            assert svc.stats["handled"] == 3
            rejected = Order(mode="reject")
            await svc.publish_event(rejected)
            with pytest.raises(AssertionError, match=f"not handled: {rejected.event_id}"):
                await svc.wait_until_handled(event_ids=[rejected], timeout=0.3)

    run(scenario())


# -- wait_for ---------------------------------------------------------------------------


def test_wait_for_returns_the_value_or_names_what_it_waited_for() -> None:
    values = iter([0, None, "", [1]])
    assert wait_for(lambda: next(values), timeout=5) == [1]
    with pytest.raises(AssertionError, match=r"^timed out after 0.05s waiting for the thing$"):
        wait_for(lambda: False, timeout=0.05, what="the thing")
    calls: list[int] = []

    def poll() -> bool:
        calls.append(1)
        return False

    with pytest.raises(AssertionError, match=r"waiting for the thing \(polled \d+ times\)$"):
        wait_for(poll, timeout=0.05, what=lambda: f"the thing (polled {len(calls)} times)")
    assert len(calls) >= 2


def test_wait_for_async_runs_the_loop_and_takes_coroutine_predicates() -> None:
    async def scenario() -> None:
        done = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, done.set)
        assert await wait_for_async(done.is_set, timeout=5) is True

        async def later() -> int:
            return 7

        assert await wait_for_async(later, timeout=1) == 7
        with pytest.raises(AssertionError, match="timed out after 0.02s waiting for never"):
            await wait_for_async(lambda: 0, timeout=0.02, what="never")

    run(scenario())


def test_the_suites_wait_for_is_the_librarys() -> None:
    import waiting

    assert waiting.wait_for is wait_for


# -- the pytest plugin ------------------------------------------------------------------


def test_the_plugin_is_registered_by_the_package(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--fixtures")
    result.stdout.fnmatch_lines(["*relaybus_url*", "*relaybus_prefix*", "*event_bus*"])


def test_the_fixtures_start_nothing_unless_asked_for(pytester: pytest.Pytester,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYBUS_TEST_URL", "redis://127.0.0.1:1/0")  # would fail if used
    pytester.makepyfile("def test_plain():\n    assert True\n")
    result = pytester.runpytest("--setup-show")
    result.assert_outcomes(passed=1)
    assert "relaybus_url" not in result.stdout.str()


def test_the_fixtures_on_a_given_server(pytester: pytest.Pytester, redis_url: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYBUS_TEST_URL", redis_url)
    record = pytester.path / "seen.txt"
    pytester.makepyfile(f"""
        from relaybus import Event, EventBus

        class Seen(Event, event_type="test.plugin.seen"):
            pass

        def test_bus(event_bus: EventBus, relaybus_url: str, relaybus_prefix: str) -> None:
            assert relaybus_url == {redis_url!r}
            assert event_bus.prefix == relaybus_prefix
            event_bus.subscribe("watcher", Seen)
            event_bus.publish(Seen())
            with open({str(record)!r}, "a") as f:
                f.write(relaybus_prefix + "\\n")

        def test_another_prefix(event_bus: EventBus, relaybus_prefix: str) -> None:
            event_bus.publish(Seen())
            with open({str(record)!r}, "a") as f:
                f.write(relaybus_prefix + "\\n")
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    prefixes = record.read_text().split()
    assert len(set(prefixes)) == 2
    client = plain_client(redis_url)
    try:
        for p in prefixes:  # each test's keys were deleted after it
            assert not list(client.scan_iter(match=p + "*")), p
    finally:
        client.close()


def test_one_private_server_per_session_stopped_after(pytester: pytest.Pytester,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAYBUS_TEST_URL", raising=False)
    record = pytester.path / "urls.txt"
    pytester.makepyfile(f"""
        import redis

        def test_one(relaybus_url: str) -> None:
            assert redis.Redis.from_url(relaybus_url).ping()
            open({str(record)!r}, "a").write(relaybus_url + "\\n")

        def test_two(relaybus_url: str) -> None:
            open({str(record)!r}, "a").write(relaybus_url + "\\n")
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    urls = record.read_text().split()
    assert len(urls) == 2 and urls[0] == urls[1]
    if os.environ.get("RELAYBUS_TEST_URL"):
        return
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(urls[0], socket_connect_timeout=1).ping()


# -- the examples of docs/testing.md ----------------------------------------------------


def documented_files() -> dict[str, str]:
    """The files docs/testing.md shows: blocks whose first line is ``# examples/NAME``;
    a file shown in several blocks is them in order, two blank lines apart."""
    doc = (ROOT / "docs" / "testing.md").read_text()
    shown: dict[str, list[str]] = {}
    for block in re.findall(r"```python\n(.*?)```", doc, flags=re.S):
        first, _, body = block.partition("\n")
        if first.startswith("# examples/"):
            shown.setdefault(first.removeprefix("# ").split()[0], []).append(body.strip("\n"))
    return {name: "\n\n\n".join(bodies) + "\n" for name, bodies in shown.items()}


def test_the_docs_show_the_examples_exactly() -> None:
    shown = documented_files()
    assert set(shown) == {"examples/shop.py", "examples/test_example_handlers.py"}
    for name, text in shown.items():
        assert text == (ROOT / name).read_text(), name


def test_the_examples_pass(redis_url: str) -> None:
    """As a user runs them: pytest in a fresh process, the plugin found by its entry point,
    on this session's server (``RELAYBUS_TEST_URL``)."""
    env = dict(os.environ, RELAYBUS_TEST_URL=redis_url)
    env.pop("RELAYBUS_URL", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "examples"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b6 passed\b", done.stdout), done.stdout
