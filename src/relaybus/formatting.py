"""Durations, times and rates as people read them (the ``relaybus`` commands and the
dashboard show the same text)."""

from __future__ import annotations

from datetime import datetime, timezone

__all__ = ["fmt_age", "fmt_time", "fmt_short_time", "iso_time", "fmt_rate", "seconds_json"]


def fmt_age(seconds: float) -> str:
    """A duration for people: ``0.4s``, ``12s``, ``5m12s``, ``3h05m``, ``2d03h``."""
    s = max(0.0, float(seconds))
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{int(s)}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d{int(s % 86400 // 3600):02d}h"


def fmt_time(ts: float) -> str:
    """An epoch time as local ``YYYY-MM-DD HH:MM:SS``."""
    return datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M:%S")


def fmt_short_time(ts: float) -> str:
    """An epoch time for a table cell: ``HH:MM:SS`` today, else ``MM-DD HH:MM``."""
    when = datetime.fromtimestamp(float(ts))
    if when.date() == datetime.now().date():
        return when.strftime("%H:%M:%S")
    return when.strftime("%m-%d %H:%M")


def iso_time(ts: float) -> str:
    """An epoch time as ISO 8601 in UTC, to the millisecond (for JSON)."""
    return datetime.fromtimestamp(float(ts), tz=timezone.utc).isoformat(timespec="milliseconds")


def fmt_rate(rate: float) -> str:
    """Messages per second: ``0``, ``0.4``, ``12``, ``1.2k``."""
    if rate >= 1000:
        return f"{rate / 1000:.1f}k"
    if rate >= 10 or rate == 0:
        return f"{rate:.0f}"
    return f"{rate:.1f}"


def seconds_json(value: float) -> float:
    """A duration rounded for JSON."""
    return round(float(value), 3)
