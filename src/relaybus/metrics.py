"""Prometheus metrics and the metrics port (extra ``relaybus[metrics]``).

:class:`RelaybusCollector` turns what services and buses counted (on either front)
into metric families at scrape time, and reads every queue under the prefix then, in
two round trips whatever their number (no polling loop). Register it in your own
registry, or let ``Microservice(..., metrics_port=PORT)`` / ``relaybus run
--metrics-port PORT`` serve it with :func:`serve`, which also answers ``/healthz``
(the process's services are running) and ``/readyz`` (the broker answers and, with
``?max_lag=N&max_oldest=SECONDS``, every queue is within bounds: see
:mod:`relaybus.health`).

Every name starts with ``relaybus_``; labels are ``service``, ``queue``,
``event_type`` (a registered event class's name, else ``other``) and ``outcome``
(``handled``, ``retried``, ``dead_lettered``, ``duplicate``, ``invalid``): bounded sets.
"""

from __future__ import annotations

import logging
import socketserver
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from . import keys
from .errors import BrokerError, ConfigurationError
from .health import Health, check, check_queues

try:
    from prometheus_client import CollectorRegistry, make_wsgi_app
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError("relaybus.metrics needs prometheus-client: "
                      "pip install 'relaybus[metrics]'") from exc

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from ._core.telemetry import Telemetry
    from .queue import MessageQueue

__all__ = ["RelaybusCollector", "MetricsServer", "serve"]

logger = logging.getLogger("relaybus.metrics")


class _Service(Protocol):
    service_name: str
    subscription_queue_name: str
    prefix: str
    running: bool
    _telemetry: Telemetry
    _event_bus: Any
    _worker: Any

    @property
    def stats(self) -> dict[str, int]: ...


def _service_of(source: object) -> _Service | None:
    return source if hasattr(source, "service_name") else None  # type: ignore[return-value]


def _bus_of(source: object) -> Any:
    """The event bus of a source (a bus, or a service's once it connected)."""
    if _service_of(source) is not None:
        return getattr(source, "_event_bus", None)
    return source


class RelaybusCollector(Collector):
    """The metrics of ``sources`` (services and event buses, of either front) and of
    their queues: a collector of services only reads their subscriptions (every
    partition), any other every queue under the prefix (``queue_names`` overrides).

    The queues are read with a sync :class:`~relaybus.MessageQueue`: ``queues`` when
    given (``None``: one made from the first source's URL and prefix once it has
    connected; ``False``: no queue metrics). A broker that does not answer at scrape
    time costs only the queue metrics (``relaybus_broker_up`` says 0).
    """

    def __init__(self, *sources: object, queues: MessageQueue | bool | None = None,
                 queue_names: Iterable[str] | None = None) -> None:
        self.sources = list(sources)
        self._queues = queues
        self._names = list(queue_names) if queue_names is not None else None
        self._own_mq: MessageQueue | None = None
        self._lock = threading.Lock()

    # -- the queue reader ---------------------------------------------------------

    def queue_layer(self) -> MessageQueue | None:
        """The sync queue layer the queue metrics (and ``/readyz``) read, if any."""
        if self._queues is False:
            return None
        if not isinstance(self._queues, bool) and self._queues is not None:
            return self._queues
        with self._lock:
            if self._own_mq is None:
                self._own_mq = self._new_mq()
            return self._own_mq

    def _new_mq(self) -> MessageQueue | None:
        from .queue import MessageQueue
        for source in self.sources:
            bus = _bus_of(source)
            mq = getattr(bus, "mq", None)
            if isinstance(mq, MessageQueue):
                return mq  # a sync front's own: thread-safe
            url = getattr(mq, "url", None)
            if isinstance(url, str) and url:
                return MessageQueue(url, prefix=bus.prefix)
        return None

    def queue_names(self) -> list[str] | None:
        """The queue pairs the queue metrics read (None: every one under the prefix)."""
        if self._names is not None:
            return self._names
        services = [s for s in map(_service_of, self.sources) if s is not None]
        if not services or len(services) != len(self.sources):
            return None
        names = []
        for svc in services:
            bus = svc._event_bus
            for i in range(bus.partitions if bus is not None else 1):
                names.append(keys.partition_name(svc.subscription_queue_name, i))
        return names

    def close(self) -> None:
        """Release the queue layer this collector made (not one it was given)."""
        with self._lock:
            mq, self._own_mq = self._own_mq, None
        if mq is not None and all(getattr(_bus_of(s), "mq", None) is not mq
                                  for s in self.sources):
            mq.close()

    # -- collecting ---------------------------------------------------------------

    def describe(self) -> list[Metric]:
        return []  # not read at registration: collect() does IO

    def collect(self) -> Iterator[Metric]:
        services = [s for s in map(_service_of, self.sources) if s is not None]
        buses = [b for b in map(_bus_of, self.sources) if b is not None]
        if services:
            yield from _service_metrics(services)
        if buses:
            yield from _bus_metrics(buses)
        mq = self.queue_layer()
        if mq is not None:
            yield from _queue_metrics(mq, self.queue_names())


def _service_metrics(services: list[_Service]) -> Iterator[Metric]:
    received = CounterMetricFamily("relaybus_events_received",
                                   "Events delivered to a service instance.",
                                   labels=["service", "event_type"])
    outcomes = CounterMetricFamily(
        "relaybus_events_handled", "Events settled by a service instance, by outcome.",
        labels=["service", "event_type", "outcome"])
    duration = HistogramMetricFamily("relaybus_handler_duration_seconds",
                                     "Seconds a handler ran, per event.",
                                     labels=["service", "event_type"])
    settles = CounterMetricFamily("relaybus_settle_round_trips",
                                  "Settle calls (one round trip per batch of outcomes).",
                                  labels=["service"])
    failed = CounterMetricFamily("relaybus_handler_failures",
                                 "Handler runs that raised (Retry and Reject excluded).",
                                 labels=["service"])
    errors = CounterMetricFamily("relaybus_service_errors",
                                 "Unexpected errors in relaybus or service code outside "
                                 "handlers.", labels=["service"])
    in_flight = GaugeMetricFamily("relaybus_events_in_flight",
                                  "Events fetched and not yet settled.", labels=["service"])
    running = GaugeMetricFamily("relaybus_service_running",
                                "1 while the service instance runs.", labels=["service"])
    for svc in services:
        name = svc.service_name
        telemetry = svc._telemetry
        for (event_type,), n in telemetry.counters("received").items():
            received.add_metric([name, event_type], n)
        for (event_type, outcome), n in telemetry.counters("outcomes").items():
            outcomes.add_metric([name, event_type, outcome], n)
        for (event_type,), h in telemetry.histograms("handler_seconds").items():
            duration.add_metric([name, event_type], h.cumulative(), h.total)
        settles.add_metric([name], telemetry.counters("settles").get((), 0))
        stats = svc.stats
        failed.add_metric([name], stats.get("failed", 0))
        errors.add_metric([name], stats.get("errors", 0))
        worker = svc._worker
        in_flight.add_metric([name], worker.in_flight if worker is not None else 0)
        running.add_metric([name], 1 if svc.running else 0)
    yield from (received, outcomes, duration, settles, failed, errors, in_flight, running)


def _bus_metrics(buses: list[Any]) -> Iterator[Metric]:
    published = CounterMetricFamily("relaybus_events_published",
                                    "Events appended to the event log by this process.",
                                    labels=["event_type"])
    repeats = CounterMetricFamily("relaybus_publish_duplicates",
                                  "Events published again within the dedup window (not "
                                  "appended).")
    totals: dict[str, int] = {}
    repeated = 0
    for bus in buses:
        for (event_type,), n in bus._telemetry.counters("published").items():
            totals[event_type] = totals.get(event_type, 0) + n
        repeated += bus.mq.stats.get("publish_duplicates", 0)
    for event_type, n in sorted(totals.items()):
        published.add_metric([event_type], n)
    repeats.add_metric([], repeated)
    yield from (published, repeats)


_QUEUE_GAUGES = (
    ("relaybus_queue_waiting_messages", "waiting_messages",
     "Messages not yet delivered: the consumer group's lag (a subscription: the log "
     "entries it has not read, plus its own stream's)."),
    ("relaybus_queue_pending_messages", "pending_messages",
     "Messages delivered and not yet acknowledged."),
    ("relaybus_queue_delayed_messages", "delayed_messages", "Retries waiting for their time."),
    ("relaybus_queue_dlq_messages", "dlq_messages", "Messages in the queue's DLQ."),
    ("relaybus_queue_consumers", "consumers", "Consumers in the queue's group."),
)


def _queue_metrics(mq: MessageQueue, names: list[str] | None) -> Iterator[Metric]:
    up = GaugeMetricFamily("relaybus_broker_up",
                           "1 when the broker answered this scrape's queue reads.")
    try:
        infos = mq.list_queues(names)
    except BrokerError as exc:
        logger.warning("metrics: the queues could not be read: %s", exc)
        up.add_metric([], 0)
        yield up
        return
    up.add_metric([], 1)
    yield up
    families = [(GaugeMetricFamily(name, doc, labels=["queue"]), field)
                for name, field, doc in _QUEUE_GAUGES]
    oldest = GaugeMetricFamily("relaybus_queue_oldest_waiting_age_seconds",
                               "Age of the oldest waiting message, by the server's clock.",
                               labels=["queue"])
    log = GaugeMetricFamily("relaybus_event_log_entries",
                            "Events the event log (a partition of it) keeps.",
                            labels=["queue"])
    scheduled = GaugeMetricFamily("relaybus_scheduled_events",
                                  "Events published for later, still waiting (per log "
                                  "partition).", labels=["queue"])
    for info in infos:
        if info.is_dlq:
            continue
        if keys.is_event_log(info.name):
            log.add_metric([info.name], info.message_count)
            scheduled.add_metric([info.name], info.scheduled_messages)
            families[3][0].add_metric([info.name], info.dlq_messages)
            continue
        for family, field in families:
            family.add_metric([info.name], getattr(info, field))
        oldest.add_metric([info.name], info.oldest_waiting_age or 0.0)
    yield from (f for f, _ in families)
    yield from (oldest, log, scheduled)


# -- the metrics port --------------------------------------------------------------


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        logger.debug("metrics port: " + format, *args)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a port, served by a daemon thread."""

    def __init__(self, collector: RelaybusCollector, port: int, host: str = "0.0.0.0",
                 registry: CollectorRegistry | None = None,
                 alive: Callable[[], bool] | None = None) -> None:
        self.collector = collector
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(collector)
        self._alive = alive or (lambda: all(
            s.running for s in map(_service_of, collector.sources) if s is not None))
        self._metrics = make_wsgi_app(self.registry)
        try:
            self._server = make_server(host, port, self._app, server_class=_Server,
                                       handler_class=_QuietHandler)
        except OSError as exc:
            raise ConfigurationError(f"the metrics port {host}:{port} cannot be opened: "
                                     f"{exc}") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="relaybus-metrics")

    @property
    def port(self) -> int:
        """The port served (the one the system chose when given 0)."""
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        logger.info("metrics on http://%s:%d/metrics (and /healthz, /readyz)",
                    self._server.server_address[0], self.port)
        return self

    def close(self) -> None:
        """Stop serving and release the port (and the collector's own queue layer)."""
        self._server.shutdown()
        self._server.server_close()
        self.collector.close()

    def readiness(self, query: str = "") -> Health:
        """``/readyz``'s verdict: the services run, the broker answers, the queues are
        within the bounds the query names (``max_lag``, ``max_oldest``)."""
        if not self._alive():
            return Health(False, "not running")
        params = urllib.parse.parse_qs(query)
        try:
            lag = int(params["max_lag"][0]) if "max_lag" in params else None
            oldest = float(params["max_oldest"][0]) if "max_oldest" in params else None
        except ValueError:
            return Health(False, "max_lag must be an integer and max_oldest a number")
        mq = self.collector.queue_layer()
        if mq is None:
            return check_queues([], max_lag=lag, max_oldest=oldest)
        return check(mq, max_lag=lag, max_oldest=oldest, names=self.collector.queue_names())

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse
             ) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            verdict = (Health(self._alive(), "running" if self._alive() else "not running")
                       if path == "/healthz" else self.readiness(environ.get("QUERY_STRING", "")))
            body = (("ok: " if verdict.ok else "unhealthy: ") + verdict.reason + "\n").encode()
            start_response("200 OK" if verdict.ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))])
            return [body]
        return self._metrics(environ, start_response)  # type: ignore[no-any-return]


def serve(*sources: object, port: int, host: str = "0.0.0.0",
          queues: MessageQueue | bool | None = None) -> MetricsServer:
    """Serve the metrics of ``sources`` (see :class:`RelaybusCollector`; none: only
    the queues of ``queues``) on ``port``; ``close()`` the result to stop."""
    return MetricsServer(RelaybusCollector(*sources, queues=queues), port, host).start()
