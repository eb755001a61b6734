"""Every Lua script relaybus runs, loaded once and called by name.

The scripts live in ``relaybus/lua/*.lua``; each one's header says its KEYS and ARGV.
Every key a script touches is passed in ``KEYS`` and, by the key layout of
:mod:`relaybus.keys`, shares one hash tag, so the scripts run on Redis Cluster too.
This module only builds the calls; the sync queue layer (and a future asyncio front)
executes them.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script

__all__ = ["SCRIPT_NAMES", "source", "Scripts"]

#: The scripts shipped in ``relaybus/lua``.
SCRIPT_NAMES = ("fetch", "ack", "dead_letter", "requeue", "route", "extend", "release", "trim")


@cache
def source(name: str) -> str:
    """The Lua source of the script ``name``."""
    if name not in SCRIPT_NAMES:
        raise KeyError(name)
    return resources.files("relaybus").joinpath("lua").joinpath(f"{name}.lua").read_text("utf-8")


class Scripts:
    """The scripts registered on one client (EVALSHA, loading on NOSCRIPT)."""

    def __init__(self, client: redis.Redis) -> None:
        self._scripts: dict[str, Script] = {
            name: client.register_script(source(name)) for name in SCRIPT_NAMES
        }

    def __call__(
        self,
        name: str,
        keys: list[str],
        args: list[Any],
        client: Any = None,
    ) -> Any:
        """Run script ``name``; with ``client`` (a pipeline), queue it there instead."""
        return self._scripts[name](keys=keys, args=args, client=client)
