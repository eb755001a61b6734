"""The events' schemas out: JSON Schema per type, an AsyncAPI 3.0 document, a
compatibility check. Pure functions, no IO (``relaybus schema`` prints them).

- :func:`event_schema` is one event class's JSON Schema (Draft 2020-12) of the payload
  a consumer of its version accepts: ``event_type`` is a ``const``, ``event_version``
  too (required from version 2; version 1 payloads leave it out), unknown fields are
  allowed unless the class is strict (``extra="forbid"``). Extensions name the type
  (``x-relaybus-event-type``), its version (``x-relaybus-version``) and the versions it
  reads through its upcasters (``x-relaybus-reads``). Each has an ``$id``
  (``urn:relaybus:event:<type>:<version>``), so its inner ``$ref`` resolve in it.
- :func:`schemas_document` gathers them into one JSON Schema: ``$defs`` keyed by type
  name, and a ``oneOf`` that validates any event of the app.
- :func:`asyncapi_document` describes the app in AsyncAPI 3.0: a channel for the
  event log and one per service's subscription, a message per event type (its payload
  the JSON Schema above), a ``send`` operation onto the log and a ``receive`` one per
  service.
- :func:`compare_schemas` lists the changes between a saved document (either kind)
  and the current one, each :class:`SchemaChange` marked breaking or not.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ._core.service import ServiceBase
from .events import Event
from .keys import EVENTS_QUEUE, QueueKeys

__all__ = ["DIALECT", "ServiceSpec", "SchemaChange", "event_schema", "schemas_document",
           "asyncapi_document", "service_spec", "event_schemas_of", "compare_schemas"]

#: The JSON Schema dialect of every schema here.
DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: ``schemaFormat`` of an AsyncAPI payload in that dialect.
ASYNCAPI_SCHEMA_FORMAT = "application/schema+json;version=draft-2020-12"
_TYPE = "x-relaybus-event-type"
_VERSION = "x-relaybus-version"
_READS = "x-relaybus-reads"
_STREAM = "x-relaybus-stream"
#: Envelope fields compared through the extensions, not as fields.
_ENVELOPE = ("event_type", "event_version")


def event_schema_id(event_type: str, version: int) -> str:
    """The ``$id`` of an event type's schema of ``version``."""
    return f"urn:relaybus:event:{quote(event_type, safe='.-_~')}:{version}"


def event_schema(cls: type[Event]) -> dict[str, Any]:
    """The JSON Schema of ``cls``'s payload (see the module docstring).

    Raises pydantic's PydanticInvalidForJsonSchema for a field JSON Schema cannot
    describe.
    """
    name, version = cls.type_name(), cls.type_version()
    schema = cls.model_json_schema(mode="validation")
    props: dict[str, Any] = schema.setdefault("properties", {})
    props["event_type"] = {"const": name, "title": "Event Type", "type": "string"}
    props["event_version"] = {"const": version, "title": "Event Version", "type": "integer",
                              **({"description": "absent means 1"} if version == 1 else {})}
    required = [r for r in schema.get("required", []) if r not in _ENVELOPE]
    schema["required"] = ["event_type", *(["event_version"] if version > 1 else []),
                          *required]
    return {"$schema": DIALECT, "$id": event_schema_id(name, version), **schema,
            _TYPE: name, _VERSION: version, _READS: cls.readable_versions()}


def schemas_document(classes: Iterable[type[Event]]) -> dict[str, Any]:
    """One JSON Schema holding each class's (``$defs``, by type name) and matching any
    of their events (``oneOf``)."""
    schemas = {s[_TYPE]: s for s in map(event_schema, classes)}
    doc: dict[str, Any] = {
        "$schema": DIALECT, "$id": "urn:relaybus:events", "title": "relaybus events",
        "description": "The JSON Schema of each event type (in $defs, by type name); "
                       "the document validates an event of any of them.",
        "$defs": {name: schemas[name] for name in sorted(schemas)},
    }
    if schemas:
        doc["oneOf"] = [{"$ref": doc["$defs"][name]["$id"]} for name in sorted(schemas)]
    return doc


# -- AsyncAPI ------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceSpec:
    """What the AsyncAPI document says of a service: its name, its subscription queue
    and the event types it receives (None: every type)."""

    name: str
    subscription: str
    event_types: tuple[str, ...] | None


def service_spec(service: ServiceBase[Any]) -> ServiceSpec:
    """The :class:`ServiceSpec` of a ``Microservice`` or ``AsyncMicroservice``."""
    types = service._subscription_types()  # what it subscribes with at start
    return ServiceSpec(service.service_name, service.subscription_queue_name,
                       None if types is None else tuple(sorted(set(types))))


def _component_id(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"
    key, n = base, 1
    while key in taken:
        n += 1
        key = f"{base}_{n}"
    taken.add(key)
    return key


def _summary(cls: type) -> str | None:
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else None


def asyncapi_document(classes: Iterable[type[Event]], services: Iterable[ServiceSpec] = (),
                      *, title: str = "relaybus events", version: str = "0.0.0",
                      prefix: str = "events:") -> dict[str, Any]:
    """The AsyncAPI 3.0 document of an app (see the module docstring).

    A channel's address is its queue's name (``all``, ``sub:billing``, as ``relaybus
    queues`` shows them); ``x-relaybus-stream`` is its stream key under ``prefix`` (not
    the address: the braces of a hash tag would read as a parameter).
    """
    taken: set[str] = set()
    by_type = {cls.type_name(): cls for cls in classes}
    ids = {name: _component_id(name, taken) for name in sorted(by_type)}
    messages: dict[str, Any] = {}
    for name, mid in ids.items():
        cls = by_type[name]
        message: dict[str, Any] = {
            "name": name, "title": f"{cls.__name__} (version {cls.type_version()})",
            "contentType": "application/json",
            "payload": {"schemaFormat": ASYNCAPI_SCHEMA_FORMAT, "schema": event_schema(cls)},
            _VERSION: cls.type_version(),
        }
        if summary := _summary(cls):
            message["summary"] = summary
        messages[mid] = message

    def channel_messages(names: Iterable[str]) -> dict[str, Any]:
        return {ids[n]: {"$ref": f"#/components/messages/{ids[n]}"} for n in names if n in ids}

    channel_ids: set[str] = {"eventLog"}
    operation_ids: set[str] = {"publishEvents"}
    channels: dict[str, Any] = {"eventLog": {
        "address": EVENTS_QUEUE, "title": "Event log",
        "description": "Every published event, in order; routed from here to each "
                       "subscription. Partition i of a partitioned log is the queue "
                       f"{EVENTS_QUEUE}@i.",
        _STREAM: QueueKeys(prefix, EVENTS_QUEUE).stream,
        "messages": channel_messages(ids)}}
    operations: dict[str, Any] = {"publishEvents": {
        "action": "send", "channel": {"$ref": "#/channels/eventLog"},
        "title": "Publish events", "summary": "EventBus.publish appends an event to the log.",
        "messages": [{"$ref": f"#/channels/eventLog/messages/{m}"} for m in ids.values()]}}
    for svc in sorted(services, key=lambda s: s.name):
        cid = _component_id(f"sub_{svc.name}", channel_ids)
        names = sorted(ids) if svc.event_types is None else list(svc.event_types)
        channels[cid] = {
            "address": svc.subscription, _STREAM: QueueKeys(prefix, svc.subscription).stream,
            "title": f"Subscription of {svc.name}",
            "description": f"The events routed to service {svc.name!r} (queue "
                           f"{svc.subscription!r}; every type)." if svc.event_types is None
            else f"The events routed to service {svc.name!r} (queue {svc.subscription!r}): "
                 + ", ".join(svc.event_types) + ".",
            "messages": channel_messages(names)}
        operations[_component_id(f"{svc.name}_receive", operation_ids)] = {
            "action": "receive", "channel": {"$ref": f"#/channels/{cid}"},
            "title": f"{svc.name} receives", "x-relaybus-service": svc.name,
            "messages": [{"$ref": f"#/channels/{cid}/messages/{m}"}
                         for m in channel_messages(names)]}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": title, "version": version,
                 "description": "Events on a relaybus event bus (Redis Streams)."},
        "defaultContentType": "application/json",
        "channels": channels, "operations": operations,
        "components": {"messages": messages},
    }


# -- compatibility -------------------------------------------------------------------


@dataclass(frozen=True)
class SchemaChange:
    """One difference between a saved schema and the current one.

    ``field`` is a path (``shipping.city``, ``items[].sku``; "" for the type itself);
    ``breaking`` when a consumer would fail on it.
    """

    event_type: str
    field: str
    kind: str
    breaking: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        """The change as a JSON-ready dict."""
        return {"event_type": self.event_type, "field": self.field, "kind": self.kind,
                "breaking": self.breaking, "message": self.message}


def event_schemas_of(document: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The event schemas of a :func:`schemas_document` or :func:`asyncapi_document`,
    by type name; ValueError for anything else."""
    if not isinstance(document, Mapping):
        raise ValueError("not a relaybus schema document (a JSON object)")
    if "asyncapi" in document:
        found = []
        for message in (document.get("components") or {}).get("messages", {}).values():
            payload = message.get("payload") if isinstance(message, Mapping) else None
            if isinstance(payload, Mapping) and "schemaFormat" in payload:
                payload = payload.get("schema")
            found.append(payload)
    elif "$defs" in document:
        found = list(document["$defs"].values())
    else:
        raise ValueError("not a relaybus schema document: neither `relaybus schema` "
                         "output ($defs) nor an AsyncAPI document")
    return {s[_TYPE]: dict(s) for s in found if isinstance(s, Mapping) and _TYPE in s}


_ANNOTATIONS = {"title", "description", "default", "examples", "deprecated", "readOnly",
                "writeOnly", "$comment", "$schema", "$id", "$defs"}
_MAPS = {"properties", "patternProperties", "dependentSchemas"}


def _resolve(node: Any, root: Mapping[str, Any], seen: frozenset[str]
             ) -> tuple[Any, frozenset[str]]:
    """``node`` with its local ``$ref`` (``#/...``) followed; ``seen`` guards cycles."""
    while isinstance(node, Mapping) and isinstance(node.get("$ref"), str):
        ref = node["$ref"]
        if ref in seen or not ref.startswith("#/"):
            return node, seen
        target: Any = root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, Mapping) else None
        if not isinstance(target, Mapping):
            return node, seen
        seen = seen | {ref}
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node, seen


def _shape(node: Any, root: Mapping[str, Any], seen: frozenset[str] = frozenset()) -> Any:
    """What ``node`` accepts, without annotations and with references inlined."""
    node, seen = _resolve(node, root, seen)
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key in sorted(node):
            if key in _ANNOTATIONS or key.startswith("x-"):
                continue
            value = node[key]
            if key in _MAPS and isinstance(value, Mapping):
                out[key] = {k: _shape(v, root, seen) for k, v in sorted(value.items())}
            elif key == "required" and isinstance(value, list):
                out[key] = sorted(value)
            else:
                out[key] = _shape(value, root, seen)
        return out
    if isinstance(node, list):
        return [_shape(v, root, seen) for v in node]
    return node


def _describe(node: Any, root: Mapping[str, Any]) -> str:
    node, _ = _resolve(node, root, frozenset())
    if not isinstance(node, Mapping):
        return "any"
    for key in ("anyOf", "oneOf"):
        if isinstance(node.get(key), list):
            return " | ".join(_describe(n, root) for n in node[key])
    if "const" in node:
        return f"const {json.dumps(node['const'])}"
    if "enum" in node:
        return "one of " + ", ".join(json.dumps(v) for v in node["enum"])
    kind = node.get("type")
    if kind == "array":
        return f"array of {_describe(node.get('items'), root)}"
    if kind == "object" and node.get("title"):
        return str(node["title"])
    text = "|".join(map(str, kind)) if isinstance(kind, list) else str(kind or "any")
    return f"{text} ({node['format']})" if "format" in node else text


@dataclass
class _Diff:
    event_type: str
    old_root: Mapping[str, Any]
    new_root: Mapping[str, Any]
    upcast: str | None  # how older events get a new required field, when they do
    changes: list[SchemaChange]

    def add(self, path: str, kind: str, breaking: bool, message: str) -> None:
        self.changes.append(SchemaChange(self.event_type, path, kind, breaking, message))

    def node(self, path: str, old: Any, new: Any, seen: tuple[frozenset[str], frozenset[str]],
             top: bool = False) -> None:
        old, old_seen = _resolve(old, self.old_root, seen[0])
        new, new_seen = _resolve(new, self.new_root, seen[1])
        seen = (old_seen, new_seen)
        if _is_object(old) and _is_object(new):
            self.object(path, old, new, seen, top)
        elif _is_array(old) and _is_array(new):
            self.node(f"{path}[]", old["items"], new["items"], seen)
            self.leaf(path, {k: v for k, v in old.items() if k != "items"},
                      {k: v for k, v in new.items() if k != "items"})
        else:
            self.leaf(path, old, new)

    def leaf(self, path: str, old: Any, new: Any) -> None:
        if _shape(old, self.old_root) != _shape(new, self.new_root):
            self.add(path, "field_retyped", True,
                     f"field {path!r} changed type: {_describe(old, self.old_root)} -> "
                     f"{_describe(new, self.new_root)}")

    def object(self, prefix: str, old: Mapping[str, Any], new: Mapping[str, Any],
               seen: tuple[frozenset[str], frozenset[str]], top: bool) -> None:
        old_props, new_props = old.get("properties") or {}, new.get("properties") or {}
        old_req, new_req = set(old.get("required") or ()), set(new.get("required") or ())
        for name in old_props:
            if top and name in _ENVELOPE:
                continue
            path = f"{prefix}.{name}" if prefix else name
            if name not in new_props:
                self.add(path, "field_removed", True, f"field {path!r} removed")
                continue
            if name in new_req and name not in old_req:
                self.required(path, "field_now_required", f"field {path!r} is now required")
            elif name in old_req and name not in new_req:
                self.add(path, "field_now_optional", False, f"field {path!r} is now optional")
            self.node(path, old_props[name], new_props[name], seen)
        for name in new_props:
            if name in old_props or (top and name in _ENVELOPE):
                continue
            path = f"{prefix}.{name}" if prefix else name
            if name in new_req:
                self.required(path, "required_field_added",
                              f"required field {path!r} added without a default")
            else:
                self.add(path, "optional_field_added", False, f"optional field {path!r} added")
        if old.get("additionalProperties", True) is not False and \
                new.get("additionalProperties", True) is False:
            self.add(prefix, "unknown_fields_refused", True,
                     f"{prefix or 'the event'} now refuses unknown fields (strict)")
        elif old.get("additionalProperties", True) is False and \
                new.get("additionalProperties", True) is not False:
            self.add(prefix, "unknown_fields_allowed", False,
                     f"{prefix or 'the event'} now accepts unknown fields")

    def required(self, path: str, kind: str, message: str) -> None:
        if self.upcast:  # older events are upcast: the upcaster provides the field
            self.add(path, kind, False, f"{message} ({self.upcast})")
        else:
            self.add(path, kind, True, f"{message}: older events lack it")


def _is_object(node: Any) -> bool:
    return isinstance(node, Mapping) and isinstance(node.get("properties"), Mapping)


def _is_array(node: Any) -> bool:
    return isinstance(node, Mapping) and node.get("type") == "array" and "items" in node


def _version(schema: Mapping[str, Any]) -> int:
    value = schema.get(_VERSION, 1)
    return value if isinstance(value, int) else 1


def compare_schemas(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[SchemaChange]:
    """The changes from the ``old`` document to the ``new`` one (each a
    :func:`schemas_document` or :func:`asyncapi_document`), by type then field.

    Breaking: an event type removed, a version lowered, a field removed or retyped, a
    required field added (or an optional one made required) without a default
    unless the version was raised and upcasters read the old one, unknown fields
    refused. Compatible: a new type, a version raised, an optional field added.
    ValueError when a document is neither kind.
    """
    before, after = event_schemas_of(old), event_schemas_of(new)
    changes: list[SchemaChange] = []
    for name in sorted(before.keys() | after.keys()):
        if name not in after:
            changes.append(SchemaChange(name, "", "type_removed", True,
                                        "event type removed"))
            continue
        if name not in before:
            changes.append(SchemaChange(name, "", "type_added", False,
                                        f"new event type (version {_version(after[name])})"))
            continue
        was, now = _version(before[name]), _version(after[name])
        if now < was:
            changes.append(SchemaChange(name, "", "version_lowered", True,
                                        f"version lowered from {was} to {now}"))
        elif now > was:
            changes.append(SchemaChange(name, "", "version_raised", False,
                                        f"version raised from {was} to {now}"))
        reads = after[name].get(_READS) or [now]
        upcast = f"version {was} events are upcast" if now > was and was in reads else None
        diff = _Diff(name, before[name], after[name], upcast, changes)
        diff.node("", before[name], after[name], (frozenset(), frozenset()), top=True)
    return changes


def breaking(changes: Sequence[SchemaChange]) -> list[SchemaChange]:
    """The breaking ones of ``changes``."""
    return [c for c in changes if c.breaking]
