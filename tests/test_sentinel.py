"""Redis Sentinel (#12 items 1 and 5, Sentinel part): ``redis+sentinel://`` URLs, both
fronts over a real Sentinel deployment (tests/sentinel.py), a forced failover while
services of both fronts consume, the CLI, and passwords that never show.

Real servers only: one primary, one replica and three sentinels per test session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import traceback
from collections import Counter
from collections.abc import Iterator

import pytest
import redis
from typer.testing import CliRunner

from helpers_aio import consume_across, service_options
from helpers_service import Ping
from relaybus import (
    AsyncEventBus,
    AsyncMicroservice,
    BrokerAuthenticationError,
    BrokerUnavailableError,
    ConfigurationError,
    EventBus,
    MessageQueue,
    Microservice,
    ReplicationTimeoutError,
)
from relaybus._core.outage import Kind, classify, is_nogroup, role_changed
from relaybus.cli import app
from relaybus.connection import (
    ConnectionSettings,
    redact,
    resolve_url,
    scrub,
    sentinel_target,
)
from relaybus.keys import QueueKeys
from relaybus.testing import delete_prefix, unique_prefix
from sentinel import SentinelCluster, sentinel_cluster
from waiting import wait_for


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelCluster]:
    """One Sentinel deployment for the session, stopped afterwards even on failure."""
    with sentinel_cluster(tmp_path_factory.mktemp("sentinel")) as started:
        yield started


@pytest.fixture
def sprefix(cluster: SentinelCluster) -> Iterator[str]:
    """A key prefix for this test alone; its keys are deleted from the primary afterwards."""
    p = unique_prefix("sen")
    yield p
    delete_prefix(f"redis://:{_quoted(cluster.password)}@127.0.0.1:{cluster.primary_port()}/0",
                  p)


def _quoted(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def shown(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc)


def assert_hidden(cluster: SentinelCluster, *texts: str) -> None:
    for secret in (cluster.password, cluster.sentinel_password,
                   _quoted(cluster.password), _quoted(cluster.sentinel_password)):
        for text in texts:
            assert secret not in text, text


# -- the URL (no server) ---------------------------------------------------------------


def test_url_grammar() -> None:
    target = sentinel_target("redis+sentinel://u:p%40w@h1:26380,h2,[::1]:5000/mymaster/3"
                             "?sentinel_password=sp&client_name=x")
    assert target is not None
    assert target.service == "mymaster"
    assert target.sentinels == (("h1", 26380), ("h2", 26379), ("::1", 5000))
    assert target.master_options == {"username": "u", "password": "p@w", "db": 3,
                                     "client_name": "x"}
    assert target.sentinel_options == {"password": "sp"}
    assert target.address == "sentinel mymaster via h1:26380,h2:26379,[::1]:5000"
    assert "p@w" not in repr(target)
    plain = sentinel_target("redis+sentinel://h/svc")
    assert plain is not None and plain.master_options == {} and plain.sentinel_options == {}
    tls = sentinel_target("rediss+sentinel://:pw@h:1/svc?ssl_cert_reqs=none"
                          "&sentinel_username=admin")
    assert tls is not None
    assert tls.master_options == {"password": "pw", "ssl": True, "ssl_cert_reqs": "none"}
    assert tls.sentinel_options == {"username": "admin", "ssl": True, "ssl_cert_reqs": "none"}
    assert sentinel_target("redis://h:1/0") is None
    url = "redis+sentinel://:pw@h:1,h:2/svc/0"
    assert resolve_url(url) == url


@pytest.mark.parametrize("url", [
    "redis+sentinel://:S3cr-et@h:1/",           # no service
    "redis+sentinel://:S3cr-et@/svc",           # no sentinel
    "redis+sentinel://:S3cr-et@h:1/svc/zero",   # a database that is not a number
    "redis+sentinel://:S3cr-et@h:port/svc",     # a port that is not a number
    "redis+sentinel://:S3cr-et@h:99999/svc",
    "redis+sentinel://:S3cr-et@h:1/svc?socket_timeout=soon",
], ids=["no-service", "no-host", "bad-db", "bad-port", "port-range", "bad-option"])
def test_bad_url_is_a_configuration_error_without_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        ConnectionSettings.from_options(url)
    assert "S3cr-et" not in shown(caught.value)
    assert "redis+sentinel://:***@" in str(caught.value)


@pytest.mark.parametrize("url", [
    "redis+sentinel://:S3cr-et@h:1,h:2/svc/0",
    "redis+sentinel://user:S3cr-et@h:1/svc",
    "rediss+sentinel://:S3cr-et@h:1,[::1]:2/svc/0?ssl_cert_reqs=none",
    "redis+sentinel://h:1/svc/0?sentinel_password=S3cr-et",
    "redis+sentinel://:S3cr-et@h:1/svc/0?sentinel_password=S3cr-et&db=0",
    "redis+sentinel://:S3c#r-et@h:1,h:2/svc/0",  # unencoded
    "redis+sentinel://:S3c/r-et@h:1,h:2/svc/0",
], ids=["netloc", "user", "tls", "sentinel-password", "both", "hash", "slash"])
def test_redact_hides_the_password_of_a_sentinel_url(url: str) -> None:
    out = redact(url)
    for piece in ("S3cr-et", "S3c", "r-et"):
        assert piece not in out, out
    assert redact(out) == out
    assert "S3c" not in scrub(f"cannot use {url}", url)
    assert "S3c" not in repr(ConnectionSettings(url))


def test_sentinel_error_replies_are_outages_that_drop_the_connection() -> None:
    demoted = redis.ResponseError("UNBLOCKED force unblock from blocking operation, "
                                  "instance state changed (master -> replica?)")
    for reply in (redis.ResponseError("NOREPLICAS Not enough good replicas to write."),
                  redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
                  redis.ResponseError("READONLY You can't write against a read only replica."),
                  redis.ResponseError("MASTERDOWN Link with MASTER is down"), demoted):
        assert classify(reply) is Kind.OUTAGE
        assert role_changed(reply)
    assert not is_nogroup(demoted)
    assert is_nogroup(redis.ResponseError("UNBLOCKED the stream key no longer exists"))
    assert not role_changed(redis.ResponseError("LOADING Redis is loading"))
    assert not role_changed(b"OK")


# -- both fronts over Sentinel ---------------------------------------------------------


def test_sync_bus_and_service_over_sentinel(cluster: SentinelCluster, sprefix: str) -> None:
    url = cluster.url()
    svc = Microservice("sen-sync", **service_options(url, sprefix))
    seen: list[int] = []
    svc.on(Ping)(lambda e: seen.append(e.n))
    bus = EventBus(url, prefix=sprefix)
    try:
        assert svc.event_bus.mq.driver.address.startswith(f"sentinel {cluster.service} via ")
        svc.start()
        for n in range(5):
            bus.publish(Ping(n=n))
        wait_for(lambda: sorted(seen) == list(range(5)), what="5 events handled")
    finally:
        svc.close()
        bus.close()


def test_async_bus_and_service_over_sentinel(cluster: SentinelCluster, sprefix: str) -> None:
    url = cluster.url()

    async def main() -> list[int]:
        seen: list[int] = []
        svc = AsyncMicroservice("sen-async", **service_options(url, sprefix))

        @svc.on(Ping)
        async def handle(event: Ping) -> None:
            seen.append(event.n)

        async with AsyncEventBus(url, prefix=sprefix) as bus:
            await svc.start()
            try:
                for n in range(5):
                    await bus.publish(Ping(n=n))
                deadline = time.monotonic() + 10
                while sorted(seen) != list(range(5)) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            finally:
                await svc.close()
        return sorted(seen)

    assert asyncio.run(asyncio.wait_for(main(), 30)) == list(range(5))


def test_cli_queues_over_sentinel(cluster: SentinelCluster, sprefix: str) -> None:
    with MessageQueue(cluster.url(), prefix=sprefix) as mq:
        mq.create_queue_pair("sen-cli")
    result = CliRunner().invoke(app, ["queues", "--url", cluster.url(), "--prefix", sprefix,
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert "sen-cli" in json.dumps(json.loads(result.stdout))
    assert_hidden(cluster, result.output)


def test_passwords_never_show(cluster: SentinelCluster, sprefix: str) -> None:
    url = cluster.url()
    wrong_data = url.replace(_quoted(cluster.password), "wr0ng-Pa55", 1)
    wrong_sentinel = url.replace(_quoted(cluster.sentinel_password), "wr0ng-Pa55", 1)
    with EventBus(url, prefix=sprefix) as bus:
        assert_hidden(cluster, repr(bus), repr(bus.mq), str(bus.mq.driver.address))
    with pytest.raises(BrokerAuthenticationError) as refused, \
            EventBus(wrong_data, prefix=sprefix, retry_timeout=1) as bad:
        bad.publish(Ping())
    assert f"sentinel {cluster.service} via 127.0.0.1:" in str(refused.value)
    with pytest.raises(BrokerUnavailableError) as unknown, \
            EventBus(wrong_sentinel, prefix=sprefix, retry_timeout=0.5) as bad:
        bad.publish(Ping())
    result = CliRunner().invoke(app, ["queues", "--url", wrong_data, "--prefix", sprefix,
                                      "--timeout", "1"])
    assert result.exit_code != 0
    for text in (shown(refused.value), shown(unknown.value), result.output):
        assert_hidden(cluster, text)
        assert "wr0ng-Pa55" not in text


# -- durability="replicated" -------------------------------------------------------------


def test_replicated_durability_waits_for_the_replica(cluster: SentinelCluster,
                                                     sprefix: str) -> None:
    """A publish returns once the replica has the event; with the replica stopped it
    raises ReplicationTimeoutError, and publishing the same event again once the
    replica is back appends it once: retrying is safe."""
    url = cluster.url()
    log = QueueKeys(sprefix, "all").stream
    with EventBus(url, prefix=sprefix, durability="replicated",
                  replication_timeout=0.3) as bus:
        bus.subscribe("dur", [Ping])
        queue, _ = bus.subscription_queue("dur")
        bus.publish(Ping(n=1))
        replica = cluster.replica_port()
        with contextlib.closing(cluster.data_client(replica)) as r:
            assert r.xlen(log) == 1  # WAIT returned: the replica has it
        late = Ping(n=2)
        with cluster.paused(replica), pytest.raises(ReplicationTimeoutError,
                                                    match="reached 0 of the 1"):
            bus.publish(late)
        bus.publish(late)  # the same event again, the replica back
        with contextlib.closing(cluster.data_client(replica)) as r:
            assert r.xlen(log) == 2
        got = queue.get_messages(count=10)
        assert [m.data["n"] for m in got] == [1, 2]  # once each
        assert queue.acknowledge_messages([m.id for m in got]) == 2


def test_a_service_settles_with_replicated_durability(cluster: SentinelCluster,
                                                      sprefix: str) -> None:
    url = cluster.url()
    svc = Microservice("sen-dur", durability="replicated", replication_timeout=1.0,
                       **service_options(url, sprefix))
    seen: list[int] = []
    svc.on(Ping)(lambda e: seen.append(e.n))
    svc.start()
    try:
        with EventBus(url, prefix=sprefix, durability="replicated") as bus:
            bus.publish_many([Ping(n=i) for i in range(20)])
        wait_for(lambda: svc.stats["handled"] == 20, 15, "20 events handled and settled")
        assert sorted(seen) == list(range(20)) and svc.stats["errors"] == 0
    finally:
        svc.close()


# -- failover ------------------------------------------------------------------------


@pytest.mark.timeout(25, func_only=True)
def test_failover_while_both_fronts_consume(cluster: SentinelCluster, sprefix: str) -> None:
    """Every event whose publish returned is handled by a service of each front, across a
    forced failover, without restarting them; the new primary holds what follows."""
    seen = consume_across(cluster.url(), sprefix, "sen-fo", cluster.failover, cluster.logs)
    old, new = seen.switched
    assert cluster.primary_port() == new != old
    # the events published last are on the new primary (the old one refuses writes)
    log = QueueKeys(sprefix, "all").stream
    ids = seen.publisher.ids
    with cluster.data_client(new) as primary:
        assert primary.xrange(log, ids[-1], ids[-1])
    dupes = {name: sum(c - 1 for c in Counter(handled).values())
             for name, handled in (("sync", seen.sync_seen), ("async", seen.async_seen))}
    print(f"published {len(seen.publisher.published)} (not acknowledged: "
          f"{len(seen.publisher.failed)}), duplicates {dupes}")
