"""Schema evolution: tolerant readers, versions and upcasters, schemas out, the check.

The service tests run real Microservices against the session's server (``redis_url``)
under their own prefix; older and newer producers are played by ``publish_raw`` with
the payload they would write.
"""

from __future__ import annotations

import copy
import json
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pydantic
import pytest
from typer.testing import CliRunner

from relaybus import Event, EventBus, Microservice
from relaybus.cli import app
from relaybus.errors import EventValidationError
from relaybus.events import (
    NewerEventVersionError,
    deserialize_event_strict,
    event_from_json,
    serialize_event,
)
from relaybus.schema import (
    DIALECT,
    SchemaChange,
    asyncapi_document,
    compare_schemas,
    event_schema,
    event_schemas_of,
    schemas_document,
    service_spec,
)
from waiting import wait_for

# -- the events of these tests ----------------------------------------------------------


class Line(pydantic.BaseModel):
    sku: str
    quantity: int = 1


class Order(Event, event_type="test.schema.order", version=3):
    """An order, at version 3: ``buyer`` became ``customer`` (v2), ``total`` in
    currency units became ``total_cents`` (v3)."""

    order_id: str
    customer: str
    total_cents: int
    lines: list[Line] = []


@Order.upcaster(from_version=1)
def _order_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    data["customer"] = data.pop("buyer")
    return data


@Order.upcaster(from_version=2)
def _order_v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    data["total_cents"] = round(data.pop("total") * 100)
    return data


class Note(Event, event_type="test.schema.note"):
    """A version 1 event of a consumer that has not seen the producer's new fields."""

    text: str


class StrictNote(Event, event_type="test.schema.strict-note", extra="forbid"):
    """A class that opted into refusing unknown fields on read too."""

    text: str


class Gappy(Event, event_type="test.schema.gappy", version=3):
    """Version 3 with an upcaster from 2 only: version 1 payloads cannot be read."""

    n: int = 0


@Gappy.upcaster(from_version=2)
def _gappy_v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    return data


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def bus(redis_url: str, prefix: str) -> Iterator[EventBus]:
    b = EventBus(redis_url, prefix=prefix)
    yield b
    b.close()


@pytest.fixture
def make(redis_url: str, prefix: str) -> Iterator[Callable[..., Microservice]]:
    made: list[Microservice] = []

    def factory(name: str, **options: Any) -> Microservice:
        svc = Microservice(name, url=redis_url, prefix=prefix, maintenance=False,
                           block_for_seconds=0.2, shutdown_timeout=5.0, **options)
        made.append(svc)
        return svc

    yield factory
    for svc in made:
        svc.close()


def reasons(svc: Microservice) -> list[str]:
    return [m.reason for m in svc.subscription_dlq.peek(100)]


# -- through a real service -------------------------------------------------------------


def test_a_v3_consumer_handles_v1_and_v2_events_as_v3(make: Callable[..., Microservice],
                                                      bus: EventBus) -> None:
    got: list[Order] = []
    svc = make("orders")
    svc.on(Order)(got.append)
    svc.start()
    # what a producer on the v1 class wrote: no event_version, the old field names
    bus.publish_raw(Order.type_name(), {"order_id": "o-1", "buyer": "ann", "total": 9.5})
    bus.publish_raw(Order.type_name(), {"order_id": "o-2", "customer": "bob", "total": 1.25,
                                        "event_version": 2})
    bus.publish(Order(order_id="o-3", customer="cy", total_cents=7))
    wait_for(lambda: len(got) == 3, what="three orders handled")
    by_id = {e.order_id: e for e in got}
    assert all(type(e) is Order and e.event_version == 3 for e in got)
    assert (by_id["o-1"].customer, by_id["o-1"].total_cents) == ("ann", 950)
    assert (by_id["o-2"].customer, by_id["o-2"].total_cents) == ("bob", 125)
    assert by_id["o-3"].total_cents == 7
    assert svc.stats["invalid"] == 0 and reasons(svc) == []


def test_an_old_consumer_tolerates_a_new_field_and_keeps_it(
        make: Callable[..., Microservice], bus: EventBus) -> None:
    got: list[Note] = []
    svc = make("notes")
    svc.on(Note)(got.append)
    svc.start()
    bus.publish_raw(Note.type_name(), {"text": "hi", "priority": 2, "tags": ["a"]})
    wait_for(lambda: got, what="the note handled")
    (note,) = got
    assert note.text == "hi"
    assert note.model_extra == {"priority": 2, "tags": ["a"]}
    # a forwarder re-publishes what it did not understand too
    data = serialize_event(note)
    assert data["priority"] == 2 and data["tags"] == ["a"]
    assert event_from_json(json.dumps(data)).model_extra == {"priority": 2, "tags": ["a"]}


def test_a_strict_class_still_dead_letters_an_unknown_field(
        make: Callable[..., Microservice], bus: EventBus) -> None:
    got: list[StrictNote] = []
    svc = make("strict-notes")
    svc.on(StrictNote)(got.append)
    svc.start()
    bus.publish_raw(StrictNote.type_name(), {"text": "hi", "priority": 2})
    bus.publish(StrictNote(text="ok"))
    wait_for(lambda: got and reasons(svc), what="one handled, one dead-lettered")
    assert [n.text for n in got] == ["ok"]
    (reason,) = reasons(svc)
    assert reason.startswith(f"invalid {StrictNote.type_name()!r} event")
    assert "priority: Extra inputs are not permitted" in reason


def test_a_newer_version_is_read_when_it_validates_else_dead_lettered_naming_both(
        make: Callable[..., Microservice], bus: EventBus) -> None:
    got: list[Order] = []
    svc = make("orders-v3")
    svc.on(Order)(got.append)
    svc.start()
    bus.publish_raw(Order.type_name(), {"order_id": "new-ok", "customer": "ann",
                                        "total_cents": 5, "currency": "EUR",
                                        "event_version": 4})
    bus.publish_raw(Order.type_name(), {"order_id": "new-bad", "buyer_ref": 7,
                                        "total_cents": 5, "event_version": 4})
    wait_for(lambda: got and reasons(svc), what="one handled, one dead-lettered")
    (event,) = got
    assert event.order_id == "new-ok" and event.event_version == 4
    assert event.model_extra == {"currency": "EUR"}
    assert serialize_event(event)["event_version"] == 4  # forwarded as it came
    (reason,) = reasons(svc)
    assert reason.startswith(f"{Order.type_name()} version 4 is newer than this consumer's "
                             "version 3 and does not validate: ")
    assert "customer: Field required" in reason
    (failure,) = svc.subscription_dlq.peek(1)[0].failures
    assert failure["error_type"] == "NewerEventVersionError"


# -- reading and producing (no server) --------------------------------------------------


def test_version_1_payloads_are_unchanged_and_later_ones_carry_their_version() -> None:
    note = serialize_event(Note(text="x"))
    assert "event_version" not in note  # what a v1 consumer of an older relaybus reads
    assert Note(text="x").event_version == 1 and Note.type_version() == 1
    order = Order(order_id="o", customer="c", total_cents=1)
    assert order.event_version == 3 and serialize_event(order)["event_version"] == 3
    assert "event_version" not in order.model_dump()
    assert Order.model_validate(serialize_event(order)) == order  # a round trip
    assert Order.model_construct(order_id="o").event_version == 3


def test_producers_stay_strict() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        Note(text="x", txt="typo")  # type: ignore[call-arg]
    assert [(e["type"], e["loc"]) for e in info.value.errors()] == [
        ("extra_forbidden", ("txt",))]
    with pytest.raises(pydantic.ValidationError, match="extra_forbidden|Extra inputs"):
        Note.model_validate({"text": "x", "txt": "typo"})
    note = Note(text="x")
    with pytest.raises(ValueError, match='no field "txt"'):
        note.txt = "typo"  # type: ignore[attr-defined]
    with pytest.raises(pydantic.ValidationError, match="does not match Order"):
        Order(order_id="o", customer="c", total_cents=1, event_version=2)
    with pytest.raises(pydantic.ValidationError):
        note.event_version = 2  # type: ignore[misc]
    # a reader asked not to tolerate reports the unknown field with the others
    with pytest.raises(EventValidationError) as read:
        deserialize_event_strict({"event_type": Note.type_name(), "txt": "x"}, tolerant=False)
    assert {e["loc"] for e in read.value.errors} == {("text",), ("txt",)}


def test_the_upcaster_chain_and_its_errors() -> None:
    v1 = {"event_type": Order.type_name(), "order_id": "o", "buyer": "b", "total": 2.5}
    order = deserialize_event_strict(v1)
    assert isinstance(order, Order) and (order.customer, order.total_cents) == ("b", 250)
    assert v1["buyer"] == "b"  # the upcasters had a copy
    assert Order.readable_versions() == [1, 2, 3] and Gappy.readable_versions() == [2, 3]
    assert Gappy.from_dict({"n": 1, "event_version": 2}).n == 1
    with pytest.raises(EventValidationError) as gap:
        event_from_json(json.dumps({"event_type": Gappy.type_name(), "n": 1}),
                        Gappy.type_name())
    assert "version 1 cannot be read as version 3: no upcaster from version 1" in str(gap.value)
    assert gap.value.errors[0]["loc"] == ("event_version",)
    broken = {"event_type": Order.type_name(), "order_id": "o", "total": 1.0}  # no buyer
    with pytest.raises(EventValidationError, match="upcaster of .* from version 1 failed: "
                                                   "KeyError"):
        deserialize_event_strict(broken)
    with pytest.raises(ValueError, match="already has an upcaster from version 1"):
        Order.upcaster(from_version=1)(lambda d: d)
    with pytest.raises(ValueError, match=r"a version in 1\.\.2, not 3"):
        Order.upcaster(from_version=3)
    with pytest.raises(ValueError):
        Note.upcaster(from_version=1)
    with pytest.raises(TypeError, match="version"):
        type("Bad", (Event,), {}, event_type=f"test.schema.{uuid.uuid4().hex}", version=0)


def test_a_newer_version_that_does_not_validate_names_both_versions() -> None:
    payload = {"event_type": Order.type_name(), "order_id": "o", "event_version": 5}
    for read in (lambda: deserialize_event_strict(payload),
                 lambda: event_from_json(json.dumps(payload), Order.type_name())):
        with pytest.raises(NewerEventVersionError) as info:
            read()
        assert (info.value.version, info.value.known_version) == (5, 3)
        assert str(info.value).startswith(
            f"{Order.type_name()} version 5 is newer than this consumer's version 3")


# -- schemas out ------------------------------------------------------------------------


def examples() -> list[Event]:
    return [Order(order_id="o", customer="c", total_cents=1, lines=[Line(sku="a")]),
            Note(text="x"), StrictNote(text="y"), Gappy(n=2)]


def test_each_json_schema_is_valid_and_validates_real_events() -> None:
    for event in examples():
        schema = event_schema(type(event))
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == DIALECT
        assert schema["x-relaybus-event-type"] == event.type_name()
        assert schema["x-relaybus-version"] == type(event).type_version()
        validator = jsonschema.Draft202012Validator(schema)
        validator.validate(serialize_event(event))
        wrong_type = {**serialize_event(event), "event_type": "other"}
        assert not validator.is_valid(wrong_type)
    order = jsonschema.Draft202012Validator(event_schema(Order))
    assert not order.is_valid({**serialize_event(examples()[0]), "lines": [{"quantity": 2}]})
    no_version = serialize_event(examples()[0])
    del no_version["event_version"]
    assert not order.is_valid(no_version)  # a v3 payload says so
    assert event_schema(Order)["x-relaybus-reads"] == [1, 2, 3]
    strict = jsonschema.Draft202012Validator(event_schema(StrictNote))
    assert not strict.is_valid({**serialize_event(StrictNote(text="y")), "more": 1})
    assert jsonschema.Draft202012Validator(event_schema(Note)).is_valid(
        {**serialize_event(Note(text="x")), "more": 1})  # tolerant


def test_the_document_is_one_schema_for_every_event() -> None:
    doc = schemas_document([Order, Note, StrictNote])
    jsonschema.Draft202012Validator.check_schema(doc)
    assert sorted(doc["$defs"]) == sorted([Order.type_name(), Note.type_name(),
                                           StrictNote.type_name()])
    validator = jsonschema.Draft202012Validator(doc)
    for event in examples()[:3]:
        validator.validate(serialize_event(event))
    assert not validator.is_valid(serialize_event(Gappy()))
    assert event_schemas_of(doc) == doc["$defs"]


def test_the_asyncapi_document(redis_url: str) -> None:
    billing = Microservice("billing", url=redis_url)
    billing.on(Order)(lambda e: None)
    audit = Microservice("audit", url=redis_url)
    audit.on("*")(lambda e: None)
    try:
        doc = asyncapi_document([Order, Note], [service_spec(billing), service_spec(audit)],
                                title="shop", version="1.0", prefix="shop:")
    finally:
        billing.close()
        audit.close()
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"] == {"title": "shop", "version": "1.0",
                           "description": doc["info"]["description"]}
    messages = doc["components"]["messages"]
    assert {m["name"]: m["x-relaybus-version"] for m in messages.values()} == {
        Order.type_name(): 3, Note.type_name(): 1}
    for message in messages.values():
        payload = message["payload"]
        assert payload["schemaFormat"] == "application/schema+json;version=draft-2020-12"
        jsonschema.Draft202012Validator.check_schema(payload["schema"])
    channels = doc["channels"]
    assert channels["eventLog"]["address"] == "all"
    assert channels["eventLog"]["x-relaybus-stream"] == "shop:{all}"
    assert channels["sub_billing"]["address"] == "sub:billing"
    operations = doc["operations"]
    assert {op["action"] for op in operations.values()} == {"send", "receive"}

    def resolve(ref: str) -> Any:
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node

    receives = {}
    for op in operations.values():
        channel = op["channel"]["$ref"]
        resolve(channel)
        for m in op["messages"]:  # a message of the operation's own channel
            assert m["$ref"].startswith(channel + "/messages/")
            assert resolve(resolve(m["$ref"])["$ref"]) in messages.values()
        if op["action"] == "receive":
            receives[op["x-relaybus-service"]] = [resolve(resolve(m["$ref"])["$ref"])["name"]
                                                  for m in op["messages"]]
    assert receives == {"billing": [Order.type_name()],
                        "audit": sorted([Order.type_name(), Note.type_name()])}
    assert event_schemas_of(doc) == {Order.type_name(): event_schema(Order),
                                     Note.type_name(): event_schema(Note)}


# -- the compatibility check ------------------------------------------------------------


def kinds(changes: list[SchemaChange]) -> set[tuple[str, str, bool]]:
    return {(c.field, c.kind, c.breaking) for c in changes}


def test_compare_schemas_finds_breaking_and_compatible_changes() -> None:
    saved = schemas_document([Order, Note])
    assert compare_schemas(saved, schemas_document([Order, Note])) == []

    def edited(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        doc = copy.deepcopy(saved)
        edit(doc["$defs"][Note.type_name()])
        return doc

    def add_required(s: dict[str, Any]) -> None:
        s["properties"]["author"] = {"type": "string"}
        s["required"].append("author")

    def add_optional(s: dict[str, Any]) -> None:
        s["properties"]["mood"] = {"type": "string", "default": "ok"}

    def remove(s: dict[str, Any]) -> None:
        del s["properties"]["text"]

    def retype(s: dict[str, Any]) -> None:
        s["properties"]["text"] = {"type": "integer"}

    def lower(s: dict[str, Any]) -> None:
        s["x-relaybus-version"] = 0

    assert kinds(compare_schemas(saved, edited(add_required))) == {
        ("author", "required_field_added", True)}
    assert kinds(compare_schemas(saved, edited(add_optional))) == {
        ("mood", "optional_field_added", False)}
    assert kinds(compare_schemas(saved, edited(remove))) == {("text", "field_removed", True)}
    (retyped,) = compare_schemas(saved, edited(retype))
    assert (retyped.kind, retyped.breaking) == ("field_retyped", True)
    assert "string -> integer" in retyped.message
    assert kinds(compare_schemas(saved, edited(lower))) == {("", "version_lowered", True)}
    # the other way round: a newer saved version
    assert kinds(compare_schemas(edited(lower), saved)) == {("", "version_raised", False)}
    assert kinds(compare_schemas(schemas_document([Order]), saved)) == {
        ("", "type_added", False)}
    assert kinds(compare_schemas(saved, schemas_document([Order]))) == {
        ("", "type_removed", True)}
    # nested models are compared field by field
    nested = copy.deepcopy(saved)
    order = nested["$defs"][Order.type_name()]
    order["$defs"]["Line"]["properties"]["quantity"] = {"type": "string"}
    assert kinds(compare_schemas(saved, nested)) == {
        ("lines[].quantity", "field_retyped", True)}
    # AsyncAPI documents compare too
    assert compare_schemas(asyncapi_document([Order, Note]), saved) == []


def test_a_required_field_is_compatible_when_an_upcaster_reads_the_old_version() -> None:
    old = schemas_document([Order])
    schema = old["$defs"][Order.type_name()]
    del schema["properties"]["total_cents"]
    schema["required"].remove("total_cents")
    schema["x-relaybus-version"] = 2
    changes = compare_schemas(old, schemas_document([Order]))  # v3: upcast from v2
    assert kinds(changes) == {("", "version_raised", False),
                              ("total_cents", "required_field_added", False)}
    assert "version 2 events are upcast" in changes[1].message
    schema["x-relaybus-version"] = 3  # the same version: old events are not upcast
    assert ("total_cents", "required_field_added", True) in kinds(
        compare_schemas(old, schemas_document([Order])))


# -- the CLI ----------------------------------------------------------------------------


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable app module (from the working directory) with events and services."""
    name = f"schema_app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "from relaybus import Microservice\n"
        "from test_schema import Note, Order\n"
        "__version__ = '2.1'\n"
        "shipping = Microservice('shipping', url='redis://127.0.0.1:1')\n"
        "shipping.on(Order)(lambda e: None)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_schema_command_prints_the_json_schemas(app_module: str) -> None:
    result = invoke("schema", "--app", app_module)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(doc)
    order = doc["$defs"][Order.type_name()]
    assert order["x-relaybus-version"] == 3
    jsonschema.Draft202012Validator(doc).validate(serialize_event(examples()[0]))


def test_schema_command_prints_the_asyncapi_document(app_module: str) -> None:
    result = invoke("schema", "--app", app_module, "--format", "asyncapi", "--prefix", "p:")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] == f"{app_module} events" and doc["info"]["version"] == "2.1"
    assert doc["channels"]["sub_shipping"]["x-relaybus-stream"] == "p:{all}:sub:shipping"
    receive = doc["operations"]["shipping_receive"]
    assert receive["action"] == "receive"
    assert receive["messages"] == [
        {"$ref": f"#/channels/sub_shipping/messages/{Order.type_name()}"}]
    assert doc["operations"]["publishEvents"]["action"] == "send"
    assert invoke("schema", "--format", "yaml").exit_code == 2


def test_schema_check_exit_codes_and_listed_changes(app_module: str, tmp_path: Path) -> None:
    saved = json.loads(invoke("schema", "--app", app_module).stdout)
    path = tmp_path / "schemas.json"

    def check(doc: dict[str, Any], *extra: str) -> Any:
        path.write_text(json.dumps(doc))
        return invoke("schema", "check", "--against", str(path), "--app", app_module, *extra)

    same = check(saved)
    assert same.exit_code == 0, same.output
    assert "0 changes, 0 breaking" in same.stdout

    older = copy.deepcopy(saved)  # the saved Note had a field, the saved Order was v4
    note = older["$defs"][Note.type_name()]
    note["properties"]["gone"] = {"type": "string"}
    note["required"].append("gone")
    order = older["$defs"][Order.type_name()]
    order["x-relaybus-version"] = 4
    broken = check(older)
    assert broken.exit_code == 1
    lines = broken.stdout.splitlines()
    assert f"BREAKING {Note.type_name()}: field 'gone' removed" in lines
    assert f"BREAKING {Order.type_name()}: version lowered from 4 to 3" in lines
    assert lines[-1] == "2 changes, 2 breaking: a consumer would fail"

    compatible = copy.deepcopy(saved)
    del compatible["$defs"][Note.type_name()]  # a new type now
    del compatible["$defs"][Order.type_name()]["properties"]["lines"]  # an optional field
    ok = check(compatible, "--json")
    assert ok.exit_code == 0, ok.output
    assert {(c["event_type"], c["kind"], c["breaking"]) for c in json.loads(ok.stdout)} == {
        (Note.type_name(), "type_added", False),
        (Order.type_name(), "optional_field_added", False)}

    path.write_text("{}")
    unreadable = invoke("schema", "check", "--against", str(path))
    assert unreadable.exit_code == 1 and "not a relaybus schema document" in unreadable.stderr
