"""Every Lua script relaybus runs, as source text and its SHA1, loaded once.

The scripts live in ``relaybus/lua/*.lua``; each one's header says its KEYS and ARGV.
``lua/lib.lua`` (server time, failure history, parking an entry) is put in front of
every script, so a rule is written once. Every key a script touches is passed in
``KEYS`` and, by the key layout of :mod:`relaybus.keys`, shares one hash tag, so the
scripts run on Redis Cluster too. Nothing here talks to a server: the commands module
builds the calls (``EVALSHA``) and the drivers run them, loading a script on
``NOSCRIPT``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

__all__ = ["SCRIPT_NAMES", "Script", "script", "source"]

#: The scripts shipped in ``relaybus/lua`` (``lib.lua`` is the prelude of each).
SCRIPT_NAMES = ("fetch", "settle", "publish", "requeue", "trim", "drain", "count", "schedule",
                "promote")


@dataclass(frozen=True)
class Script:
    """One script: its name, full source (prelude included) and SHA1 (for EVALSHA)."""

    name: str
    source: str
    sha: str


def _read(name: str) -> str:
    return resources.files("relaybus").joinpath("lua").joinpath(f"{name}.lua").read_text("utf-8")


@cache
def script(name: str) -> Script:
    """The script ``name`` (KeyError for an unknown one)."""
    if name not in SCRIPT_NAMES:
        raise KeyError(name)
    text = _read("lib") + "\n" + _read(name)
    return Script(name, text, hashlib.sha1(text.encode("utf-8")).hexdigest())


def source(name: str) -> str:
    """The full Lua source of the script ``name``."""
    return script(name).source
