"""Connecting: URL resolution and one settings object for both fronts' clients.

Accepted URLs: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS),
``unix:///path/to/socket[?db=N]``, ``embedded`` / ``embedded:///path/to/dir``
(the local server of :mod:`relaybus.embedded`), and Redis Sentinel:
``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/SERVICE[/db][?options]``
(``rediss+sentinel://`` for TLS to the servers and the sentinels), and Redis Cluster:
``redis+cluster://[[user]:password@]host[:port][,host[:port]...]/[?options]``
(``rediss+cluster://`` for TLS). With no URL, ``RELAYBUS_URL`` wins over host/port
arguments.

A cluster URL lists some of its nodes; the driver reads the slot map from the first
that answers and connects to every primary with the URL's credentials and options
(:mod:`relaybus._core.cluster` routes each command to its slot's node).

A Sentinel URL lists the sentinels (port 26379 unless given) and names the monitored
service; the client asks them for the current primary each time it connects, so a
connection dropped by a failover reconnects to the new primary. The user and password
before the hosts are the data servers' (the primary and its replicas); the sentinels
get none unless the query says ``sentinel_password=...`` (and ``sentinel_username=...``)
-- repeat the password there when the sentinels share it. Other query options
(``ssl_ca_certs=...``) go to the data connections, and the ``ssl_*`` ones also to the
sentinels of a ``rediss+sentinel://`` URL.

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
import redis.asyncio.sentinel
import redis.sentinel
from redis.connection import parse_url

from ._core.outage import is_nogroup
from ._core.replies import info_fields
from ._core.steps import Replication
from .errors import ConfigurationError, UnsupportedServerError

__all__ = ["ConnectionSettings", "resolve_url", "DEFAULT_RETRY_TIMEOUT", "is_nogroup",
           "check_version", "address_of", "SentinelTarget", "sentinel_target",
           "sentinel_clients", "cluster_seeds", "cluster_seed_url", "node_pool",
           "pool_of", "cluster_address"]

#: Environment variable naming the server when no URL is passed.
URL_ENV = "RELAYBUS_URL"
#: Longest time, in seconds, an operation retries a server that does not answer.
DEFAULT_RETRY_TIMEOUT = 10.0
#: Socket timeout, in seconds, for one command (blocking reads are cut to fit under it).
DEFAULT_SOCKET_TIMEOUT = 10.0
_MIN_VERSION = (6, 2)
#: What ``durability`` takes: a write counts once the primary has it, or once a
#: replica has it too.
DURABILITIES = ("primary", "replicated")
#: Longest ``replication_timeout``, in seconds (a WAIT must end well inside a socket
#: timeout).
MAX_REPLICATION_TIMEOUT = 5.0


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


#: The Sentinel URL schemes, and whether each speaks TLS.
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
#: The port of a sentinel given without one.
DEFAULT_SENTINEL_PORT = 26379
#: Query options of a Sentinel URL that are the sentinels' own.
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")


@dataclass(frozen=True, repr=False)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names: the sentinels, the service, and the
    connection options of the data servers and of the sentinels (they hold passwords:
    the ``repr`` shows the address only)."""

    service: str
    sentinels: tuple[tuple[str, int], ...]
    master_options: dict[str, Any]
    sentinel_options: dict[str, Any]

    @property
    def address(self) -> str:
        """``sentinel mymaster via host:port,host:port`` (for messages)."""
        return sentinel_address(self.service, self.sentinels)

    def __repr__(self) -> str:
        return f"SentinelTarget({self.address!r})"


def sentinel_address(service: str, sentinels: Any) -> str:
    """How messages name a Sentinel-managed server: the service and its sentinels."""
    hosts = ",".join(f"[{h}]:{p}" if ":" in str(h) else f"{h}:{p}" for h, p in sentinels)
    return f"sentinel {service} via {hosts}"


def _sentinel_hosts(url: str, text: str, default_port: int = DEFAULT_SENTINEL_PORT
                    ) -> tuple[tuple[str, int], ...]:
    """``host[:port],[v6]:port,...`` as (host, port) pairs."""
    found = []
    for item in text.split(","):
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else rest
        else:
            host, _, port = item.partition(":")
        if not host or (port and not port.isdigit()) or ("]" in port):
            raise _bad_url(url, f"bad address {item!r}: use host:port[,host:port...]")
        number = int(port) if port else default_port
        if not 0 < number < 65536:
            raise _bad_url(url, f"bad port in {item!r}")
        found.append((unquote(host), number))
    return tuple(found)


def sentinel_target(url: str) -> SentinelTarget | None:
    """The :class:`SentinelTarget` of a ``redis+sentinel://`` or ``rediss+sentinel://``
    URL, None for any other URL; :class:`ConfigurationError` for a malformed one."""
    scheme, sep, rest = url.partition("://")
    tls = SENTINEL_SCHEMES.get(scheme.lower()) if sep else None
    if tls is None:
        return None
    netloc, _, tail = rest.partition("/")
    if any(c in netloc for c in "?#"):
        raise _bad_url(url, "name the service after the hosts: .../SERVICE_NAME[/db]")
    userinfo, at, hosts = netloc.rpartition("@")
    path, _, query = tail.partition("?")
    path = path.partition("#")[0]
    service, _, db = path.strip("/").partition("/")
    if not hosts:
        raise _bad_url(url, "no sentinel address: use host:port[,host:port...]")
    if not service:
        raise _bad_url(url, "no service name: use .../SERVICE_NAME[/db]")
    if db and not db.isdigit():
        raise _bad_url(url, f"the database must be a number, not {db!r}")
    sentinels = _sentinel_hosts(url, hosts)
    try:  # redis-py reads the credentials and the typed query options
        options = parse_url(  # type: ignore[no-untyped-call]
            f"redis://{userinfo}{at}localhost/?{query}")
    except ValueError as exc:  # not chained: a parser's message may quote the password
        raise _bad_url(url, str(exc)) from None
    for key in ("host", "port", "connection_class"):
        options.pop(key, None)
    if db:
        options["db"] = int(db)
    own = {key.partition("_")[2]: options.pop(key) for key in _SENTINEL_OPTIONS
           if key in options}
    if tls:
        options["ssl"] = True
        own.update({k: v for k, v in options.items() if k.startswith("ssl")})
    return SentinelTarget(unquote(service), sentinels, options, own)


#: The Redis Cluster URL schemes, and whether each speaks TLS.
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}


def cluster_seeds(url: str) -> tuple[tuple[str, int], ...] | None:
    """The nodes a ``redis+cluster://`` or ``rediss+cluster://`` URL names (the client
    reads the rest of the cluster from them), None for any other URL;
    :class:`ConfigurationError` for a malformed one."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        return None
    netloc, _, tail = rest.partition("/")
    if any(c in netloc for c in "?#"):
        raise _bad_url(url, "end the node list with a slash: host:port[,host:port...]/")
    hosts = netloc.rpartition("@")[2]
    if not hosts:
        raise _bad_url(url, "no node address: use host:port[,host:port...]")
    path = tail.partition("?")[0].partition("#")[0].strip("/")
    if path and path != "0":
        raise _bad_url(url, f"Redis Cluster has only database 0, not {path!r}")
    return _sentinel_hosts(url, hosts, 6379)


def cluster_seed_url(url: str) -> str | None:
    """The ``redis://`` (or ``rediss://``) URL of a cluster URL's first node, with its
    credentials and options (None for any other URL): the client relaybus makes for a
    cluster (its driver reaches the other nodes with the same options)."""
    seeds = cluster_seeds(url)
    if not seeds:
        return None
    scheme, _, rest = url.partition("://")
    netloc, _, tail = rest.partition("/")
    userinfo, at, _ = netloc.rpartition("@")
    host, port = seeds[0]
    shown = f"[{host}]" if ":" in host else host
    query = tail.partition("?")[2]
    return (f"{scheme.lower().partition('+')[0]}://{userinfo}{at}{shown}:{port}/0"
            + (f"?{query}" if query else ""))


def sentinel_clients(client: redis.Redis | redis.asyncio.Redis) -> list[Any]:
    """The clients of the sentinels a Sentinel-managed ``client`` asks (to close them
    with it), or ``[]`` for any other client."""
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    return list(getattr(manager, "sentinels", None) or [])


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
    if parsed.scheme in SENTINEL_SCHEMES:
        sentinel_target(chosen)  # raises for a malformed one
        return chosen
    if parsed.scheme in CLUSTER_SCHEMES:
        cluster_seeds(chosen)  # raises for a malformed one
        return chosen
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(scrub(
            f"unsupported URL {redact(chosen)!r}: use redis://, rediss://, unix://, "
            "redis+sentinel://, rediss+sentinel://, redis+cluster://, rediss+cluster:// "
            "or embedded", chosen))
    db = parsed.path.strip("/") if parsed.scheme != "unix" else ""
    if db and not db.isdigit():  # redis-py would silently use database 0
        raise _bad_url(chosen, f"the database must be a number, not {db!r}")
    return chosen


def address_of(client: redis.Redis | redis.asyncio.Redis) -> str:
    """``host:port`` (or the socket path) a client connects to; for a Sentinel-managed
    client, ``sentinel SERVICE via host:port,host:port`` (the primary changes)."""
    pool = client.connection_pool
    sentinels = sentinel_clients(client)
    if sentinels and hasattr(pool, "service_name"):
        return sentinel_address(pool.service_name, [
            (s.connection_pool.connection_kwargs.get("host", "localhost"),
             s.connection_pool.connection_kwargs.get("port", DEFAULT_SENTINEL_PORT))
            for s in sentinels])
    kw = pool.connection_kwargs
    if "path" in kw:
        return str(kw["path"])
    return f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"


def cluster_address(seeds: Any) -> str:
    """How messages name a cluster: ``cluster via host:port,host:port``."""
    return "cluster via " + ",".join(f"[{h}]:{p}" if ":" in str(h) else f"{h}:{p}"
                                     for h, p in seeds)


def node_pool(pool: Any, host: str, port: int) -> Any:
    """A connection pool like ``pool`` (either front's: same class, options,
    credentials and TLS) to another node, ``host:port``, of a cluster."""
    kwargs = {**pool.connection_kwargs, "host": host, "port": port}
    return type(pool)(connection_class=pool.connection_class, **kwargs)


def pool_of(pools: dict[Any, Any], node: tuple[str, int] | None) -> Any:
    """The connection pool of ``node`` in ``pools``: ``pools[None]`` is the first
    server's; another node's is made like it (:func:`node_pool`) on first use."""
    pool = pools.get(node)
    if pool is None:
        assert node is not None
        pool = pools.setdefault(node, node_pool(pools[None], *node))
    return pool


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
    #: ``durability="replicated"``: how durable writes wait for the replicas.
    replication: Replication | None = None

    def __repr__(self) -> str:
        return (f"ConnectionSettings(url={redact(self.url)!r}, "
                f"retry_timeout={self.retry_timeout!r}, socket_timeout={self.socket_timeout!r}"
                + (f", replication={self.replication!r})" if self.replication else ")"))

    @classmethod
    def from_options(cls, url: str | None = None, *, redis_host: str = "localhost",
                     redis_port: int = 6379, redis_db: int = 0,
                     redis_password: str | None = None,
                     retry_timeout: float | None = None,
                     durability: str = "primary", replication_timeout: float = 1.0,
                     client: bool = False) -> ConnectionSettings:
        """Resolve the URL (``embedded`` starts a server) and validate the options.

        ``durability``: ``"primary"`` (a write counts once the primary applied it) or
        ``"replicated"`` (publishes, settles and moves also wait, up to
        ``replication_timeout`` seconds, for one replica). ``client``: the caller
        brings its own client, so no URL is resolved.
        """
        if durability not in DURABILITIES:
            raise ConfigurationError(f"durability must be one of {', '.join(DURABILITIES)}, "
                                     f"not {durability!r}")
        if not (isinstance(replication_timeout, (int, float))
                and 0 < replication_timeout <= MAX_REPLICATION_TIMEOUT):
            raise ConfigurationError(
                f"replication_timeout must be > 0 and <= {MAX_REPLICATION_TIMEOUT:g} "
                f"seconds, not {replication_timeout!r}")
        resolved = "client" if client else resolve_url(
            url, redis_host=redis_host, redis_port=redis_port, redis_db=redis_db,
            redis_password=redis_password)
        bound = DEFAULT_RETRY_TIMEOUT if retry_timeout is None else float(retry_timeout)
        if not bound >= 0:
            raise ConfigurationError(f"retry_timeout must be >= 0 seconds, not {retry_timeout!r}")
        replication = Replication(1, float(replication_timeout)) \
            if durability == "replicated" else None
        return cls(resolved, bound, replication=replication)

    def _kwargs(self) -> dict[str, Any]:
        return {"socket_timeout": self.socket_timeout,
                "socket_connect_timeout": min(2.0, self.socket_timeout),
                "retry": None, "retry_on_timeout": False, "health_check_interval": 30,
                "protocol": 2}

    def _client(self, redis_class: Any, sentinel_class: Any) -> Any:
        """A client of ``redis_class`` (either front's) for these settings: from the URL,
        or, for a Sentinel URL, one whose pool asks ``sentinel_class``'s sentinels for the
        primary on every connect. The same timeouts for the sentinels and the servers."""
        try:
            target = sentinel_target(self.url)
            if target is None:
                return redis_class.from_url(cluster_seed_url(self.url) or self.url,
                                            **self._kwargs())
            sentinel_kwargs = {k: v for k, v in self._kwargs().items()
                               if k != "retry_on_timeout"}  # deprecated for a client
            manager = sentinel_class(list(target.sentinels),
                                     sentinel_kwargs={**sentinel_kwargs,
                                                      **target.sentinel_options},
                                     **self._kwargs())
            return manager.master_for(target.service, redis_class=redis_class,
                                      **target.master_options)
        except ValueError as exc:  # not chained: its message may quote a piece of the password
            error = _bad_url(self.url, str(exc))
        raise error

    def sync_client(self) -> redis.Redis:
        """A redis-py client for these settings (RESP2, relaybus's timeouts, no retries);
        for a cluster URL, a client of its first node (the driver reaches the others)."""
        client: redis.Redis = self._client(redis.Redis, redis.sentinel.Sentinel)
        return client

    def async_client(self) -> redis.asyncio.Redis:
        """A ``redis.asyncio`` client for these settings."""
        client: redis.asyncio.Redis = self._client(redis.asyncio.Redis,
                                                   redis.asyncio.sentinel.Sentinel)
        return client
