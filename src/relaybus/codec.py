"""The wire format of a stream entry: encode, decode, size limits.

An entry's fields (short names keep Redis memory per message low)::

    d   the payload: JSON text of the dict the sender passed (always present)
    t   sent time, integer milliseconds since the epoch (always present)
    h   headers: JSON object of str -> str (absent when empty)
    x   expiry, integer milliseconds since the epoch (absent without a TTL)
    k   dedup key: an event id (absent for plain queue messages)
    e   routing key: the event type (events only; lets routers route without parsing)
    n   attempts made before this entry was (re)queued by a retry (absent when 0)
    f   failure records: JSON list, oldest first (DLQ entries and retries)

Nothing here touches a socket: the queue layer and any asyncio front share it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import MessageTooLargeError, SerializationError

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "Message", "decode_entry", "encode_entry", "dumps"]

#: Largest accepted encoded payload, in bytes (1 MiB).
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024


def dumps(data: Any, *, lossy: bool = False) -> str:
    """JSON-encode ``data`` compactly, raising :class:`SerializationError` if JSON cannot carry it.

    Text stays UTF-8, except in a document holding a lone surrogate (which UTF-8
    cannot carry): that one is written with ``\\u`` escapes, which read back as the
    same string; with ``lossy`` (failure records, which Lua's cjson must read and
    refuses such escapes) each lone surrogate becomes ``?`` instead.
    """
    try:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                if lossy:
                    return text.encode("utf-8", "replace").decode("utf-8")
                text = json.dumps(data, separators=(",", ":"), allow_nan=False)
        return text
    except (TypeError, ValueError, RecursionError) as exc:
        raise SerializationError(f"payload cannot be encoded as JSON: {exc}") from exc


def _key_text(what: str, value: str) -> str:
    """A dedup or routing key, which travels as UTF-8 (so no lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SerializationError(f"{what} {value!r} is not valid unicode text: {exc}") from exc
    return value


@dataclass
class Message:
    """A message read from a queue.

    ``data`` is the payload exactly as sent. ``delivery_count`` counts the deliveries of
    this stream entry (1 on first delivery); ``attempts`` adds the attempts made before a
    retry re-queued it. ``failures`` lists the failure records, oldest first; ``reason``
    is the latest one's reason (set on messages read from a dead-letter queue).
    """

    id: str
    data: dict[str, Any]
    timestamp: float
    delivery_count: int = 1
    headers: dict[str, str] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    expires_at: float | None = None
    dedup_key: str | None = None
    previous_attempts: int = 0
    queue: str = ""
    #: The entry's raw stream fields, for passing it on unchanged (routing, requeue).
    fields: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def reason(self) -> str | None:
        """The latest failure's reason, or None for a message that never failed."""
        return str(self.failures[-1].get("reason")) if self.failures else None

    @property
    def attempts(self) -> int:
        """Attempts including this delivery: earlier retries plus this entry's deliveries."""
        return self.previous_attempts + self.delivery_count

    def is_expired(self, now: float) -> bool:
        """True when the message had a TTL that has passed at ``now`` (epoch seconds)."""
        return self.expires_at is not None and now >= self.expires_at


def encode_entry(
    data: Mapping[str, Any],
    *,
    now: float,
    headers: Mapping[str, str] | None = None,
    ttl: float | None = None,
    dedup_key: str | None = None,
    routing_key: str | None = None,
    max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> dict[str, str | int]:
    """Build the stream fields for one message (see the module docstring)."""
    if not isinstance(data, Mapping):
        raise SerializationError(f"a message payload must be a dict, not {type(data).__name__}")
    payload = dumps(dict(data))
    size = len(payload.encode("utf-8"))
    if size > max_size:
        raise MessageTooLargeError(size, max_size)
    fields: dict[str, str | int] = {"d": payload, "t": int(now * 1000)}
    if headers:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise SerializationError("headers must map str to str")
        fields["h"] = dumps(dict(headers))
    if ttl is not None:
        if not isinstance(ttl, (int, float)) or math.isnan(ttl) or ttl <= 0:
            raise SerializationError(f"ttl must be a positive number of seconds, not {ttl!r}")
        fields["x"] = int((now + ttl) * 1000)
    if dedup_key:
        fields["k"] = _key_text("dedup key", dedup_key)
    if routing_key:
        fields["e"] = _key_text("routing key", routing_key)
    return fields


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def decode_entry(
    entry_id: bytes | str,
    raw: Mapping[bytes, bytes] | Mapping[str, str] | list[Any],
    delivery_count: int = 1,
    queue: str = "",
) -> Message:
    """Turn a stream entry into a :class:`Message`.

    ``raw`` is the entry's field map (or Redis's flat ``[k, v, k, v]`` list). Raises
    :class:`SerializationError` with a message starting ``malformed`` when the entry
    was not written by relaybus or is damaged.
    """
    mid = _text(entry_id)
    try:
        if isinstance(raw, list):
            fields = {_text(raw[i]): raw[i + 1] for i in range(0, len(raw) - 1, 2)}
        else:
            fields = {_text(k): v for k, v in raw.items()}
        if "d" not in fields:
            raise SerializationError(f"malformed entry {mid}: no payload field 'd'")
        data = json.loads(fields["d"])
        if not isinstance(data, dict):
            raise SerializationError(f"malformed entry {mid}: payload is not a JSON object")
        sent_ms = int(fields["t"]) if "t" in fields else int(mid.split("-", 1)[0])
        headers = json.loads(fields["h"]) if "h" in fields else {}
        failures = json.loads(fields["f"]) if "f" in fields else []
        if not isinstance(headers, dict) or not isinstance(failures, list):
            raise SerializationError(f"malformed entry {mid}: bad headers or failure list")
        expires = int(fields["x"]) / 1000 if "x" in fields else None
        return Message(
            id=mid,
            data=data,
            timestamp=sent_ms / 1000,
            delivery_count=int(delivery_count),
            headers={str(k): str(v) for k, v in headers.items()},
            failures=failures,
            expires_at=expires,
            dedup_key=_text(fields["k"]) if "k" in fields else None,
            previous_attempts=int(fields.get("n", 0)),
            queue=queue,
            fields=fields,
        )
    except SerializationError:
        raise
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        raise SerializationError(f"malformed entry {mid}: {exc}") from exc
