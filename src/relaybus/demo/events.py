"""The events of the order flow."""

from __future__ import annotations

from relaybus.events import Event

__all__ = ["OrderCreated", "PaymentProcessed", "OrderShipped"]


class OrderCreated(Event, event_type="order.created"):
    """An order was placed."""

    order_id: str
    customer_id: str
    items: list[str]
    amount: float


class PaymentProcessed(Event, event_type="payment.processed"):
    """A payment attempt for an order finished (``success`` False: declined)."""

    order_id: str
    success: bool
    amount: float
    payment_id: str | None = None
    reason: str | None = None


class OrderShipped(Event, event_type="order.shipped"):
    """A paid order left the warehouse."""

    order_id: str
    carrier: str
    tracking_number: str
