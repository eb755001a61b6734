"""Typed events, the event-type registry, and (de)serialisation.

An event is a pydantic model deriving from :class:`Event`. Its *type name* is the
name that travels on the wire; it is given with a class keyword and defaults to the
class name::

    class OrderCreated(Event, event_type="order.created"):
        order_id: str
        total: float

Contracts:

- Every concrete subclass registers itself under its type name when the class is
  defined. A second, *different* class under a taken name raises
  :class:`~relaybus.errors.DuplicateEventTypeError` at definition; defining the same
  class again (same module and qualname, e.g. a reloaded module) replaces it.
- ``class Base(Event, abstract=True)`` declares an intermediate base that is not
  registered and cannot be instantiated. ``Event`` itself is abstract.
- :data:`EVENT_TYPES` is a read-only, live view of the registry (name -> class).
- Tolerant reader, strict producer: the deserialisers (:func:`event_from_json`,
  :func:`deserialize_event_strict`, :func:`deserialize_event`, :meth:`Event.from_dict`)
  accept fields the class does not know and keep them in ``event.model_extra``
  (re-serialised, so a forwarder loses nothing); building an event in code
  (``OrderCreated(...)``, ``model_validate``) or assigning an attribute refuses them.
  ``tolerant=False`` makes a deserialiser refuse them too, and a class declared with
  pydantic's ``extra="forbid"`` (``class X(Event, extra="forbid")``) refuses them
  everywhere. An ``event_type`` in the input must equal the class's type name.
  ``event_type`` and ``event_version`` cannot be reassigned; other fields can.
- Versions: ``class X(Event, version=2)`` (default 1). The version travels as the
  payload field ``event_version``, left out for version 1 (so version 1 payloads are
  what they always were; absent means 1). ``@X.upcaster(from_version=1)`` registers a
  ``dict -> dict`` function turning a version 1 payload into version 2; readers chain
  them (v1 -> v2 -> v3), and a missing step is an :class:`EventValidationError` naming
  it. A payload of a *newer* version is read tolerantly when it validates (its
  ``event_version`` is kept), else raises :class:`NewerEventVersionError`, naming both
  versions.
- :func:`serialize_event` gives a JSON-compatible dict that always holds
  ``event_type``; :func:`event_json` the same document as JSON text, straight from
  pydantic-core, where it can vouch for it (what publishing uses first).
  :func:`deserialize_event_strict` raises
  :class:`~relaybus.errors.UnknownEventTypeError` or
  :class:`~relaybus.errors.EventValidationError`; :func:`deserialize_event` returns
  ``None`` for an unknown or missing type but still raises for invalid data of a
  known type. Input that is not a mapping raises
  :class:`~relaybus.errors.SerializationError`.

Nothing here does IO; the registry is filled at import time and only read afterwards.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError, PydanticSerializationError
from typing_extensions import Self

from relaybus.codec import JsonText
from relaybus.errors import (
    DuplicateEventTypeError,
    EventValidationError,
    NewerEventVersionError,
    SerializationError,
    UnknownEventTypeError,
)

__all__ = [
    "EVENT_TYPES",
    "Event",
    "NewerEventVersionError",
    "Upcaster",
    "deserialize_event",
    "deserialize_event_strict",
    "event_from_json",
    "event_json",
    "event_type_name",
    "resolve_event_type",
    "serialize_event",
]

_REGISTRY: dict[str, type[Event]] = {}

#: Read-only, live view of the registry: event type name -> event class.
EVENT_TYPES: Mapping[str, type[Event]] = MappingProxyType(_REGISTRY)


#: An upcaster: a payload (a dict it may change) of one version -> that of the next.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
U = TypeVar("U", bound=Upcaster)

#: Validation contexts of the deserialisers (compared by identity in the validator):
#: the tolerant reader, and a reader that refuses unknown fields (``tolerant=False``).
_READ: Mapping[str, str] = MappingProxyType({"relaybus": "read"})
_READ_STRICT: Mapping[str, str] = MappingProxyType({"relaybus": "read-strict"})
#: Error type the validator raises for a payload older than its class (the fast path
#: then upcasts it from the dict).
_OLDER = "event_version_older"


def _new_event_id() -> str:
    return str(uuid.uuid4())


#: Longest ``Event.partition_key``, in characters.
MAX_PARTITION_KEY_LENGTH = 512


class Event(BaseModel):
    """Base class of every event; subclass it and add payload fields.

    Class keywords: ``event_type="name"`` sets the wire name (default: the class
    name); ``version=N`` the schema version (default 1); ``abstract=True`` makes an
    unregistered intermediate base; ``extra="forbid"`` (pydantic's) refuses unknown
    fields on read too.
    """

    # "allow" keeps what a reader does not know; producers are held strict by
    # _check_input (and __setattr__), readers are told apart by the validation context.
    # "constants": a NaN or infinity shows in model_dump_json's text (not as null), so
    # event_json can tell that the event cannot be published (JSON cannot carry it).
    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants")

    __event_type__: ClassVar[str] = ""
    __event_abstract__: ClassVar[bool] = True
    __event_version__: ClassVar[int] = 1
    __event_upcasters__: ClassVar[dict[int, Upcaster]] = {}

    #: Unique id of this event (a uuid4 string unless given).
    event_id: str = Field(default_factory=_new_event_id)
    #: When the event was created, in epoch seconds.
    timestamp: float = Field(default_factory=time.time)
    #: The registered type name of the class; filled in when omitted, never reassigned.
    event_type: str = Field(default="", frozen=True)
    #: ``event_id`` of the request or flow this event belongs to.
    correlation_id: str | None = None
    #: ``event_id`` of the event that caused this one.
    causation_id: str | None = None
    #: Free-form string metadata carried with the event.
    headers: dict[str, str] = Field(default_factory=dict)
    #: What orders this event: a service with ``ordered=True`` handles the events of one
    #: key one at a time, in publish order (None: the event is ordered with no other).
    partition_key: str | None = Field(default=None, min_length=1,
                                      max_length=MAX_PARTITION_KEY_LENGTH)
    #: The schema version of this event: the class's, or a newer producer's when read
    #: tolerantly. On the wire as ``event_version``, left out when it is 1.
    event_version: int = Field(default=1, ge=1, strict=True, frozen=True, exclude=True)

    def __init_subclass__(
        cls, *, event_type: str | None = None, abstract: bool = False,
        version: int | None = None, **kwargs: Any
    ) -> None:
        if abstract and (event_type is not None or version is not None):
            raise TypeError(f"abstract event class {cls.__qualname__} cannot have an "
                            "event_type or a version")
        if event_type is not None and (not isinstance(event_type, str) or not event_type):
            raise TypeError(f"event_type of {cls.__qualname__} must be a non-empty string")
        if version is not None and (type(version) is not int or version < 1):
            raise TypeError(f"version of {cls.__qualname__} must be an int >= 1, not "
                            f"{version!r}")
        if "event_version" in cls.__dict__.get("__annotations__", {}):
            raise TypeError(f"{cls.__qualname__} cannot declare event_version: it is the "
                            "version of the schema (give the class keyword version=N)")
        cls.__event_abstract__ = abstract
        cls.__event_type__ = "" if abstract else (event_type or cls.__name__)
        cls.__event_version__ = version or 1
        cls.__event_upcasters__ = {}
        super().__init_subclass__(**kwargs)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        # Runs once pydantic has built the class, so a class that fails to build
        # never reaches the registry.
        super().__pydantic_init_subclass__(**kwargs)
        if cls.__event_abstract__:
            return
        name = cls.__event_type__
        existing = _REGISTRY.get(name)
        if existing is not None and _identity(existing) != _identity(cls):
            raise DuplicateEventTypeError(
                f"event type {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}; "
                f"cannot register {cls.__module__}.{cls.__qualname__}"
            )
        _REGISTRY[name] = cls

    @field_validator("partition_key")
    @classmethod
    def _check_partition_key(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("partition_key must not contain NUL characters")
        return value

    @model_validator(mode="after")
    def _check_input(self, info: ValidationInfo) -> Self:
        """The class's event type; producers: no unknown fields, the class's version.
        Readers: see the module. (One validator per event: this is the hot path.)"""
        cls = type(self)
        if self.event_type != cls.__event_type__ or cls.__event_abstract__:
            cls._fill_event_type(self)
        context = info.context
        if context is _READ or context is _READ_STRICT:  # a deserialiser (the hot path)
            if self.event_version < cls.__event_version__:  # only from event_from_json
                raise PydanticCustomError(_OLDER, "older than the class: upcast first")
            if context is _READ or not self.__pydantic_extra__:
                return self
        elif "event_version" in self.__pydantic_fields_set__:
            if self.event_version != cls.__event_version__:
                raise PydanticCustomError(
                    "event_version_mismatch",
                    "event_version {given} does not match {cls} (version {version})",
                    {"given": self.event_version, "cls": cls.__name__,
                     "version": cls.__event_version__})
        elif cls.__event_version__ != 1:
            self.__dict__["event_version"] = cls.__event_version__
        if self.__pydantic_extra__:
            raise ValidationError.from_exception_data(cls.__name__, [
                InitErrorDetails(type="extra_forbidden", loc=(name,), input=value)
                for name, value in self.__pydantic_extra__.items()])
        return self

    @classmethod
    def _fill_event_type(cls, event: Event) -> None:
        """Fill in an omitted ``event_type``; refuse another or an abstract class."""
        value = event.event_type
        if cls.__event_abstract__:
            reason = f"{cls.__name__} is abstract; instantiate a concrete event class"
        elif value == "":
            event.__dict__["event_type"] = cls.__event_type__
            return
        else:
            reason = f"event_type {value!r} does not match {cls.__name__} ({cls.__event_type__!r})"
        raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(
            type=PydanticCustomError("value_error", "Value error, {reason}", {"reason": reason}),
            loc=("event_type",), input=value)])

    if not TYPE_CHECKING:  # hidden from type checkers: they keep refusing unknown names
        def __setattr__(self, name: str, value: Any) -> None:
            """Refuse an unknown attribute, as ``extra="forbid"`` would (extras kept
            from a read can be reassigned)."""
            extra = self.__pydantic_extra__
            if (extra is not None and name not in extra and name[:1] != "_"
                    and name not in type(self).__pydantic_fields__
                    and not hasattr(type(self), name)):
                raise ValueError(f'"{type(self).__name__}" object has no field "{name}"')
            super().__setattr__(name, value)

    @classmethod
    def type_name(cls) -> str:
        """The registered type name of this class; TypeError for an abstract class."""
        if cls.__event_abstract__:
            raise TypeError(f"{cls.__qualname__} is abstract and has no event type")
        return cls.__event_type__

    @classmethod
    def type_version(cls) -> int:
        """The schema version of this class (its ``version`` keyword, default 1)."""
        cls.type_name()
        return cls.__event_version__

    @classmethod
    def upcaster(cls, *, from_version: int) -> Callable[[U], U]:
        """Register the decorated ``fn(data) -> data`` turning a payload of version
        ``from_version`` into one of ``from_version + 1``.

        Readers chain the steps up to the class's version; ``data`` is a (deep) copy of
        the payload, without ``event_version``, that the function may change and return.
        A second, different function for the same step raises ValueError.
        """
        current = cls.type_version()
        if type(from_version) is not int or not 1 <= from_version < current:
            raise ValueError(f"{cls.__qualname__} is version {current}: an upcaster goes from "
                             f"a version in 1..{current - 1}, not {from_version!r}")

        def register(fn: U) -> U:
            if not callable(fn):
                raise TypeError(f"upcaster() decorates a callable, not {fn!r}")
            existing = cls.__event_upcasters__.get(from_version)
            if existing is not None and _identity(existing) != _identity(fn):
                raise ValueError(
                    f"{cls.__qualname__} already has an upcaster from version {from_version}: "
                    f"{existing.__module__}.{existing.__qualname__}")
            cls.__event_upcasters__[from_version] = fn
            return fn

        return register

    @classmethod
    def readable_versions(cls) -> list[int]:
        """The versions this class reads: its own and those its upcasters chain from."""
        current = cls.type_version()
        versions = [current]
        while versions[0] - 1 in cls.__event_upcasters__:
            versions.insert(0, versions[0] - 1)
        return versions

    @classmethod
    def model_construct(cls, _fields_set: set[str] | None = None, **values: Any) -> Self:
        """Build without validation (pydantic's), still filling in ``event_type`` and
        ``event_version``."""
        values.setdefault("event_type", cls.__event_type__)
        values.setdefault("event_version", cls.__event_version__)
        return super().model_construct(_fields_set, **values)

    def to_dict(self) -> dict[str, Any]:
        """Same as :func:`serialize_event`."""
        return serialize_event(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, tolerant: bool = True) -> Self:
        """Read ``data`` as this class (upcasting an older version; with ``tolerant``,
        keeping unknown fields in ``model_extra``).

        On ``Event`` or an abstract base, dispatch by ``data["event_type"]`` through
        the registry (as :func:`deserialize_event_strict`) and require the result to
        be an instance of ``cls``.
        """
        if not cls.__event_abstract__:
            return cls._validate(data, tolerant)
        event = deserialize_event_strict(data, tolerant=tolerant)
        if not isinstance(event, cls):
            name = event.type_name()
            raise EventValidationError(
                name,
                [
                    {
                        "type": "event_type_mismatch",
                        "loc": ("event_type",),
                        "msg": f"event type {name!r} is not a {cls.__name__}",
                        "input": name,
                    }
                ],
            )
        return event

    @classmethod
    def _validate(cls, data: Mapping[str, Any], tolerant: bool = True) -> Self:
        """Read ``data``: upcast it to the class's version, then validate it."""
        if not isinstance(data, Mapping):
            raise SerializationError(f"an event must be a mapping, not {type(data).__name__}")
        current = cls.__event_version__
        given = data.get("event_version", 1)
        # an unusable version is the validator's to report: read as the class's own
        version = given if type(given) is int and given >= 1 else current
        payload = cls._upcast(data, version) if version < current else dict(data)
        try:
            return cls.model_validate(payload, context=_READ if tolerant else _READ_STRICT)
        except ValidationError as exc:
            errors = cast("list[dict[str, Any]]", exc.errors(include_url=False))
            if not tolerant:
                errors = _with_unknown_fields(cls, payload, errors)
            if version > current:
                raise NewerEventVersionError(cls.__event_type__, version, current,
                                             errors) from exc
            raise EventValidationError(cls.__event_type__, errors) from exc

    @classmethod
    def _upcast(cls, data: Mapping[str, Any], version: int) -> dict[str, Any]:
        """``data`` of ``version`` through the upcaster chain to the class's version."""
        name, current = cls.__event_type__, cls.__event_version__
        payload = copy.deepcopy({k: v for k, v in data.items() if k != "event_version"})
        for step in range(version, current):
            fn = cls.__event_upcasters__.get(step)
            if fn is None:
                raise _version_error(
                    name, version, "event_version_gap",
                    f"{name} version {version} cannot be read as version {current}: no "
                    f"upcaster from version {step} (register one with "
                    f"@{cls.__qualname__}.upcaster(from_version={step}))")
            try:
                result = fn(payload)
            except Exception as exc:  # the user's function: a reason, not a crash
                raise _version_error(
                    name, version, "upcaster_failed",
                    f"upcaster of {name} from version {step} failed: "
                    f"{type(exc).__name__}: {exc}") from exc
            if not isinstance(result, dict):
                raise _version_error(
                    name, version, "upcaster_failed",
                    f"upcaster of {name} from version {step} returned "
                    f"{type(result).__name__}, not a dict")
            payload = result
        payload["event_version"] = current
        return payload


def _identity(obj: Any) -> tuple[str, str]:
    return getattr(obj, "__module__", ""), getattr(obj, "__qualname__", repr(obj))


def _version_error(event_type: str, version: int, kind: str, msg: str) -> EventValidationError:
    return EventValidationError(event_type, [
        {"type": kind, "loc": ("event_version",), "msg": msg, "input": version}])


def _with_unknown_fields(cls: type[Event], data: Mapping[str, Any],
                         errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``errors`` and one per unknown field in ``data`` (reported with the others)."""
    if any(e.get("type") == "extra_forbidden" for e in errors):
        return errors
    known: set[str] = set()
    for name, field in cls.__pydantic_fields__.items():
        known.update(n for n in (name, field.alias, field.validation_alias)
                     if isinstance(n, str))
    return errors + [{"type": "extra_forbidden", "loc": (k,), "input": v,
                      "msg": "Extra inputs are not permitted"}
                     for k, v in data.items() if k not in known]


def serialize_event(event: Event) -> dict[str, Any]:
    """Return ``event`` as a JSON-compatible dict (always holding ``event_type``).

    Unknown fields kept from a read are in it too, and ``event_version`` when it is
    not 1. Raises SerializationError if a field value cannot be represented as JSON
    (or is text that is not valid unicode, such as a lone surrogate).
    """
    try:
        data = event.model_dump(mode="json")
    except (PydanticSerializationError, UnicodeEncodeError) as exc:
        raise SerializationError(f"cannot serialize {type(event).__name__}: {exc}") from exc
    if event.event_version != 1:
        data["event_version"] = event.event_version
    return data


#: Core-schema node types whose JSON serialisation pydantic-core writes under the
#: event class's own config (so a non-finite float shows as ``NaN``/``Infinity``); a
#: class whose schema holds any other (a nested model or dataclass with a config of
#: its own, ``Any``, a custom serializer) is encoded by the dict path instead.
_PLAIN_JSON_NODES = frozenset({
    "model", "model-fields", "model-field", "default", "nullable", "function-after",
    "function-before", "with-info", "no-info", "str", "int", "float", "bool", "none",
    "bytes", "list", "tuple", "set", "frozenset", "dict", "literal", "enum", "datetime",
    "date", "time", "timedelta", "decimal", "uuid", "url", "union", "lax-or-strict",
    "json-or-python"})

_PLAIN_JSON: dict[type[Event], bool] = {}


def _plain_json(cls: type[Event]) -> bool:
    """Whether ``model_dump_json`` of ``cls`` writes everything under its config (see
    :data:`_PLAIN_JSON_NODES`); computed once per complete class."""
    known = _PLAIN_JSON.get(cls)
    if known is not None:
        return known
    models = 0

    def plain(node: Any) -> bool:
        nonlocal models
        if isinstance(node, (list, tuple)):
            return all(plain(n) for n in node)
        if not isinstance(node, dict):
            return True
        kind = node.get("type")
        if isinstance(kind, str):
            if kind not in _PLAIN_JSON_NODES or "serialization" in node or \
                    node.get("computed_fields"):
                return False
            models += kind == "model"
        return all(plain(v) for k, v in node.items() if k not in ("metadata", "config"))

    found = cls.model_config.get("ser_json_inf_nan") == "constants" and \
        plain(cls.__pydantic_core_schema__) and models == 1
    if cls.__pydantic_complete__:
        _PLAIN_JSON[cls] = found
    return found


def event_json(event: Event) -> JsonText | None:
    """``event``'s payload as JSON text, straight from pydantic-core: the same document
    as :func:`serialize_event` gives (``event_version`` included), about three times
    faster. None when that text cannot be trusted to be the same (a class outside
    :func:`_plain_json`, a non-finite number, text that is not valid unicode): the
    caller takes the dict path, which refuses what JSON cannot carry."""
    if not _plain_json(type(event)):
        return None
    try:
        text = event.model_dump_json()
    except (PydanticSerializationError, UnicodeEncodeError):
        return None
    if "NaN" in text or "Infinity" in text:  # maybe inside a string: the dict path decides
        return None
    if event.event_version != 1:
        text = f'{text[:-1]},"event_version":{event.event_version}}}'
    return JsonText(text)


def deserialize_event_strict(data: Mapping[str, Any], *, tolerant: bool = True) -> Event:
    """Read the registered event class named by ``data["event_type"]`` from ``data``.

    ("Strict" about the type: an unknown one raises.) An older version is upcast; with
    ``tolerant`` (the default) unknown fields are kept in ``model_extra``, without it
    they are errors. Raises UnknownEventTypeError (``event_type`` ``""`` when it is
    missing or empty), EventValidationError (with pydantic's errors and field paths)
    when the data does not fit the class (:class:`NewerEventVersionError` when it is of
    a newer version), and SerializationError when ``data`` is not a mapping.
    """
    if not isinstance(data, Mapping):
        raise SerializationError(f"an event must be a mapping, not {type(data).__name__}")
    raw = data.get("event_type")
    name = "" if raw is None else str(raw)
    cls = _REGISTRY.get(name) if isinstance(raw, str) else None
    if cls is None:
        raise UnknownEventTypeError(name)
    return cls._validate(data, tolerant)


def _parse(payload: bytes | str) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise SerializationError(f"malformed payload: {exc}") from exc
    if not isinstance(data, dict):
        raise SerializationError("malformed payload: not a JSON object")
    return data


def event_from_json(payload: bytes | str, event_type: str | None = None, *,
                    tolerant: bool = True) -> Event:
    """Read an event straight from its JSON text (the consumers' fast path).

    ``event_type`` (an entry's routing field) picks the class without parsing the
    payload first; with None the payload is parsed to find it. Reads as
    :func:`deserialize_event_strict` does (versions, ``tolerant``), and raises as it
    does, and :class:`SerializationError` for a payload that is not a JSON object.
    """
    if event_type is None:
        return deserialize_event_strict(_parse(payload), tolerant=tolerant)
    cls = _REGISTRY.get(event_type)
    if cls is None:
        raise UnknownEventTypeError(event_type)
    try:
        return cls.model_validate_json(payload, context=_READ if tolerant else _READ_STRICT)
    except ValidationError as exc:
        errors = cast("list[dict[str, Any]]", exc.errors(include_url=False))
        if any(e.get("type") in ("json_invalid", "model_type") and not e.get("loc")
               for e in errors):
            raise SerializationError(f"malformed payload: {errors[0].get('msg')}") from exc
        data = _parse(payload)
        given = data.get("event_version", 1)
        if type(given) is int and given != cls.__event_version__:
            return cls._validate(data, tolerant)  # older: upcast; newer: say so
        if not tolerant:
            errors = _with_unknown_fields(cls, data, errors)
        raise EventValidationError(cls.__event_type__, errors) from exc


def deserialize_event(data: Mapping[str, Any], *, tolerant: bool = True) -> Event | None:
    """Like :func:`deserialize_event_strict`, but None for an unknown or missing type.

    Invalid data of a *known* type still raises EventValidationError.
    """
    try:
        return deserialize_event_strict(data, tolerant=tolerant)
    except UnknownEventTypeError:
        return None


def event_type_name(t: str | type[Event]) -> str:
    """The type name for a name (returned as is) or a concrete Event subclass.

    Raises TypeError for anything else, including abstract event classes.
    """
    if isinstance(t, str):
        return t
    if isinstance(t, type) and issubclass(t, Event):
        return t.type_name()
    raise TypeError(f"expected an event type name or Event subclass, not {t!r}")


def resolve_event_type(name: str) -> type[Event] | None:
    """The event class registered under ``name``, or None."""
    return _REGISTRY.get(name)
