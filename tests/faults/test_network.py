"""Scenario 5: connections cut mid-command by a TCP proxy the test controls.

Every process reaches the server through :class:`~faults.proxy.RespProxy`, which
loses replies after the server ran the command, and drops connections blocked in a
read:

- the reply to an XADD is lost: the producer's client retries, the event lands in
  the log twice, and routing suppresses the copy by ``event_id``;
- the reply to an acknowledgement is lost: the retry finds it done, nothing runs twice;
- the reply of a read that delivered entries (a blocking XREADGROUP, the fetch
  script) is lost: the entries sit pending for a consumer that never saw them and are
  reclaimed after the visibility timeout, then handled once;
- a connection is dropped while blocked in XREADGROUP: the read is re-issued.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator

import pytest

from faults.conftest import Scale
from faults.harness import Cluster, wait_until
from faults.ledger import Report, reconcile
from faults.proxy import Command, RespProxy, delivers_entries, is_blocking_read, is_xadd, name_of
from relaybus.scripts import source

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]


def _sha(script: str) -> bytes:
    return hashlib.sha1(source(script).encode()).hexdigest().encode()


def _script_call(script: str, *, with_entries: bool = False
                 ) -> Callable[[Command, bytes], bool]:
    sha = _sha(script)

    def match(cmd: Command, reply: bytes) -> bool:
        if name_of(cmd) != "EVALSHA" or len(cmd) < 2 or cmd[1].lower() != sha:
            return False
        # fetch.lua answers {entries, ...}: "*5\r\n*0\r\n" when it delivered nothing
        return not with_entries or not reply.startswith(b"*5\r\n*0\r\n")

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
    seconds = 20.0 if scale.full else 6.0
    lost = {"xadd": scale.n(50, 5), "ack": scale.n(20, 3), "read": scale.n(20, 3),
            "fetch": scale.n(20, 3)}
    cuts = scale.n(20, 5)
    every_xadd = max(2, total // 2 // (lost["xadd"] + 2))
    proxy.drop_reply(is_xadd, times=lost["xadd"], every=every_xadd)
    batch_proxy.drop_reply(is_xadd, times=lost["xadd"], every=every_xadd)
    proxy.drop_reply(_script_call("ack"), times=lost["ack"], every=max(2, total // 40))
    proxy.drop_reply(delivers_entries, times=lost["read"], every=3)
    proxy.drop_reply(_script_call("fetch", with_entries=True), times=lost["fetch"],
                     every=max(2, total // 400))
    vt = 2.0
    relaybus = [cluster.router(vt=vt, url=proxy.url),
                cluster.service("net", vt=vt, concurrency=2, prefetch=8, url=proxy.url)]
    cluster.wait_ready(relaybus)
    t0 = time.time()
    producers = [cluster.producer("single", total // 2, rate=total / 2 / seconds, batch=1,
                                  types="alpha,beta", url=proxy.url),
                 cluster.producer("batched", total // 2, rate=total / 2 / seconds, batch=10,
                                  types="alpha,beta", url=batch_proxy.url)]
    cluster.wait_exit(producers, timeout=seconds * 4 + 60)
    cluster.wait_quiet(["net"], timeout=60)

    # idle now: both processes sit in blocking reads; drop those connections, repeatedly
    for _ in range(cuts):
        wait_until(lambda: proxy.waiting(is_blocking_read) >= 2, 15,
                   "the router and the service to block in a read")
        proxy.cut_waiting(is_blocking_read)
    after = cluster.producer("after", 100, batch=10, url=proxy.url)
    cluster.wait_exit([after], timeout=60)
    cluster.wait_quiet(["net"], timeout=60)
    cluster.check_threads(relaybus)

    report = reconcile(cluster.ledger, cluster.dead, {"net": ["*"]}, "5. TCP proxy faults",
                       prefix=cluster.prefix, duplicate_bound=0, seconds=time.time() - t0,
                       faults=f"replies lost: {proxy.dropped['XADD']} XADD, "
                              f"{batch_proxy.dropped['XADD']} XADD in a batch, "
                              f"{proxy.dropped['EVALSHA']} ack or fetch, "
                              f"{proxy.dropped['XREADGROUP']} blocking read; "
                              f"{sum(proxy.cut.values())} connections cut in a blocking read")
    log_added = cluster.client.xinfo_stream(f"{cluster.prefix}{{all}}")["entries-added"]
    copies = cluster.client.xinfo_stream(f"{cluster.prefix}{{sub:net}}")["entries-added"]
    report.notes["log entries (duplicates from retried XADDs)"] = \
        f"{log_added} ({log_added - report.published})"
    report.notes["copies routed"] = copies
    for c in relaybus:
        c.terminate()
    record.append(report)
    assert proxy.dropped["XADD"] == batch_proxy.dropped["XADD"] == lost["xadd"]
    assert proxy.dropped["EVALSHA"] >= lost["ack"] + lost["fetch"]
    assert proxy.dropped["XREADGROUP"] == lost["read"]
    assert log_added > report.published, "no XADD was retried"
    assert copies == report.published, "a retried XADD was routed twice"
    assert report.dead_lettered == 0
    report.assert_ok()
