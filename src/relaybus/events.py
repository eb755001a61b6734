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
- Unknown input fields are validation errors (``extra="forbid"``), and an
  ``event_type`` in the input must equal the class's type name. ``event_type``
  cannot be reassigned; other fields can (events are not frozen).
- :func:`serialize_event` gives a JSON-compatible dict that always holds
  ``event_type``. :func:`deserialize_event_strict` raises
  :class:`~relaybus.errors.UnknownEventTypeError` or
  :class:`~relaybus.errors.EventValidationError`; :func:`deserialize_event` returns
  ``None`` for an unknown or missing type but still raises for invalid data of a
  known type. Input that is not a mapping raises
  :class:`~relaybus.errors.SerializationError`.

Nothing here does IO; the registry is filled at import time and only read afterwards.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticSerializationError
from typing_extensions import Self

from relaybus.errors import (
    DuplicateEventTypeError,
    EventValidationError,
    SerializationError,
    UnknownEventTypeError,
)

__all__ = [
    "EVENT_TYPES",
    "Event",
    "deserialize_event",
    "deserialize_event_strict",
    "event_from_json",
    "event_type_name",
    "resolve_event_type",
    "serialize_event",
]

_REGISTRY: dict[str, type[Event]] = {}

#: Read-only, live view of the registry: event type name -> event class.
EVENT_TYPES: Mapping[str, type[Event]] = MappingProxyType(_REGISTRY)


def _new_event_id() -> str:
    return str(uuid.uuid4())


#: Longest ``Event.partition_key``, in characters.
MAX_PARTITION_KEY_LENGTH = 512


class Event(BaseModel):
    """Base class of every event; subclass it and add payload fields.

    Class keywords: ``event_type="name"`` sets the wire name (default: the class
    name); ``abstract=True`` makes an unregistered intermediate base.
    """

    model_config = ConfigDict(extra="forbid")

    __event_type__: ClassVar[str] = ""
    __event_abstract__: ClassVar[bool] = True

    #: Unique id of this event (a uuid4 string unless given).
    event_id: str = Field(default_factory=_new_event_id)
    #: When the event was created, in epoch seconds.
    timestamp: float = Field(default_factory=time.time)
    #: The registered type name of the class; filled in when omitted, never reassigned.
    event_type: str = Field(default="", validate_default=True, frozen=True)
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

    def __init_subclass__(
        cls, *, event_type: str | None = None, abstract: bool = False, **kwargs: Any
    ) -> None:
        if abstract and event_type is not None:
            raise TypeError(f"abstract event class {cls.__qualname__} cannot have an event_type")
        if event_type is not None and (not isinstance(event_type, str) or not event_type):
            raise TypeError(f"event_type of {cls.__qualname__} must be a non-empty string")
        cls.__event_abstract__ = abstract
        cls.__event_type__ = "" if abstract else (event_type or cls.__name__)
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

    @field_validator("event_type", mode="before")
    @classmethod
    def _check_event_type(cls, value: object) -> object:
        if cls.__event_abstract__:
            raise ValueError(f"{cls.__name__} is abstract; instantiate a concrete event class")
        if value == "":
            return cls.__event_type__
        if value != cls.__event_type__:
            raise ValueError(
                f"event_type {value!r} does not match {cls.__name__} ({cls.__event_type__!r})"
            )
        return value

    @field_validator("partition_key")
    @classmethod
    def _check_partition_key(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("partition_key must not contain NUL characters")
        return value

    @classmethod
    def type_name(cls) -> str:
        """The registered type name of this class; TypeError for an abstract class."""
        if cls.__event_abstract__:
            raise TypeError(f"{cls.__qualname__} is abstract and has no event type")
        return cls.__event_type__

    @classmethod
    def model_construct(cls, _fields_set: set[str] | None = None, **values: Any) -> Self:
        """Build without validation (pydantic's), still filling in ``event_type``."""
        values.setdefault("event_type", cls.__event_type__)
        return super().model_construct(_fields_set, **values)

    def to_dict(self) -> dict[str, Any]:
        """Same as :func:`serialize_event`."""
        return serialize_event(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Validate ``data`` as this class.

        On ``Event`` or an abstract base, dispatch by ``data["event_type"]`` through
        the registry (as :func:`deserialize_event_strict`) and require the result to
        be an instance of ``cls``.
        """
        if not cls.__event_abstract__:
            return cls._validate(data)
        event = deserialize_event_strict(data)
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
    def _validate(cls, data: Mapping[str, Any]) -> Self:
        if not isinstance(data, Mapping):
            raise SerializationError(f"an event must be a mapping, not {type(data).__name__}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            errors = cast("list[dict[str, Any]]", exc.errors(include_url=False))
            raise EventValidationError(cls.__event_type__, errors) from exc


def _identity(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def serialize_event(event: Event) -> dict[str, Any]:
    """Return ``event`` as a JSON-compatible dict (always holding ``event_type``).

    Raises SerializationError if a field value cannot be represented as JSON (or is
    text that is not valid unicode, such as a lone surrogate).
    """
    try:
        return event.model_dump(mode="json")
    except (PydanticSerializationError, UnicodeEncodeError) as exc:
        raise SerializationError(f"cannot serialize {type(event).__name__}: {exc}") from exc


def deserialize_event_strict(data: Mapping[str, Any]) -> Event:
    """Build the registered event class named by ``data["event_type"]`` from ``data``.

    Raises UnknownEventTypeError (``event_type`` ``""`` when it is missing or empty),
    EventValidationError (with pydantic's errors and field paths) when the data does
    not fit the class, and SerializationError when ``data`` is not a mapping.
    """
    if not isinstance(data, Mapping):
        raise SerializationError(f"an event must be a mapping, not {type(data).__name__}")
    raw = data.get("event_type")
    name = "" if raw is None else str(raw)
    cls = _REGISTRY.get(name) if isinstance(raw, str) else None
    if cls is None:
        raise UnknownEventTypeError(name)
    return cls._validate(data)


def event_from_json(payload: bytes | str, event_type: str | None = None) -> Event:
    """Validate an event straight from its JSON text (the consumers' fast path).

    ``event_type`` (an entry's routing field) picks the class without parsing the
    payload first; with None the payload is parsed to find it. Raises as
    :func:`deserialize_event_strict` does, and :class:`SerializationError` for a payload
    that is not a JSON object.
    """
    if event_type is None:
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError) as exc:
            raise SerializationError(f"malformed payload: {exc}") from exc
        if not isinstance(data, dict):
            raise SerializationError("malformed payload: not a JSON object")
        return deserialize_event_strict(data)
    cls = _REGISTRY.get(event_type)
    if cls is None:
        raise UnknownEventTypeError(event_type)
    try:
        return cls.model_validate_json(payload)
    except ValidationError as exc:
        errors = cast("list[dict[str, Any]]", exc.errors(include_url=False))
        if any(e.get("type") in ("json_invalid", "model_type") and not e.get("loc")
               for e in errors):
            raise SerializationError(f"malformed payload: {errors[0].get('msg')}") from exc
        raise EventValidationError(cls.__event_type__, errors) from exc


def deserialize_event(data: Mapping[str, Any]) -> Event | None:
    """Like :func:`deserialize_event_strict`, but None for an unknown or missing type.

    Invalid data of a *known* type still raises EventValidationError.
    """
    try:
        return deserialize_event_strict(data)
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
