"""The ledger: what producers published and handlers completed, kept outside the bus.

Layout of a ledger directory (one file per process, so a SIGKILL damages at most
the last line of its own file, which readers ignore)::

    published/<label>.log     one JSON line per event whose publish returned:
                              [event_id, event_type, time]
    refused/<label>.log       events whose publish raised and were given up:
                              [event_id, event_type, time, error]
    handled/<service>/<label>.log
                              one JSON line per event a handler completed:
                              [event_id, probe, time, front]  (front: sync or async)
    named/<label>.log         the named-service host: [service, event_id, time, front]
    status/<label>.json       each process's latest status (threads, stats, memory)

Lines are JSON with ``ensure_ascii`` so any event id (odd unicode, lone
surrogates, newlines) fits on one line. Writers flush every line (an fsync is not
needed: the test's own processes are killed, not the machine).
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

# -- writing (child processes) ------------------------------------------------------------


class LineLog:
    """An append-only JSON-lines file, flushed after every line; thread-safe."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a", encoding="ascii", buffering=1 << 16)
        self._lock = threading.Lock()

    def write(self, *values: Any) -> None:
        line = json.dumps(list(values), ensure_ascii=True, separators=(",", ":")) + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()

    def write_many(self, rows: Iterable[Iterable[Any]]) -> None:
        text = "".join(json.dumps(list(r), ensure_ascii=True, separators=(",", ":")) + "\n"
                       for r in rows)
        with self._lock:
            self._fh.write(text)
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=True, default=str))
    os.replace(tmp, path)


# -- reading (the test) -----------------------------------------------------------------


class _Tail:
    """Incremental reader of one JSON-lines file: only complete lines, each once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> list[list[Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        return [json.loads(line) for line in chunk[: end + 1].splitlines() if line]


class Ledger:
    """The test's view of a ledger directory; reading is incremental (cheap to poll)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("published", "refused", "handled", "named", "status"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._tails: dict[Path, _Tail] = {}
        #: event_id -> event type, for every publish that returned.
        self.published: dict[str, str] = {}
        #: event_id -> when its publish returned (epoch seconds).
        self.published_at: dict[str, float] = {}
        #: event_id -> first completion by any service (epoch seconds).
        self.completed_at: dict[str, float] = {}
        #: how many times a producer recorded the same event id (must stay 0)
        self.republished = 0
        #: event_id -> (event type, error) for publishes that raised and were given up.
        self.refused: dict[str, tuple[str, str]] = {}
        #: when each given-up publish raised (epoch seconds), in file order.
        self.refused_times: list[float] = []
        #: service -> Counter of completed event ids.
        self.completed: dict[str, Counter[str]] = {}
        #: service -> completion times (epoch seconds), in file order.
        self.completion_times: dict[str, list[float]] = {}
        #: probe -> number of completions carrying it (poison scenario).
        self.probes: Counter[str] = Counter()
        #: service -> probe -> completions carrying it.
        self.service_probes: dict[str, Counter[str]] = {}
        #: (service, event_id) -> completions (named-service host).
        self.named: Counter[tuple[str, str]] = Counter()
        #: front (sync, async) -> completions, every service together.
        self.by_front: Counter[str] = Counter()
        #: service -> front -> completions.
        self.service_fronts: dict[str, Counter[str]] = {}
        #: front -> second (and later) completions it ran of an event already completed.
        self.duplicate_fronts: Counter[str] = Counter()
        #: front -> completions in the named-service host.
        self.named_fronts: Counter[str] = Counter()
        #: An ordered service's completed runs: service -> [(key, n, started, ended, front)]
        self.runs: dict[str, list[tuple[str, int, float, float, str]]] = {}

    def _rows(self, pattern: str) -> Iterable[tuple[Path, list[Any]]]:
        for path in sorted(self.root.glob(pattern)):
            tail = self._tails.get(path)
            if tail is None:
                tail = self._tails[path] = _Tail(path)
            for row in tail.read():
                yield path, row

    def refresh(self) -> Ledger:
        """Read whatever the processes appended since the last call."""
        for _, row in self._rows("published/*.log"):
            if row[0] in self.published:
                self.republished += 1
            self.published[row[0]] = row[1]
            self.published_at[row[0]] = float(row[2])
        for _, row in self._rows("refused/*.log"):
            self.refused[row[0]] = (row[1], row[3])
            self.refused_times.append(float(row[2]))
        for path, row in self._rows("handled/*/*.log"):
            service = path.parent.name
            front = str(row[3]) if len(row) > 3 else "sync"
            done = self.completed.setdefault(service, Counter())
            if done[row[0]]:
                self.duplicate_fronts[front] += 1
            done[row[0]] += 1
            self.by_front[front] += 1
            self.service_fronts.setdefault(service, Counter())[front] += 1
            self.completion_times.setdefault(service, []).append(float(row[2]))
            self.completed_at.setdefault(row[0], float(row[2]))
            if row[1]:
                self.probes[row[1]] += 1
                self.service_probes.setdefault(service, Counter())[row[1]] += 1
        for path, row in self._rows("runs/*/*.log"):
            self.runs.setdefault(path.parent.name, []).append(
                (str(row[0]), int(row[1]), float(row[2]), float(row[3]), str(row[4])))
        for _, row in self._rows("named/*.log"):
            self.named[(row[0], row[1])] += 1
            self.named_fronts[str(row[3]) if len(row) > 3 else "sync"] += 1
        return self

    def order_faults(self, service: str) -> list[str]:
        """Where an ordered service broke its promise, per partition key: a run that
        started before the previous completed run of its key ended (two at once), or
        an event that ran after a later one of its key (out of publish order, which is
        ``n`` order for one producer's key). Empty when it kept it."""
        faults: list[str] = []
        by_key: dict[str, list[tuple[str, int, float, float, str]]] = {}
        for run in self.runs.get(service, []):
            by_key.setdefault(run[0], []).append(run)
        for key, runs in by_key.items():
            runs.sort(key=lambda r: r[2])
            for before, after in zip(runs, runs[1:], strict=False):
                if after[2] < before[3]:
                    faults.append(f"{key}: n={after[1]} ({after[4]}) started before n="
                                  f"{before[1]} ({before[4]}) ended")
                if after[1] < before[1]:
                    faults.append(f"{key}: n={after[1]} ran after n={before[1]}")
        return faults

    def handled_count(self, service: str) -> int:
        return len(self.completed.get(service, ()))

    def first_completion_after(self, t: float) -> float | None:
        """Earliest completion time (any service) at or after epoch ``t``."""
        best: float | None = None
        for times in self.completion_times.values():
            for c in times:
                if c >= t and (best is None or c < best):
                    best = c
        return best

    def caught_up_after(self, t: float) -> float | None:
        """Seconds after epoch ``t`` until every event published before ``t`` was completed."""
        last = max((self.completed_at.get(eid, float("inf"))
                    for eid, at in self.published_at.items() if at <= t), default=None)
        return None if last is None or last == float("inf") else max(0.0, last - t)

    def status(self) -> dict[str, dict[str, Any]]:
        """Every process's latest status, by label."""
        out: dict[str, dict[str, Any]] = {}
        for path in self.root.glob("status/*.json"):
            try:
                out[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
        return out


# -- dead letters ---------------------------------------------------------------------------


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


@dataclass
class DeadLetter:
    """One DLQ entry as the suite sees it."""

    stream: str
    entry_id: str
    event_id: str | None
    probe: str | None
    reason: str
    fields: dict[bytes, bytes] = field(repr=False)


def _event_id_of(fields: Mapping[bytes, bytes]) -> str | None:
    if b"k" in fields and fields[b"k"]:
        return _text(fields[b"k"])
    try:
        data = json.loads(fields.get(b"d", b""))
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None
    if isinstance(data, dict) and data.get("event_id") not in (None, ""):
        return str(data["event_id"])
    return None


def _reason_of(fields: Mapping[bytes, bytes]) -> str:
    try:
        history = json.loads(fields.get(b"f", b"[]"))
        return str(history[-1].get("reason") or "") if history else ""
    except (ValueError, AttributeError, TypeError, IndexError, RecursionError):
        return ""


class DeadLetters:
    """Incremental reader of DLQ streams: everything dead-lettered, with its reason."""

    def __init__(self, client: redis.Redis, keys: Iterable[str]) -> None:
        self.client = client
        self.cursors = {k: "-" for k in keys}
        self.entries: list[DeadLetter] = []
        self.by_event: dict[str, DeadLetter] = {}
        self.by_probe: dict[str, DeadLetter] = {}
        #: (DLQ stream, probe or event id) -> its entries there
        self.in_stream: dict[tuple[str, str], list[DeadLetter]] = {}

    def watch(self, key: str) -> None:
        self.cursors.setdefault(key, "-")

    def refresh(self) -> DeadLetters:
        for key, cursor in self.cursors.items():
            while True:
                rows = self.client.xrange(key, min=cursor, count=1000)
                if not rows:
                    break
                for entry_id, fields in rows:
                    probe = fields.get(b"probe")
                    dl = DeadLetter(key, _text(entry_id), _event_id_of(fields),
                                    _text(probe) if probe is not None else None,
                                    _reason_of(fields), fields)
                    self.entries.append(dl)
                    if dl.event_id is not None:
                        self.by_event[dl.event_id] = dl
                        self.in_stream.setdefault((key, dl.event_id), []).append(dl)
                    if dl.probe is not None:
                        self.by_probe[dl.probe] = dl
                        if dl.probe != dl.event_id:
                            self.in_stream.setdefault((key, dl.probe), []).append(dl)
                cursor = "(" + _text(rows[-1][0])
            self.cursors[key] = cursor
        return self


# -- the verdict ---------------------------------------------------------------------------


@dataclass
class Report:
    """One scenario's counts (a row of the table in docs/reliability.md)."""

    scenario: str
    published: int = 0
    completed: int = 0
    expected: int = 0
    missing: int = 0
    duplicates: int = 0
    duplicate_bound: int = 0
    dead_lettered: int = 0
    faults: str = ""
    seconds: float = 0.0
    #: front -> completions it ran (of the scenario's services)
    fronts: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    missing_ids: list[str] = field(default_factory=list, repr=False)

    def fronts_text(self) -> str:
        """``sync 1,020 / async 980``: completions per front ('-' when none recorded)."""
        return " / ".join(f"{f} {n:,}" for f, n in sorted(self.fronts.items(),
                                                          key=lambda kv: kv[0] != "sync")) \
            or "-"

    def line(self) -> str:
        notes = ", ".join(f"{k}={v}" for k, v in self.notes.items())
        return (f"[{self.scenario}] published={self.published} expected={self.expected} "
                f"completed={self.completed} missing={self.missing} "
                f"duplicates={self.duplicates} (bound {self.duplicate_bound}) "
                f"dlq={self.dead_lettered} fronts: {self.fronts_text()} "
                f"faults: {self.faults}; {self.seconds:.1f}s; {notes}")

    def assert_ok(self) -> None:
        assert self.missing == 0, f"{self.missing} events lost, e.g. {self.missing_ids[:5]}: " \
                                  f"{self.line()}"
        assert self.duplicates <= self.duplicate_bound, f"too many duplicates: {self.line()}"


def log_key(prefix: str) -> str:
    """The event log: every subscription reads it through a consumer group of its own."""
    return f"{prefix}{{all}}"


def sub_group(service: str) -> str:
    """The consumer group of a service's subscription on the log."""
    return f"sub:{service}"


def sub_key(prefix: str, service: str) -> str:
    """A subscription's own stream: retries due again, requeued dead letters."""
    return f"{prefix}{{all}}:sub:{service}"


def sub_dlq_key(prefix: str, service: str) -> str:
    return sub_key(prefix, service) + ":dlq"


def bus_dlq_key(prefix: str) -> str:
    return f"{prefix}{{all}}:dlq"


def reconcile(ledger: Ledger, dead: DeadLetters, plan: Mapping[str, Iterable[str]],
              scenario: str, *, prefix: str, faults: str = "", duplicate_bound: int = 0,
              seconds: float = 0.0) -> Report:
    """Compare what was published with what each service completed or dead-lettered.

    ``plan`` maps each service to the event types it subscribes to (``*``: all). An
    event is accounted for when the service completed it, or it sits in that service's
    DLQ or in the bus DLQ with a non-empty reason.
    """
    ledger.refresh()
    for service in plan:
        dead.watch(sub_dlq_key(prefix, service))
    dead.watch(bus_dlq_key(prefix))
    dead.refresh()
    report = Report(scenario, published=len(ledger.published), faults=faults,
                    duplicate_bound=duplicate_bound, seconds=seconds)
    fronts: Counter[str] = Counter()
    for service in plan:
        fronts.update(ledger.service_fronts.get(service, Counter()))
    report.fronts = dict(fronts)
    report.dead_lettered = len(dead.entries)
    in_bus_dlq = {d.event_id for d in dead.entries
                  if d.event_id is not None and d.reason and d.stream == bus_dlq_key(prefix)}
    for service, types in plan.items():
        wanted = set(types)
        expected = {eid for eid, t in ledger.published.items() if "*" in wanted or t in wanted}
        done = ledger.completed.get(service, Counter())
        in_dlq = in_bus_dlq | {d.event_id for d in dead.entries if d.event_id is not None
                               and d.reason and d.stream == sub_dlq_key(prefix, service)}
        missing = [eid for eid in expected if eid not in done and eid not in in_dlq]
        report.expected += len(expected)
        report.completed += sum(1 for eid in expected if eid in done)
        report.missing += len(missing)
        report.missing_ids += missing[:20]
        report.duplicates += sum(n - 1 for n in done.values() if n > 1)
    report.duplicates += ledger.republished
    return report


# -- the summary table ---------------------------------------------------------------------


def _plain(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    return str(value)


def markdown_table(reports: Iterable[Report]) -> str:
    """The table of scenarios for docs/reliability.md."""
    head = ("| scenario | faults injected | events | completions expected | missing | "
            "duplicates (bound) | in DLQ | completions by front | time | notes |\n"
            "|---|---|---:|---:|---:|---:|---:|---|---:|---|\n")
    rows = []
    for r in sorted(reports, key=lambda r: r.scenario):
        notes = "; ".join(f"{k} {_plain(v)}" for k, v in r.notes.items())
        rows.append(f"| {r.scenario} | {r.faults} | {r.published:,} | {r.expected:,} | "
                    f"{r.missing} | {r.duplicates} ({r.duplicate_bound}) | {r.dead_lettered:,} | "
                    f"{r.fronts_text()} | {r.seconds:.1f} s | {notes} |")
    return head + "\n".join(rows) + "\n"

