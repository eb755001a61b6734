"""Health checks: does the broker answer, and is every queue within its bounds?

One check for ``relaybus health`` (a container probe's exit status) and the metrics
port's ``/readyz``: the broker answers, and no queue has more than ``max_lag``
messages waiting (for a subscription: the entries of the log its group has not read
yet, plus its own) nor a waiting message older than ``max_oldest`` seconds, by the
server's clock. The event log itself and the DLQs have no backlog to bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import keys
from .connection import redact
from .errors import BrokerError
from .queue import MessageQueue, QueueInfo

__all__ = ["Health", "check", "check_queues"]


@dataclass(frozen=True)
class Health:
    """A check's verdict and a one-line reason (it names the first queue out of bounds)."""

    ok: bool
    reason: str


def check_queues(infos: Sequence[QueueInfo], *, max_lag: int | None = None,
                 max_oldest: float | None = None) -> Health:
    """The verdict on queues already read (no IO): each within ``max_lag`` messages
    waiting and ``max_oldest`` seconds for its oldest waiting message (None: no bound)."""
    queues = [i for i in infos if not i.is_dlq and not keys.is_event_log(i.name)]
    for info in queues:
        if max_lag is not None and info.waiting_messages > max_lag:
            return Health(False, f"{info.name} has {info.waiting_messages} messages waiting "
                                 f"(more than {max_lag})")
        age = info.oldest_waiting_age
        if max_oldest is not None and age is not None and age > max_oldest:
            return Health(False, f"{info.name}'s oldest waiting message is {age:.1f}s old "
                                 f"(more than {max_oldest:g}s)")
    bounds = [f"lag <= {max_lag}" if max_lag is not None else "",
              f"oldest <= {max_oldest:g}s" if max_oldest is not None else ""]
    shown = " and ".join(b for b in bounds if b)
    return Health(True, f"{len(queues)} queue{'s' if len(queues) != 1 else ''}"
                        + (f" within {shown}" if shown else ""))


def check(mq: MessageQueue, *, max_lag: int | None = None, max_oldest: float | None = None,
          names: Iterable[str] | None = None) -> Health:
    """Read every queue under ``mq``'s prefix (or the pairs ``names``; two round trips)
    and judge them; a broker that does not answer (or refuses) is unhealthy, with its
    error as the reason."""
    try:
        infos = mq.list_queues(names)
    except BrokerError as exc:
        return Health(False, f"the broker at {redact(mq.url)} does not answer: {exc}")
    verdict = check_queues(infos, max_lag=max_lag, max_oldest=max_oldest)
    return Health(verdict.ok, f"{redact(mq.url)}: {verdict.reason}")
