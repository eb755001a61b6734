"""Poll-with-deadline: the one way tests here wait for something to happen
(:func:`relaybus.testing.wait_for`, which the library's users get too)."""

from __future__ import annotations

from relaybus.testing import wait_for

__all__ = ["wait_for"]
