"""pytest fixtures for testing code that uses relaybus; installing relaybus enables them.

- ``relaybus_url`` (session): the URL of one private embedded server for the whole
  test session, stopped after it (``$RELAYBUS_TEST_URL``, when set, names a server to
  use instead);
- ``relaybus_prefix``: a key prefix for one test alone; its keys are deleted after it;
- ``event_bus``: an :class:`~relaybus.EventBus` on both, closed after the test.

Nothing starts unless a test asks for one of them. Disable the plugin with
``-p no:relaybus``. See docs/testing.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .bus import EventBus

__all__ = ["relaybus_url", "relaybus_prefix", "event_bus"]


@pytest.fixture(scope="session")
def relaybus_url() -> Iterator[str]:
    """The test server's URL: ``$RELAYBUS_TEST_URL``, else a private embedded server
    (one per session, stopped at its end)."""
    from .testing import embedded_server

    with embedded_server() as url:
        yield url


@pytest.fixture
def relaybus_prefix(relaybus_url: str) -> Iterator[str]:
    """A key prefix no other test uses; every key under it is deleted after the test."""
    from .testing import delete_prefix, unique_prefix

    prefix = unique_prefix("rb")
    yield prefix
    delete_prefix(relaybus_url, prefix)


@pytest.fixture
def event_bus(relaybus_url: str, relaybus_prefix: str) -> Iterator[EventBus]:
    """An :class:`~relaybus.EventBus` on the test server under the test's prefix
    (closed after the test; give it to services as ``event_bus=``)."""
    from .bus import EventBus

    bus = EventBus(relaybus_url, prefix=relaybus_prefix)
    yield bus
    bus.close()
