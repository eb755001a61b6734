"""Helpers for testing code that uses relaybus against a real server.

``embedded_server()`` starts a private embedded Valkey in a temporary directory (or
uses ``$RELAYBUS_TEST_URL``) and stops it afterwards; ``unique_prefix()`` and
``delete_prefix()`` isolate tests by key prefix instead of flushing the database;
``named_url()`` names a client's connections, to find them in ``CLIENT LIST``::

    with embedded_server() as url:
        bus = EventBus(url, prefix=unique_prefix())
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator

import redis

from .embedded import EmbeddedServer

__all__ = ["TEST_URL_ENV", "delete_prefix", "embedded_server", "named_url", "unique_prefix"]

#: Environment variable naming an existing server to test against instead.
TEST_URL_ENV = "RELAYBUS_TEST_URL"


@contextlib.contextmanager
def embedded_server(*, appendfsync: str = "everysec") -> Iterator[str]:
    """Yield the URL of a test server: ``$RELAYBUS_TEST_URL``, else a private embedded one."""
    url = os.environ.get(TEST_URL_ENV)
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="relaybus-test-") as tmp:
        server = EmbeddedServer(tmp, appendfsync=appendfsync)
        state = server.start()
        try:
            yield state.url
        finally:
            server.stop()


def unique_prefix(label: str = "t") -> str:
    """A key prefix no other test uses, such as ``t3f9a1c2e:``."""
    return f"{label}{uuid.uuid4().hex[:10]}:"


def named_url(url: str, name: str) -> str:
    """``url`` with a client name: the connections opened from it show ``name`` in
    ``CLIENT LIST`` (other tests' clients may share the server)."""
    return f"{url}{'&' if '?' in url else '?'}client_name={name}"


def _glob_literal(text: str) -> str:
    """``text`` as a SCAN MATCH pattern that matches only itself."""
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)


def delete_prefix(url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` (SCAN, not KEYS), and no other (glob characters
    in it match only themselves); return how many."""
    client = redis.Redis.from_url(url)
    try:
        deleted = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=_glob_literal(prefix) + "*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += int(client.delete(*batch))
                batch = []
        if batch:
            deleted += int(client.delete(*batch))
        return deleted
    finally:
        client.close()
