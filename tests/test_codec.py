"""The wire format of a stream entry (pure: no server)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaybus import Message, MessageTooLargeError, SerializationError
from relaybus.codec import DEFAULT_MAX_MESSAGE_SIZE, decode_entry, dumps, encode_entry

NOW = 1_700_000_000.123


def as_redis(fields: dict[str, str | int]) -> dict[bytes, bytes]:
    """The field map as redis-py returns it (bytes keys and values)."""
    return {k.encode(): str(v).encode() for k, v in fields.items()}


def test_encode_minimal_fields() -> None:
    fields = encode_entry({"a": 1}, now=NOW)
    assert fields == {"d": '{"a":1}', "t": 1_700_000_000_123}


def test_encode_optional_fields() -> None:
    fields = encode_entry({"a": 1}, now=NOW, headers={"trace": "x"}, ttl=2.5, dedup_key="ev-1")
    assert json.loads(str(fields["h"])) == {"trace": "x"}
    assert fields["l"] == 2_500 and "x" not in fields  # a duration: no client clock in it
    assert fields["k"] == "ev-1"
    assert "f" not in fields and "n" not in fields
    assert "h" not in encode_entry({"a": 1}, now=NOW, headers={})


def test_round_trip_exact() -> None:
    payload = {"str": "é ü 中", "int": -3, "big": 2**63, "float": 0.1, "bool": False,
               "none": None, "list": [1, [2, {"x": []}]], "obj": {}, "d": "field-like", "t": 9}
    fields = encode_entry(payload, now=NOW, headers={"h": "v"}, ttl=10, dedup_key="k1")
    msg = decode_entry(b"1700000000123-0", as_redis(fields), 3, "orders")
    assert isinstance(msg, Message)
    assert msg.data == payload and list(msg.data) == list(payload)
    assert msg.id == "1700000000123-0"
    assert msg.timestamp == pytest.approx(1_700_000_000.123)
    assert msg.delivery_count == 3
    assert msg.headers == {"h": "v"}
    assert msg.expires_at == pytest.approx(NOW + 10, abs=0.001)
    assert msg.dedup_key == "k1"
    assert msg.queue == "orders"
    assert msg.failures == [] and msg.reason is None
    assert msg.previous_attempts == 0 and msg.attempts == 3


def test_decode_flat_list_and_str_forms() -> None:
    fields = encode_entry({"a": 1}, now=NOW)
    flat: list[Any] = []
    for k, v in as_redis(fields).items():
        flat += [k, v]
    assert decode_entry("1-0", flat).data == {"a": 1}
    assert decode_entry("1-0", {k: str(v) for k, v in fields.items()}).data == {"a": 1}


def test_decode_without_t_uses_id_time() -> None:
    msg = decode_entry("1700000000500-3", {b"d": b"{}"})
    assert msg.timestamp == pytest.approx(1_700_000_000.5)
    assert msg.delivery_count == 1 and msg.headers == {}


def test_decode_failures_and_attempts() -> None:
    failures = [{"reason": "first", "timestamp": 1.0, "queue": "q"},
                {"reason": "second", "timestamp": 2.0, "queue": "q"}]
    msg = decode_entry("1-0", {"d": "{}", "f": json.dumps(failures), "n": "2"}, 1)
    assert msg.failures == failures
    assert msg.reason == "second"
    assert msg.previous_attempts == 2 and msg.attempts == 3


@given(st.dictionaries(
    st.text(),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text()
                 | st.floats(allow_nan=False, allow_infinity=False),
                 lambda children: st.lists(children) | st.dictionaries(st.text(), children),
                 max_leaves=10)))
def test_round_trip_any_json_object(payload: dict[str, Any]) -> None:
    fields = encode_entry(payload, now=NOW)
    assert decode_entry("1-0", as_redis(fields)).data == payload


# -- what cannot be sent ----------------------------------------------------------------


@pytest.mark.parametrize("payload", [
    {"s": {1, 2}}, {"nan": math.nan}, {"inf": math.inf}, {"ninf": -math.inf},
    {"o": object()}, {"b": b"x"}, {"nested": {"deep": [object()]}}, {(1, 2): "tuple key"},
])
def test_non_json_payload_raises_serialization_error(payload: dict[Any, Any]) -> None:
    with pytest.raises(SerializationError) as info:
        encode_entry(payload, now=NOW)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("payload", [[1, 2], "text", 3, None, b"{}"])
def test_payload_must_be_a_mapping(payload: Any) -> None:
    with pytest.raises(SerializationError, match="dict"):
        encode_entry(payload, now=NOW)


def test_circular_payload_raises_serialization_error() -> None:
    payload: dict[str, Any] = {}
    payload["self"] = payload
    with pytest.raises(SerializationError):
        encode_entry(payload, now=NOW)


@pytest.mark.parametrize("headers", [{"k": 1}, {1: "v"}, {"k": None}])
def test_headers_must_be_str_to_str(headers: dict[Any, Any]) -> None:
    with pytest.raises(SerializationError):
        encode_entry({"a": 1}, now=NOW, headers=headers)


@pytest.mark.parametrize("ttl", [0, -1, math.nan, "5"])
def test_ttl_must_be_positive_number(ttl: Any) -> None:
    with pytest.raises(SerializationError):
        encode_entry({"a": 1}, now=NOW, ttl=ttl)


def test_dumps_is_compact_and_keeps_unicode() -> None:
    assert dumps({"a": [1, 2], "é": "ü"}) == '{"a":[1,2],"é":"ü"}'
    with pytest.raises(SerializationError):
        dumps({"x": math.nan})


# -- size limit --------------------------------------------------------------------------


def test_default_limit_is_one_mib() -> None:
    assert DEFAULT_MAX_MESSAGE_SIZE == 1024 * 1024
    overhead = len('{"x":""}')
    encode_entry({"x": "a" * (DEFAULT_MAX_MESSAGE_SIZE - overhead)}, now=NOW)
    with pytest.raises(MessageTooLargeError):
        encode_entry({"x": "a" * (DEFAULT_MAX_MESSAGE_SIZE - overhead + 1)}, now=NOW)


def test_limit_boundary_and_attributes() -> None:
    overhead = len('{"x":""}')
    encode_entry({"x": "a" * (100 - overhead)}, now=NOW, max_size=100)  # exactly the limit
    with pytest.raises(MessageTooLargeError) as info:
        encode_entry({"x": "a" * (101 - overhead)}, now=NOW, max_size=100)
    assert (info.value.size, info.value.limit) == (101, 100)
    assert isinstance(info.value, SerializationError)
    assert "101" in str(info.value) and "100" in str(info.value)


def test_headers_count_toward_the_limit() -> None:
    overhead = len('{"x":""}')
    body = {"x": "a" * (100 - overhead)}  # the payload alone is exactly the limit
    encode_entry(body, now=NOW, max_size=100)
    with pytest.raises(MessageTooLargeError) as info:
        encode_entry(body, now=NOW, max_size=100, headers={"trace": "t"})
    assert info.value.size == 100 + len('{"trace":"t"}')


def test_limit_counts_utf8_bytes() -> None:
    overhead = len('{"x":""}')
    with pytest.raises(MessageTooLargeError) as info:
        encode_entry({"x": "é" * 50}, now=NOW, max_size=overhead + 99)  # 100 bytes of é
    assert info.value.size == overhead + 100


# -- entries relaybus cannot decode -----------------------------------------------------


@pytest.mark.parametrize("raw", [
    {b"payload": b"no d"},
    {b"d": b"{not json"},
    {b"d": b""},
    {b"d": b"[1, 2]"},
    {b"d": b'"a string"'},
    {b"d": b"null"},
    {b"d": b"\xff\xfe"},
    {b"d": b"{}", b"t": b"yesterday"},
    {b"d": b"{}", b"h": b"[1]"},
    {b"d": b"{}", b"h": b"{bad"},
    {b"d": b"{}", b"f": b"not json"},
    {b"d": b"{}", b"f": b'{"not": "a list"}'},
    {b"d": b"{}", b"x": b"never"},
    {b"d": b"{}", b"n": b"many"},
    {},
])
def test_malformed_entries_raise_with_malformed_reason(raw: dict[bytes, bytes]) -> None:
    with pytest.raises(SerializationError) as info:
        decode_entry(b"5-0", raw)
    assert str(info.value).startswith("malformed entry 5-0")


# -- Message helpers ---------------------------------------------------------------------


def test_message_expiry() -> None:
    """The time to live counts from the entry id (the server's clock when it appended
    the entry), whatever the sender's clock said; a moved entry carries ``x``."""
    appended = 1_800_000_000.0  # the server's time, far from the sender's NOW
    entry_id = f"{int(appended * 1000)}-0"
    msg = decode_entry(entry_id, as_redis(encode_entry({"a": 1}, now=NOW, ttl=1)))
    assert msg.expires_at == pytest.approx(appended + 1)
    assert not msg.is_expired(appended + 0.5)
    assert msg.is_expired(appended + 1.0)
    assert decode_entry(f"all/{entry_id}", {"d": "{}", "l": "1000"}).expires_at == \
        pytest.approx(appended + 1)
    assert decode_entry("1-0", {"d": "{}", "x": "5000"}).expires_at == 5.0
    assert not decode_entry("1-0", {"d": "{}"}).is_expired(1e12)
