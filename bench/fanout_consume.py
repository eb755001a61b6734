"""Three sync services in one process consuming pre-loaded events (fan-out to 3).

The workload behind the sync fan-out profile in docs/benchmarks.md, without a
publisher running beside it::

    python bench/fanout_consume.py [EVENTS]
    py-spy record -r 1000 --gil -f raw -o fanout3.txt -- python bench/fanout_consume.py

Each service has its own subscription and a typed handler; the rate is per service.
"""

from __future__ import annotations

import sys
import time

from relaybus import EventBus, Microservice, testing
from relaybus._bench import BenchEvent, make_events, publish_all


def main(n: int) -> None:
    with testing.embedded_server() as url:
        prefix = "fanout3:"
        counts = [0, 0, 0]

        def services() -> list[Microservice]:
            made = []
            for i in range(3):
                svc = Microservice(f"s{i}", url=url, prefix=prefix, maintenance=False)

                def handle(event: BenchEvent, i: int = i) -> None:
                    counts[i] += 1

                svc.on(BenchEvent)(handle)
                made.append(svc)
            return made

        for svc in services():  # subscribe, then stop: the events wait in the log
            svc.start()
            svc.stop()
        with EventBus(url, prefix=prefix) as bus:
            publish_all(bus, make_events(n), 100)
        running = services()
        t0 = time.monotonic()
        for svc in running:
            svc.start()
        while sum(counts) < 3 * n:
            time.sleep(0.01)  # polling for the end of the run
        dt = time.monotonic() - t0
        print(f"fan-out to 3, pre-loaded: {n / dt:,.0f} events/s per service "
              f"({3 * n / dt:,.0f} handled/s in all)")
        for svc in running:
            svc.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 60_000)
