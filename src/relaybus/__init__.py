"""relaybus: a durable, typed event bus for Python microservices on Redis Streams.

Layers, bottom up: :class:`MessageQueue` (queue pairs with dead-letter queues on
Redis Streams), :class:`Event` (typed pydantic events), :class:`EventBus` (shared,
durable subscriptions) and :class:`Microservice` (handlers, retries, graceful
shutdown). Each has an asyncio twin on the same core: :class:`AsyncMessageQueue`,
:class:`AsyncEventBus`, :class:`AsyncMicroservice`.
"""

from __future__ import annotations

import logging

from ._core.service import HandleResult
from .aio import AsyncEventBus, AsyncMessageQueue, AsyncMicroservice, AsyncQueue, AsyncTransaction
from .bus import EventBus
from .codec import Message
from .embedded import EmbeddedServer
from .errors import (
    BrokerAuthenticationError,
    BrokerCommandError,
    BrokerError,
    BrokerOutOfMemoryError,
    BrokerRequestTooLargeError,
    BrokerUnavailableError,
    ConfigurationError,
    CrossSlotError,
    DuplicateEventTypeError,
    EmbeddedServerError,
    EventError,
    EventValidationError,
    HandlerOutcome,
    InvalidNameError,
    MessageTooLargeError,
    NewerEventVersionError,
    QueueNotFoundError,
    Reject,
    RelaybusError,
    ReplicationTimeoutError,
    Retry,
    SerializationError,
    UnknownEventTypeError,
    UnsupportedServerError,
)
from .events import (
    EVENT_TYPES,
    Event,
    deserialize_event,
    deserialize_event_strict,
    serialize_event,
)
from .queue import LeanMQ, MessageQueue, Queue, QueueInfo, Transaction
from .retry import RetryPolicy
from .runner import load_service, run_service
from .service import Microservice

__version__ = "0.1.0"

__all__ = [
    "EVENT_TYPES",
    "AsyncEventBus",
    "AsyncMessageQueue",
    "AsyncMicroservice",
    "AsyncQueue",
    "AsyncTransaction",
    "BrokerAuthenticationError",
    "BrokerCommandError",
    "BrokerError",
    "BrokerOutOfMemoryError",
    "BrokerRequestTooLargeError",
    "BrokerUnavailableError",
    "ConfigurationError",
    "CrossSlotError",
    "DuplicateEventTypeError",
    "EmbeddedServer",
    "EmbeddedServerError",
    "Event",
    "EventBus",
    "EventError",
    "EventValidationError",
    "NewerEventVersionError",
    "HandleResult",
    "HandlerOutcome",
    "InvalidNameError",
    "LeanMQ",
    "Message",
    "MessageQueue",
    "MessageTooLargeError",
    "Microservice",
    "Queue",
    "QueueInfo",
    "QueueNotFoundError",
    "Reject",
    "RelaybusError",
    "ReplicationTimeoutError",
    "Retry",
    "RetryPolicy",
    "SerializationError",
    "Transaction",
    "UnknownEventTypeError",
    "UnsupportedServerError",
    "deserialize_event",
    "deserialize_event_strict",
    "load_service",
    "run_service",
    "serialize_event",
]

logging.getLogger("relaybus").addHandler(logging.NullHandler())
