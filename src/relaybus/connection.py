"""Connecting: URL resolution, client creation, bounded retry.

Accepted URLs: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS),
``unix:///path/to/socket[?db=N]``, and ``embedded`` / ``embedded:///path/to/dir``
(the local server of :mod:`relaybus.embedded`). With no URL, ``RELAYBUS_URL`` wins
over host/port arguments.

Every command relaybus sends goes through :meth:`Connection.call`, which retries
connection failures with capped exponential backoff for at most
``retry_timeout`` seconds, then raises :class:`BrokerUnavailableError` naming the
address. Nothing waits forever.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

import redis

from .errors import (
    BrokerError,
    BrokerOutOfMemoryError,
    BrokerUnavailableError,
    ConfigurationError,
    UnsupportedServerError,
)

__all__ = ["Connection", "resolve_url", "DEFAULT_RETRY_TIMEOUT", "is_nogroup"]

logger = logging.getLogger("relaybus.connection")
T = TypeVar("T")

#: Environment variable naming the server when no URL is passed.
URL_ENV = "RELAYBUS_URL"
#: Longest time, in seconds, an operation retries a server that does not answer.
DEFAULT_RETRY_TIMEOUT = 10.0
#: Socket timeout, in seconds, for one command (blocking reads are cut to fit under it).
DEFAULT_SOCKET_TIMEOUT = 10.0
_MIN_VERSION = (6, 2)


def resolve_url(
    url: str | None = None,
    *,
    redis_host: str = "localhost",
    redis_port: int = 6379,
    redis_db: int = 0,
    redis_password: str | None = None,
) -> str:
    """The URL to connect to: ``url``, else ``$RELAYBUS_URL``, else host/port/db.

    ``embedded`` URLs are started (or reused) here and come back as ``redis://``.
    """
    chosen = url or os.environ.get(URL_ENV)
    if not chosen:
        auth = f":{redis_password}@" if redis_password else ""
        return f"redis://{auth}{redis_host}:{int(redis_port)}/{int(redis_db)}"
    if chosen == "embedded" or chosen.startswith("embedded:"):
        from .embedded import EmbeddedServer

        path = urlparse(chosen).path if chosen.startswith("embedded://") else ""
        return EmbeddedServer(path or None).start().url
    parsed = urlparse(chosen)
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(
            f"unsupported URL {chosen!r}: use redis://, rediss://, unix:// or embedded"
        )
    db = parsed.path.strip("/") if parsed.scheme != "unix" else ""
    if db and not db.isdigit():  # redis-py would silently use database 0
        raise ConfigurationError(f"bad URL {chosen!r}: the database must be a number, not {db!r}")
    return chosen


def _address(client: redis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return str(kw["path"])
    return f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"


def is_nogroup(exc: BaseException) -> bool:
    """True when the server said the consumer group (or its stream) does not exist.

    That includes a blocking read cut short because its stream or group was deleted
    (Redis 7 replies ``UNBLOCKED the stream key no longer exists``).
    """
    if not isinstance(exc, redis.ResponseError):
        return False
    text = str(exc)
    return "NOGROUP" in text or text.startswith("UNBLOCKED")


def _is_oom(exc: BaseException) -> bool:
    # redis-py turns an "-OOM ..." reply into OutOfMemoryError and strips the prefix
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return True
    return isinstance(exc, redis.ResponseError) and "OOM" in str(exc).split(" ", 2)[:2]


class Connection:
    """A redis-py client plus relaybus's retry policy and server checks.

    Thread-safe: the client's pool hands each thread its own socket.
    """

    def __init__(
        self,
        url: str,
        *,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        client: redis.Redis | None = None,
    ) -> None:
        self.url = url
        self.retry_timeout = float(retry_timeout)
        self.socket_timeout = float(socket_timeout)
        if client is None:
            try:
                client = redis.Redis.from_url(
                    url,
                    socket_timeout=socket_timeout,
                    socket_connect_timeout=min(2.0, socket_timeout),
                    retry=None,
                    retry_on_timeout=False,
                    health_check_interval=30,
                )
            except ValueError as exc:
                raise ConfigurationError(f"bad URL {url!r}: {exc}") from exc
        self.client: redis.Redis = client
        self.address = _address(client)
        self._checked = False

    def call(self, fn: Callable[[], T], *, retry_timeout: float | None = None) -> T:
        """Run ``fn`` (which talks to the server), retrying connection failures.

        Raises :class:`BrokerUnavailableError` once ``retry_timeout`` has passed,
        :class:`BrokerOutOfMemoryError` when the server refuses writes, and
        :class:`BrokerError` for other server errors.
        """
        bound = self.retry_timeout if retry_timeout is None else retry_timeout
        deadline = time.monotonic() + bound
        delay = 0.05
        while True:
            try:
                if not self._checked:
                    self._check_server()
                return fn()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                now = time.monotonic()
                if now >= deadline:
                    raise BrokerUnavailableError(self.address, exc) from exc
                time.sleep(min(delay * (0.5 + random.random()), max(0.0, deadline - now)))
                delay = min(delay * 2, 1.0)
            except redis.ResponseError as exc:
                if _is_oom(exc):
                    # a pipeline's error names the command, payload included: keep the reason
                    reason = str(exc).rpartition(" of pipeline caused error: ")[2]
                    raise BrokerOutOfMemoryError(
                        f"server at {self.address} is out of memory and refused the write "
                        f"(nothing was written): {reason}") from exc
                raise

    def _check_server(self) -> None:
        info = self.client.info("server")
        version = str(info.get("redis_version", "0"))
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if parts < _MIN_VERSION:
            raise UnsupportedServerError(
                f"server at {self.address} runs Redis {version}; relaybus needs Redis >= 6.2 "
                "or Valkey >= 7.2"
            )
        self._checked = True

    def server_version(self) -> str:
        """The server's name and version, e.g. ``valkey 8.1.8`` or ``redis 7.0.15``."""
        info = self.call(lambda: self.client.info("server"))
        if "valkey_version" in info:
            return f"valkey {info['valkey_version']}"
        return f"redis {info.get('redis_version', '?')}"

    def close(self) -> None:
        """Close the client's sockets."""
        self.client.close()


def wrap_response_error(exc: redis.ResponseError) -> BrokerError:
    """A :class:`BrokerError` for a server error reply relaybus does not handle."""
    return BrokerError(str(exc))
