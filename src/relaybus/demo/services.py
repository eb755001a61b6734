"""The four services of the order flow, built on :class:`relaybus.Microservice`.

They talk only through events. The order service keeps each order's state in a
Redis hash (its "database"), which the demo reads to show progress in either mode.
Randomness (declined payments, carriers) is derived from ``--seed`` and the order
id, so a run's outcome does not depend on which process handles what, or when.
"""

from __future__ import annotations

import json
import random
from typing import Any

import redis

from relaybus.errors import Reject
from relaybus.events import Event
from relaybus.service import Microservice
from relaybus.testing import plain_client

from .events import OrderCreated, OrderShipped, PaymentProcessed

__all__ = ["SERVICES", "build_service", "create_orders", "orders_key", "notifications_key",
           "retries_key", "FINAL_STATES"]

#: Service names, in the order they are started.
SERVICES = ("order", "payment", "shipping", "notification")
#: Order states that end the flow.
FINAL_STATES = ("shipped", "payment_failed")
#: Share of payments the payment service declines.
DECLINE_RATE = 0.1
#: Share of shipments whose carrier API times out once (retried with backoff).
CARRIER_TIMEOUT_RATE = 0.2
#: Share of customers whose mailbox bounces (their confirmation is dead-lettered).
BOUNCE_RATE = 0.1
_CARRIERS = ("UPS", "DHL", "FedEx", "PostNL")
_ITEMS = ("book", "lamp", "mug", "chair", "pen", "kettle", "rug")


def orders_key(prefix: str, run: str) -> str:
    """The hash holding order states for one demo run."""
    return f"{prefix}demo:{run}:orders"


def notifications_key(prefix: str, run: str) -> str:
    """The counter of notifications sent in one demo run."""
    return f"{prefix}demo:{run}:notifications"


def retries_key(prefix: str, run: str) -> str:
    """The counter of simulated carrier time-outs (each one retried) in one demo run."""
    return f"{prefix}demo:{run}:retries"


def _rng(seed: int, *parts: str) -> random.Random:
    return random.Random(":".join([str(seed), *parts]))


#: How far along each state is: a late, out-of-order event never moves an order back.
_RANK = {"created": 0, "paid": 1, "payment_failed": 2, "shipped": 2}


_STORES: dict[str, redis.Redis] = {}


def store(svc: Microservice) -> redis.Redis:
    """A redis-py client for the demo's own records (orders, counters), on the service's
    server: any URL relaybus takes (a ``RedisCluster`` on a cluster); one per URL."""
    url = svc.mq.url
    if url not in _STORES:
        _STORES[url] = plain_client(url)
    return _STORES[url]


def _update(svc: Microservice, run: str, order_id: str, **changes: Any) -> None:
    """Merge ``changes`` into an order's record (WATCH/MULTI: handlers run concurrently).

    Events about one order can be handled side by side (payment and shipping), so
    the merge is optimistic and atomic, and the status only moves forward.
    """
    key = orders_key(svc.mq.prefix, run)
    with store(svc).pipeline(transaction=True) as pipe:  # a cluster pipeline too (redis-py 6+)
        while True:
            try:
                pipe.watch(key)  # type: ignore[no-untyped-call]
                raw = pipe.hget(key, order_id)
                record = json.loads(raw) if raw else {"order_id": order_id}
                status = changes.get("status")
                if status and _RANK[status] < _RANK.get(record.get("status", "created"), 0):
                    changes = {k: v for k, v in changes.items() if k != "status"}
                record.update(changes)
                pipe.multi()
                pipe.hset(key, order_id, json.dumps(record))
                pipe.execute()
                return
            except redis.WatchError:
                continue


def create_orders(svc: Microservice, run: str, count: int, seed: int) -> list[str]:
    """Create ``count`` orders through the order service; return their ids."""
    ids = []
    for i in range(1, count + 1):
        rng = _rng(seed, "order", str(i))
        order_id = f"ORD-{i:04d}"
        items = rng.sample(_ITEMS, k=rng.randint(1, 3))
        amount = round(rng.uniform(5, 250), 2)
        _update(svc, run, order_id, status="created", amount=amount, items=items)
        svc.publish_event(OrderCreated(order_id=order_id, customer_id=f"CUST-{rng.randint(1, 99):02d}",
                                       items=items, amount=amount))
        ids.append(order_id)
    return ids


class NotificationService(Microservice):
    """Subscribes to every event and "sends" a notification for each (seed style).

    Some customers' mailboxes bounce: their order confirmations are rejected and land
    in the service's dead-letter queue with the reason, for ``relaybus dlq`` to show.
    """

    def __init__(self, run: str, seed: int, **options: Any) -> None:
        super().__init__("notification", event_types=None, **options)
        self.run = run
        self.seed = seed

    def handle_event(self, event: Event) -> bool:
        customer = getattr(event, "customer_id", None)
        if customer and _rng(self.seed, "mailbox", customer).random() < BOUNCE_RATE:
            raise Reject(f"mailbox of {customer} unavailable (550): confirmation not sent")
        store(self).incr(notifications_key(self.mq.prefix, self.run))
        return True


def build_service(name: str, *, url: str, prefix: str, run: str, seed: int,
                  maintenance: bool = True) -> Microservice:
    """The demo service ``name`` (one of :data:`SERVICES`), not yet started."""
    common: dict[str, Any] = {"url": url, "prefix": prefix, "maintenance": maintenance,
                              "concurrency": 4, "retry_backoff": 0.05}
    if name == "order":
        svc = Microservice("order", **common)

        @svc.on(PaymentProcessed)
        def on_payment(event: PaymentProcessed) -> None:
            if event.success:
                _update(svc, run, event.order_id, status="paid", payment=event.payment_id)
            else:
                _update(svc, run, event.order_id, status="payment_failed",
                        payment=f"declined: {event.reason}")

        @svc.on(OrderShipped)
        def on_shipped(event: OrderShipped) -> None:
            _update(svc, run, event.order_id, status="shipped", carrier=event.carrier,
                    tracking=event.tracking_number)

        return svc
    if name == "payment":
        svc = Microservice("payment", **common)

        @svc.on(OrderCreated)
        def charge(event: OrderCreated) -> None:
            rng = _rng(seed, "payment", event.order_id)
            ok = rng.random() >= DECLINE_RATE
            svc.publish_event(PaymentProcessed(
                order_id=event.order_id, success=ok, amount=event.amount,
                payment_id=f"PAY-{rng.randint(100000, 999999)}" if ok else None,
                reason=None if ok else "card declined",
                correlation_id=event.order_id, causation_id=event.event_id))

        return svc
    if name == "shipping":
        svc = Microservice("shipping", **common)
        timed_out: set[str] = set()

        @svc.on(PaymentProcessed)
        def ship(event: PaymentProcessed) -> None:
            if not event.success:
                return
            rng = _rng(seed, "shipping", event.order_id)
            carrier = rng.choice(_CARRIERS)
            if rng.random() < CARRIER_TIMEOUT_RATE and event.order_id not in timed_out:
                # the carrier's API times out once: raising makes relaybus retry later
                timed_out.add(event.order_id)
                store(svc).incr(retries_key(svc.mq.prefix, run))
                raise TimeoutError(f"{carrier} API timed out booking {event.order_id}")
            svc.publish_event(OrderShipped(
                order_id=event.order_id, carrier=carrier,
                tracking_number=f"{carrier[:2].upper()}{rng.randint(10**9, 10**10 - 1)}",
                correlation_id=event.order_id, causation_id=event.event_id))

        return svc
    if name == "notification":
        return NotificationService(run, seed, **common)
    raise ValueError(f"unknown demo service {name!r}; choose from {', '.join(SERVICES)}")
