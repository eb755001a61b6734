"""Scenario 7: poison input, generated with hypothesis, into running processes.

Three services run as processes while a producer keeps publishing good events: two
subscribed to every type, one per front (``poison``: a Microservice, ``poison-aio``:
an AsyncMicroservice), and one subscribed to the good events' type only
(``poison-typed``, asyncio). Hypothesis generates bad entries and writes them where
they can land: raw into the event log (which every subscription reads through its
own consumer group) or straight into one subscription's own stream (as another tool,
or damage, would), or through the library (``publish``, ``publish_raw``). Kinds:
undecodable payloads and fields, missing or unknown ``event_type``, payloads that fail
validation, handlers that raise, deeply nested and oversized payloads, odd unicode
everywhere (lone surrogates, NUL, bidi overrides, non-characters).

Each entry carries a probe (its ``event_id`` or an extra ``probe`` field) and must end
handled or in the DLQ with a reason, in each wildcard subscription it reaches; one that
should be handled must be. The typed subscription filters the log by type on the
client: an entry of another readable type is acknowledged unseen, one with no readable
type is delivered and dead-lettered with the reason. No worker loop may die or spin,
and every good event published around them is handled by all three.

A second test feeds odd queue and service names: each is refused with
InvalidNameError before anything is written (by both fronts alike), or works end to end
in a running process (services of both fronts).
"""

from __future__ import annotations

import json
import re
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
from faults.ledger import Report, log_key, reconcile, sub_dlq_key, sub_key
from faults.procs import (
    BASE_EXC,
    FRONTS,
    RAISE,
    REJECT,
    RETURN_FALSE,
    SYSTEM_EXIT,
    Alpha,
    Named,
    Poisoned,
)
from relaybus import (
    AsyncMicroservice,
    EventBus,
    InvalidNameError,
    MessageQueue,
    Microservice,
    RelaybusError,
)
from relaybus.errors import BrokerError

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

SYNC, ASYNC, TYPED = "poison", "poison-aio", "poison-typed"
#: The wildcard subscriptions: every entry written to the log or published reaches both.
WILDCARD = (SYNC, ASYNC)
FRONT = {SYNC: "sync", ASYNC: "async", TYPED: "async"}
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
    service: str = ""  # target "sub": whose own stream

    @property
    def services(self) -> tuple[str, ...]:
        """The wildcard subscriptions this entry reaches."""
        return (self.service,) if self.target == "sub" else WILDCARD

    def with_probe(self) -> Poison:
        """This entry with a fresh probe in place of the placeholder."""
        probe = uuid.uuid4().hex
        old = PLACEHOLDER.encode()
        return Poison(self.kind, self.target, probe, self.expect,
                      [(k.replace(old, probe.encode()), v.replace(old, probe.encode()))
                       for k, v in self.fields],
                      _swap(self.payload, probe), self.event_type, self.service)


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
        # the entry's routing field (e) still names the class, which then fills it in;
        # without e (field damage) nothing names a type: dead-lettered
        expect = "handled"
    elif kind == "type-not-str":
        payload["event_type"] = draw(st.sampled_from([5, None, ["faults.poison"], {}]))
    elif kind == "validation":
        key, value = draw(st.sampled_from([("n", "many"), ("probe", 5), ("timestamp", "now"),
                                           ("headers", {"a": 1}), ("event_id", None)]))
        payload[key] = value
        if key == "event_id":
            payload["event_id"] = probe  # keep the probe; break another field instead
            payload["correlation_id"] = 12
    elif kind == "extra-field":  # a field the class does not know: tolerated on read
        key, value = draw(odd_text) + "_extra", draw(json_values)
        payload[key] = value
        expect = "either" if _has_surrogate(key) or _has_surrogate(value) else "handled"
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
    elif kind == "lone-surrogate":  # in the type or id, read from the payload (no e, no k)
        where = draw(st.sampled_from(["event_type", "event_id", "both"]))
        bad = draw(st.sampled_from(["\ud800", "\udfff", "x\udc80y"]))
        if where in ("event_type", "both"):
            payload["event_type"] = "faults.poison" + bad
        if where in ("event_id", "both"):
            payload["event_id"] = probe + bad
        d = json.dumps(payload).encode()  # as JSON escapes, which decode to the surrogate
        expect = "either"  # an odd type is unknown (dead-lettered); an odd id is just an id
    service = draw(st.sampled_from(WILDCARD)) if target == "sub" else ""
    if target in ("publish", "publish_raw"):
        if kind in ("very-deep", "not-object", "bad-json", "not-utf8", "missing-d",
                    "field-damage", "lone-surrogate"):
            target = "log"  # not expressible through the library
        else:
            return Poison(kind, target, probe, expect, payload=payload,
                          event_type=str(payload.get("event_type") or "faults.poison"))
    fields: list[tuple[bytes, bytes]] = []
    if kind != "missing-d":
        fields.append((b"d", d if d is not None else _dumps(payload)))
    fields.append((b"t", _b(SENT_MS)))
    fields.append((b"k", _b(probe)))
    etype = payload.get("event_type") if isinstance(payload, dict) else None
    fields.append((b"e", _b(etype if isinstance(etype, str) else "faults.poison")))
    if kind == "lone-surrogate":  # no routing key nor event id: readers parse the payload
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
    return Poison(kind, target, probe, expect, fields=fields, service=service)


def readable_type(fields: list[tuple[bytes, bytes]]) -> str | None:
    """The event type a subscription's type filter reads from a raw log entry: its
    routing field ``e`` (whatever its bytes), else its payload's ``event_type`` when that
    is text; None when neither (such an entry is delivered, to be dead-lettered)."""
    raw = dict(fields)
    if b"e" in raw:
        return raw[b"e"].decode("utf-8", "replace")
    try:
        data = json.loads(raw[b"d"]) if b"d" in raw else None
    except (ValueError, RecursionError):
        return None
    etype = data.get("event_type") if isinstance(data, dict) else None
    return etype if isinstance(etype, str) else None


class Fates:
    """Where each probe ended in a service: handled (the ledger) or dead-lettered (in that
    service's DLQ, with its reason)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def of(self, probe: str, service: str, refresh: bool = True) -> tuple[str, str] | None:
        ledger = self.cluster.ledger.refresh() if refresh else self.cluster.ledger
        dead = self.cluster.dead.refresh() if refresh else self.cluster.dead
        handled = ledger.service_probes.get(service, Counter())[probe] + \
            ledger.completed.get(service, Counter())[probe]
        dls = dead.in_stream.get((sub_dlq_key(self.cluster.prefix, service), probe))
        dl = dls[-1] if dls else None
        if handled and dl is not None:
            return "both", dl.reason
        if handled:
            return "handled", ""
        if dl is not None:
            return "dlq", dl.reason
        return None

    def all_of(self, probe: str, services: tuple[str, ...]) -> dict[str, tuple[str, str]] | None:
        """Every service's fate of ``probe``, once each has one (None before)."""
        self.cluster.ledger.refresh()
        self.cluster.dead.refresh()
        out = {}
        for service in services:
            fate = self.of(probe, service, refresh=False)
            if fate is None:
                return None
            out[service] = fate
        return out


@pytest.fixture
def poisoned(cluster: Cluster) -> Iterator[tuple[list[Child], Child, EventBus]]:
    # vt 1 s: an idle instance looks at its own stream (entries written straight into it)
    # every vt / 4
    options = dict(concurrency=2, prefetch=8, vt=1.0, max_attempts=3)
    relaybus = [cluster.service(SYNC, front="sync", types="*", **options),
                cluster.service(ASYNC, front="async", types="*", **options),
                cluster.service(TYPED, front="async", types="alpha", **options)]
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
    written: list[Poison] = []
    waited: Counter[str] = Counter()  # target -> seconds waited for fates
    t0 = time.time()

    def inject(p: Poison) -> bool:
        """Write the entry; False when the library refused it (nothing sent)."""
        if p.target in ("log", "sub"):
            key = log_key(cluster.prefix) if p.target == "log" else \
                sub_key(cluster.prefix, p.service)
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

    @settings(max_examples=scale.n(1500, 20, ci=80),
              deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(poisons())
    def one(drawn: Poison) -> None:
        p = drawn.with_probe()
        seen[p.kind] += 1
        if not inject(p):
            return
        written.append(p)
        started = time.monotonic()
        got = wait_until(lambda: fates.all_of(p.probe, p.services), 20,
                         f"the fate of a {p.kind!r} entry written to {p.target} in "
                         f"{', '.join(p.services)}", interval=0.005)
        waited[p.target] += time.monotonic() - started
        for service, fate in got.items():
            outcomes[f"{p.target}:{FRONT[service]}:{fate[0]}"] += 1
            assert fate[0] != "both", f"{p.kind} entry was handled and dead-lettered"
            if fate[0] == "dlq":
                assert fate[1], f"{p.kind} entry dead-lettered without a reason"
            if p.expect != "either":
                assert fate[0] == p.expect, f"{p.kind} entry ({p.target}, {service}): {fate}"
        if p.expect == "either" and len(got) == 2:
            # both fronts decide alike (same core): the same fate in each
            assert got[SYNC][0] == got[ASYNC][0], f"{p.kind} entry ({p.target}): {got}"

    one()
    cluster.check_threads(relaybus)
    good.terminate()
    cluster.wait_quiet([SYNC, ASYNC, TYPED], timeout=60)
    cluster.check_threads(relaybus, since=time.time())
    idle = cluster.cpu_seconds(relaybus, window=2.0)
    # in the end, too: each entry has exactly one fate per service and was handled at most
    # once there
    cluster.ledger.refresh()
    cluster.dead.refresh()
    final = Counter(str((fates.of(p.probe, svc, refresh=False) or ("lost",))[0])
                    for p in written for svc in p.services)
    rehandled = [(p.probe, svc) for p in written for svc in p.services
                 if cluster.ledger.service_probes.get(svc, Counter())[p.probe] > 1]
    # the typed subscription: what it took of the log is what had no readable type
    typed_dlq = sub_dlq_key(cluster.prefix, TYPED)
    typed_handled = [p for p in written if cluster.ledger.service_probes.get(TYPED, {}).get(
        p.probe) or cluster.ledger.completed.get(TYPED, {}).get(p.probe)]
    untyped = [p for p in written if p.target == "log" and readable_type(p.fields) is None]
    typed_wrong = [(p.kind, readable_type(p.fields), bool(cluster.dead.in_stream.get(
        (typed_dlq, p.probe)))) for p in written if p.target == "log"
        and readable_type(p.fields) != "faults.alpha"
        and bool(cluster.dead.in_stream.get((typed_dlq, p.probe))) != (p in untyped)]
    typed_reasons = [d.reason for p in untyped for d in cluster.dead.in_stream.get(
        (typed_dlq, p.probe), [])]
    report = reconcile(cluster.ledger, cluster.dead,
                       {SYNC: ["faults.alpha"], ASYNC: ["faults.alpha"], TYPED: ["faults.alpha"]},
                       "7. poison input", prefix=cluster.prefix, duplicate_bound=0,
                       seconds=time.time() - t0,
                       faults=f"{sum(seen.values())} generated bad entries among good events; "
                              "2 wildcard subscriptions (one per front), 1 typed")
    reasons = Counter(re.sub(r"^malformed entry \S+", "malformed entry", d.reason)
                      .split(":")[0][:40] for d in cluster.dead.entries)
    report.notes["outcomes (target:front:fate)"] = dict(sorted(outcomes.items()))
    report.notes["refused by publish"] = dict(refused)
    report.notes["typed subscription"] = (
        f"{sum(1 for p in written if p.target == 'log') - len(untyped)} log "
        f"entries of other types passed over, {len(untyped)} without a readable type "
        f"dead-lettered")
    report.notes["top DLQ reasons"] = dict(reasons.most_common(6))
    report.notes["idle CPU after"] = f"{idle:.2f} s in 2 s"
    report.notes["mean wait for a fate"] = {t: f"{waited[t] / n:.2f} s" for t, n in Counter(
        p.target for p in written).items()}
    report.notes["service errors"] = sum(int((c.status() or {}).get("stats", {}).get(
        "errors", 0)) for c in relaybus)
    cluster.terminate(relaybus)
    record.append(report)
    assert idle < 0.5, f"{idle:.2f} s of CPU in 2 s idle: a hot loop?"
    assert set(final) <= {"handled", "dlq"}, final
    assert not rehandled, f"{len(rehandled)} entries handled more than once"
    assert not typed_handled, f"the typed subscription handled {len(typed_handled)} poison entries"
    assert not typed_wrong, f"typed subscription: (kind, type, dead-lettered) {typed_wrong[:5]}"
    assert all(typed_reasons), "a dead letter of the typed subscription has no reason"
    report.assert_ok()  # every good event was handled by all three


def test_typed_subscription_reads_past_odd_types(cluster: Cluster, record: list[Report]
                                                 ) -> None:
    """Log entries whose payload names a type with a lone surrogate (no routing field),
    among good events, on a subscription to the good type only (one service per front):
    the good events are handled at once (not after a visibility timeout), each odd entry
    is passed over or dead-lettered with a reason, and no read fails."""
    vt = 10.0
    services = {"typed-sync": "sync", "typed-aio": "async"}
    instances = [cluster.service(name, front=front, types="alpha", vt=vt)
                 for name, front in services.items()]
    cluster.wait_ready(instances)
    t0 = time.time()
    odd = []
    with EventBus(cluster.server.url, prefix=cluster.prefix, retry_timeout=5.0) as bus:
        for bad in ("\ud800", "\udfff", "x\udc80y"):
            probe = uuid.uuid4().hex
            odd.append(probe)
            cluster.client.xadd(log_key(cluster.prefix), {
                "d": json.dumps({"event_type": "faults.poison" + bad, "event_id": probe,
                                 "probe": probe}), "t": str(SENT_MS), "probe": probe})
            bus.publish_many([Alpha(n=i) for i in range(5)])
    cluster.wait_quiet(services, timeout=vt * 3)
    settled = time.time() - t0
    report = reconcile(cluster.ledger, cluster.dead, {n: ["faults.alpha"] for n in services},
                       "7d. typed subscription, odd types", prefix=cluster.prefix,
                       seconds=settled, faults="3 log entries typed with a lone surrogate "
                       "among 15 good events")
    fates = Fates(cluster)
    got = {(p, n): fates.of(p, n) for p in odd for n in services}
    errors = [c.label for c in instances if "unexpected error" in c.err_path.read_text()]
    cluster.terminate(instances)
    record.append(report)
    assert not errors, f"a read failed in {errors}"
    assert settled < vt / 2, f"settled after {settled:.1f} s: a batch waited for its lease"
    assert all(f is None or (f[0] == "dlq" and f[1]) for f in got.values()), got
    report.assert_ok()


def test_log_entry_without_sent_time(cluster: Cluster, record: list[Report]) -> None:
    """A valid event written into the log without its sent-time field ``t`` (another
    tool's writer) is handled, in a service of each front, with its entry id's time."""
    instances = [cluster.service(name, front=FRONT[name], types="*") for name in WILDCARD]
    cluster.wait_ready(instances)
    t0 = time.time()
    probe = uuid.uuid4().hex
    cluster.client.xadd(log_key(cluster.prefix), {
        "d": json.dumps({"event_type": "faults.poison", "event_id": probe,
                         "timestamp": SENT_MS / 1000, "probe": probe}),
        "k": probe, "e": "faults.poison"})
    fates = Fates(cluster)
    got = wait_until(lambda: fates.all_of(probe, WILDCARD), 20, "the entry's fate")
    report = Report("7e. log entry without its sent time", seconds=time.time() - t0,
                    faults="one valid event without 't', written into the log",
                    notes={"fates": {n: f[0] for n, f in got.items()}})
    cluster.terminate(instances)
    record.append(report)
    assert all(f[0] == "handled" for f in got.values()), got


def test_async_handler_raising_system_exit(cluster: Cluster, record: list[Report]) -> None:
    """An AsyncMicroservice's handler raising SystemExit or KeyboardInterrupt ends like any
    failing handler (retried, then dead-lettered with the reason), as in a Microservice;
    the instance lives on."""
    instance = cluster.service(ASYNC, front="async", types="*", vt=2.0, max_attempts=2)
    cluster.wait_ready([instance])
    probes = [uuid.uuid4().hex for _ in (SYSTEM_EXIT, BASE_EXC)]  # the event ids too:
    # a DLQ entry of a published event is found by its event id
    events = [Poisoned(event_id=p, probe=p, n=n) for p, n in zip(probes, (SYSTEM_EXIT, BASE_EXC),
                                                                 strict=True)]
    t0 = time.time()
    with EventBus(cluster.server.url, prefix=cluster.prefix, retry_timeout=5.0) as bus:
        bus.publish_many(events)
    fates = Fates(cluster)
    got = [wait_until(lambda e=e: fates.of(e.probe, ASYNC), 30, f"the fate of {e.n}")
           for e in events]
    cluster.check_threads([instance])
    report = Report("7c. async handler raising SystemExit", seconds=time.time() - t0,
                    faults="SystemExit and KeyboardInterrupt raised by an async handler",
                    notes={"fates": [f[0] for f in got]})
    instance.terminate()
    record.append(report)
    assert [f[0] for f in got] == ["dlq", "dlq"], got
    assert all(f[1] for f in got), got


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
    started: dict[str, str] = {}  # name -> front
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
        # as a service name: refused up front (by both fronts alike), or a service that
        # runs in another process (the fronts take turns)
        try:
            AsyncMicroservice(name, url=cluster.server.url)
        except InvalidNameError:
            async_refused = True
        else:
            async_refused = False
        try:
            Microservice(name, url=cluster.server.url)
        except InvalidNameError as exc:
            assert str(exc), name
            assert async_refused, f"{name!r}: refused by Microservice only"
            with pytest.raises(InvalidNameError):
                bus.subscribe(name, [Named])
            assert not raw.exists(sub_key(cluster.prefix, "").encode() + encoded), \
                f"a refused service name {name!r} wrote keys"
            assert not raw.hexists(cluster.prefix + "subscriptions", encoded)
            outcome["service name refused"] += 1
            return
        assert not async_refused, f"{name!r}: refused by AsyncMicroservice only"
        if name not in started:
            front = FRONTS[len(started) % 2]
            raw.rpush(ctl, json.dumps([name, front]))
            reply = raw.blpop([ctl + ":started"], timeout=30)
            assert reply is not None, f"the host did not start {name!r}"
            assert json.loads(reply[1]) == [name, "started"], reply
            started[name] = front
        event = Named(target=name)
        bus.publish(event)  # every named service reads it; this one must handle it
        wait_until(lambda: cluster.ledger.refresh().named[(name, event.event_id)], 20,
                   f"service {name!r} to handle its event")
        outcome[f"service worked end to end ({started[name]})"] += 1

    one()
    cluster.check_threads([host])
    report = Report("7b. odd queue and service names", seconds=time.time() - t0,
                    faults=f"{seen[0]} generated names, each as a queue and a service name",
                    notes=dict(outcome))
    report.fronts = dict(cluster.ledger.refresh().named_fronts)
    host.terminate()
    bus.close()
    mq.close()
    record.append(report)
    assert outcome["service name refused"]
    assert outcome["service worked end to end (sync)"]
    assert outcome["service worked end to end (async)"]
