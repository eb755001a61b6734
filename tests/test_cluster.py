"""Redis Cluster (#12 items 1 and 2): ``redis+cluster://`` URLs, a failover while
services of both fronts consume, the CLI over every node, and round trips per batch
that stay constant in the batch size.

The rest of the suite runs against a cluster too (``.ci/run`` starts one and sets
``RELAYBUS_TEST_URL``); these are the tests that need one of their own (a failover) or
that a single server cannot show. Real servers only: three primaries and three replicas
(tests/cluster.py) for the module.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from cluster import ClusterDeployment, cluster_deployment
from helpers_aio import consume_across
from helpers_service import Ping
from relaybus import ConfigurationError, EventBus, MessageQueue
from relaybus.cli import app
from relaybus.connection import ConnectionSettings, cluster_seeds, redact, resolve_url
from relaybus.keys import QueueKeys
from relaybus.testing import delete_prefix, unique_prefix

# -- the URL (no server) ---------------------------------------------------------------


def test_url_grammar() -> None:
    assert cluster_seeds("redis+cluster://u:p%40w@h1:7000,h2,[::1]:7002/") == (
        ("h1", 7000), ("h2", 6379), ("::1", 7002))
    assert cluster_seeds("rediss+cluster://h:1/0?ssl_cert_reqs=none") == (("h", 1),)
    assert cluster_seeds("redis://h:1/0") is None
    url = "redis+cluster://:pw@h:1,h:2/"
    assert resolve_url(url) == url
    assert "pw" not in redact(url) and "pw" not in repr(ConnectionSettings(url))


@pytest.mark.parametrize("url", [
    "redis+cluster://:S3cr-et@/",               # no node
    "redis+cluster://:S3cr-et@h:1/3",           # a database other than 0
    "redis+cluster://:S3cr-et@h:port/",         # a port that is not a number
    "redis+cluster://:S3cr-et@h:99999/",
], ids=["no-host", "db", "bad-port", "port-range"])
def test_bad_url_is_a_configuration_error_without_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        ConnectionSettings.from_options(url)
    text = "".join(traceback.format_exception(caught.value))
    assert "S3cr-et" not in text and "redis+cluster://:***@" in str(caught.value)


# -- on a cluster of its own -------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterDeployment]:
    with cluster_deployment(tmp_path_factory.mktemp("cluster")) as started:
        yield started


@pytest.fixture
def cprefix(deployment: ClusterDeployment) -> Iterator[str]:
    p = unique_prefix()
    yield p
    delete_prefix(deployment.url, p)


@pytest.mark.timeout(40, func_only=True)
def test_failover_while_both_fronts_consume(deployment: ClusterDeployment,
                                            cprefix: str) -> None:
    """Every event whose publish returned is handled by a service of each front across a
    ``CLUSTER FAILOVER`` of the primary that holds the event log, without restarting
    them: the driver reads the new slot map after the old primary answers ``MOVED``."""
    log = QueueKeys(cprefix, "all").stream
    old = deployment.owner(log)
    seen = consume_across(deployment.url, cprefix, "cl-fo",
                          lambda: deployment.failover(old), deployment.logs)
    assert deployment.owner(log) == seen.switched != old


def test_cli_queues_sees_every_node(deployment: ClusterDeployment, cprefix: str) -> None:
    names = ["orders", "billing", "shipping", "audit"]
    with MessageQueue(deployment.url, prefix=cprefix) as mq:
        for i, name in enumerate(names):
            q, _ = mq.create_queue_pair(name)
            q.send_messages([{"i": j} for j in range(i + 1)])
    owners = {deployment.owner(QueueKeys(cprefix, n).stream) for n in names}
    assert len(owners) > 1  # the queues are spread over the primaries
    result = CliRunner().invoke(app, ["queues", "--url", deployment.url, "--prefix", cprefix,
                                      "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert {n: rows[n]["waiting"] for n in names} == {"orders": 1, "billing": 2,
                                                       "shipping": 3, "audit": 4}


def test_round_trips_per_batch_do_not_grow_with_the_batch(
        deployment: ClusterDeployment, cprefix: str) -> None:
    """Publishing a batch, fetching it and settling it: the same number of requests
    (writes to a node) for 10 events as for 500, on a cluster as on one server."""
    with EventBus(deployment.url, prefix=cprefix) as bus:
        bus.subscribe("rt", [Ping])
        queue, _ = bus.subscription_queue("rt")
        bus.publish(Ping(n=-1))  # warm: slot map, scripts, groups
        queue.acknowledge_messages([m.id for m in queue.get_messages(count=1)])
        driver: Any = bus.mq.driver
        assert queue.mq.driver is driver
        talk = driver._talk
        requests: list[int] = []

        def counted(batches: Any) -> Any:
            requests.append(len(batches))
            return talk(batches)

        driver._talk = counted
        per_size = {}
        for size in (10, 500):
            requests.clear()
            bus.publish_many([Ping(n=i) for i in range(size)])
            got = queue.get_messages(count=size)
            assert len(got) == size
            assert queue.acknowledge_messages(
                [m.id for m in got], record_done=[m.dedup_key or "" for m in got]) == size
            per_size[size] = sum(requests)
    assert per_size[10] == per_size[500] == 3, per_size  # publish, fetch, settle


def test_a_partitioned_log_spreads_over_the_primaries(deployment: ClusterDeployment,
                                                      cprefix: str) -> None:
    """Six partitions: their logs sit on more than one primary, and publishing a batch
    over all of them is one request per primary, written side by side (one round trip)."""
    with EventBus(deployment.url, prefix=cprefix, partitions=6) as bus:
        bus.subscribe("spread", [Ping])
        bus.publish_many([Ping(n=i) for i in range(60)])  # warm: slot map, scripts
        owners = {deployment.owner(QueueKeys(cprefix, "all" if i == 0 else f"all@{i}").stream)
                  for i in range(6)}
        driver: Any = bus.mq.driver
        talk = driver._talk
        requests: list[int] = []

        def counted(batches: Any) -> Any:
            requests.append(len(batches))
            return talk(batches)

        driver._talk = counted
        bus.publish_many([Ping(n=i) for i in range(500)])
    assert len(owners) > 1
    assert requests == [len(owners)], requests  # one exchange, one request per primary
