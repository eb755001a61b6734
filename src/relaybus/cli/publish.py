"""``relaybus publish``: put one event on the bus by hand."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

import typer
from rich.text import Text

from ..bus import EventBus
from ..errors import EventValidationError
from ..events import EVENT_TYPES, Event, deserialize_event_strict, resolve_event_type
from ._common import (
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    EXIT_FAILURE,
    JsonOption,
    PrefixOption,
    TimeoutOption,
    UrlOption,
    console,
    error,
    fail,
    guarded,
    import_module,
    print_json,
)


def _payload(text: str, event_type: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint="'JSON'") from exc
    if not isinstance(data, dict):
        raise typer.BadParameter("must be a JSON object ({...})", param_hint="'JSON'")
    if data.get("event_type", event_type) != event_type:
        raise typer.BadParameter(f"its event_type {data['event_type']!r} is not {event_type!r}",
                                 param_hint="'JSON'")
    return data


def _validate(event_type: str, data: dict[str, Any], module: str) -> Event:
    """Build the registered event class; report each invalid field on its own line."""
    import_module(module, "'--app'")
    if resolve_event_type(event_type) is None:
        known = ", ".join(sorted(EVENT_TYPES)) or "none"
        fail(f"unknown event type {event_type!r} after importing {module} "
             f"(registered: {known})")
    try:
        return deserialize_event_strict({**data, "event_type": event_type}, tolerant=False)
    except EventValidationError as exc:
        error(f"invalid {event_type!r} event, nothing published:")
        for err in exc.errors:
            loc = ".".join(str(p) for p in err.get("loc", ())) or "(event)"
            given = err.get("input")
            shown = "" if err.get("type") == "missing" or isinstance(given, dict) \
                else f" (got {given!r})"
            typer.echo(f"  {loc}: {err.get('msg', 'invalid')}{shown}", err=True)
        raise typer.Exit(EXIT_FAILURE) from None


@guarded
def publish(
    event_type: Annotated[str, typer.Argument(metavar="EVENT_TYPE", show_default=False,
                                              help="Event type name, e.g. order.created.")],
    payload: Annotated[str, typer.Argument(metavar="JSON", show_default=False,
                                           help="The event's fields as a JSON object.")],
    app_module: Annotated[str | None, typer.Option(
        "--app", metavar="MODULE",
        help="Import MODULE so its Event classes validate the payload first.")] = None,
    delay: Annotated[float | None, typer.Option(
        "--delay", metavar="SECONDS", min=0.0,
        help="Schedule it: published SECONDS from now by the server's clock, by the "
             "bus's maintenance (relaybus scheduled list shows it).")] = None,
    url: UrlOption = DEFAULT_URL, prefix: PrefixOption = DEFAULT_PREFIX,
    timeout: TimeoutOption = DEFAULT_TIMEOUT, as_json: JsonOption = False,
) -> None:
    """Publish an event through the bus; with --app, validate it against its class.

    Without --app the fields are sent as given (event_id and timestamp are filled
    in), and a warning says that nothing validated them. An invalid payload is
    reported field by field and exits 1. For example:

        relaybus publish order.created '{"order_id": "A-1", "amount": 9.5}' --app shop.events

    With --delay the event waits on the server and the id shown is its schedule id
    (for `relaybus scheduled cancel`).
    """
    data = _payload(payload, event_type)
    event = _validate(event_type, data, app_module) if app_module else None
    event_id = event.event_id if event else str(data.setdefault("event_id", str(uuid.uuid4())))
    with EventBus(url, prefix=prefix, retry_timeout=timeout) as bus:
        msg_id = bus.publish(event, delay=delay) if event else \
            bus.publish_raw(event_type, data, delay=delay)
    if event is None:
        typer.echo(f"warning: no class validated this {event_type!r} event (give --app "
                   "MODULE to check it against its Event class); subscribers validate it on "
                   "receipt and dead-letter it if it does not fit", err=True)
    if as_json:
        print_json([{"id": msg_id, "event_type": event_type, "event_id": event_id,
                     **({"delay": delay} if delay is not None else {})}])
    elif delay is not None:
        console().print(Text(f"scheduled {event_type} {event_id} in {delay:g} s as {msg_id}"))
    else:
        console().print(Text(f"published {event_type} {event_id} as {msg_id}"))
