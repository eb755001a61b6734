"""The queue layer against a real server (issue 2): every rule of MessageQueue / Queue.

Each test runs under its own key prefix on the session's server (a private embedded
Valkey, or ``$RELAYBUS_TEST_URL``). Waiting is done by polling with a deadline, never
by sleeping a fixed time and hoping.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlparse

import pytest
import redis
from redis.connection import AbstractConnection

from relaybus import (
    ConfigurationError,
    CrossSlotError,
    InvalidNameError,
    LeanMQ,
    Message,
    MessageQueue,
    MessageTooLargeError,
    Queue,
    QueueInfo,
    QueueNotFoundError,
    RelaybusError,
    ReplicationTimeoutError,
    SerializationError,
)
from relaybus.keys import GROUP
from relaybus.testing import on_cluster, one_server
from waiting import wait_for

T = TypeVar("T")

#: Small visibility timeout for reclaim tests, in seconds.
VT = 0.3


def pending_ids(raw: redis.Redis, queue: Queue) -> dict[str, str]:
    """id -> owning consumer of every entry in the queue's PEL."""
    rows = raw.xpending_range(queue.key, GROUP, min="-", max="+", count=10_000)
    return {r["message_id"].decode(): r["consumer"].decode() for r in rows}


def is_blocked(raw: redis.Redis, client_name: str) -> bool:
    """True while the connection named ``client_name`` waits in a blocking command."""
    return any(c.get("name") == client_name and "b" in c.get("flags", "")
               for c in raw.client_list())


def wait_idle(raw: redis.Redis, queue: Queue, seconds: float) -> None:
    """Wait until every pending entry of ``queue`` has been idle for ``seconds``."""
    wait_for(lambda: all(r["time_since_delivered"] >= seconds * 1000 for r in
                         raw.xpending_range(queue.key, GROUP, "-", "+", 10_000)))


class _RequestCounter:
    """Counts requests written to the server (a pipeline or a script call is one)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = AbstractConnection.send_packed_command

        def counting(conn: AbstractConnection, command: Any, check_health: bool = True) -> None:
            self.count += 1
            original(conn, command, check_health)

        monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)


@pytest.fixture
def make_mq(redis_url: str, prefix: str) -> Iterator[Callable[..., MessageQueue]]:
    """Factory for more MessageQueue objects (other consumers, other processes' view)."""
    made: list[MessageQueue] = []

    def make(**kwargs: Any) -> MessageQueue:
        kwargs.setdefault("retry_timeout", 5.0)
        mq = MessageQueue(redis_url, prefix=prefix, **kwargs)
        made.append(mq)
        return mq

    yield make
    for mq in made:
        mq.close()


@pytest.fixture
def named_mq(redis_url: str, prefix: str) -> Iterator[tuple[MessageQueue, str]]:
    """A MessageQueue whose connections carry a client name (to see it block in CLIENT LIST)."""
    if not one_server(redis_url):
        pytest.skip("inspects one server's connections (CLIENT LIST, a counting client)")
    name = f"relaybus-test-{uuid.uuid4().hex[:8]}"
    mq = MessageQueue(client=redis.Redis.from_url(redis_url, client_name=name), prefix=prefix)
    yield mq, name
    mq.close()


# -- queue pairs ------------------------------------------------------------------------


def test_create_queue_pair_returns_main_and_dlq(mq: MessageQueue, raw: redis.Redis) -> None:
    q, dlq = mq.create_queue_pair("orders")
    assert (q.name, q.is_dlq) == ("orders", False)
    assert (dlq.name, dlq.is_dlq) == ("orders:dlq", True)
    assert raw.exists(q.key) and raw.exists(dlq.key)
    groups = {g["name"].decode() for g in raw.xinfo_groups(q.key)}
    assert groups == {GROUP}
    # every key of the pair shares one hash tag
    assert all("{orders}" in k for k in q.keys.all())


def test_create_queue_pair_is_idempotent_and_keeps_messages(mq: MessageQueue,
                                                            raw: redis.Redis) -> None:
    q, dlq = mq.create_queue_pair("orders")
    created = q.get_info().created_at
    q.send_message({"n": 1})
    [held] = q.get_messages()
    q.send_message({"n": 2})
    q2, dlq2 = mq.create_queue_pair("orders")
    assert (q2.key, dlq2.key) == (q.key, dlq.key)
    assert raw.xlen(q.key) == 2
    assert pending_ids(raw, q) == {held.id: mq.consumer_id}  # the group was not reset
    assert [g["name"].decode() for g in raw.xinfo_groups(q.key)] == [GROUP]
    assert q2.get_info().created_at == created
    assert mq.queue_names() == ["orders"]
    assert [m.data for m in q2.get_messages(count=5)] == [{"n": 2}]


def test_visibility_timeout_default_stored_updated_and_shared(
        mq: MessageQueue, make_mq: Callable[..., MessageQueue]) -> None:
    q, dlq = mq.create_queue_pair("orders")
    assert q.visibility_timeout == dlq.visibility_timeout == 30.0
    q, _ = mq.create_queue_pair("orders", visibility_timeout=5)
    assert q.visibility_timeout == 5.0
    # not given: the stored one applies
    assert mq.create_queue_pair("orders")[0].visibility_timeout == 5.0
    other = make_mq()
    seen = other.get_queue("orders")
    assert seen is not None and seen.visibility_timeout == 5.0
    mq.create_queue_pair("orders", visibility_timeout=7.5)
    seen_dlq = other.get_dead_letter_queue("orders")
    assert seen_dlq is not None and seen_dlq.visibility_timeout == 7.5
    assert other.get_queue("orders").get_info().visibility_timeout == 7.5  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", [0, -1.0])
def test_visibility_timeout_must_be_positive(mq: MessageQueue, bad: float) -> None:
    with pytest.raises(ValueError):
        mq.create_queue_pair("orders", visibility_timeout=bad)


def test_get_queue_and_dlq_none_for_missing(mq: MessageQueue) -> None:
    assert mq.get_queue("nope") is None
    assert mq.get_dead_letter_queue("nope") is None
    assert mq.get_queue("nope:dlq") is None
    with pytest.raises(QueueNotFoundError):
        mq.require_queue("nope")
    with pytest.raises(LookupError):
        mq.require_queue("nope")


def test_get_queue_and_dlq_find_existing(mq: MessageQueue) -> None:
    q, dlq = mq.create_queue_pair("orders")
    got = mq.get_queue("orders")
    got_dlq = mq.get_dead_letter_queue("orders")
    by_name = mq.get_queue("orders:dlq")
    assert got is not None and got.key == q.key and not got.is_dlq
    assert got_dlq is not None and got_dlq.key == dlq.key and got_dlq.is_dlq
    assert by_name is not None and by_name.key == dlq.key
    assert mq.require_queue("orders").key == q.key


def test_list_queues(mq: MessageQueue) -> None:
    assert mq.list_queues() == []
    mq.create_queue_pair("b")
    mq.create_queue_pair("a")
    infos = mq.list_queues()
    assert all(isinstance(i, QueueInfo) for i in infos)
    assert {(i.name, i.is_dlq) for i in infos} == {
        ("a", False), ("a:dlq", True), ("b", False), ("b:dlq", True)}
    assert mq.queue_names() == ["a", "b"]


def test_list_queues_sees_only_its_prefix(
        mq: MessageQueue, redis_url: str, prefix: str) -> None:
    mq.create_queue_pair("mine")
    other = MessageQueue(redis_url, prefix=prefix + "other:")
    try:
        other.create_queue_pair("theirs")
        assert [i.name for i in mq.list_queues() if not i.is_dlq] == ["mine"]
    finally:
        other.delete_queue("theirs")
        other.close()


def test_delete_queue_removes_pair(mq: MessageQueue, raw: redis.Redis) -> None:
    q, dlq = mq.create_queue_pair("orders")
    q.send_message({"a": 1})
    assert mq.delete_queue("orders") is True
    assert not any(raw.exists(k) for k in q.keys.all())
    assert mq.get_queue("orders") is None
    assert mq.list_queues() == []
    assert mq.delete_queue("orders") is False


def test_delete_queue_can_keep_dlq(mq: MessageQueue, raw: redis.Redis) -> None:
    q, dlq = mq.create_queue_pair("orders")
    mid = q.send_message({"a": 1})
    q.move_to_dlq(mid, "bad")
    mq.delete_queue("orders", delete_dlq=False)
    assert not raw.exists(q.key)
    assert raw.xlen(dlq.key) == 1
    # re-creating the pair finds the kept dead letters
    _, dlq2 = mq.create_queue_pair("orders")
    assert [m.data for m in dlq2.peek()] == [{"a": 1}]


def test_context_manager_closes(redis_url: str, prefix: str) -> None:
    with MessageQueue(redis_url, prefix=prefix) as mq:
        q, _ = mq.create_queue_pair("orders")
        q.send_message({"a": 1})
        assert mq.ping()
    with MessageQueue(redis_url, prefix=prefix) as mq2:
        assert [m.data for m in mq2.require_queue("orders").get_messages()] == [{"a": 1}]


@pytest.mark.single_server
def test_leanmq_seed_constructor(redis_url: str, prefix: str) -> None:
    parsed = urlparse(redis_url)
    db = int(parsed.path.strip("/") or 0)
    assert LeanMQ is MessageQueue
    mq = LeanMQ(redis_host=parsed.hostname or "localhost", redis_port=parsed.port or 6379,
                redis_db=db, redis_password=parsed.password, prefix=prefix)
    try:
        q, dlq = mq.create_queue_pair("seed")
        q.send_message({"hello": "seed"})
        msgs = q.get_messages(count=10, block_for_seconds=1)
        assert [m.data for m in msgs] == [{"hello": "seed"}]
        assert q.acknowledge_messages([m.id for m in msgs]) == 1
    finally:
        mq.close()


# -- invalid input ----------------------------------------------------------------------

BAD_NAMES = ["", " ", "a b", " a", "a\t", "a\nb", "a\x00b", "a\x07b", "a\x7fb", "x" * 201,
             "a{b", "a}b", "{a}", "a:dlq"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_invalid_queue_names_rejected(mq: MessageQueue, raw: redis.Redis, prefix: str,
                                      bad: str) -> None:
    for call in (mq.create_queue_pair, mq.get_dead_letter_queue, mq.delete_queue):
        with pytest.raises(InvalidNameError) as info:
            call(bad)
        assert isinstance(info.value, ValueError)
    if not bad.endswith(":dlq"):
        with pytest.raises(InvalidNameError):
            mq.get_queue(bad)
    assert list(raw.scan_iter(match=prefix + "*")) == []


def test_name_limits_accepted(mq: MessageQueue) -> None:
    for good in ["x" * 200, "orders.v2", "a:b", "unicodé", "A-b_c/1"]:
        q, dlq = mq.create_queue_pair(good)
        q.send_message({"ok": good})
        assert [m.data for m in q.get_messages()] == [{"ok": good}]


@pytest.mark.parametrize("bad", ["a{", "a}", "a b", 3])
def test_invalid_prefix_rejected(redis_url: str, bad: Any) -> None:
    with pytest.raises(InvalidNameError):
        MessageQueue(redis_url, prefix=bad)


@pytest.mark.parametrize("payload", [{"s": {1, 2}}, {"f": float("nan")}, {"f": float("inf")},
                                     {"o": object()}, {"b": b"bytes"}, ["not", "a", "dict"],
                                     "text"])
def test_non_json_payload_rejected_nothing_written(
        mq: MessageQueue, raw: redis.Redis, payload: Any) -> None:
    q, _ = mq.create_queue_pair("orders")
    with pytest.raises(SerializationError) as info:
        q.send_message(payload)
    assert isinstance(info.value, ValueError)
    with pytest.raises(SerializationError):
        q.send_messages([{"good": 1}, payload, {"good": 2}])
    with pytest.raises(SerializationError), mq.transaction() as tx:
        tx.send_message(q, {"good": 1})
        tx.send_message(q, payload)
    assert raw.xlen(q.key) == 0


def test_oversize_payload_rejected_nothing_written(
        mq: MessageQueue, make_mq: Callable[..., MessageQueue], raw: redis.Redis) -> None:
    q, _ = mq.create_queue_pair("orders")
    big = {"x": "a" * (1024 * 1024)}
    with pytest.raises(MessageTooLargeError) as info:
        q.send_message(big)
    assert info.value.limit == 1024 * 1024 and info.value.size > info.value.limit
    assert isinstance(info.value, SerializationError)
    with pytest.raises(MessageTooLargeError):
        q.send_messages([{"ok": 1}, big])
    # the limit is configurable
    small = make_mq(max_message_size=100)
    sq = small.require_queue("orders")
    with pytest.raises(MessageTooLargeError):
        sq.send_message({"x": "a" * 100})
    assert raw.xlen(q.key) == 0
    sq.send_message({"x": "a" * 50})
    assert raw.xlen(q.key) == 1


@pytest.mark.parametrize("ttl", [0, -1, float("nan")])
def test_invalid_ttl_rejected(mq: MessageQueue, raw: redis.Redis, ttl: float) -> None:
    q, _ = mq.create_queue_pair("orders")
    with pytest.raises(SerializationError):
        q.send_message({"a": 1}, ttl=ttl)
    assert raw.xlen(q.key) == 0


def test_get_messages_count_must_be_positive(mq: MessageQueue) -> None:
    q, _ = mq.create_queue_pair("orders")
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError):
            q.get_messages(count=bad)  # type: ignore[arg-type]


# -- send / get / ack -------------------------------------------------------------------


def test_message_fields_and_data_exactly_as_sent(mq: MessageQueue) -> None:
    q, _ = mq.create_queue_pair("orders")
    payload = {"d": "looks like a field", "t": 1, "h": None, "_id": "x", "__headers__": {},
               "nested": {"list": [1, 2.5, True, None, "é"], "empty": {}}, "big": 2**62}
    before = time.time()
    mid = q.send_message(payload, headers={"trace-id": "abc", "kind": "test"})
    after = time.time()
    [msg] = q.get_messages()
    assert isinstance(msg, Message)
    assert msg.id == mid
    assert msg.data == payload
    assert list(msg.data) == list(payload)
    assert msg.headers == {"trace-id": "abc", "kind": "test"}
    assert before - 0.01 <= msg.timestamp <= after + 0.01
    assert msg.delivery_count == 1
    assert msg.failures == [] and msg.reason is None
    assert msg.queue == "orders"


def test_headers_default_empty(mq: MessageQueue) -> None:
    q, _ = mq.create_queue_pair("orders")
    q.send_message({"a": 1})
    [msg] = q.get_messages()
    assert msg.headers == {}


def test_send_message_returns_stream_id_and_explicit_id(mq: MessageQueue,
                                                        raw: redis.Redis) -> None:
    q, _ = mq.create_queue_pair("orders")
    mid = q.send_message({"a": 1}, message_id="1-1")
    assert mid == "1-1"
    auto = q.send_message({"a": 2})
    assert [e[0].decode() for e in raw.xrange(q.key)] == ["1-1", auto]


def test_send_messages_in_order(mq: MessageQueue, raw: redis.Redis) -> None:
    q, _ = mq.create_queue_pair("orders")
    assert q.send_messages([]) == []
    ids = q.send_messages([{"i": i} for i in range(20)])
    assert len(ids) == 20 and len(set(ids)) == 20
    msgs = q.get_messages(count=50)
    assert [m.id for m in msgs] == ids
    assert [m.data["i"] for m in msgs] == list(range(20))


def test_get_messages_empty_returns_empty_list(mq: MessageQueue) -> None:
    q, _ = mq.create_queue_pair("orders")
    assert q.get_messages() == []
    assert q.get_messages(count=10, block_for_seconds=0) == []


def test_get_messages_respects_count(mq: MessageQueue) -> None:
    q, _ = mq.create_queue_pair("orders")
    q.send_messages([{"i": i} for i in range(5)])
    assert [m.data["i"] for m in q.get_messages(count=2)] == [0, 1]
    assert [m.data["i"] for m in q.get_messages(count=10)] == [2, 3, 4]


def test_acknowledged_messages_leave_the_stream(mq: MessageQueue, raw: redis.Redis) -> None:
    q, _ = mq.create_queue_pair("orders")
    q.send_messages([{"i": i} for i in range(3)])
    msgs = q.get_messages(count=3)
    assert raw.xlen(q.key) == 3
    assert q.acknowledge_messages([msgs[0].id, msgs[1].id]) == 2
    assert raw.xlen(q.key) == 1
    assert [e[0].decode() for e in raw.xrange(q.key)] == [msgs[2].id]
    assert set(pending_ids(raw, q)) == {msgs[2].id}
    assert q.acknowledge_messages(msgs[2].id) == 1  # a single id as a str
    assert raw.xlen(q.key) == 0
    assert q.acknowledge_messages([msgs[0].id]) == 0  # already acknowledged
    assert q.acknowledge_messages(["1-1"]) == 0  # unknown
    assert q.acknowledge_messages([]) == 0


def test_acknowledge_many_at_once(mq: MessageQueue, raw: redis.Redis) -> None:
    q, _ = mq.create_queue_pair("orders")
    q.send_messages([{"i": i} for i in range(1200)])
    msgs = q.get_messages(count=1200)
    assert len(msgs) == 1200
    assert q.acknowledge_messages(m.id for m in msgs) == 1200
    assert raw.xlen(q.key) == 0


def test_block_for_seconds_float_times_out(mq: MessageQueue) -> None:
    q, _ = mq.create_queue_pair("orders")
    start = time.monotonic()
    assert q.get_messages(block_for_seconds=0.25) == []
    elapsed = time.monotonic() - start
    assert 0.2 <= elapsed < 1.5


def test_block_returns_promptly_when_message_arrives(
        named_mq: tuple[MessageQueue, str], make_mq: Callable[..., MessageQueue],
        raw: redis.Redis) -> None:
    mq, client_name = named_mq
    q, _ = mq.create_queue_pair("orders")
    sender = make_mq().require_queue("orders")
    started = threading.Event()
    got: list[Message] = []
    took: list[float] = []

    def consume() -> None:
        started.set()
        t0 = time.monotonic()
        got.extend(q.get_messages(count=5, block_for_seconds=8.0))
        took.append(time.monotonic() - t0)

    thread = threading.Thread(target=consume)
    thread.start()
    assert started.wait(5)
    wait_for(lambda: is_blocked(raw, client_name))  # the consumer is in its blocking read
    sent_at = time.monotonic()
    mid = sender.send_message({"hello": 1})
    thread.join(10)
    assert not thread.is_alive()
    assert [m.id for m in got] == [mid]
    assert took[0] < 8.0
    assert time.monotonic() - sent_at < 1.0


def test_unique_consumer_per_message_queue(
        mq: MessageQueue, make_mq: Callable[..., MessageQueue], raw: redis.Redis) -> None:
    other = make_mq()
    assert mq.consumer_id and other.consumer_id and mq.consumer_id != other.consumer_id
    assert mq.consumer_id == mq.consumer_id  # stable
    named = make_mq(consumer_id="worker-7")
    assert named.consumer_id == "worker-7"
    q, _ = mq.create_queue_pair("orders")
    q.send_messages([{"i": 1}, {"i": 2}, {"i": 3}])
    [m1] = q.get_messages()
    [m2] = other.require_queue("orders").get_messages()
    [m3] = q.get_messages(consumer_id="explicit")
    owners = pending_ids(raw, q)
    assert owners == {m1.id: mq.consumer_id, m2.id: other.consumer_id, m3.id: "explicit"}


# -- crash recovery ----------------------------------------------------------------------


def test_dead_consumer_messages_redelivered_after_visibility_timeout(
        make_mq: Callable[..., MessageQueue], raw: redis.Redis) -> None:
    dying = make_mq()
    q, _ = dying.create_queue_pair("orders", visibility_timeout=VT)
    mid = q.send_message({"job": 1})
    [first] = q.get_messages()
    delivered = time.monotonic()
    assert first.delivery_count == 1
    dying.close()  # dies without acknowledging

    live = make_mq().require_queue("orders")
    assert live.get_messages() == []  # not before the visibility timeout
    [again] = wait_for(lambda: live.get_messages(), timeout=5)
    assert time.monotonic() - delivered >= VT - 0.05
    assert again.id == mid and again.data == {"job": 1}
    assert again.delivery_count == 2
    assert pending_ids(raw, live) == {mid: live.mq.consumer_id}
    assert live.acknowledge_messages(mid) == 1
    assert raw.xlen(live.key) == 0


def test_dead_consumer_other_consumer_id_same_object(mq: MessageQueue) -> None:
    q, _ = mq.create_queue_pair("orders", visibility_timeout=VT)
    q.send_message({"job": 1})
    [first] = q.get_messages(consumer_id="dies")
    assert q.get_messages(consumer_id="lives") == []
    [again] = wait_for(lambda: q.get_messages(consumer_id="lives"))
    assert (again.id, again.delivery_count) == (first.id, 2)


def test_reclaimed_messages_come_before_new_ones(mq: MessageQueue, raw: redis.Redis) -> None:
    q, _ = mq.create_queue_pair("orders", visibility_timeout=VT)
    old = q.send_message({"n": "old"})
    q.get_messages(consumer_id="dies")
    wait_idle(raw, q, VT)
    new = q.send_message({"n": "new"})
    msgs = q.get_messages(count=2, consumer_id="lives")
    assert [m.id for m in msgs] == [old, new]
    assert [m.delivery_count for m in msgs] == [2, 1]


def test_concurrent_claimers_each_entry_delivered_once(
        make_mq: Callable[..., MessageQueue], raw: redis.Redis) -> None:
    dying = make_mq(consumer_id="dead")
    q, _ = dying.create_queue_pair("orders", visibility_timeout=VT)
    ids = q.send_messages([{"i": i} for i in range(60)])
    assert len(q.get_messages(count=60)) == 60
    claimers = [make_mq(consumer_id=f"claimer-{i}").require_queue("orders") for i in range(2)]
    wait_idle(raw, q, VT)
    got: dict[int, list[Message]] = {0: [], 1: []}
    barrier = threading.Barrier(2)
    deadline = time.monotonic() + 10

    def claim(i: int) -> None:
        barrier.wait()
        while time.monotonic() < deadline and len(got[0]) + len(got[1]) < 60:
            msgs = claimers[i].get_messages(count=7)
            claimers[i].acknowledge_messages([m.id for m in msgs])
            got[i].extend(msgs)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    a = [m.id for m in got[0]]
    b = [m.id for m in got[1]]
    assert len(a) == len(set(a)) and len(b) == len(set(b))
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted(ids)
    assert all(m.delivery_count == 2 for m in got[0] + got[1])
    assert raw.xlen(q.key) == 0


def test_extend_lease_prevents_reclaim(mq: MessageQueue, raw: redis.Redis) -> None:
    q, _ = mq.create_queue_pair("orders", visibility_timeout=VT)
    mid = q.send_message({"long": "job"})
    q.get_messages(consumer_id="busy")
    end = time.monotonic() + VT * 3
    while time.monotonic() < end:  # a live worker keeps its lease for three timeouts
        assert q.extend_lease(mid, consumer_id="busy") == 1
        assert q.get_messages(consumer_id="thief") == []
        time.sleep(VT / 6)
    assert pending_ids(raw, q) == {mid: "busy"}
    [again] = wait_for(lambda: q.get_messages(consumer_id="thief"))  # lease lapses
    assert again.delivery_count == 2  # extending did not count as deliveries


def age(raw: redis.Redis, queue: Queue, mid: str, holder: str, idle_ms: int) -> None:
    """Make ``holder``'s pending ``mid`` look idle for ``idle_ms`` (the server's idle time,
    set with XCLAIM ... IDLE; its delivery count unchanged)."""
    raw.xclaim(queue.key, GROUP, holder, 0, [mid], idle=idle_ms, justid=True)


def test_reclaim_waits_for_the_holders_lease_not_the_callers(
        make_mq: Callable[..., MessageQueue], raw: redis.Redis) -> None:
    """A rolling deploy changes the visibility timeout: an instance with a short one
    never takes the running messages of one with a long one, and the other way round
    the short lease still lapses on time."""
    old, _ = make_mq(consumer_id="old").create_queue_pair("orders", visibility_timeout=30)
    new, _ = make_mq(consumer_id="new").create_queue_pair("orders", visibility_timeout=VT)
    mid = old.send_message({"job": 1})
    assert [m.id for m in old.get_messages()] == [mid]
    age(raw, old, mid, "old", 5_000)  # past the new instance's 0.3 s, not its holder's 30 s
    assert new.get_messages() == []
    assert pending_ids(raw, old) == {mid: "old"}
    age(raw, old, mid, "old", 30_001)  # the holder's lease lapsed: it died
    [taken] = new.get_messages()
    assert (taken.id, taken.delivery_count) == (mid, 2)
    assert new.acknowledge_messages(mid) == 1
    short = new.send_message({"job": 2})
    assert [m.id for m in new.get_messages()] == [short]
    wait_idle(raw, new, VT)  # 0.3 s: the holder's lease, though the caller's is 30 s
    [again] = old.get_messages()
    assert (again.id, again.delivery_count) == (short, 2)


def test_reclaim_of_a_holder_without_a_recorded_lease_uses_the_callers(
        make_mq: Callable[..., MessageQueue], raw: redis.Redis) -> None:
    q, _ = make_mq(consumer_id="long").create_queue_pair("orders", visibility_timeout=30)
    make_mq(consumer_id="short").create_queue_pair("orders", visibility_timeout=VT)
    assert q.get_messages() == []  # "long" records its lease
    mid = q.send_message({"job": 1})
    raw.xreadgroup(GROUP, "foreign", {q.key: ">"}, count=1)  # a reader of another tool
    age(raw, q, mid, "foreign", 29_000)
    assert q.get_messages() == []
    age(raw, q, mid, "foreign", 30_001)
    assert [m.id for m in q.get_messages()] == [mid]


def test_consumers_long_gone_that_hold_nothing_are_pruned(
        make_mq: Callable[..., MessageQueue], raw: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from relaybus._core import queue as core

    monkeypatch.setattr(core, "PRUNE_IDLE", VT)
    q, _ = make_mq(consumer_id="dead").create_queue_pair("orders", visibility_timeout=VT / 3)
    first, keep = q.send_messages([{"job": "done"}, {"job": "held"}])
    [done] = q.get_messages(consumer_id="dead")  # it worked, then died holding nothing
    assert q.acknowledge_messages(done.id) == 1 and done.id == first
    q.get_messages(consumer_id="holder")  # died holding a message: it is reclaimed first
    live = make_mq(consumer_id="live").require_queue("orders")
    wait_for(lambda: {c["name"] for c in raw.xinfo_consumers(q.key, GROUP)
                      if c["idle"] >= VT * 1000} >= {b"dead", b"holder"})
    [reclaimed] = live.get_messages()
    assert reclaimed.id == keep
    assert {c["name"] for c in raw.xinfo_consumers(q.key, GROUP)} == {b"holder", b"live"} \
        or {c["name"] for c in raw.xinfo_consumers(q.key, GROUP)} == {b"live"}
    assert b"dead" not in raw.hkeys(q.key + ":leases")
    assert live.mq.stats["consumers_pruned"] >= 1


def test_extend_lease_does_not_steal_reclaimed_message(
        mq: MessageQueue, raw: redis.Redis) -> None:
    q, _ = mq.create_queue_pair("orders", visibility_timeout=VT)
    mid = q.send_message({"a": 1})
    q.get_messages(consumer_id="slow")
    wait_for(lambda: q.get_messages(consumer_id="fast"))
    assert pending_ids(raw, q) == {mid: "fast"}
    assert q.extend_lease([mid], consumer_id="slow") == 0
    assert pending_ids(raw, q) == {mid: "fast"}
    assert q.extend_lease([mid], consumer_id="fast") == 1
    assert q.extend_lease([]) == 0
    assert q.extend_lease(["1-1"], consumer_id="fast") == 0


def test_release_hands_back_unstarted_messages_and_drops_idle_consumer(
        mq: MessageQueue, raw: redis.Redis) -> None:
    q, _ = mq.create_queue_pair("orders", visibility_timeout=30)
    ids = q.send_messages([{"n": i} for i in range(3)])
    q.get_messages(count=3, consumer_id="stopping")
    # two were never started: another consumer gets them at once, not after 30 s
    assert q.release(ids[1:], consumer_id="stopping") == (2, False)
    taken = q.get_messages(count=5, consumer_id="other")
    assert sorted(m.id for m in taken) == ids[1:]
    assert all(m.delivery_count == 1 for m in taken)  # never started: not an attempt more
    # the consumer still holds its running message, so it stays in the group
    consumers = {c["name"] for c in raw.xinfo_consumers(q.key, GROUP)}
    assert b"stopping" in consumers or "stopping" in consumers
    q.acknowledge_messages([ids[0]])
    assert q.release([], consumer_id="stopping") == (0, True)
    names = {(c["name"].decode() if isinstance(c["name"], bytes) else c["name"])
             for c in raw.xinfo_consumers(q.key, GROUP)}
    assert "stopping" not in names and "other" in names


def test_handing_back_again_and_again_is_never_an_attempt(mq: MessageQueue) -> None:
    """Five graceful stops that each hand the same unstarted message back (a rolling
    deploy) leave it at its first delivery: it is not dead-lettered for attempts."""
    q, dlq = mq.create_queue_pair("orders", visibility_timeout=30)
    mid = q.send_message({"n": 1})
    for i in range(5):
        [m] = q.get_messages(consumer_id=f"instance-{i}")
        assert (m.id, m.delivery_count, m.attempts) == (mid, 1, 1)
        assert q.release([mid], consumer_id=f"instance-{i}")[0] == 1
    assert dlq.peek() == []


def test_max_deliveries_dead_letters_with_reason(
        make_mq: Callable[..., MessageQueue], raw: redis.Redis) -> None:
    mq = make_mq(max_deliveries=2)
    q, dlq = mq.create_queue_pair("orders", visibility_timeout=VT)
    mid = q.send_message({"poison": True})
    counts = [m.delivery_count for m in q.get_messages(consumer_id="c1")]
    counts += [m.delivery_count for m in wait_for(lambda: q.get_messages(consumer_id="c2"))]
    assert counts == [1, 2]
    # the third delivery is over the cap: dead-lettered, never handed out
    wait_for(lambda: raw.xlen(dlq.key) == 1 or q.get_messages(consumer_id="c3"))
    assert raw.xlen(q.key) == 0 and pending_ids(raw, q) == {}
    [dead] = dlq.peek()
    assert dead.data == {"poison": True}
    assert dead.reason is not None and "max deliveries" in dead.reason
    assert dead.failures[-1]["message_id"] == mid
    assert mq.stats.get("dead_lettered") == 1


# -- dead letters ------------------------------------------------------------------------


def test_move_to_dlq_keeps_payload_and_adds_failure_record(
        mq: MessageQueue, raw: redis.Redis) -> None:
    q, dlq = mq.create_queue_pair("orders")
    payload = {"order": 42, "items": ["a", "b"]}
    mid = q.send_message(payload, headers={"trace": "t1"})
    [msg] = q.get_messages()
    before = time.time()
    assert q.move_to_dlq([msg.id], "payment declined", dlq) == 1
    assert raw.xlen(q.key) == 0 and pending_ids(raw, q) == {}
    assert raw.xlen(dlq.key) == 1
    [dead] = dlq.get_messages()
    assert dead.data == payload
    assert dead.headers == {"trace": "t1"}
    assert dead.reason == "payment declined"
    [record] = dead.failures
    assert record["reason"] == "payment declined"
    assert record["queue"] == "orders"
    assert record["message_id"] == mid
    assert before - 1 <= record["timestamp"] <= time.time() + 1
    assert record["attempt"] == 1


def test_move_to_dlq_default_dlq_and_details(mq: MessageQueue) -> None:
    q, dlq = mq.create_queue_pair("orders")
    ids = q.send_messages([{"i": 1}, {"i": 2}])
    assert q.move_to_dlq(ids, "bulk", details={"handler": "h1"}) == 2  # not even delivered
    dead = dlq.peek()
    assert [m.data for m in dead] == [{"i": 1}, {"i": 2}]
    assert all(m.failures[0]["handler"] == "h1" for m in dead)
    assert q.move_to_dlq([], "nothing") == 0
    assert q.move_to_dlq(["1-1"], "unknown id") == 0


def test_failure_history_kept_across_requeue_and_second_failure(mq: MessageQueue,
                                                                raw: redis.Redis) -> None:
    q, dlq = mq.create_queue_pair("orders")
    q.send_message({"n": 1}, headers={"h": "v"})
    [msg] = q.get_messages()
    q.move_to_dlq(msg.id, "first failure")
    [dead] = dlq.get_messages()
    assert dlq.requeue_messages([dead.id], q) == 1
    assert raw.xlen(dlq.key) == 0 and pending_ids(raw, dlq) == {}
    [back] = q.get_messages()
    assert back.data == {"n": 1} and back.headers == {"h": "v"}
    assert [f["reason"] for f in back.failures] == ["first failure"]
    assert back.delivery_count == 1
    q.move_to_dlq(back.id, "second failure")
    [dead2] = dlq.get_messages()
    assert dead2.reason == "second failure"
    assert [f["reason"] for f in dead2.failures] == ["first failure", "second failure"]
    assert dead2.failures[0]["timestamp"] <= dead2.failures[1]["timestamp"]
    assert [f["message_id"] for f in dead2.failures] == [msg.id, back.id]
    assert all(f["queue"] == "orders" for f in dead2.failures)


def test_failure_records_round_trip_exactly(mq: MessageQueue) -> None:
    """Details come back as written, through a retry, a dead letter, a requeue and a
    second failure: empty lists stay lists, large integers keep every digit."""
    details = {"errors": [], "empty": {}, "big": 2**63 + 1, "precise": 12345678901234567,
               "nested": [[], {"k": []}], "text": "a/b \u00e9 \"q\""}
    q, dlq = mq.create_queue_pair("orders")
    q.send_message({"n": 1})
    [msg] = q.get_messages()
    q.schedule_retry(msg.id, 0, "try again", details=details)
    [retried] = wait_for(lambda: q.get_messages(), what="the retry due")
    assert retried.failures[0] == {**details, "reason": "try again", "queue": "orders",
                                   "message_id": msg.id, "attempt": 1,
                                   "timestamp": retried.failures[0]["timestamp"]}
    q.move_to_dlq(retried.id, "gave up", details=details)
    [dead] = dlq.get_messages()
    assert dlq.requeue_messages([dead.id], q) == 1
    [back] = q.get_messages()
    q.move_to_dlq(back.id, "again", details={"list": [1, []]})
    [dead2] = dlq.peek()
    assert [f["reason"] for f in dead2.failures] == ["try again", "gave up", "again"]
    for record in dead2.failures[:2]:
        assert {k: record[k] for k in details} == details
    assert dead2.failures[2]["list"] == [1, []]


def test_requeue_messages_default_destination_and_unknown_ids(mq: MessageQueue,
                                                              raw: redis.Redis) -> None:
    q, dlq = mq.create_queue_pair("orders")
    other, _ = mq.create_queue_pair("other")
    ids = q.send_messages([{"i": 1}, {"i": 2}, {"i": 3}])
    q.move_to_dlq(ids, "bad")
    dead = dlq.peek()
    assert dlq.requeue_messages([dead[0].id, "1-1"]) == 1  # to the pair's own queue
    assert dlq.requeue_messages(dead[1].id, other) == 1
    assert dlq.requeue_messages([]) == 0
    assert [m.data for m in q.get_messages(count=5)] == [{"i": 1}]
    assert [m.data for m in other.get_messages(count=5)] == [{"i": 2}]
    assert [m.data for m in dlq.peek()] == [{"i": 3}]


def test_move_to_another_pairs_dlq_moves_it_whole(mq: MessageQueue, raw: redis.Redis) -> None:
    """Into another pair's DLQ: on a cluster another slot, so dead-lettered into the
    pair's own DLQ first and then copied across; the same outcome on one server."""
    q, own_dlq = mq.create_queue_pair("orders")
    _, shared = mq.create_queue_pair("poison")
    keep = q.send_message({"n": 0})
    mid = q.send_message({"n": 1}, headers={"trace": "t1"}, ttl=600)
    msgs = q.get_messages(count=2)
    assert q.move_to_dlq([msgs[1].id], "unreadable", shared) == 1
    assert raw.xlen(own_dlq.key) == 0 and list(pending_ids(raw, q)) == [keep]
    [dead] = shared.peek()
    assert (dead.data, dead.headers, dead.reason) == ({"n": 1}, {"trace": "t1"}, "unreadable")
    assert dead.failures[-1]["message_id"] == mid and dead.expires_at is not None
    assert shared.requeue_messages(dead.id, q) == 1  # back across: afresh, no expiry
    assert raw.xlen(shared.key) == 0
    [back] = [m for m in q.peek() if m.data == {"n": 1}]
    assert back.expires_at is None and back.headers == {"trace": "t1"}


def test_requeued_message_starts_afresh_without_expiry(mq: MessageQueue) -> None:
    q, dlq = mq.create_queue_pair("orders")
    q.send_message({"a": 1}, ttl=0.05)
    wait_for(lambda: time.time() > q.peek()[0].expires_at)  # type: ignore[operator]
    assert q.get_messages() == []
    [dead] = dlq.peek()
    assert dead.reason == "expired"
    dlq.requeue_messages(dead.id)
    [back] = q.get_messages()
    assert back.data == {"a": 1} and back.expires_at is None


# -- TTL ---------------------------------------------------------------------------------


def test_ttl_expired_message_dead_lettered_never_delivered(
        mq: MessageQueue, raw: redis.Redis) -> None:
    q, dlq = mq.create_queue_pair("orders")
    q.send_message({"n": "before"})
    short = q.send_message({"n": "short"}, ttl=0.05)
    q.send_message({"n": "long"}, ttl=60)
    q.send_messages([{"n": "batch"}], ttl=0.05)
    q.send_message({"n": "after"})
    wait_for(lambda: all(time.time() > (m.expires_at or 1e18) for m in q.peek()
                         if m.data["n"] in ("short", "batch")))
    msgs = q.get_messages(count=10)
    assert [m.data["n"] for m in msgs] == ["before", "long", "after"]
    assert msgs[1].expires_at is not None and msgs[1].expires_at > time.time()
    dead = dlq.peek()
    assert [m.data["n"] for m in dead] == ["short", "batch"]
    assert all(m.reason == "expired" for m in dead)
    assert dead[0].failures[0]["message_id"] == short
    q.acknowledge_messages([m.id for m in msgs])
    assert raw.xlen(q.key) == 0 and pending_ids(raw, q) == {}


class _SkewedClock:
    """The ``time`` module of a client whose clock is ``skew`` seconds off."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def time(self) -> float:
        return time.time() + self.skew

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.mark.parametrize("skew", [600.0, -600.0], ids=["10 min fast", "10 min slow"])
def test_a_skewed_client_clock_changes_no_ttl_and_no_retry_delay(
        mq: MessageQueue, monkeypatch: pytest.MonkeyPatch, skew: float) -> None:
    """Expiry counts from the entry id (the server's clock), retries are due by the
    server's clock: a client 10 minutes off changes neither."""
    import relaybus._core.bases as bases
    monkeypatch.setattr(bases, "time", _SkewedClock(skew))
    q, dlq = mq.create_queue_pair("orders")
    short = q.send_message({"n": "short"}, ttl=0.3)
    q.send_message({"n": "long"}, ttl=60)
    wait_for(lambda: time.time() > (q.peek()[0].expires_at or 1e18), what="short's TTL")
    [long_one] = q.get_messages(count=10)  # the fresh one is delivered, the short one is not
    assert long_one.data == {"n": "long"} and not long_one.is_expired(time.time())
    [dead] = dlq.peek()
    assert dead.reason == "expired" and dead.failures[0]["message_id"] == short
    q.schedule_retry(long_one.id, 300, "later")
    assert q.get_messages(count=10) == []  # due in 300 s by the server, not at once


def test_ttl_not_passed_is_delivered(mq: MessageQueue) -> None:
    q, _ = mq.create_queue_pair("orders")
    q.send_message({"a": 1}, ttl=30)
    [msg] = q.get_messages()
    assert msg.data == {"a": 1} and not msg.is_expired(time.time())


# -- retries -----------------------------------------------------------------------------


def test_schedule_retry_delays_redelivery(mq: MessageQueue, raw: redis.Redis) -> None:
    q, _ = mq.create_queue_pair("orders")
    mid = q.send_message({"job": 1}, headers={"h": "1"})
    [msg] = q.get_messages()
    scheduled_at = time.monotonic()
    assert q.schedule_retry(msg.id, 0.3, "flaky", details={"error": "Timeout"}) == 1
    assert raw.xlen(q.key) == 0 and pending_ids(raw, q) == {}
    assert q.get_info().delayed_messages == 1
    assert q.get_messages() == []  # not due yet
    [back] = wait_for(lambda: q.get_messages())
    assert time.monotonic() - scheduled_at >= 0.25
    assert back.id != mid
    assert back.data == {"job": 1} and back.headers == {"h": "1"}
    assert back.delivery_count == 1
    assert back.previous_attempts == 1 and back.attempts == 2
    [record] = back.failures
    assert record["reason"] == "flaky" and record["error"] == "Timeout"
    assert record["queue"] == "orders" and record["message_id"] == mid
    assert q.get_info().delayed_messages == 0


def test_blocking_get_wakes_up_for_due_retry(mq: MessageQueue) -> None:
    q, _ = mq.create_queue_pair("orders")
    q.send_message({"job": 1})
    [msg] = q.get_messages()
    q.schedule_retry(msg.id, 0.3, "later")
    start = time.monotonic()
    [back] = q.get_messages(block_for_seconds=4.0)
    elapsed = time.monotonic() - start
    assert back.data == {"job": 1}
    assert 0.2 <= elapsed < 2.0


def test_second_retry_counts_attempts(mq: MessageQueue) -> None:
    q, dlq = mq.create_queue_pair("orders")
    q.send_message({"job": 1})
    [msg] = q.get_messages()
    q.schedule_retry(msg.id, 0, "one")
    [m2] = wait_for(lambda: q.get_messages())
    q.schedule_retry(m2.id, 0, "two")
    [m3] = wait_for(lambda: q.get_messages())
    assert m3.previous_attempts == 2 and m3.attempts == 3
    assert [f["reason"] for f in m3.failures] == ["one", "two"]
    q.move_to_dlq(m3.id, "gave up")
    [dead] = dlq.peek()
    assert [f["reason"] for f in dead.failures] == ["one", "two", "gave up"]
    assert dead.failures[-1]["attempt"] == 3


# -- deleting, purging, peeking, info ---------------------------------------------------


def test_delete_messages(mq: MessageQueue, raw: redis.Redis) -> None:
    q, _ = mq.create_queue_pair("orders")
    ids = q.send_messages([{"i": i} for i in range(3)])
    [first] = q.get_messages()  # one pending, two waiting
    assert q.delete_messages([first.id, ids[1]]) == 2
    assert raw.xlen(q.key) == 1 and pending_ids(raw, q) == {}
    assert q.delete_messages([]) == 0
    assert q.delete_messages("1-1") == 0
    assert [m.id for m in q.get_messages(count=5)] == [ids[2]]


def test_purge_removes_waiting_pending_and_delayed(mq: MessageQueue, raw: redis.Redis) -> None:
    q, dlq = mq.create_queue_pair("orders")
    q.send_messages([{"i": i} for i in range(5)])
    msgs = q.get_messages(count=2)
    q.schedule_retry(msgs[0].id, 60, "later")
    assert q.purge() == 5  # 4 in the stream + 1 delayed
    assert raw.xlen(q.key) == 0 and pending_ids(raw, q) == {}
    assert q.get_info().delayed_messages == 0
    assert q.get_messages() == []
    q.send_message({"after": "purge"})
    assert [m.data for m in q.get_messages()] == [{"after": "purge"}]
    q.send_message({"x": 1})
    q.move_to_dlq(q.get_messages()[0].id, "bad")
    assert dlq.purge() == 1
    assert raw.xlen(dlq.key) == 0
    assert dlq.get_messages() == []


def test_peek_does_not_consume(mq: MessageQueue, raw: redis.Redis) -> None:
    q, _ = mq.create_queue_pair("orders")
    ids = q.send_messages([{"i": i} for i in range(3)])
    peeked = q.peek(count=2)
    assert [m.id for m in peeked] == ids[:2]
    assert [m.data for m in peeked] == [{"i": 0}, {"i": 1}]
    assert [m.id for m in q.peek(start_id=ids[1])] == ids[1:]
    assert pending_ids(raw, q) == {}
    assert q.get_info().waiting_messages == 3
    msgs = q.get_messages(count=5)
    assert [m.id for m in msgs] == ids
    assert all(m.delivery_count == 1 for m in msgs)
    assert [m.id for m in q.peek()] == ids  # pending messages still show


def test_get_info_fields(mq: MessageQueue) -> None:
    q, dlq = mq.create_queue_pair("orders", visibility_timeout=12)
    created = time.time()
    info = q.get_info()
    assert info.name == "orders" and info.is_dlq is False
    assert (info.message_count, info.pending_messages, info.waiting_messages) == (0, 0, 0)
    assert info.oldest_waiting_age is None
    assert info.consumer_group == GROUP
    assert info.visibility_timeout == 12.0
    assert info.created_at is not None and abs(info.created_at - created) < 5

    old_ms = int(time.time() * 1000) - 5000
    q.send_message({"n": "old"}, message_id=f"{old_ms}-0")
    q.send_messages([{"n": "new1"}, {"n": "new2"}])
    info = q.get_info()
    assert (info.message_count, info.pending_messages, info.waiting_messages) == (3, 0, 3)
    assert info.oldest_waiting_age is not None and 4.5 <= info.oldest_waiting_age < 60

    [msg] = q.get_messages()
    info = q.get_info()
    assert (info.message_count, info.pending_messages, info.waiting_messages) == (3, 1, 2)
    assert info.oldest_waiting_age is not None and info.oldest_waiting_age < 4
    assert info.consumers == 1
    q.move_to_dlq(msg.id, "bad")
    assert q.get_info().dlq_messages == 1
    dinfo = dlq.get_info()
    assert dinfo.name == "orders:dlq" and dinfo.is_dlq is True
    assert dinfo.message_count == 1 and dinfo.waiting_messages == 1
    # created_at survives re-creating the pair
    assert mq.create_queue_pair("orders")[0].get_info().created_at == info.created_at


# -- transactions ------------------------------------------------------------------------


def test_transaction_commits_all_across_queues(mq: MessageQueue, redis_url: str) -> None:
    if on_cluster(redis_url):
        pytest.skip("queue pairs live in different slots of a cluster: see the next test")
    a, _ = mq.create_queue_pair("a")
    b, _ = mq.create_queue_pair("b")
    with mq.transaction() as tx:
        tx.send_message(a, {"to": "a"})
        tx.send_message(b, {"to": "b"}, headers={"k": "v"})
        tx.send_message(a, {"to": "a2"}, ttl=60)
        assert a.peek() == [] and b.peek() == []  # nothing before the block ends
    assert len(tx.ids) == 3
    assert [m.data for m in a.get_messages(count=5)] == [{"to": "a"}, {"to": "a2"}]
    [bm] = b.get_messages(count=5)
    assert bm.data == {"to": "b"} and bm.headers == {"k": "v"} and bm.id == tx.ids[1]


def test_a_transaction_across_queue_pairs_on_a_cluster_is_refused_whole(
        mq: MessageQueue, redis_url: str) -> None:
    if not on_cluster(redis_url):
        pytest.skip("a single server runs a transaction across queue pairs")
    a, _ = mq.create_queue_pair("a")
    b, _ = mq.create_queue_pair("b")
    with pytest.raises(CrossSlotError, match="within one slot"), mq.transaction() as tx:
        tx.send_message(a, {"to": "a"})
        tx.send_message(b, {"to": "b"})
    assert a.peek() == [] and b.peek() == [] and tx.ids == []
    with mq.transaction() as tx:  # within one pair it commits
        tx.send_message(a, {"n": 1})
        tx.send_message(a, {"n": 2})
    assert [m.data for m in a.peek()] == [{"n": 1}, {"n": 2}]


@pytest.mark.single_server
def test_replicated_durability_without_a_replica_raises_after_writing(
        redis_url: str, prefix: str) -> None:
    """No replica to wait for (this server has none): the send raises
    ReplicationTimeoutError, and the primary has the message all the same."""
    with MessageQueue(redis_url, prefix=prefix, durability="replicated",
                      replication_timeout=0.1) as mq:
        q, _ = mq.create_queue_pair("dur")
        with pytest.raises(ReplicationTimeoutError, match="reached 0 of the 1"):
            q.send_message({"a": 1})
        assert [m.data for m in q.peek()] == [{"a": 1}]
        assert q.peek() and q.get_messages()  # reads do not wait for replicas


@pytest.mark.parametrize(("option", "value"), [("durability", "quorum"),
                                               ("replication_timeout", 0),
                                               ("replication_timeout", 60)])
def test_bad_durability_options_are_configuration_errors(option: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=option):
        MessageQueue("redis://localhost:1/0", **{option: value})


def test_transaction_exception_sends_nothing(mq: MessageQueue, raw: redis.Redis) -> None:
    a, _ = mq.create_queue_pair("a")
    b, _ = mq.create_queue_pair("b")
    with pytest.raises(RuntimeError, match="boom"), mq.transaction() as tx:
        tx.send_message(a, {"to": "a"})
        tx.send_message(b, {"to": "b"})
        raise RuntimeError("boom")
    assert raw.xlen(a.key) == 0 and raw.xlen(b.key) == 0
    assert tx.ids == []
    with mq.transaction():
        pass  # empty: nothing to send, no error


# -- entries the queue cannot decode ----------------------------------------------------


def test_malformed_entries_dead_lettered_good_ones_delivered(
        mq: MessageQueue, raw: redis.Redis) -> None:
    q, dlq = mq.create_queue_pair("orders")
    good = [q.send_message({"n": 1})]
    bad = [raw.xadd(q.key, {"payload": "no d field"}).decode()]
    good.append(q.send_message({"n": 2}))
    bad.append(raw.xadd(q.key, {"d": "{not json"}).decode())
    good.append(q.send_message({"n": 3}))
    bad.append(raw.xadd(q.key, {"d": "[1, 2, 3]"}).decode())
    bad.append(raw.xadd(q.key, {"d": b"\xff\xfe"}).decode())
    good.append(q.send_message({"n": 4}))

    msgs = q.get_messages(count=10)
    assert [m.id for m in msgs] == good
    assert [m.data for m in msgs] == [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}]
    q.acknowledge_messages(good)
    assert raw.xlen(q.key) == 0 and pending_ids(raw, q) == {}

    entries = raw.xrange(dlq.key)
    assert len(entries) == 4
    records = [json.loads(fields[b"f"])[-1] for _, fields in entries]
    assert [r["message_id"] for r in records] == bad
    assert all(r["reason"].startswith("malformed") for r in records)
    # the raw fields are kept as they were
    assert entries[0][1][b"payload"] == b"no d field"
    assert entries[1][1][b"d"] == b"{not json"
    # read from the DLQ, they still come out, with a reason starting "malformed"
    dead = dlq.get_messages(count=10)
    assert len(dead) == 4 and all((m.reason or "").startswith("malformed") for m in dead)
    assert mq.stats.get("dead_lettered") == 4


def test_malformed_entries_do_not_hide_good_ones_one_at_a_time(
        mq: MessageQueue, raw: redis.Redis) -> None:
    q, dlq = mq.create_queue_pair("orders")
    q.send_message({"n": 1})
    for _ in range(3):
        raw.xadd(q.key, {"junk": "x"})
    q.send_message({"n": 2})
    got = [q.get_messages()[0].data["n"], q.get_messages()[0].data["n"]]
    assert got == [1, 2]
    assert q.get_messages() == []
    assert raw.xlen(dlq.key) == 3


@pytest.mark.parametrize("fields", [
    {"d": "{}", "f": "not json"},
    {"d": "{}", "f": '"a string"'},
    {"d": "{}", "f": '{"an": "object"}'},
    {"d": "{}", "n": "not a number"},
    {"d": "{}", "t": "yesterday"},
    {"d": "{}", "h": "[1]"},
    {"d": "{}", "x": "never"},
])
def test_malformed_metadata_fields_dead_lettered(
        mq: MessageQueue, raw: redis.Redis, fields: dict[str, str]) -> None:
    q, dlq = mq.create_queue_pair("orders")
    bad = raw.xadd(q.key, fields).decode()  # type: ignore[arg-type]
    good = q.send_message({"ok": True})
    msgs = q.get_messages(count=5)
    assert [m.id for m in msgs] == [good]
    entries = raw.xrange(dlq.key)
    assert len(entries) == 1
    record = json.loads(entries[0][1][b"f"])[-1]
    assert record["message_id"] == bad and record["reason"].startswith("malformed")


def test_malformed_entry_reaches_blocking_reader(
        named_mq: tuple[MessageQueue, str], make_mq: Callable[..., MessageQueue],
        raw: redis.Redis) -> None:
    mq, client_name = named_mq
    q, dlq = mq.create_queue_pair("orders")
    sender = make_mq().require_queue("orders")
    got: list[Message] = []
    thread = threading.Thread(target=lambda: got.extend(q.get_messages(block_for_seconds=5)))
    thread.start()
    wait_for(lambda: is_blocked(raw, client_name))
    raw.xadd(q.key, {"junk": "1"})
    wait_for(lambda: raw.xlen(dlq.key) == 1)
    mid = sender.send_message({"n": 1})
    thread.join(10)
    assert [m.id for m in got] == [mid]


# -- server-side faults -----------------------------------------------------------------


def test_nogroup_after_group_destroyed(mq: MessageQueue, raw: redis.Redis) -> None:
    q, _ = mq.create_queue_pair("orders")
    q.send_message({"n": 1})
    raw.xgroup_destroy(q.key, GROUP)
    [msg] = q.get_messages()
    assert msg.data == {"n": 1}
    assert mq.stats.get("groups_recreated") == 1
    q.acknowledge_messages(msg.id)
    q.send_message({"n": 2})
    assert [m.data for m in q.get_messages()] == [{"n": 2}]


def test_nogroup_after_stream_deleted_no_hot_loop(mq: MessageQueue, raw: redis.Redis,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    q, dlq = mq.create_queue_pair("orders")
    q.send_message({"n": 1})
    q.get_messages()
    raw.delete(q.key)
    counter = _RequestCounter(monkeypatch)
    start = time.monotonic()
    assert q.get_messages(block_for_seconds=0.3) == []
    assert time.monotonic() - start >= 0.25  # it waited instead of spinning
    assert counter.count <= 6  # recreate the group once, then one blocking read
    assert mq.stats.get("groups_recreated") == 1
    q.send_message({"n": 2})
    assert [m.data for m in q.get_messages()] == [{"n": 2}]
    assert mq.get_queue("orders") is not None
    # the other operations cope with a missing stream too
    raw.delete(q.key)
    assert q.get_info().message_count == 0
    assert q.acknowledge_messages(["1-1"]) == 0
    assert q.purge() == 0
    q.send_message({"n": 3})
    assert [m.data for m in q.get_messages()] == [{"n": 3}]


@pytest.mark.parametrize("fault", ["delete_stream", "destroy_group"])
def test_nogroup_while_blocked(named_mq: tuple[MessageQueue, str],
                               make_mq: Callable[..., MessageQueue],
                               raw: redis.Redis, fault: str) -> None:
    mq, client_name = named_mq
    q, _ = mq.create_queue_pair("orders")
    sender = make_mq().require_queue("orders")
    got: list[Message] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            got.extend(q.get_messages(block_for_seconds=5))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    wait_for(lambda: is_blocked(raw, client_name))
    if fault == "delete_stream":
        raw.delete(q.key)
    else:
        raw.xgroup_destroy(q.key, GROUP)
    mid = sender.send_message({"after": fault})
    thread.join(10)
    assert errors == []
    assert [m.id for m in got] == [mid]


def test_pending_entry_whose_payload_is_gone(mq: MessageQueue, raw: redis.Redis) -> None:
    q, _ = mq.create_queue_pair("orders", visibility_timeout=VT)
    lost = q.send_message({"n": 1})
    kept = q.send_message({"n": 2})
    q.get_messages(count=2, consumer_id="dies")
    raw.xdel(q.key, lost)
    assert lost in pending_ids(raw, q)
    [msg] = wait_for(lambda: q.get_messages(count=5, consumer_id="lives"))
    assert msg.id == kept and msg.delivery_count == 2
    assert lost not in pending_ids(raw, q)
    assert q.get_messages(count=5, consumer_id="lives") == []
    assert mq.stats.get("gone", 0) >= 1


# -- scale and cost ----------------------------------------------------------------------


def test_150k_unread_messages_all_kept(mq: MessageQueue, raw: redis.Redis) -> None:
    q, _ = mq.create_queue_pair("big")
    total, batch = 150_000, 10_000
    first = last = ""
    for start in range(0, total, batch):
        ids = q.send_messages([{"i": i} for i in range(start, start + batch)])
        first = first or ids[0]
        last = ids[-1]
    assert raw.xlen(q.key) == total
    info = q.get_info()
    assert info.message_count == total and info.waiting_messages == total
    assert raw.xrange(q.key, count=1)[0][0].decode() == first
    assert raw.xrevrange(q.key, count=1)[0][0].decode() == last
    assert [m.data for m in q.get_messages(count=2)] == [{"i": 0}, {"i": 1}]


def test_batch_operations_cost_constant_requests(
        mq: MessageQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    q, _ = mq.create_queue_pair("orders")
    q.get_messages()  # warm up: server check, scripts loaded
    q.acknowledge_messages(["1-1"])
    counter = _RequestCounter(monkeypatch)
    for n in (1, 100):
        counter.count = 0
        q.send_messages([{"i": i} for i in range(n)])
        sent = counter.count
        counter.count = 0
        msgs = q.get_messages(count=n)
        got = counter.count
        counter.count = 0
        q.acknowledge_messages([m.id for m in msgs])
        acked = counter.count
        assert len(msgs) == n
        assert (sent, got, acked) == (1, 1, 1), n


def test_errors_share_root(mq: MessageQueue) -> None:
    for exc in (InvalidNameError, SerializationError, MessageTooLargeError, QueueNotFoundError):
        assert issubclass(exc, RelaybusError)
