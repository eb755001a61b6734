"""Run a test deployment in the foreground for a CI test pass::

    python tests/deployments.py cluster DIR    # tests/cluster.py: 3 primaries, 3 replicas
    python tests/deployments.py sentinel DIR   # tests/sentinel.py: a primary, a replica,
                                               # three sentinels

It starts the deployment under DIR (new or empty), prints its URL (the only line on
stdout; everything else goes to stderr), and runs until SIGTERM or SIGINT, then stops
every server. ``.ci/run`` points ``RELAYBUS_TEST_URL`` at the URL for one pass of the
suite.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from cluster import ClusterDeployment
from sentinel import SentinelCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["cluster", "sentinel"])
    parser.add_argument("dir", type=Path, help="an empty or new directory for the servers")
    args = parser.parse_args(argv)

    def leave(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, leave)
    args.dir.mkdir(parents=True, exist_ok=True)
    root = args.dir.resolve()
    deployment = ClusterDeployment(root) if args.kind == "cluster" else SentinelCluster(root)
    try:
        began = time.monotonic()
        deployment.start()
        url = deployment.url if isinstance(deployment, ClusterDeployment) else deployment.url()
        print(f"{args.kind} up in {time.monotonic() - began:.1f}s, servers under {root}",
              file=sys.stderr, flush=True)
        print(url, flush=True)
        while True:
            signal.pause()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        deployment.stop()


if __name__ == "__main__":
    sys.exit(main())
