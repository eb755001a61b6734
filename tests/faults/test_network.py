"""Scenario 5: connections cut mid-command by a TCP proxy the test controls.

Every process reaches the server through :class:`~faults.proxy.RespProxy`, which
loses replies after the server ran the command, and drops connections blocked in a
read. Two instances of one service, one per front, share the subscription:

- the reply to a publish (``EVALSHA`` of publish.lua, single and batched) is lost:
  the producer's client sends it again, and publish.lua finds the event ids already
  in the log within the dedup window: the log holds each event once;
- the reply to a settle of acknowledgements (the hot path's ``MULTI``/``XACK``/
  ``ZADD``/``EXEC``) or to a settle.lua call (a batch with lease extensions) is lost:
  the retry finds the work done, nothing runs twice;
- the reply of a read that delivered log entries (the hot path's ``XREADGROUP`` on
  the log, blocking or not) is lost: the entries sit pending for a consumer that
  never saw them and are reclaimed (fetch.lua's ``XAUTOCLAIM``) after the visibility
  timeout, then handled once; so is the reply of a fetch.lua call that reclaimed
  entries;
- a connection is dropped while blocked in ``XREADGROUP``: the read is re-issued.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from faults.conftest import Scale
from faults.harness import Cluster, wait_until
from faults.ledger import Report, log_key, reconcile
from faults.proxy import Command, RespProxy, is_blocking_read, is_exec, is_read_of, name_of
from relaybus.scripts import script

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]


def _script_call(name: str, *, with_entries: bool = False
                 ) -> Callable[[Command, bytes], bool]:
    sha = script(name).sha.encode()

    def match(cmd: Command, reply: bytes) -> bool:
        if name_of(cmd) != "EVALSHA" or len(cmd) < 2 or cmd[1].lower() != sha:
            return False
        # fetch.lua answers {entries, gone, ...}: "*N\r\n*0\r\n..." when it delivered none
        if not with_entries:
            return True
        head = reply.find(b"\r\n")
        return reply[:1] == b"*" and reply[head + 2:head + 6] not in (b"*0\r\n", b"")

    return match


@pytest.fixture
def proxies(cluster: Cluster) -> Iterator[tuple[RespProxy, RespProxy]]:
    """Two proxies: one for the batched producer, one for every other process."""
    ps = (RespProxy(cluster.server.url), RespProxy(cluster.server.url))
    yield ps
    for p in ps:
        p.close()


def test_replies_lost_and_connections_cut(cluster: Cluster, proxies: tuple[RespProxy, RespProxy],
                                          scale: Scale, record: list[Report]) -> None:
    proxy, batch_proxy = proxies
    total = scale.n(10_000)
    seconds = 20.0 if scale.full else 4.0
    lost = {"publish": scale.n(50, 5), "ack": scale.n(20, 3), "settle": scale.n(20, 3),
            "read": scale.n(20, 3), "fetch": scale.n(5, 2)}
    cuts = scale.n(20, 5)
    # publish calls: total / 2 single ones; the batched producer alternates one event and
    # a batch of 10, so total / 2 / 5.5 calls
    calls = {proxy: total // 2, batch_proxy: total // 11}
    log = log_key(cluster.prefix).encode()
    for p, n in calls.items():
        p.drop_reply(_script_call("publish"), times=lost["publish"],
                     every=max(2, n // (lost["publish"] + 2)), name="publish")
    proxy.drop_reply(is_exec, times=lost["ack"], every=max(2, total // 40), name="ack")
    proxy.drop_reply(_script_call("settle"), times=lost["settle"], every=2, name="settle")
    # about one read in four delivers a batch: spread the losses over the run
    proxy.drop_reply(is_read_of(log), times=lost["read"],
                     every=max(3, total // 4 // (lost["read"] + 2)), name="read")
    proxy.drop_reply(_script_call("fetch", with_entries=True), times=lost["fetch"], every=1,
                     name="fetch")
    vt = 1.0
    # up to 1 + lost fetch + 1 deliveries of one entry: below max_attempts, no dead letter
    relaybus = cluster.services("net", 2, vt=vt, concurrency=2, prefetch=8, max_attempts=10,
                                url=proxy.url)
    cluster.wait_ready(relaybus)
    t0 = time.time()
    producers = [cluster.producer("single", total // 2, rate=total / 2 / seconds, batch=1,
                                  types="alpha,beta", url=proxy.url),
                 cluster.producer("batched", total // 2, rate=total / 2 / seconds, batch=10,
                                  types="alpha,beta", url=batch_proxy.url)]
    cluster.wait_exit(producers, timeout=seconds * 4 + 60)
    cluster.wait_quiet(["net"], timeout=60)

    # idle now: both instances sit in blocking reads; drop those connections, repeatedly
    # (a read can end by its own timeout between the look and the cut: such a round
    # cuts one connection, and is done again, so that each round cuts both)
    rounds = 0
    while sum(proxy.cut.values()) < 2 * cuts and rounds < 4 * cuts:
        wait_until(lambda: proxy.waiting(is_blocking_read) >= 2, 15,
                   "both instances to block in a read")
        proxy.cut_waiting(is_blocking_read)
        rounds += 1
    after = cluster.producer("after", 100, batch=10, url=proxy.url)
    cluster.wait_exit([after], timeout=60)
    cluster.wait_quiet(["net"], timeout=60)
    cluster.check_threads(relaybus)

    dropped = proxy.dropped_by + batch_proxy.dropped_by
    report = reconcile(cluster.ledger, cluster.dead, {"net": ["*"]}, "5. TCP proxy faults",
                       prefix=cluster.prefix, duplicate_bound=0, seconds=time.time() - t0,
                       faults=f"replies lost: {proxy.dropped_by['publish']} publish, "
                              f"{batch_proxy.dropped_by['publish']} publish of a batch, "
                              f"{dropped['ack']} acknowledgement (MULTI/EXEC), "
                              f"{dropped['settle']} settle.lua, {dropped['read']} XREADGROUP "
                              f"that delivered, {dropped['fetch']} fetch.lua that reclaimed; "
                              f"{sum(proxy.cut.values())} connections cut in a blocking read")
    fan_out = cluster.fan_out(["net"])
    report.notes["log entries"] = (f"{fan_out['log entries']:,} for {report.published:,} "
                                   "events: each retried publish deduplicated")
    report.notes["log entries read by the subscription's group"] = f"{fan_out['net']:,}"
    cluster.terminate(relaybus)
    record.append(report)
    assert proxy.dropped_by["publish"] == batch_proxy.dropped_by["publish"] == lost["publish"]
    assert dropped["ack"] == lost["ack"], dropped
    assert dropped["settle"] >= 1, dropped
    assert dropped["read"] == lost["read"], dropped
    assert dropped["fetch"] >= 1, dropped
    assert sum(proxy.cut.values()) >= 2 * cuts
    assert fan_out["log entries"] == report.published, "a retried publish was written twice"
    assert fan_out["net"] == fan_out["log entries"], fan_out
    assert report.dead_lettered == 0
    report.assert_ok()
