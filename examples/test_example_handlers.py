"""Tests of the shop's handlers at three levels (the examples of docs/testing.md)."""

from __future__ import annotations

from shop import OrderPlaced, Payments, PaymentTaken, billing_service, shipping_service

from relaybus import Event, EventBus
from relaybus.testing import wait_for

# -- unit: one event through the handler, no server -------------------------------------


def test_billing_charges_an_order_and_announces_the_payment() -> None:
    payments = Payments()
    published: list[Event] = []
    billing = billing_service(payments, publish=published.append)

    result = billing.handle(OrderPlaced(order_id="A-1", amount=9.5))

    assert result.outcome == "handled"
    assert payments.charged == {"A-1": 9.5}
    assert [(type(e), e.order_id) for e in published] == [(PaymentTaken, "A-1")]


def test_billing_dead_letters_an_order_with_nothing_to_charge() -> None:
    result = billing_service(Payments()).handle(OrderPlaced(order_id="A-2", amount=0))

    assert result.outcome == "dead_lettered"
    assert result.reason == "order A-2: nothing to charge"


def test_billing_retries_while_payments_are_down_then_gives_up() -> None:
    billing = billing_service(Payments(down=True), max_attempts=3, retry_backoff=1.0)
    order = OrderPlaced(order_id="A-3", amount=5.0)

    first = billing.handle(order)
    assert first.outcome == "retried"
    assert first.retry_delay is not None and 0 <= first.retry_delay <= 1.0
    assert isinstance(first.error, ConnectionError)

    last = billing.handle(order, attempt=3)
    assert last.outcome == "dead_lettered"
    assert last.reason == "max attempts (3) reached: ConnectionError: payment provider unavailable"


def test_an_order_without_its_amount_is_invalid() -> None:
    result = billing_service(Payments()).handle(
        {"event_type": "shop.order_placed", "order_id": "A-4"})  # the payload as it arrives

    assert result.outcome == "invalid"
    assert "amount" in str(result.reason)


# -- with a real server: the plugin's event_bus fixture ----------------------------------


def test_billing_on_a_real_server(event_bus: EventBus) -> None:
    payments = Payments()
    with billing_service(payments, event_bus=event_bus) as billing:
        billing.start()
        order = OrderPlaced(order_id="B-1", amount=20.0)
        event_bus.publish(order)
        event_bus.publish(OrderPlaced(order_id="B-2", amount=0))

        billing.wait_until_handled(event_ids=[order.event_id])
        assert payments.charged == {"B-1": 20.0}
        [dead] = wait_for(billing.subscription_dlq.peek, timeout=5, what="a dead letter")
        assert dead.data["order_id"] == "B-2"
        assert dead.reason == "order B-2: nothing to charge"


# -- end to end: two services on one server ----------------------------------------------


def test_a_placed_order_is_charged_then_shipped(event_bus: EventBus) -> None:
    payments = Payments()
    shipped: list[str] = []
    billing = billing_service(payments, event_bus=event_bus)
    shipping = shipping_service(shipped, event_bus=event_bus)
    with billing, shipping:
        billing.start()
        shipping.start()
        event_bus.publish(OrderPlaced(order_id="C-1", amount=12.0))

        billing.wait_until_handled(count=1)
        shipping.wait_until_handled(count=1)
    assert payments.charged == {"C-1": 12.0}
    assert shipped == ["C-1"]
