"""Tests for relaybus.events: the registry, validation and (de)serialisation (no Redis)."""

from __future__ import annotations

import datetime
import decimal
import json
import uuid
from collections.abc import Mapping
from enum import Enum
from typing import Annotated, Any, Literal

import pydantic
import pytest

from relaybus.errors import (
    DuplicateEventTypeError,
    EventError,
    EventValidationError,
    SerializationError,
    UnknownEventTypeError,
)
from relaybus.events import (
    EVENT_TYPES,
    Event,
    deserialize_event,
    deserialize_event_strict,
    event_json,
    event_type_name,
    resolve_event_type,
    serialize_event,
)


def unique(label: str) -> str:
    """A type name no other test uses (the registry is process-global)."""
    return f"test.{label}.{uuid.uuid4().hex}"


class Item(pydantic.BaseModel):
    sku: str
    quantity: int = 1


class Address(pydantic.BaseModel):
    street: str
    city: str


class Status(str, Enum):
    NEW = "new"
    PAID = "paid"


ORDER_TYPE = unique("order")


class OrderPlaced(Event, event_type=ORDER_TYPE):
    order_id: str
    total: float
    items: list[Item] = []
    shipping: Address | None = None
    tags: dict[str, int] = {}
    status: Status = Status.NEW


def make_order(**overrides: Any) -> OrderPlaced:
    fields: dict[str, Any] = {
        "order_id": "o-1",
        "total": 12.5,
        "items": [Item(sku="a", quantity=2), Item(sku="b")],
        "shipping": Address(street="1 Main St", city="Springfield"),
        "tags": {"priority": 3},
        "status": Status.PAID,
    }
    fields.update(overrides)
    return OrderPlaced(**fields)


# --- class definition and registry -------------------------------------------------


def test_class_keyword_sets_type_and_registers() -> None:
    assert OrderPlaced.type_name() == ORDER_TYPE
    assert EVENT_TYPES[ORDER_TYPE] is OrderPlaced
    assert resolve_event_type(ORDER_TYPE) is OrderPlaced
    assert make_order().event_type == ORDER_TYPE


def test_default_type_name_is_class_name() -> None:
    class DefaultNamedEventForEventsTest(Event):
        value: int

    assert DefaultNamedEventForEventsTest.type_name() == "DefaultNamedEventForEventsTest"
    assert EVENT_TYPES["DefaultNamedEventForEventsTest"] is DefaultNamedEventForEventsTest
    assert DefaultNamedEventForEventsTest(value=1).event_type == "DefaultNamedEventForEventsTest"


def test_subclass_of_concrete_event_gets_its_own_type() -> None:
    name = unique("v2")

    class OrderPlacedV2(OrderPlaced, event_type=name):
        coupon: str | None = None

    assert OrderPlaced.type_name() == ORDER_TYPE
    assert OrderPlacedV2.type_name() == name
    assert EVENT_TYPES[ORDER_TYPE] is OrderPlaced
    assert EVENT_TYPES[name] is OrderPlacedV2
    event = OrderPlacedV2(order_id="x", total=1.0, coupon="C")
    assert event.event_type == name
    assert deserialize_event(event.to_dict()) == event


def test_duplicate_type_raises_at_definition() -> None:
    name = unique("dup")

    class First(Event, event_type=name):
        pass

    with pytest.raises(DuplicateEventTypeError, match="already registered") as info:

        class Second(Event, event_type=name):
            pass

    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, EventError)
    assert EVENT_TYPES[name] is First


def test_redefining_the_same_class_replaces_it() -> None:
    name = unique("reload")
    defined = []
    for _ in range(2):  # same module and qualname, as when a module is reloaded

        class Reloaded(Event, event_type=name):
            value: int = 0

        defined.append(Reloaded)

    assert defined[0] is not defined[1]
    assert EVENT_TYPES[name] is defined[1]


def test_event_itself_is_abstract_and_unregistered() -> None:
    assert Event not in EVENT_TYPES.values()
    assert "Event" not in EVENT_TYPES
    with pytest.raises(pydantic.ValidationError, match="abstract"):
        Event()
    with pytest.raises(TypeError):
        Event.type_name()


def test_abstract_base_is_not_registered() -> None:
    name = unique("concrete")

    class AbstractOrderBase(Event, abstract=True):
        order_id: str

    class Concrete(AbstractOrderBase, event_type=name):
        pass

    assert AbstractOrderBase not in EVENT_TYPES.values()
    assert "AbstractOrderBase" not in EVENT_TYPES
    assert EVENT_TYPES[name] is Concrete
    with pytest.raises(pydantic.ValidationError, match="abstract"):
        AbstractOrderBase(order_id="x")
    with pytest.raises(TypeError):
        AbstractOrderBase.type_name()
    event = Concrete(order_id="x")
    assert event.order_id == "x"
    assert isinstance(event, AbstractOrderBase)


def test_bad_class_keywords_are_rejected() -> None:
    with pytest.raises(TypeError):

        class AbstractWithType(Event, abstract=True, event_type=unique("bad")):
            pass

    with pytest.raises(TypeError):

        class EmptyType(Event, event_type=""):
            pass

    assert "" not in EVENT_TYPES


def test_event_types_is_read_only() -> None:
    with pytest.raises(TypeError):
        EVENT_TYPES["x"] = OrderPlaced  # type: ignore[index]
    with pytest.raises(TypeError):
        del EVENT_TYPES[ORDER_TYPE]  # type: ignore[attr-defined]
    assert isinstance(EVENT_TYPES, Mapping)


def test_event_types_is_live() -> None:
    view = EVENT_TYPES
    name = unique("late")
    assert name not in view

    class Late(Event, event_type=name):
        pass

    assert view[name] is Late


# --- fields and validation -----------------------------------------------------------


def test_default_fields() -> None:
    first = make_order()
    second = make_order()
    assert uuid.UUID(first.event_id).version == 4
    assert first.event_id != second.event_id
    assert isinstance(first.timestamp, float) and first.timestamp > 1_600_000_000
    assert first.correlation_id is None and first.causation_id is None
    assert first.headers == {}
    first.headers["k"] = "v"
    assert second.headers == {}  # not a shared default


def test_extra_fields_are_rejected() -> None:
    with pytest.raises(pydantic.ValidationError, match="ordr_id"):
        OrderPlaced(order_id="x", total=1.0, ordr_id="typo")  # type: ignore[call-arg]


def test_matching_event_type_is_accepted_and_mismatch_rejected() -> None:
    assert OrderPlaced(order_id="x", total=1.0, event_type=ORDER_TYPE).event_type == ORDER_TYPE
    with pytest.raises(pydantic.ValidationError, match="does not match") as info:
        OrderPlaced(order_id="x", total=1.0, event_type="something.else")
    assert info.value.errors()[0]["loc"] == ("event_type",)


def test_event_type_cannot_be_reassigned_but_payload_can() -> None:
    event = make_order()
    with pytest.raises(pydantic.ValidationError):
        event.event_type = "other"
    event.total = 99.0
    assert event.total == 99.0


def test_model_construct_fills_event_type() -> None:
    event = OrderPlaced.model_construct(order_id="x", total=1.0)
    assert event.event_type == ORDER_TYPE
    assert serialize_event(event)["event_type"] == ORDER_TYPE


# --- serialisation -------------------------------------------------------------------


def test_round_trip_with_nested_models() -> None:
    event = make_order(correlation_id="c-1", causation_id="e-0", headers={"trace": "t"})
    data = serialize_event(event)
    assert data == event.to_dict()
    assert data["event_type"] == ORDER_TYPE
    assert data["items"] == [{"sku": "a", "quantity": 2}, {"sku": "b", "quantity": 1}]
    assert data["shipping"] == {"street": "1 Main St", "city": "Springfield"}
    assert data["status"] == "paid"

    wire = json.loads(json.dumps(data))  # JSON-compatible
    for decoded in (
        deserialize_event(wire),
        deserialize_event_strict(wire),
        Event.from_dict(wire),
        OrderPlaced.from_dict(wire),
    ):
        assert type(decoded) is OrderPlaced
        assert decoded == event
        assert decoded.items[0] == Item(sku="a", quantity=2)
        assert decoded.status is Status.PAID


def test_serialize_unrepresentable_value_raises_serialization_error() -> None:
    class Opaque:
        pass

    class Blob(Event, event_type=unique("blob")):
        model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
        payload: Opaque

    with pytest.raises(SerializationError):
        serialize_event(Blob(payload=Opaque()))


# --- event_json: the publish path's encoding ----------------------------------------


class Flat(Event, event_type=unique("flat")):
    when: datetime.datetime
    ref: uuid.UUID
    price: decimal.Decimal
    status: Status
    ratios: list[float]
    counts: dict[str, int] = {}
    pair: tuple[int, str] = (1, "a")
    maybe: int | None = None
    kind: Literal["a", "b"] = "a"


class Flat2(Event, event_type=unique("flat2"), version=2):
    n: int


def test_event_json_is_the_document_serialize_event_gives() -> None:
    flat = Flat(when=datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
                ref=uuid.uuid4(), price=decimal.Decimal("1.10"), status=Status.PAID,
                ratios=[0.1, 1e16, -2.5e-7], counts={"é": 1}, headers={"h": "ü"})
    read_back = Flat2.from_dict({**serialize_event(Flat2(n=1)), "newer": [1, {"x": None}]})
    for event in (flat, Flat2(n=3), read_back):
        text = event_json(event)
        assert text is not None and json.loads(text) == serialize_event(event)
    assert json.loads(event_json(read_back) or "")["newer"] == [1, {"x": None}]
    assert json.loads(event_json(Flat2(n=3)) or "")["event_version"] == 2


class WithModel(Event, event_type=unique("with_model")):
    item: Item


class WithAny(Event, event_type=unique("with_any")):
    anything: Any = None


class WithSerializer(Event, event_type=unique("with_serializer")):
    value: Annotated[float, pydantic.PlainSerializer(lambda v: v * 2, return_type=float)]


class Plain(Event, event_type=unique("plain")):
    label: str = ""
    value: float = 0.0


class NullInfNan(Event, event_type=unique("null_inf_nan")):
    model_config = pydantic.ConfigDict(ser_json_inf_nan="null")
    value: float = 0.0


def test_event_json_leaves_to_the_dict_path_what_it_cannot_vouch_for() -> None:
    # classes whose text may hide a NaN as null (a nested model's own config, Any, a
    # custom serializer, the config changed), and values JSON cannot carry
    for event in (WithModel(item=Item(sku="a")), WithAny(anything=Item(sku="b")),
                  WithSerializer(value=1.0), NullInfNan(),
                  Plain(value=float("nan")), Plain(value=-float("inf")),
                  Plain(label="Infinity")):  # maybe a number: the dict path decides
        assert event_json(event) is None, event
    assert event_json(Plain(label="finite", value=1.5)) is not None


def test_deserialize_returns_none_for_unknown_or_missing_type() -> None:
    assert deserialize_event({"event_type": unique("nobody"), "x": 1}) is None
    assert deserialize_event({"order_id": "x"}) is None
    assert deserialize_event({"event_type": 5}) is None


def test_deserialize_raises_for_invalid_data_of_known_type() -> None:
    with pytest.raises(EventValidationError):
        deserialize_event({"event_type": ORDER_TYPE, "order_id": "x"})


def test_strict_unknown_and_missing_type() -> None:
    name = unique("nobody")
    with pytest.raises(UnknownEventTypeError) as info:
        deserialize_event_strict({"event_type": name})
    assert info.value.event_type == name
    assert isinstance(info.value, LookupError)

    with pytest.raises(UnknownEventTypeError) as info:
        deserialize_event_strict({"order_id": "x"})
    assert info.value.event_type == ""


def test_strict_validation_error_names_type_and_fields() -> None:
    data = {
        "event_type": ORDER_TYPE,
        "total": "not a number",
        "items": [{"sku": "a"}, {"quantity": 2}],
        "surprise": True,
    }
    with pytest.raises(EventValidationError) as tolerant:
        deserialize_event_strict(data)  # a reader ignores the unknown field
    assert {tuple(e["loc"]) for e in tolerant.value.errors} == {
        ("order_id",), ("total",), ("items", 1, "sku")}
    with pytest.raises(EventValidationError) as info:
        deserialize_event_strict(data, tolerant=False)
    error = info.value
    assert isinstance(error, ValueError)
    assert error.event_type == ORDER_TYPE
    locs = {tuple(e["loc"]) for e in error.errors}
    assert locs == {("order_id",), ("total",), ("items", 1, "sku"), ("surprise",)}
    message = str(error)
    assert ORDER_TYPE in message
    for path in ("order_id", "total", "items.1.sku", "surprise"):
        assert path in message
    assert isinstance(error.__cause__, pydantic.ValidationError)


def test_non_mapping_input_is_a_serialization_error() -> None:
    for bad in (["event_type", ORDER_TYPE], "text", None, 42):
        with pytest.raises(SerializationError):
            deserialize_event_strict(bad)  # type: ignore[arg-type]
        with pytest.raises(SerializationError):
            deserialize_event(bad)  # type: ignore[arg-type]
        with pytest.raises(SerializationError):
            Event.from_dict(bad)  # type: ignore[arg-type]
        with pytest.raises(SerializationError):
            OrderPlaced.from_dict(bad)  # type: ignore[arg-type]


# --- from_dict -----------------------------------------------------------------------


def test_from_dict_on_event_dispatches_strictly() -> None:
    with pytest.raises(UnknownEventTypeError):
        Event.from_dict({"event_type": unique("nobody")})
    with pytest.raises(EventValidationError):
        Event.from_dict({"event_type": ORDER_TYPE})


def test_from_dict_on_subclass_validates_as_that_subclass() -> None:
    event = OrderPlaced.from_dict({"order_id": "x", "total": 2})  # event_type may be omitted
    assert type(event) is OrderPlaced
    assert event.event_type == ORDER_TYPE

    other = unique("other")

    class Other(Event, event_type=other):
        pass

    with pytest.raises(EventValidationError, match="event_type") as info:
        OrderPlaced.from_dict({"event_type": other, "order_id": "x", "total": 2})
    assert info.value.event_type == ORDER_TYPE
    with pytest.raises(EventValidationError, match="total"):
        OrderPlaced.from_dict({"order_id": "x"})


def test_from_dict_on_abstract_base_requires_a_member_of_the_family() -> None:
    member, outsider = unique("member"), unique("outsider")

    class Family(Event, abstract=True):
        pass

    class Member(Family, event_type=member):
        pass

    class Outsider(Event, event_type=outsider):
        pass

    assert type(Family.from_dict({"event_type": member})) is Member
    with pytest.raises(EventValidationError, match="is not a Family"):
        Family.from_dict(Outsider().to_dict())


# --- helpers ---------------------------------------------------------------------------


def test_event_type_name() -> None:
    assert event_type_name(OrderPlaced) == ORDER_TYPE
    assert event_type_name("any.name") == "any.name"

    class Abstract(Event, abstract=True):
        pass

    for bad in (Event, Abstract, Item, 42, None, make_order()):
        with pytest.raises(TypeError):
            event_type_name(bad)  # type: ignore[arg-type]


def test_resolve_event_type_unknown() -> None:
    assert resolve_event_type(unique("nobody")) is None
