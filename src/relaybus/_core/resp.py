"""Packing commands into the Redis protocol (RESP), once for both drivers.

Each command is packed by ``hiredis`` (a dependency of relaybus), in C: 0.16-0.25 µs per
argument on a 2-vCPU VM, against 0.33-0.53 µs for redis-py's sync packer and about
2.1 µs for its asyncio one (``python bench/driver_cost.py``); a settle batch carries
three arguments per message.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from hiredis import pack_command

__all__ = ["pack"]


def pack(commands: Iterable[Sequence[Any]]) -> bytes:
    """Every command of ``commands`` (argument tuples) in RESP, as one buffer."""
    return b"".join(pack_command(tuple(c)) for c in commands)
