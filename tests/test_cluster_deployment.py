"""The Redis Cluster helper (tests/cluster.py) itself: it comes up settled, takes
writes through a cluster client, and :meth:`ClusterDeployment.failover` swaps roles.

Real servers only: one deployment (six nodes) for the module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import pytest
from redis.cluster import RedisCluster

from cluster import ClusterDeployment, cluster_deployment


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterDeployment]:
    with cluster_deployment(tmp_path_factory.mktemp("cluster")) as started:
        yield started


def test_comes_up_with_three_primaries_each_with_one_replica(
        deployment: ClusterDeployment) -> None:
    primaries = deployment.primaries()
    assert len(primaries) == 3
    replicas = [deployment.replicas_of(p) for p in primaries]
    assert all(len(r) == 1 for r in replicas)
    assert {a for r in replicas for a in r} | set(primaries) == set(deployment.nodes)
    for address in deployment.nodes:
        with contextlib.closing(deployment.client(address)) as c:
            info = c.execute_command("CLUSTER", "INFO")
        assert "cluster_state:ok" in info and "cluster_slots_assigned:16384" in info

    parts = urlsplit(deployment.url)
    assert parts.scheme == "redis+cluster" and parts.path == "/"
    assert unquote(parts.password or "") == deployment.password
    assert "/" in deployment.password and "/" not in parts.netloc.split("@", 1)[0]


def test_a_key_written_through_a_cluster_client_is_readable(
        deployment: ClusterDeployment) -> None:
    host, port = deployment.nodes[0]
    client = RedisCluster(host=host, port=port, password=deployment.password)
    try:
        keys = {f"relaybus-test-{i}": f"value-{i}".encode() for i in range(20)}
        for key, value in keys.items():
            client.set(key, value)
        assert {key: client.get(key) for key in keys} == keys
        # spread over the primaries, not all on one node
        owners = {client.get_node_from_key(key).port for key in keys}
        assert len(owners) > 1
    finally:
        client.close()


def test_failover_swaps_roles(deployment: ClusterDeployment) -> None:
    old = deployment.primaries()[0]
    new = deployment.failover(old)
    assert new != old
    assert new in deployment.primaries() and old not in deployment.primaries()
    assert deployment.replicas_of(new) == [old]
    assert len(deployment.primaries()) == 3
