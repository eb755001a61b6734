"""Child processes for the AsyncMicroservice tests (tests/test_aio.py).

:func:`child_command` builds the command line of a child process running :func:`main`::

    run URL PREFIX SERVICE
        ``run_service(load_service("helpers_aio:make_blocking_service"))``: an async
        handler prints "started N", awaits an item on the list PREFIX + "release",
        prints "finished N" (the test signals the process while it waits). Its
        visibility timeout is 30 s, so what a survivor gets within seconds was handed
        back, not lapsed.
    stream URL PREFIX SERVICE
        an async service (concurrency 2, prefetch 4, visibility timeout 1 s) whose
        handler appends N to the list PREFIX + "ledger" before it returns; prints
        "ready CONSUMER_ID" once started, then runs until killed (the test SIGKILLs it
        mid-stream).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import redis.asyncio

from helpers_service import Ping, SteadyPublisher
from relaybus import AsyncMicroservice, Event, Microservice
from relaybus.testing import plain_async_client
from waiting import wait_for

#: Visibility timeout of the ``run`` service, in seconds.
RUN_VISIBILITY_TIMEOUT = 30.0


def make_blocking_service() -> AsyncMicroservice:
    """Factory for ``run``: settings come from the environment (see the module docstring)."""
    url, prefix, name = (os.environ["SVC_URL"], os.environ["SVC_PREFIX"], os.environ["SVC_NAME"])
    clients: list[redis.asyncio.Redis] = []  # made on the service's loop, at first use
    svc = AsyncMicroservice(name, prefix=prefix, visibility_timeout=RUN_VISIBILITY_TIMEOUT,
                            maintenance=False, prefetch=2, block_for_seconds=0.2,
                            shutdown_timeout=20.0)

    @svc.on(Ping)
    async def handle(event: Ping) -> None:
        if not clients:
            clients.append(plain_async_client(url))
        print(f"started {event.n}", flush=True)
        await clients[0].blpop([prefix + "release"], timeout=20)
        print(f"finished {event.n}", flush=True)

    return svc


def _run(url: str, prefix: str, name: str) -> None:
    from relaybus.runner import load_service, run_service

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.update(SVC_URL=url, SVC_PREFIX=prefix, SVC_NAME=name)
    service = load_service("helpers_aio:make_blocking_service", url=url)
    print("ready", flush=True)
    run_service(service)
    print(f"exited stats={service.stats}", flush=True)


def _stream(url: str, prefix: str, name: str) -> None:
    async def main() -> None:
        ledger = plain_async_client(url)
        svc = AsyncMicroservice(name, url=url, prefix=prefix, visibility_timeout=1.0,
                                maintenance=False, block_for_seconds=0.2, concurrency=2,
                                prefetch=4)

        @svc.on(Ping)
        async def handle(event: Ping) -> None:
            await ledger.rpush(prefix + "ledger", event.n)
            await asyncio.sleep(0.002)  # some work after recording, before returning

        await svc.start()
        print(f"ready {svc.consumer_id}", flush=True)
        await asyncio.Event().wait()  # until killed

    asyncio.run(main())


def main(argv: list[str]) -> None:
    """Entry point of a child process (see the module docstring)."""
    command, *args = argv
    commands: dict[str, Callable[..., None]] = {"run": _run, "stream": _stream}
    commands[command](*args)


class Child:
    """A child process whose stdout and stderr lines are collected by two threads."""

    def __init__(self, args: list[str]) -> None:
        self.popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self._pumps = [threading.Thread(target=self._pump, args=(s, into), daemon=True)
                       for s, into in ((self.popen.stdout, self.out),
                                       (self.popen.stderr, self.err))]
        for t in self._pumps:
            t.start()

    @staticmethod
    def _pump(stream: IO[str], into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def expect(self, text: str, *, stderr: bool = False, timeout: float = 15.0) -> str:
        """The first line of stdout (or stderr) containing ``text``, once there is one."""
        lines = self.err if stderr else self.out
        deadline = time.monotonic() + timeout
        while True:
            found = next((line for line in list(lines) if text in line), None)
            if found is not None:
                return found
            exited = self.popen.poll() is not None
            if exited:
                for t in self._pumps:  # what the process wrote before it exited
                    t.join(2)
                found = next((line for line in list(lines) if text in line), None)
                if found is not None:
                    return found
            if exited or time.monotonic() >= deadline:
                raise AssertionError(
                    f"no line with {text!r} " + (f"(exited {self.popen.returncode})" if exited
                                                 else f"within {timeout}s")
                    + f"; stdout: {self.out[-10:]}; stderr: {self.err[-20:]}")
            time.sleep(0.01)  # polling interval

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit (and its output to be read); its exit code."""
        code = self.popen.wait(timeout)
        for t in self._pumps:
            t.join(5)
        return code

    def close(self) -> None:
        """Kill the process if it is still running, and reap it."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.wait(10)


def child_command(*args: str) -> list[str]:
    """The command line of a child process running ``main(args)``.

    The child imports this module by name (not as ``__main__``), so its event classes
    register once under the same identity as in a service loaded from it.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import helpers_aio; "
            "helpers_aio.main(sys.argv[1:])")
    return [sys.executable, "-c", code, *args]


def service_options(url: str, prefix: str) -> dict[str, Any]:
    """Test-friendly service options (either front): quick retries, short waits."""
    return dict(url=url, prefix=prefix, maintenance=False, block_for_seconds=0.2,
                retry_backoff=0.01, retry_backoff_max=0.05, shutdown_timeout=5.0)


class AsyncConsumer:
    """An AsyncMicroservice running on its own loop in a thread, recording what it handles."""

    def __init__(self, url: str, prefix: str, name: str) -> None:
        self.seen: list[int] = []
        self.url, self.prefix, self.name = url, prefix, name
        self.started = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.stats: dict[str, int] = {}
        self.thread = threading.Thread(target=self._run, name=f"{name}-thread")
        self.thread.start()

    def _run(self) -> None:
        async def main() -> None:
            svc = AsyncMicroservice(self.name, **service_options(self.url, self.prefix))

            @svc.on(Ping)
            async def handle(event: Ping) -> None:
                self.seen.append(event.n)

            await svc.start()
            try:
                self.started.set()
                while not self.stop.is_set():
                    await asyncio.sleep(0.02)
                self.stats = svc.stats
            finally:
                await svc.close()

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by the test
            self.error = exc
            self.started.set()


@dataclass
class Failover:
    """What :func:`consume_across` saw: the switch's result, the acknowledged
    publishes, and what each front's service handled."""

    switched: Any
    publisher: SteadyPublisher
    sync_seen: list[int]
    async_seen: list[int]


def consume_across(url: str, prefix: str, name: str, switch: Callable[[], Any],
                   logs: Callable[[], str]) -> Failover:
    """A service of each front (``name``-sync, ``name``-async) consuming a steady stream
    while ``switch()`` (a failover) runs: asserts that both keep handling what is
    published after it, without a restart, and that every event whose publish returned
    is handled by both. ``logs()`` goes into a failure's message."""
    svc = Microservice(f"{name}-sync", **service_options(url, prefix))
    sync_seen: list[int] = []
    svc.on(Ping)(lambda e: sync_seen.append(e.n))
    svc.start()
    aio = AsyncConsumer(url, prefix, f"{name}-async")
    publisher = SteadyPublisher(url, prefix)
    published = publisher.published
    try:
        assert aio.started.wait(15) and aio.error is None, aio.error
        publisher.start()
        wait_for(lambda: len(sync_seen) > 20 and len(aio.seen) > 20, 15, "consuming")
        switched = switch()
        after = len(published)
        wait_for(lambda: len(published) > after + 50, 15, "publishing after the switch")
        mark = published[-1]
        wait_for(lambda: max(sync_seen) >= mark and max(aio.seen) >= mark, 15,
                 "both services handling events published after the switch")
        publisher.stop()
        every = set(published)
        wait_for(lambda: every <= set(sync_seen) and every <= set(aio.seen), 15,
                 "every acknowledged event handled by both services")
        assert svc.running and aio.thread.is_alive() and aio.error is None
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs()}") from exc
    finally:
        publisher.stop()
        aio.stop.set()
        aio.thread.join(15)
        svc.close()
    assert aio.error is None, aio.error
    return Failover(switched, publisher, sync_seen, aio.seen)


@contextmanager
def running_service(front: str, url: str, prefix: str, name: str, event_type: type[Event],
                    handle: Callable[[Any], Any], **options: Any) -> Iterator[Any]:
    """A started service of ``front`` with :func:`service_options` (and ``options``):
    ``handle(event)`` runs in its handler threads (sync), or in an ``async def``
    handler on its loop (async; a coroutine it returns is awaited), the loop running
    in a thread of its own."""
    opts = {**service_options(url, prefix), **options}
    if front == "sync":
        svc = Microservice(name, **opts)
        svc.on(event_type)(handle)
        svc.start()
        try:
            yield svc
        finally:
            svc.close()
        return
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=f"{name}-loop", daemon=True)
    thread.start()
    asvc = AsyncMicroservice(name, **opts)

    @asvc.on(event_type)
    async def on_event(event: Any) -> None:
        result = handle(event)
        if asyncio.iscoroutine(result):
            await result

    asyncio.run_coroutine_threadsafe(asvc.start(), loop).result(30)
    try:
        yield asvc
    finally:
        asyncio.run_coroutine_threadsafe(asvc.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
