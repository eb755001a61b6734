"""``relaybus schema``: print the events' schemas; ``schema check``: compare them with a
saved copy (for CI: exit 1 when a change would break a consumer).

Both import the ``--app`` modules first, so that their Event classes register (the
schemas are those of every registered type) and their services are found (module
attributes that are ``Microservice`` or ``AsyncMicroservice`` instances). Nothing
connects to a broker.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from pydantic import PydanticUserError

from .._core.service import ServiceBase
from ..events import EVENT_TYPES, Event
from ..schema import (
    ServiceSpec,
    asyncapi_document,
    compare_schemas,
    event_schema,
    schemas_document,
    service_spec,
)
from ._common import (
    DEFAULT_PREFIX,
    EXIT_FAILURE,
    JsonOption,
    PrefixOption,
    fail,
    guarded,
    import_module,
    print_json,
)

app = typer.Typer(
    name="schema", no_args_is_help=False,
    help="Print the events' JSON Schemas or AsyncAPI document; `check` finds breaking changes.\n\n"
         "Without a command: one JSON Schema per event type (--format jsonschema) or the "
         "AsyncAPI 3.0 document of the app. `check --against FILE` compares them with a "
         "saved copy.")


class Format(str, Enum):
    """Output of ``relaybus schema``."""

    jsonschema = "jsonschema"
    asyncapi = "asyncapi"


AppOption = Annotated[list[str] | None, typer.Option(
    "--app", metavar="MODULE", show_default=False,
    help="Import MODULE (repeatable) so its Event classes register and its services are "
         "found.")]


def _load(modules: list[str] | None) -> tuple[list[type[Event]], list[ServiceSpec], str]:
    """The registered event classes (but those JSON Schema cannot describe: a warning
    each), the modules' services, and the first module's ``__version__`` (``0.0.0``
    without one), after importing ``modules``."""
    services: dict[str, ServiceSpec] = {}
    version = "0.0.0"
    for i, name in enumerate(modules or ()):
        import_module(name, "'--app'")
        module = sys.modules[name]
        if i == 0 and isinstance(getattr(module, "__version__", None), str):
            version = module.__version__
        for value in vars(module).values():
            if isinstance(value, ServiceBase):
                services.setdefault(value.service_name, service_spec(value))
    classes = []
    for name in sorted(EVENT_TYPES):
        try:
            event_schema(EVENT_TYPES[name])
        except PydanticUserError as exc:  # a field JSON Schema cannot describe
            typer.echo(f"warning: left out event type {name!r}: its schema cannot be "
                       f"built: {' '.join(str(exc).split())}", err=True)
        else:
            classes.append(EVENT_TYPES[name])
    return classes, list(services.values()), version


@app.callback(invoke_without_command=True)
@guarded
def schema(
    ctx: typer.Context,
    app_modules: AppOption = None,
    fmt: Annotated[Format, typer.Option(
        "--format", help="jsonschema: one JSON Schema per event type (in $defs); asyncapi: "
                         "the app's AsyncAPI 3.0 document.")] = Format.jsonschema,
    prefix: PrefixOption = DEFAULT_PREFIX,
) -> None:
    """Print the events' schemas as JSON: every registered type with its version.

    Save the output (relaybus schema --app shop > schemas.json) and compare later
    versions of the app with it: relaybus schema check --against schemas.json --app shop
    """
    if ctx.invoked_subcommand is not None:
        return
    classes, services, version = _load(app_modules)
    if not classes:
        typer.echo("warning: no event types are registered: give --app MODULE to import "
                   "the module that defines them", err=True)
    if fmt is Format.asyncapi:
        title = f"{app_modules[0]} events" if app_modules else "relaybus events"
        print_json(asyncapi_document(classes, services, title=title, version=version,
                                     prefix=prefix))
    else:
        print_json(schemas_document(classes))


@app.command("check")
@guarded
def check(
    against: Annotated[Path, typer.Option(
        "--against", metavar="FILE", exists=True, dir_okay=False, show_default=False,
        help="A saved `relaybus schema` output (either format).")],
    app_modules: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Compare the schemas with a saved output: exit 1 if a change breaks a consumer.

    Breaking: an event type removed, a version lowered, a field removed or retyped, a
    required field added without a default (unless the version was raised and an
    upcaster reads the old one). Compatible: a new type or version, an optional field.
    """
    try:
        saved = json.loads(against.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        fail(f"cannot read {str(against)!r}: {exc}")
    classes, _, _ = _load(app_modules)
    if not classes:
        typer.echo("warning: no event types are registered: give --app MODULE to import "
                   "the module that defines them", err=True)
    try:
        changes = compare_schemas(saved, schemas_document(classes))
    except ValueError as exc:
        fail(f"{str(against)!r}: {exc}")
    broken = [c for c in changes if c.breaking]
    if as_json:
        print_json([c.to_dict() for c in changes])
    else:
        for c in changes:
            typer.echo(f"{'BREAKING' if c.breaking else 'ok':<9}{c.event_type}: {c.message}")
        typer.echo(f"{len(changes)} change{'' if len(changes) == 1 else 's'}, "
                   f"{len(broken)} breaking" + (": a consumer would fail" if broken else
                                                "; compatible"))
    if broken:
        raise typer.Exit(EXIT_FAILURE)
