"""Helpers for testing code that uses relaybus (see docs/testing.md).

``wait_for()`` (and ``wait_for_async()``) poll a condition with a deadline instead of
sleeping; ``HandleResult`` is what ``svc.handle(event)`` returns. The pytest plugin
(:mod:`relaybus.pytest_plugin`, enabled by installing relaybus) wraps the helpers below
in fixtures: ``relaybus_url``, ``relaybus_prefix``, ``event_bus``.

``embedded_server()`` starts a private embedded Valkey in a temporary directory (or
uses ``$RELAYBUS_TEST_URL``) and stops it afterwards; ``unique_prefix()`` and
``delete_prefix()`` isolate tests by key prefix instead of flushing the database;
``named_url()`` names a client's connections, to find them in ``CLIENT LIST``;
``plain_client()`` is a redis-py client for any URL relaybus takes (a
``redis.cluster.RedisCluster`` for a cluster), to inspect what relaybus wrote::

    with embedded_server() as url:
        bus = EventBus(url, prefix=unique_prefix())
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar, cast

import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import ClusterNode, RedisCluster

from ._core.service import HandleResult
from .connection import ConnectionSettings, cluster_seeds
from .embedded import EmbeddedServer

__all__ = ["TEST_URL_ENV", "HandleResult", "delete_prefix", "embedded_server", "named_url",
           "plain_client", "plain_async_client", "on_cluster", "one_server", "unique_prefix",
           "wait_for", "wait_for_async"]

#: Environment variable naming an existing server to test against instead.
TEST_URL_ENV = "RELAYBUS_TEST_URL"

T = TypeVar("T")


def _timed_out(timeout: float, what: str | Callable[[], str]) -> AssertionError:
    return AssertionError(f"timed out after {timeout}s waiting for "
                          f"{what() if callable(what) else what}")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0,
             what: str | Callable[[], str] = "condition", interval: float = 0.01) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy,
    and return that; after ``timeout`` seconds raise ``AssertionError`` naming ``what``
    (a callable: called then, to say how far it got)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what)
        time.sleep(interval)


async def wait_for_async(predicate: Callable[[], T | Awaitable[T]], timeout: float = 10.0,
                         what: str | Callable[[], str] = "condition",
                         interval: float = 0.01) -> T:
    """:func:`wait_for` on an event loop (which runs between checks); ``predicate`` may
    be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return cast(T, value)
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what)
        await asyncio.sleep(interval)


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


def _cluster_options(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]] | None:
    """A cluster URL's nodes and connection options (TLS, credentials, timeouts)."""
    seeds = cluster_seeds(url)
    if seeds is None:
        return None
    seed = ConnectionSettings(url).sync_client()
    pool = seed.connection_pool
    options = {k: v for k, v in pool.connection_kwargs.items()
               if k not in ("host", "port", "db", "retry", "retry_on_timeout")}
    options["ssl"] = issubclass(pool.connection_class, redis.SSLConnection)
    seed.close()
    return list(seeds), options


def plain_client(url: str) -> redis.Redis:
    """A redis-py client for ``url`` (``redis://``, ``rediss://``, ``unix://``,
    ``redis+sentinel://``, ``redis+cluster://``): relaybus's connection settings, replies
    decoded by redis-py as usual. For a cluster, a ``redis.cluster.RedisCluster``
    (typed as ``redis.Redis``: the commands are the same)."""
    cluster = _cluster_options(url)
    if cluster is None:
        return ConnectionSettings(url).sync_client()
    seeds, options = cluster
    client: redis.Redis = RedisCluster(  # type: ignore[assignment]
        startup_nodes=[ClusterNode(h, p) for h, p in seeds],  # type: ignore[no-untyped-call]
        **options)
    return client


def plain_async_client(url: str) -> redis.asyncio.Redis:
    """:func:`plain_client` for asyncio (a ``redis.asyncio.cluster.RedisCluster`` for a
    cluster)."""
    cluster = _cluster_options(url)
    if cluster is None:
        return ConnectionSettings(url).async_client()
    seeds, options = cluster
    accepted = inspect.signature(AsyncRedisCluster).parameters  # it takes no others
    client: redis.asyncio.Redis = AsyncRedisCluster(  # type: ignore[assignment]
        startup_nodes=[AsyncClusterNode(h, p) for h, p in seeds],
        **{k: v for k, v in options.items() if k in accepted})
    return client


def on_cluster(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster."""
    return cluster_seeds(url) is not None


def one_server(url: str) -> bool:
    """Whether ``url`` names one server directly (``redis://``, ``rediss://``,
    ``unix://``), not a cluster or a Sentinel-managed service."""
    return url.partition("://")[0].lower() in ("redis", "rediss", "unix")


def delete_prefix(url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` (SCAN, not KEYS; on every primary of a
    cluster), and no other (glob characters in it match only themselves); return how
    many."""
    client = plain_client(url)
    try:
        nodes = ([n.redis_connection for n in client.get_primaries()]
                 if isinstance(client, RedisCluster) else [client])
        deleted = 0
        for node in nodes:
            keys = list(node.scan_iter(match=_glob_literal(prefix) + "*", count=1000))
            for i in range(0, len(keys), 500):  # one slot per DEL on a cluster: one by one
                chunk = keys[i:i + 500]
                deleted += sum(int(node.delete(k)) for k in chunk) if node is not client \
                    else int(node.delete(*chunk))
        return deleted
    finally:
        client.close()
