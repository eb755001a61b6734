"""Connecting: URL resolution and one settings object for both fronts' clients.

Accepted URLs: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS),
``unix:///path/to/socket[?db=N]``, and ``embedded`` / ``embedded:///path/to/dir``
(the local server of :mod:`relaybus.embedded`). With no URL, ``RELAYBUS_URL`` wins
over host/port arguments.

:class:`ConnectionSettings` is built once from the URL and makes the redis-py client
of either front (:meth:`~ConnectionSettings.sync_client`,
:meth:`~ConnectionSettings.async_client`) with the same timeouts. Every command
relaybus sends goes through a driver (:mod:`relaybus._sync.driver`,
:mod:`relaybus._async.driver`), which retries outages for at most ``retry_timeout``
seconds, then raises :class:`~relaybus.errors.BrokerUnavailableError` naming the
address. Nothing waits forever.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlparse, urlsplit

import redis
import redis.asyncio

from ._core.outage import is_nogroup
from ._core.replies import info_fields
from .errors import ConfigurationError, UnsupportedServerError

__all__ = ["ConnectionSettings", "resolve_url", "DEFAULT_RETRY_TIMEOUT", "is_nogroup",
           "check_version", "address_of"]

#: Environment variable naming the server when no URL is passed.
URL_ENV = "RELAYBUS_URL"
#: Longest time, in seconds, an operation retries a server that does not answer.
DEFAULT_RETRY_TIMEOUT = 10.0
#: Socket timeout, in seconds, for one command (blocking reads are cut to fit under it).
DEFAULT_SOCKET_TIMEOUT = 10.0
_MIN_VERSION = (6, 2)


def is_host(text: str) -> bool:
    """``text`` names a host (``localhost``, ``10.0.0.5``), not a URL: it has no scheme."""
    return bool(text) and text != "embedded" and not any(c in text for c in ":/@")


def host_url(host: str, port: int = 6379, db: int = 0, password: str | None = None) -> str:
    """The ``redis://`` URL of ``host``, ``port``, database ``db`` (and ``password``)."""
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{int(port)}/{int(db)}"


#: A password in a URL's query (``?password=...``, ``?ssl_password=...``): redis-py takes
#: any query argument as a connection option, so that is a password too.
_QUERY_SECRET = re.compile(r"(?i)([?&][^=&#]*password=)([^&#]*)")
#: The user information of a URL, read loosely: from the first ``:`` after the scheme
#: up to the last ``@``. It catches a password ``urlsplit`` cannot read (one with ``#``,
#: ``?`` or ``/`` not percent-encoded, a malformed host); an ``@`` elsewhere in the
#: URL (a query value) hides more than the password, never less.
_LOOSE_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/?#]*:)(.*)@")
_HIDDEN = "***"


def _redaction(url: str) -> tuple[str, list[str]]:
    """``url`` with its passwords replaced by ``***``, and the texts replaced."""
    text, hidden = url, []
    try:
        parsed = urlsplit(url)
        password = parsed.password
    except ValueError:  # a malformed host or port: the loose reading below still hides it
        password = None
    if password:
        userinfo, _, host = parsed.netloc.rpartition("@")
        hidden.append(userinfo.partition(":")[2])
        text = parsed._replace(netloc=f"{parsed.username or ''}:{_HIDDEN}@{host}").geturl()
    loose = _LOOSE_USERINFO.match(text)
    if loose and loose.group(2) != _HIDDEN:
        hidden.append(loose.group(2))
        text = f"{loose.group(1)}{_HIDDEN}@{text[loose.end():]}"
    hidden += [m.group(2) for m in _QUERY_SECRET.finditer(text) if m.group(2) != _HIDDEN]
    text = _QUERY_SECRET.sub(rf"\g<1>{_HIDDEN}", text)
    return text, [h for h in hidden if h]


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages, logs and reprs):
    the one before the host, any ``password=`` in the query, and one ``urlsplit``
    cannot read (unencoded ``#``, ``?`` or ``/``)."""
    return _redaction(url)[0]


def scrub(text: str, url: str) -> str:
    """``text`` (a message about ``url``) with every piece of ``url``'s password in it
    replaced by ``***``: a parser's error about a malformed URL may quote a piece
    (``Port could not be cast to integer value as 'pa'`` for the password ``pa#ss``)."""
    pieces: set[str] = set()
    for secret in _redaction(url)[1]:
        for form in (secret, unquote(secret)):
            pieces.add(form)
            pieces.update(p for p in re.split(r"[#?/@:&=]", form) if len(p) >= 3)
    for piece in sorted(pieces, key=len, reverse=True):
        text = text.replace(piece, _HIDDEN)
    return text


def _bad_url(url: str, detail: str) -> ConfigurationError:
    """The error for a URL relaybus cannot use: redacted, and scrubbed of its password."""
    return ConfigurationError(scrub(f"bad URL {redact(url)!r}: {detail}", url))


def embedded_dir(url: str) -> str | None:
    """The data directory an ``embedded`` URL names ("" for the default one), or None
    for any other URL."""
    if url == "embedded" or url.startswith("embedded:"):
        return urlparse(url).path if url.startswith("embedded://") else ""
    return None


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
        return host_url(redis_host, redis_port, redis_db, redis_password)
    data_dir = embedded_dir(chosen)
    if data_dir is not None:
        from .embedded import EmbeddedServer

        return EmbeddedServer(data_dir or None).start().url
    try:
        parsed = urlparse(chosen)
    except ValueError as exc:  # not chained: a parser's message may quote the password
        raise _bad_url(chosen, str(exc)) from None
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(scrub(
            f"unsupported URL {redact(chosen)!r}: use redis://, rediss://, unix:// or embedded",
            chosen))
    db = parsed.path.strip("/") if parsed.scheme != "unix" else ""
    if db and not db.isdigit():  # redis-py would silently use database 0
        raise _bad_url(chosen, f"the database must be a number, not {db!r}")
    return chosen


def address_of(client: redis.Redis | redis.asyncio.Redis) -> str:
    """``host:port`` (or the socket path) a client connects to."""
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return str(kw["path"])
    return f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"


def check_version(reply: Any, address: str) -> None:
    """Raise :class:`UnsupportedServerError` for an ``INFO server`` reply older than 6.2."""
    version = info_fields(reply).get("redis_version", "0")
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < _MIN_VERSION:
        raise UnsupportedServerError(
            f"server at {address} runs Redis {version}; relaybus needs Redis >= 6.2 "
            "or Valkey >= 7.2"
        )


def server_name(reply: Any) -> str:
    """``valkey 8.1.8`` or ``redis 7.0.15`` from an ``INFO server`` reply."""
    info = info_fields(reply)
    if "valkey_version" in info:
        return f"valkey {info['valkey_version']}"
    return f"redis {info.get('redis_version', '?')}"


@dataclass(frozen=True, repr=False)
class ConnectionSettings:
    """Where and how to connect: built once from a URL, shared by both fronts.

    ``url`` holds the password, if any; the ``repr`` shows it redacted.
    """

    url: str
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT

    def __repr__(self) -> str:
        return (f"ConnectionSettings(url={redact(self.url)!r}, "
                f"retry_timeout={self.retry_timeout!r}, socket_timeout={self.socket_timeout!r})")

    @classmethod
    def from_options(cls, url: str | None = None, *, redis_host: str = "localhost",
                     redis_port: int = 6379, redis_db: int = 0,
                     redis_password: str | None = None,
                     retry_timeout: float | None = None,
                     client: bool = False) -> ConnectionSettings:
        """Resolve the URL (``embedded`` starts a server) and validate the timeouts.

        ``client``: the caller brings its own client, so no URL is resolved.
        """
        resolved = "client" if client else resolve_url(
            url, redis_host=redis_host, redis_port=redis_port, redis_db=redis_db,
            redis_password=redis_password)
        bound = DEFAULT_RETRY_TIMEOUT if retry_timeout is None else float(retry_timeout)
        if not bound >= 0:
            raise ConfigurationError(f"retry_timeout must be >= 0 seconds, not {retry_timeout!r}")
        return cls(resolved, bound)

    def _kwargs(self) -> dict[str, Any]:
        return {"socket_timeout": self.socket_timeout,
                "socket_connect_timeout": min(2.0, self.socket_timeout),
                "retry": None, "retry_on_timeout": False, "health_check_interval": 30,
                "protocol": 2}

    def sync_client(self) -> redis.Redis:
        """A redis-py client for these settings (RESP2, relaybus's timeouts, no retries)."""
        try:
            return redis.Redis.from_url(self.url, **self._kwargs())
        except ValueError as exc:  # not chained: its message may quote a piece of the password
            error = _bad_url(self.url, str(exc))
        raise error

    def async_client(self) -> redis.asyncio.Redis:
        """A ``redis.asyncio`` client for these settings."""
        try:
            return redis.asyncio.Redis.from_url(self.url, **self._kwargs())
        except ValueError as exc:  # not chained: its message may quote a piece of the password
            error = _bad_url(self.url, str(exc))
        raise error
