"""A tiny shop, the application that docs/testing.md tests: billing charges each placed
order and announces the payment, shipping ships each paid order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relaybus import Event, Microservice, Reject


class OrderPlaced(Event, event_type="shop.order_placed"):
    order_id: str
    amount: float


class PaymentTaken(Event, event_type="shop.payment_taken"):
    order_id: str
    amount: float


class Payments:
    """Stands in for a payment provider's API."""

    def __init__(self, down: bool = False) -> None:
        self.down = down
        self.charged: dict[str, float] = {}

    def charge(self, order_id: str, amount: float) -> None:
        if self.down:
            raise ConnectionError("payment provider unavailable")
        self.charged[order_id] = amount  # by order: charging twice charges once


def billing_service(payments: Payments, publish: Callable[[Event], object] | None = None,
                    **options: Any) -> Microservice:
    """Charges each placed order, then publishes PaymentTaken (through ``publish``,
    else on the service's bus)."""
    billing = Microservice("billing", **options)

    @billing.on(OrderPlaced)
    def charge(order: OrderPlaced) -> None:
        if order.amount <= 0:
            raise Reject(f"order {order.order_id}: nothing to charge")  # dead-lettered
        payments.charge(order.order_id, order.amount)  # raises while it is down: retried
        (publish or billing.publish_event)(PaymentTaken(
            order_id=order.order_id, amount=order.amount, causation_id=order.event_id))

    return billing


def shipping_service(shipped: list[str], **options: Any) -> Microservice:
    """Ships each paid order (appends its id to ``shipped``)."""
    shipping = Microservice("shipping", **options)

    @shipping.on(PaymentTaken)
    def ship(payment: PaymentTaken) -> None:
        shipped.append(payment.order_id)

    return shipping
