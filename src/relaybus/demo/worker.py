"""One demo process: ``python -m relaybus.demo.worker NAME PREFIX RUN SEED ORDERS``.

NAME is a service of the demo or ``maintenance`` (the event log's retention); the
server's URL is in ``$RELAYBUS_DEMO_URL`` (it may hold a password, and a command line
is visible to every user of the machine). Runs until SIGTERM or SIGINT, then stops
gracefully.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from relaybus.bus import EventBus

from . import URL_ENV
from .services import SERVICES, build_service, create_orders


def main(argv: list[str]) -> int:
    """Run one demo process; return its exit code."""
    name, prefix, run, seed, orders = argv
    url = os.environ[URL_ENV]
    logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if name == "maintenance":
        bus = EventBus(url, prefix=prefix)
        bus.start()
        stop.wait()
        bus.close()
        return 0
    svc = build_service(name, url=url, prefix=prefix, run=run, seed=int(seed), maintenance=False)
    svc.start()
    if name == "order":
        # orders published before a service subscribed would never reach it
        deadline = time.monotonic() + 60
        while not set(SERVICES) <= set(svc.event_bus.subscriptions()):
            if stop.wait(0.05) or time.monotonic() > deadline:
                break
        create_orders(svc, run, int(orders), int(seed))
    stop.wait()
    svc.stop()
    svc.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
