"""Event classes for the CLI tests (``relaybus publish --app cli_app``)."""

from __future__ import annotations

from relaybus import Event


class CliOrderPlaced(Event, event_type="cli.OrderPlaced"):
    """An order, as a service of the tests would receive it."""

    order_id: str
    total: float
    quantity: int = 1
