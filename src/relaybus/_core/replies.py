"""Reading replies: the shapes a server gives (RESP2 or RESP3) made one.

The drivers read replies raw (no redis-py response callbacks): RESP2 arrays as lists,
RESP3 maps as dicts; an ``XREAD`` reply is a list of ``[stream, entries]`` in RESP2 and
a dict in RESP3; ``XINFO GROUPS`` rows are flat ``[k, v, ...]`` lists or dicts; ``INFO``
is text. Lua script replies come as plain nested lists. Every function here is pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["text", "stream_entries", "read_entries", "flat_to_dict", "group_rows", "id_order",
           "ids", "info_fields"]


def text(value: Any) -> str:
    """Bytes as UTF-8 text (undecodable bytes replaced), anything else as ``str``."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def ids(values: str | Iterable[Any]) -> list[str]:
    """One id or many (bytes or text) as a list of text ids."""
    if isinstance(values, str):
        return [values]
    return [text(v) for v in values]


def id_order(stream_id: str) -> tuple[int, int]:
    """A stream id (``ms-seq``, optionally after a ``source/`` prefix) as a sortable tuple."""
    bare = stream_id.rpartition("/")[2]
    ms, _, seq = bare.partition("-")
    return int(ms), int(seq or 0)


def flat_to_dict(raw: Any) -> dict[bytes, Any]:
    """A field map from a dict or a flat ``[k, v, k, v]`` list, keys as bytes."""
    if isinstance(raw, Mapping):
        items: Iterable[tuple[Any, Any]] = raw.items()
    else:
        items = zip(raw[::2], raw[1::2], strict=False)
    return {(k.encode() if isinstance(k, str) else k): v for k, v in items}


def stream_entries(rows: Any) -> list[tuple[Any, Any]]:
    """``XRANGE``/``XREVRANGE`` rows as ``[(id, fields)]`` (fields a dict or flat list)."""
    if not rows:
        return []
    return [(r[0], r[1]) for r in rows]


def read_entries(reply: Any) -> list[tuple[Any, Any]]:
    """Every entry of an ``XREAD``/``XREADGROUP`` reply, all streams together."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, Mapping) else [s[1] for s in reply]
    out: list[tuple[Any, Any]] = []
    for entries in streams:
        # RESP3 callbacks wrap a stream's entries in one more list
        if entries and isinstance(entries[0], list) and entries[0] and \
                isinstance(entries[0][0], (list, tuple)):
            entries = entries[0]
        out.extend((e[0], e[1]) for e in entries)
    return out


def group_rows(reply: Any) -> dict[str, dict[str, Any]]:
    """``XINFO GROUPS`` as ``{group name: {field: value}}`` (field names as text)."""
    out: dict[str, dict[str, Any]] = {}
    if not isinstance(reply, list):
        return out
    for row in reply:
        fields = {text(k): v for k, v in flat_to_dict(row).items()}
        out[text(fields.get("name", ""))] = fields
    return out


def info_fields(reply: Any) -> dict[str, str]:
    """An ``INFO`` reply (text, or the dict redis-py makes of it) as ``{field: value}``."""
    if isinstance(reply, Mapping):
        return {str(k): str(v) for k, v in reply.items()}
    out: dict[str, str] = {}
    for line in text(reply).splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.startswith("#"):
            out[key.strip()] = value.strip()
    return out
