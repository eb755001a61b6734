"""Steps and flows: what the drivers run.

A :class:`Step` is one round trip: one command, or several sent as one pipeline
(``transaction`` for MULTI/EXEC), and a ``parse`` function that turns the replies
into a value. A *flow* is a generator of steps that receives each step's value and
returns the operation's result::

    def flow() -> Flow[int]:
        n = yield Step.one(Call("XLEN", key), int)
        return n

Drivers run a flow with ``drive``; an error the driver does not handle itself (see
:mod:`.outage`) is thrown into the flow at its ``yield``, so a flow can recover (a
missing consumer group) or let it propagate.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..errors import ReplicationTimeoutError
from ..scripts import Script
from .outage import Kind, classify
from .resp import pack

__all__ = ["Call", "ScriptCall", "Command", "Step", "Flow", "T", "command_args", "wire", "unwrap",
           "Replication", "framed",
           "first_error", "noscript", "request_size"]

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True, slots=True)
class Call:
    """A plain command: ``Call("XADD", key, "*", "d", payload)``."""

    args: tuple[Any, ...]

    def __init__(self, *args: Any) -> None:
        object.__setattr__(self, "args", args)


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """A Lua script call, sent as EVALSHA (the driver loads the script on NOSCRIPT)."""

    script: Script
    keys: Sequence[str]
    args: Sequence[Any]

    @property
    def evalsha(self) -> tuple[Any, ...]:
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)


Command = Call | ScriptCall


def _first(replies: list[Any]) -> Any:
    return replies[0]


@dataclass(frozen=True, slots=True)
class Step(Generic[T]):
    """One round trip: ``commands`` sent together, ``parse(replies)`` gives the value.

    ``tolerate`` lets error replies through to ``parse`` (as exception objects in
    their place) instead of raising the first one. ``block`` marks a blocking read:
    the seconds it may wait on the server (the driver gives it a connection of its
    own and a socket timeout above it). ``transaction`` sends MULTI/EXEC. ``durable``
    marks a write whose loss would lose or repeat work (a publish, a settle, a move):
    with ``durability="replicated"`` it waits for the replicas (:class:`Replication`).
    """

    commands: tuple[Command, ...]
    parse: Callable[[list[Any]], T]
    transaction: bool = False
    tolerate: bool = False
    block: float | None = None
    durable: bool = False

    @staticmethod
    def one(command: Command, parse: Callable[[Any], U] | None = None, *,
            block: float | None = None, durable: bool = False) -> Step[U]:
        """A step of one command; ``parse`` gets its reply (not a list)."""
        if parse is None:
            return Step((command,), _first, block=block, durable=durable)
        fn = parse
        return Step((command,), lambda replies: fn(replies[0]), block=block, durable=durable)


@dataclass(frozen=True, slots=True)
class Replication:
    """``durability="replicated"``: a durable step ends with ``WAIT replicas timeout``
    (after its EXEC: inside MULTI, WAIT does not wait), in the same write, and fails with
    :class:`~relaybus.errors.ReplicationTimeoutError` when fewer replicas than
    ``replicas`` acknowledged it within ``timeout`` seconds."""

    replicas: int = 1
    timeout: float = 1.0

    def applies(self, step: Step[Any]) -> bool:
        return step.durable and step.block is None

    def command(self) -> tuple[Any, ...]:
        return ("WAIT", self.replicas, max(1, int(self.timeout * 1000)))

    def check(self, reply: Any) -> None:
        """Raise unless ``reply`` (WAIT's) counts enough replicas."""
        if isinstance(reply, Exception):
            raise reply
        if int(reply) < self.replicas:
            raise ReplicationTimeoutError(int(reply), self.replicas, self.timeout)


#: A multi-step operation: yields steps, receives their values, returns a result.
Flow = Generator[Step[Any], Any, T]


def command_args(command: Command) -> tuple[Any, ...]:
    """What to send for ``command``: its arguments, or the EVALSHA of a script call."""
    return command.evalsha if isinstance(command, ScriptCall) else command.args


def wire(step: Step[Any], replication: Replication | None = None) -> tuple[bytes, int]:
    """The bytes to write for ``step`` (MULTI/EXEC around a transaction, WAIT after a
    durable step when ``replication`` is asked for) and how many replies they bring
    back."""
    cmds = framed(step, [command_args(c) for c in step.commands], replication)
    return pack(cmds), len(cmds)


def framed(step: Step[Any], cmds: list[tuple[Any, ...]], replication: Replication | None
           ) -> list[tuple[Any, ...]]:
    """``cmds`` (some or all of ``step``'s) as sent: in MULTI/EXEC for a transaction,
    then WAIT for a durable step under ``replication``."""
    if step.transaction:
        cmds = [("MULTI",), *cmds, ("EXEC",)]
    if replication is not None and replication.applies(step):
        cmds = [*cmds, replication.command()]
    return cmds


def unwrap(step: Step[Any], replies: list[Any], replication: Replication | None = None
           ) -> list[Any]:
    """The replies of ``step``'s own commands from what was read (MULTI/EXEC unwrapped,
    WAIT's checked and taken off).

    A refused transaction (EXECABORT: a command was refused when queued, e.g. out of
    memory) raises the refusal; too few replicas, :class:`ReplicationTimeoutError`.
    """
    if replication is not None and replication.applies(step):
        replies, waited = replies[:-1], replies[-1]
        if not any(isinstance(r, Exception) for r in replies):
            replication.check(waited)  # (a refused command reports itself)
    if not step.transaction:
        return replies
    result = replies[-1]
    if isinstance(result, Exception):
        queued = [r for r in replies[1:-1] if isinstance(r, Exception)]
        raise queued[0] if queued else result
    return list(result)


def first_error(step: Step[Any], replies: list[Any]) -> Exception | None:
    """The error to raise for ``replies`` (None when the step tolerates them)."""
    if step.tolerate:
        return None
    return next((r for r in replies if isinstance(r, Exception)), None)


def noscript(replies: list[Any]) -> list[int]:
    """Positions whose script was not loaded (those commands did not run)."""
    return [i for i, r in enumerate(replies)
            if isinstance(r, Exception) and classify(r) is Kind.NOSCRIPT]


def request_size(step: Step[Any]) -> int:
    """About how many bytes ``step`` sends: its text and bytes arguments."""
    total = 0
    for command in step.commands:
        args = command.args if isinstance(command, Call) else (*command.keys, *command.args)
        for a in args:
            if isinstance(a, (bytes, str)):
                total += len(a)
    return total
