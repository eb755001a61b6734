"""What a service and a bus count for metrics: labelled counters and histograms.

Plain code, no IO and no dependency: the consumer core and the publish step record
here, on either front; :mod:`relaybus.metrics` turns a snapshot into Prometheus
metric families at scrape time. Label values are bounded: an event type is its own
label only when an event class of that name is registered in this process (else
``other``), and outcomes come from a fixed set.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..events import EVENT_TYPES
from .replies import text

__all__ = ["DURATION_BUCKETS", "OTHER", "OUTCOMES", "Histogram", "Labels", "Telemetry",
           "type_label"]

#: Upper bounds, in seconds, of the handler duration histogram's buckets.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: The ``event_type`` label of an event whose type has no class in this process.
OTHER = "other"
#: The ``outcome`` label of a handled-by-outcome count.
OUTCOMES = ("handled", "retried", "dead_lettered", "duplicate", "invalid")


#: Labels of registered types by their wire form (only registered ones: bounded).
_LABELS: dict[str | bytes, str] = {}


def type_label(event_type: str | bytes | None) -> str:
    """``event_type`` when an event class of that name is registered, else ``other``."""
    if event_type is None:
        return OTHER
    label = _LABELS.get(event_type)
    if label is not None:
        return label
    name = text(event_type) if isinstance(event_type, bytes) else event_type
    if name not in EVENT_TYPES:
        return OTHER
    _LABELS[event_type] = name
    return name


@dataclass
class Histogram:
    """Counts per bucket (not cumulative; the last one is ``+Inf``), their sum and count."""

    bounds: tuple[float, ...] = DURATION_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.observe_all((value,))

    def observe_all(self, values: Sequence[float]) -> None:
        counts, bounds, place = self.counts, self.bounds, bisect.bisect_left
        for value in values:
            counts[place(bounds, value)] += 1
        self.total += sum(values)
        self.count += len(values)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(upper bound, observations at or under it)`` pairs, ``+Inf`` last."""
        out, running = [], 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total, self.count)


def by_type(counts: Mapping[str | bytes | None, int], *labels: str) -> dict[Labels, int]:
    """Counts by raw event type as counts by ``(type label, *labels)`` (types without
    a class add up under ``other``)."""
    out: dict[Labels, int] = {}
    for kind, n in counts.items():
        key = (type_label(kind), *labels)
        out[key] = out.get(key, 0) + n
    return out


#: The label values of one series, in the order of its metric's label names.
Labels = tuple[str, ...]


class Telemetry:
    """Thread-safe labelled counters and histograms (a snapshot is a plain copy)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, int]] = {}
        self._histograms: dict[str, dict[Labels, Histogram]] = {}

    def count(self, name: str, labels: Labels = (), n: int = 1) -> None:
        """Add ``n`` to counter ``name`` at ``labels``."""
        if n:
            with self._lock:
                values = self._counters.setdefault(name, {})
                values[labels] = values.get(labels, 0) + n

    def add(self, name: str, counts: Mapping[Labels, int]) -> None:
        """Add each of ``counts`` (labels -> n) to counter ``name``, under one lock."""
        if counts:
            with self._lock:
                values = self._counters.setdefault(name, {})
                for labels, n in counts.items():
                    values[labels] = values.get(labels, 0) + n

    def observe(self, name: str, labels: Labels, value: float) -> None:
        """Record ``value`` in histogram ``name`` at ``labels``."""
        self.observe_many(name, [(labels, value)])

    def observe_many(self, name: str, values: Sequence[tuple[Labels, float]]) -> None:
        """Record each ``(labels, value)`` in histogram ``name``, under one lock."""
        groups: dict[Labels, list[float]] = {}
        for labels, value in values:
            groups.setdefault(labels, []).append(value)
        self.observe_groups(name, groups)

    def observe_groups(self, name: str, groups: Mapping[Labels, Sequence[float]]) -> None:
        """Record the values of each labels in histogram ``name``, under one lock."""
        if not groups:
            return
        with self._lock:
            histograms = self._histograms.setdefault(name, {})
            for labels, values in groups.items():
                histogram = histograms.get(labels)
                if histogram is None:
                    histogram = histograms[labels] = Histogram()
                histogram.observe_all(values)

    def counters(self, name: str) -> dict[Labels, int]:
        """A copy of counter ``name``'s values by labels."""
        with self._lock:
            return dict(self._counters.get(name, {}))

    def histograms(self, name: str) -> dict[Labels, Histogram]:
        """A copy of histogram ``name``'s values by labels."""
        with self._lock:
            return {k: h.copy() for k, h in self._histograms.get(name, {}).items()}
