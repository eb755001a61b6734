"""Consumer-group facts read alike on every server version the suite runs against."""

from __future__ import annotations

from typing import Any

import redis


def lag(raw: redis.Redis, stream: str, group: dict[str, Any]) -> int:
    """Entries of ``stream`` the group has not read yet: ``XINFO GROUPS``'s ``lag`` where
    the server reports it (Redis 7+), else counted after its last-delivered id (6.2)."""
    if group.get("lag") is not None:
        return int(group["lag"])
    last = group["last-delivered-id"]
    last = last.decode() if isinstance(last, bytes) else str(last)
    return len(raw.xrange(stream, "(" + last, "+"))
