"""Packing commands into the Redis protocol (RESP), once for both drivers.

Each command is packed by ``hiredis`` (a dependency of relaybus), in C. Measured on a
2-vCPU VM, redis-py's own packers cost about 1.7 µs (sync, through hiredis, plus
chunking) to 12 µs (asyncio, in Python) per argument of a settle batch, more than the
server spends on it (``python bench/driver_cost.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from hiredis import pack_command

__all__ = ["pack"]


def pack(commands: Iterable[Sequence[Any]]) -> bytes:
    """Every command of ``commands`` (argument tuples) in RESP, as one buffer."""
    return b"".join(pack_command(tuple(c)) for c in commands)
