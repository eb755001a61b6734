"""Scenario 7: poison input, generated with hypothesis, into running processes.

A router and a service (subscribed to every type) run as processes while a producer
keeps publishing good events. Hypothesis generates bad entries and writes them where
they can land: raw into the event log or straight into the subscription queue (as
another tool, or damage, would), or through the library (``publish``,
``publish_raw``). Kinds: undecodable payloads and fields, missing or unknown
``event_type``, payloads that fail validation, handlers that raise, deeply nested
and oversized payloads, odd unicode everywhere (lone surrogates, NUL, bidi
overrides, non-characters).

Each entry carries a probe (its ``event_id`` or an extra ``probe`` field) and must
end handled or in a DLQ with a reason; one that should be handled must be. No worker
loop may die, and every good event published around them is handled.

A second test feeds odd queue and service names: each is refused with
InvalidNameError before anything is written, or works end to end in a running process.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faults.conftest import Scale
from faults.harness import Child, Cluster, wait_until
from faults.ledger import Report, reconcile
from faults.procs import BASE_EXC, RAISE, REJECT, RETURN_FALSE, SYSTEM_EXIT, Named, Poisoned
from relaybus import (
    EventBus,
    InvalidNameError,
    MessageQueue,
    Microservice,
    RelaybusError,
)
from relaybus.errors import BrokerError

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

SERVICE = "poison"
ODD = ["\ud800", "\udfff", "\x00", "\u202e", "\u200b", "\u200d", "\ufeff", "\uffff",
       "\U0010ffff", "e\u0301", "\U0001f642", "\r\n", "\t", "{", "}", "*", "[", "\\", '"',
       "'", "%s%n", "\x7f", "\u0085", "\u2028", ":dlq", "ǅ", "ß", "İ", "\ufdd0"]

odd_text = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=()), max_size=30),
    st.lists(st.sampled_from(ODD), min_size=1, max_size=6).map("".join),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                           allow_infinity=False) | odd_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(odd_text, children,
                                                                      max_size=4),
    max_leaves=12,
)


@dataclass
class Poison:
    """One bad entry, where it goes, and what must become of it."""

    kind: str
    target: str  # "log", "sub", "publish", "publish_raw"
    probe: str
    expect: str  # "handled", "dlq" or "either"
    fields: list[tuple[bytes, bytes]] = field(default_factory=list)
    payload: Any = None
    event_type: str = ""

    def with_probe(self) -> Poison:
        """This entry with a fresh probe in place of the placeholder."""
        probe = uuid.uuid4().hex
        old = PLACEHOLDER.encode()
        return Poison(self.kind, self.target, probe, self.expect,
                      [(k.replace(old, probe.encode()), v.replace(old, probe.encode()))
                       for k, v in self.fields],
                      _swap(self.payload, probe), self.event_type)


def _b(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return str(value).encode()


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


#: Stands for the probe while hypothesis draws (generation must not depend on the clock
#: or on randomness of its own); :meth:`Poison.with_probe` puts a fresh uuid in its place.
PLACEHOLDER = "feedfacefeedfacefeedfacefeedface"
#: A fixed time for the drawn entries' timestamps (milliseconds since the epoch).
SENT_MS = 1_790_000_000_000


def _base(probe: str) -> dict[str, Any]:
    return {"event_type": "faults.poison", "event_id": probe, "timestamp": SENT_MS / 1000,
            "probe": probe, "n": 0, "data": None}


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def _swap(value: Any, probe: str) -> Any:
    if isinstance(value, str):
        return value.replace(PLACEHOLDER, probe)
    if isinstance(value, dict):
        return {_swap(k, probe): _swap(v, probe) for k, v in value.items()}
    if isinstance(value, list):
        return [_swap(v, probe) for v in value]
    return value


@st.composite
def poisons(draw: st.DrawFn) -> Poison:
    probe = PLACEHOLDER
    target = draw(st.sampled_from(["log", "log", "sub", "publish", "publish_raw"]))
    payload: Any = _base(probe)
    d: bytes | None = None
    expect = "dlq"
    kind = draw(st.sampled_from([
        "valid", "valid", "odd-unicode", "deep", "very-deep", "oversize", "unknown-type",
        "missing-type", "type-not-str", "validation", "extra-field", "handler-raises",
        "handler-false", "handler-rejects", "handler-exits", "handler-interrupt",
        "not-object", "bad-json", "not-utf8", "missing-d", "field-damage", "lone-surrogate"]))
    if kind == "valid":
        payload["data"] = draw(json_values)
        # pydantic refuses text holding a lone surrogate: such an event cannot be built
        expect = "either" if _has_surrogate(payload["data"]) else "handled"
    elif kind == "odd-unicode":
        payload["data"] = draw(odd_text)
        payload["headers"] = draw(st.dictionaries(odd_text, odd_text, max_size=3))
        expect = "either"  # lone surrogates: readable in JSON escapes, not as UTF-8
    elif kind == "deep":
        depth = draw(st.integers(10, 200))
        payload["data"] = json.loads("[" * depth + "]" * depth)
        expect = "handled"
    elif kind == "very-deep":
        depth = draw(st.sampled_from([900, 2000, 100_000]))
        text = _dumps(payload).decode()
        d = text.replace('"data":null', '"data":' + "[" * depth + "]" * depth).encode()
        expect = "either"
    elif kind == "oversize":
        payload["data"] = "x" * draw(st.sampled_from([1024 * 1024 + 1, 3 * 1024 * 1024]))
        expect = "either"  # raw entries are not size-checked on read; publish refuses
    elif kind == "unknown-type":
        payload["event_type"] = "faults.unknown." + draw(odd_text)
    elif kind == "missing-type":
        del payload["event_type"]
    elif kind == "type-not-str":
        payload["event_type"] = draw(st.sampled_from([5, None, ["faults.poison"], {}]))
    elif kind == "validation":
        key, value = draw(st.sampled_from([("n", "many"), ("probe", 5), ("timestamp", "now"),
                                           ("headers", {"a": 1}), ("event_id", None)]))
        payload[key] = value
        if key == "event_id":
            payload["event_id"] = probe  # keep the probe; break another field instead
            payload["correlation_id"] = 12
    elif kind == "extra-field":
        payload[draw(odd_text) + "_extra"] = draw(json_values)
    elif kind.startswith("handler-"):
        payload["n"] = {"handler-raises": RAISE, "handler-false": RETURN_FALSE,
                        "handler-rejects": REJECT, "handler-exits": SYSTEM_EXIT,
                        "handler-interrupt": BASE_EXC}[kind]
    elif kind == "not-object":
        d = _dumps(draw(st.sampled_from([[probe], probe, 7, None, True])))
    elif kind == "bad-json":
        text = _dumps(payload)
        d = text[: draw(st.integers(1, len(text) - 1))]
    elif kind == "not-utf8":
        d = b"\xff\xfe" + _dumps(payload) + b"\xc3"
    elif kind == "field-damage":
        expect = "either"
    elif kind == "lone-surrogate":  # in the type or id, which the router reads from the payload
        where = draw(st.sampled_from(["event_type", "event_id", "both"]))
        bad = draw(st.sampled_from(["\ud800", "\udfff", "x\udc80y"]))
        if where in ("event_type", "both"):
            payload["event_type"] = "faults.poison" + bad
        if where in ("event_id", "both"):
            payload["event_id"] = probe + bad
        d = json.dumps(payload).encode()  # as JSON escapes, which decode to the surrogate
        expect = "either"  # an odd type is unknown (dead-lettered); an odd id is just an id
    if target in ("publish", "publish_raw"):
        if kind in ("very-deep", "not-object", "bad-json", "not-utf8", "missing-d",
                    "field-damage", "lone-surrogate"):
            target = "log"  # not expressible through the library
        else:
            if kind == "missing-type":  # the event class, or publish_raw's argument, names it
                expect = "handled"
            return Poison(kind, target, probe, expect, payload=payload,
                          event_type=str(payload.get("event_type") or "faults.poison"))
    fields: list[tuple[bytes, bytes]] = []
    if kind != "missing-d":
        fields.append((b"d", d if d is not None else _dumps(payload)))
    fields.append((b"t", _b(SENT_MS)))
    fields.append((b"k", _b(probe)))
    etype = payload.get("event_type") if isinstance(payload, dict) else None
    fields.append((b"e", _b(etype if isinstance(etype, str) else "faults.poison")))
    if kind == "lone-surrogate":  # no routing key nor event id: the router parses the payload
        fields = [(k, v) for k, v in fields if k not in (b"e", b"k")]
    # field damage: the whole point of "field-damage", and now and then on top of the others
    damaged = kind == "field-damage" or draw(st.integers(0, 3)) == 0
    if damaged:
        name, value = draw(st.sampled_from([
            (b"t", b"yesterday"), (b"t", b""), (b"t", None), (b"h", b"not json"),
            (b"h", b"[1]"), (b"h", b'{"a": 1}'), (b"x", b"garbage"), (b"x", b"1"),
            (b"x", b"99999999999999"), (b"n", b"many"), (b"n", b"-3"), (b"n", b"999"),
            (b"f", b"garbage"), (b"f", b'{"a": 1}'), (b"f", b"[1, 2]"), (b"e", b""),
            (b"e", None), (b"e", b"\xff"), (b"k", b""), (b"k", None),
            (b"k", b"\xff\xfe" + _b(probe)), (b"\xff\xfe", b"x"), (b"zz", b"1"),
            (b"e", _b(draw(odd_text)))]))
        fields = [(k, v) for k, v in fields if k != name]
        if value is not None:
            fields.append((name, value))
        safe = (name, value) in ((b"h", b'{"a": 1}'), (b"x", b"99999999999999"), (b"n", b"-3"),
                                 (b"zz", b"1"), (b"f", b"[1, 2]"), (b"t", None))
        expect = "handled" if kind == "field-damage" and safe else "either"
    keys = dict(fields)
    if keys.get(b"k") != _b(probe):
        fields.append((b"probe", _b(probe)))
    return Poison(kind, target, probe, expect, fields=fields)


class Fates:
    """Where each probe ended: handled (the ledger) or dead-lettered (with its reason)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def of(self, probe: str) -> tuple[str, str] | None:
        ledger = self.cluster.ledger.refresh()
        dead = self.cluster.dead.refresh()
        handled = ledger.probes[probe] + ledger.completed.get(SERVICE, Counter())[probe]
        dl = dead.by_probe.get(probe) or dead.by_event.get(probe)
        if handled and dl is not None:
            return "both", dl.reason
        if handled:
            return "handled", ""
        if dl is not None:
            return "dlq", dl.reason
        return None


@pytest.fixture
def poisoned(cluster: Cluster) -> Iterator[tuple[list[Child], Child, EventBus]]:
    relaybus = [cluster.router(vt=5.0),
                cluster.service(SERVICE, types="*", concurrency=2, prefetch=8, vt=5.0,
                                max_attempts=3)]
    cluster.wait_ready(relaybus)
    good = cluster.producer("good", 0, rate=100, types="alpha")
    bus = EventBus(cluster.server.url, prefix=cluster.prefix, retry_timeout=5.0)
    yield relaybus, good, bus
    bus.close()


def test_poison_entries_end_handled_or_dead_lettered(
        cluster: Cluster, poisoned: tuple[list[Child], Child, EventBus], scale: Scale,
        record: list[Report]) -> None:
    relaybus, good, bus = poisoned
    raw = cluster.client
    fates = Fates(cluster)
    seen: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    probes: list[str] = []
    t0 = time.time()

    def inject(p: Poison) -> bool:
        """Write the entry; False when the library refused it (nothing sent)."""
        if p.target in ("log", "sub"):
            key = f"{cluster.prefix}{{all}}" if p.target == "log" else \
                f"{cluster.prefix}{{sub:{SERVICE}}}"
            raw.execute_command("XADD", key, "*", *[x for kv in p.fields for x in kv])
            return True
        try:
            if p.target == "publish":
                bus.publish(Poisoned.from_dict(p.payload))  # validation refuses at build
            else:
                bus.publish_raw(p.event_type, p.payload)
        except (RelaybusError, ValueError) as exc:
            # refused before anything was sent, with a relaybus error that says why
            assert isinstance(exc, RelaybusError) and not isinstance(exc, BrokerError), \
                f"{p.kind}: {type(exc).__name__}: {exc}"
            refused[type(exc).__name__] += 1
            return False
        return True

    @settings(max_examples=scale.n(1500, 150), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(poisons())
    def one(drawn: Poison) -> None:
        p = drawn.with_probe()
        seen[p.kind] += 1
        if not inject(p):
            return
        probes.append(p.probe)
        fate = wait_until(lambda: fates.of(p.probe), 20,
                          f"the fate of a {p.kind!r} entry written to {p.target}", interval=0.005)
        outcomes[f"{p.target}:{fate[0]}"] += 1
        assert fate[0] != "both", f"{p.kind} entry was handled and dead-lettered"
        if fate[0] == "dlq":
            assert fate[1], f"{p.kind} entry dead-lettered without a reason"
        if p.expect != "either":
            assert fate[0] == p.expect, f"{p.kind} entry ({p.target}): {fate}"

    one()
    cluster.check_threads(relaybus)
    good.terminate()
    cluster.wait_quiet([SERVICE], timeout=60)
    cluster.check_threads(relaybus, since=time.time())
    idle = cluster.cpu_seconds(relaybus, window=2.0)
    # in the end, too: each entry has exactly one fate and was handled at most once
    final = Counter(str((fates.of(probe) or ("lost",))[0]) for probe in probes)
    rehandled = [probe for probe in probes if cluster.ledger.probes[probe] > 1]
    report = reconcile(cluster.ledger, cluster.dead, {SERVICE: ["faults.alpha"]},
                       "7. poison input", prefix=cluster.prefix, duplicate_bound=0,
                       seconds=time.time() - t0,
                       faults=f"{sum(seen.values())} generated bad entries among good events")
    reasons = Counter(d.reason.split(":")[0][:40] for d in cluster.dead.entries)
    report.notes["outcomes"] = dict(outcomes)
    report.notes["refused by publish"] = dict(refused)
    report.notes["top DLQ reasons"] = dict(reasons.most_common(6))
    report.notes["idle CPU after"] = f"{idle:.2f} s in 2 s"
    service_stats = (relaybus[1].status() or {}).get("stats", {})
    report.notes["service errors"] = service_stats.get("errors", 0)
    for c in relaybus:
        c.terminate()
    record.append(report)
    assert idle < 0.5, f"{idle:.2f} s of CPU in 2 s idle: a hot loop?"
    assert set(final) <= {"handled", "dlq"}, final
    assert not rehandled, f"{len(rehandled)} entries handled more than once"
    report.assert_ok()  # every good event was handled


# -- odd names ------------------------------------------------------------------------------

names = st.one_of(
    odd_text,
    st.text(alphabet=st.characters(exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp")),
            min_size=1, max_size=40),
    st.sampled_from(["", "a" * 200, "a" * 201, "orders:dlq", "sub:x", "a{b}", "x*", "🙂" * 50,
                     "naïve-サービス", "\u202ename", "a\u200bb", "-", ":", "a/b", "é"]),
)


def test_odd_queue_and_service_names(cluster: Cluster, scale: Scale,
                                     record: list[Report]) -> None:
    ctl = "faults:ctl"
    host = cluster.spawn("host", "host", "--ctl", ctl)
    cluster.wait_ready([host])
    raw: redis.Redis = cluster.client
    bus = EventBus(cluster.server.url, prefix=cluster.prefix, retry_timeout=5.0)
    mq = MessageQueue(cluster.server.url, prefix="q:", retry_timeout=5.0)
    outcome: Counter[str] = Counter()
    t0 = time.time()
    started: set[str] = set()
    seen = [0]

    @settings(max_examples=scale.n(300, 40), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(names)
    def one(name: str) -> None:
        seen[0] += 1
        encoded = name.encode("utf-8", "surrogatepass")
        # as a queue name: refused before anything is written, or a working queue
        try:
            queue, _ = mq.create_queue_pair(name)
        except InvalidNameError as exc:
            assert str(exc), name
            assert not raw.exists(b"q:{" + encoded + b"}", b"q:{" + encoded + b"}:meta"), \
                f"a refused queue name {name!r} wrote keys"
            outcome["queue name refused"] += 1
        else:
            queue.send_message({"name": name})
            [msg] = queue.get_messages(1)
            assert msg.data == {"name": name}
            assert queue.acknowledge_messages([msg.id]) == 1
            outcome["queue worked"] += 1
        # as a service name: refused up front, or a service that runs in another process
        try:
            Microservice(name, url=cluster.server.url)
        except InvalidNameError as exc:
            assert str(exc), name
            with pytest.raises(InvalidNameError):
                bus.subscribe(name, [Named])
            assert not raw.exists(cluster.prefix.encode() + b"{sub:" + encoded + b"}"), \
                f"a refused service name {name!r} wrote keys"
            assert not raw.hexists(cluster.prefix + "subscriptions", encoded)
            outcome["service name refused"] += 1
            return
        if name not in started:
            raw.rpush(ctl, encoded)
            reply = raw.blpop([ctl + ":started"], timeout=30)
            assert reply is not None, f"the host did not start {name!r}"
            assert json.loads(reply[1]) == [name, "started"], reply
            started.add(name)
        event = Named(target=name)
        bus.publish(event)
        while bus.route_once():
            pass
        wait_until(lambda: cluster.ledger.refresh().named[(name, event.event_id)], 20,
                   f"service {name!r} to handle its event")
        outcome["service worked end to end"] += 1

    one()
    cluster.check_threads([host])
    report = Report("7b. odd queue and service names", seconds=time.time() - t0,
                    faults=f"{seen[0]} generated names, each as a queue and a service name",
                    notes=dict(outcome))
    host.terminate()
    bus.close()
    mq.close()
    record.append(report)
    assert outcome["service name refused"] and outcome["service worked end to end"]
