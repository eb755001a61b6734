"""The wire format of a stream entry: encode, decode, size limits.

An entry's fields (short names keep Redis memory per message low)::

    d   the payload: JSON text of the dict the sender passed (always present)
    t   sent time, integer milliseconds since the epoch (always present)
    h   headers: JSON object of str -> str (absent when empty)
    l   time to live, integer milliseconds from the entry's id (the server's clock when
        it appended the entry; absent without a TTL)
    x   expiry, integer milliseconds since the epoch by the server's clock: what ``l``
        becomes when a script moves the entry (a retry, a dead letter)
    k   dedup key: an event id (absent for plain queue messages)
    e   routing key: the event type (events only; lets routers route without parsing)
    p   partition key: an event's ``partition_key`` (absent without one); a service with
        ``ordered=True`` handles the entries of one key one at a time, in order
    n   attempts made before this entry was (re)queued by a retry (absent when 0)
    f   failure records: JSON list, oldest first (DLQ entries and retries)

Nothing here touches a socket: the queue layer and any asyncio front share it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import MessageTooLargeError, SerializationError

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "JsonText", "Message", "decode_entry", "encode_entry",
           "dumps", "payload_data"]

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


class JsonText(str):
    """A payload already encoded: the JSON text of an object, valid UTF-8, no NaN or
    infinity (what :func:`dumps` would write for it; :func:`relaybus.events.event_json`
    makes one). :func:`encode_entry` takes it as it is."""

    __slots__ = ()


#: Between an event's type and its id in its dedup identity.
IDENTITY_SEP = "\x1f"


def dedup_identity(routing: str | None, key: str) -> str:
    """What deduplicates an entry (its publish-dedup and done records): its event type
    and id (``routing``, ``key``), so two events of different types that share an id are
    both kept; an entry without a type (a plain queue message) by its key alone."""
    return f"{routing}{IDENTITY_SEP}{key}" if routing else key


#: Bytes of a stored dedup record (a publish-dedup or done record): the first bytes of
#: the SHA-1 of the identity (``lua/lib.lua`` ``record_of`` computes the same).
RECORD_BYTES = 16


def dedup_record(identity: str) -> bytes:
    """What is stored for a dedup identity: a fixed 16-byte digest of it, not the text
    (a record costs about 84 bytes on the server, not 130; two identities share one with
    a chance of about 2**-64 per pair)."""
    return hashlib.sha1(identity.encode("utf-8", "surrogatepass")).digest()[:RECORD_BYTES]


def _key_text(what: str, value: str) -> str:
    """A dedup or routing key, which travels as UTF-8 (so no lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SerializationError(f"{what} {value!r} is not valid unicode text: {exc}") from exc
    return value


@dataclass(slots=True)
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
    #: The entry's raw stream fields (names as bytes: ``fields[b"e"]`` is the event type).
    fields: dict[bytes, Any] = field(default_factory=dict, repr=False, compare=False)
    #: The payload's JSON text as stored (``data`` is it decoded).
    payload: bytes | str = field(default=b"", repr=False, compare=False)

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
    data: Mapping[str, Any] | JsonText,
    *,
    now: float,
    headers: Mapping[str, str] | None = None,
    ttl: float | None = None,
    dedup_key: str | None = None,
    routing_key: str | None = None,
    partition_key: str | None = None,
    max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> dict[str, str | int]:
    """Build the stream fields for one message (see the module docstring); ``data`` is
    the payload: a dict, or its :class:`JsonText`."""
    if isinstance(data, JsonText):
        payload = str(data)
    elif isinstance(data, Mapping):
        payload = dumps(dict(data))
    else:
        raise SerializationError(f"a message payload must be a dict, not {type(data).__name__}")
    fields: dict[str, str | int] = {"d": payload, "t": int(now * 1000)}
    size = len(payload.encode("utf-8"))
    if headers:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise SerializationError("headers must map str to str")
        encoded_headers = dumps(dict(headers))
        fields["h"] = encoded_headers
        size += len(encoded_headers.encode("utf-8"))  # headers count toward the limit
    if size > max_size:
        raise MessageTooLargeError(size, max_size)
    if ttl is not None:
        if not isinstance(ttl, (int, float)) or math.isnan(ttl) or ttl <= 0:
            raise SerializationError(f"ttl must be a positive number of seconds, not {ttl!r}")
        fields["l"] = max(1, int(ttl * 1000))  # from the entry id: the server's clock
    if dedup_key:
        fields["k"] = _key_text("dedup key", dedup_key)
    if routing_key:
        fields["e"] = _key_text("routing key", routing_key)
    if partition_key:
        fields["p"] = _key_text("partition key", partition_key)
    return fields


def _expiry_ms(message_id: str, fields: Mapping[bytes, Any]) -> int | None:
    """When an entry expires, in ms by the server's clock: its ``x``, else its id's time
    plus its ``l`` (None without a TTL)."""
    expires = fields.get(b"x")
    if expires is not None:
        return int(expires)
    ttl = fields.get(b"l")
    if ttl is None:
        return None
    return int(message_id.rpartition("/")[2].split("-", 1)[0]) + int(ttl)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def payload_data(message: Message) -> dict[str, Any]:
    """``message.data``, decoding ``message.payload`` when it was left undecoded ({} when
    it cannot be decoded)."""
    if message.data or not message.payload:
        return message.data
    try:
        data = json.loads(message.payload)
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def decode_entry(
    entry_id: bytes | str,
    raw: Mapping[bytes, bytes] | Mapping[str, str] | list[Any],
    delivery_count: int = 1,
    queue: str = "",
    *,
    parse: bool = True,
) -> Message:
    """Turn a stream entry into a :class:`Message`.

    ``raw`` is the entry's field map (or Redis's flat ``[k, v, k, v]`` list). Raises
    :class:`SerializationError` with a message starting ``malformed`` when the entry
    was not written by relaybus or is damaged. ``parse=False`` leaves the payload
    undecoded (``data`` empty, ``payload`` holds it): for a consumer that validates
    it straight from JSON into an event class (:func:`relaybus.events.event_from_json`).
    """
    mid = entry_id if isinstance(entry_id, str) else entry_id.decode("utf-8")
    try:
        if isinstance(raw, list):
            it = iter(raw)
            fields: dict[bytes, Any] = dict(zip(it, it, strict=False))
        else:
            fields = raw if isinstance(raw, dict) else dict(raw)  # type: ignore[assignment]
        if fields and not isinstance(next(iter(fields)), bytes):
            fields = {(k.encode() if isinstance(k, str) else k): v for k, v in fields.items()}
        payload = fields.get(b"d")
        if payload is None:
            raise SerializationError(f"malformed entry {mid}: no payload field 'd'")
        data = json.loads(payload) if parse else {}
        if not isinstance(data, dict):
            raise SerializationError(f"malformed entry {mid}: payload is not a JSON object")
        sent = fields.get(b"t")
        # without one: the entry id's time (a log entry's message id is "all/<entry id>")
        sent_ms = int(sent) if sent is not None else \
            int(mid.rpartition("/")[2].split("-", 1)[0])
        raw_headers = fields.get(b"h")
        headers = json.loads(raw_headers) if raw_headers is not None else {}
        raw_failures = fields.get(b"f")
        failures = json.loads(raw_failures) if raw_failures is not None else []
        if not isinstance(headers, dict) or not isinstance(failures, list):
            raise SerializationError(f"malformed entry {mid}: bad headers or failure list")
        expires_ms = _expiry_ms(mid, fields)
        key = fields.get(b"k")
        attempts = fields.get(b"n")
        return Message(mid, data, sent_ms / 1000, int(delivery_count),
                       {str(k): str(v) for k, v in headers.items()} if headers else {},
                       failures, expires_ms / 1000 if expires_ms is not None else None,
                       _text(key) if key is not None else None,
                       int(attempts) if attempts is not None else 0, queue, fields, payload)
    except SerializationError:
        raise
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        raise SerializationError(f"malformed entry {mid}: {exc}") from exc
