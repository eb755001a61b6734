"""relaybus in a FastAPI app: publish from an endpoint, handle in the same process.

    RELAYBUS_URL=redis://localhost:6379/0 uvicorn fastapi_app:app

``POST /orders/A-1?amount=9.5`` publishes an ``OrderPlaced`` event and returns its id
in the event log; the ``billing`` service, started and stopped with the app, handles it.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from relaybus import AsyncEventBus, AsyncMicroservice, Event

bus = AsyncEventBus(os.environ.get("RELAYBUS_URL", "embedded"),
                    prefix=os.environ.get("RELAYBUS_PREFIX", "events:"))
billing = AsyncMicroservice("billing", event_bus=bus)  # shares the bus's connection
charged: list[str] = []


class OrderPlaced(Event, event_type="shop.order_placed"):
    order_id: str
    amount: float


@billing.on(OrderPlaced)
async def charge(event: OrderPlaced) -> None:
    charged.append(event.order_id)  # call the payment provider here


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with bus, billing:  # started on startup; stopped gracefully on shutdown
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/orders/{order_id}")
async def place_order(order_id: str, amount: float) -> dict[str, str]:
    log_id = await bus.publish(OrderPlaced(order_id=order_id, amount=amount))
    return {"log_id": log_id}
