"""Shared fixtures: one real server per test run, one key prefix per test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from relaybus import MessageQueue
from relaybus.testing import (
    delete_prefix,
    embedded_server,
    one_server,
    plain_client,
    unique_prefix,
)


@pytest.fixture(autouse=True)
def _no_ambient_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests name their server explicitly; an exported RELAYBUS_URL must not leak in."""
    monkeypatch.delenv("RELAYBUS_URL", raising=False)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The server under test: $RELAYBUS_TEST_URL, else a private embedded Valkey."""
    with embedded_server() as url:
        yield url


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix for this test alone; its keys are deleted afterwards."""
    p = unique_prefix()
    yield p
    delete_prefix(redis_url, p)


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain redis-py client on the test server (for injecting and inspecting)."""
    client = plain_client(redis_url)
    yield client
    client.close()


@pytest.fixture
def mq(redis_url: str, prefix: str) -> Iterator[MessageQueue]:
    """A MessageQueue on the test server under this test's prefix."""
    queue = MessageQueue(redis_url, prefix=prefix, retry_timeout=5.0)
    yield queue
    queue.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Through a cluster or Sentinel (``RELAYBUS_TEST_URL=redis+cluster://...`` or
    ``redis+sentinel://...``), skip the tests marked ``single_server``."""
    url = os.environ.get("RELAYBUS_TEST_URL", "")
    if not url or one_server(url):
        return
    skip = pytest.mark.skip(reason="single_server: not through a cluster or Sentinel")
    for item in items:
        if item.get_closest_marker("single_server"):
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> str:
    return f"relaybus test server: {os.environ.get('RELAYBUS_TEST_URL') or 'embedded valkey'}"
