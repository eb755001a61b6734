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

from ..scripts import Script
from .outage import Kind, classify
from .resp import pack

__all__ = ["Call", "ScriptCall", "Command", "Step", "Flow", "T", "command_args", "wire", "unwrap",
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
    own and a socket timeout above it). ``transaction`` sends MULTI/EXEC.
    """

    commands: tuple[Command, ...]
    parse: Callable[[list[Any]], T]
    transaction: bool = False
    tolerate: bool = False
    block: float | None = None

    @staticmethod
    def one(command: Command, parse: Callable[[Any], U] | None = None, *,
            block: float | None = None) -> Step[U]:
        """A step of one command; ``parse`` gets its reply (not a list)."""
        if parse is None:
            return Step((command,), _first, block=block)
        fn = parse
        return Step((command,), lambda replies: fn(replies[0]), block=block)


#: A multi-step operation: yields steps, receives their values, returns a result.
Flow = Generator[Step[Any], Any, T]


def command_args(command: Command) -> tuple[Any, ...]:
    """What to send for ``command``: its arguments, or the EVALSHA of a script call."""
    return command.evalsha if isinstance(command, ScriptCall) else command.args


def wire(step: Step[Any]) -> tuple[bytes, int]:
    """The bytes to write for ``step`` (MULTI/EXEC around a transaction) and how many
    replies they bring back."""
    cmds = [command_args(c) for c in step.commands]
    if step.transaction:
        cmds = [("MULTI",), *cmds, ("EXEC",)]
    return pack(cmds), len(cmds)


def unwrap(step: Step[Any], replies: list[Any]) -> list[Any]:
    """The replies of ``step``'s own commands from what was read (MULTI/EXEC unwrapped).

    A refused transaction (EXECABORT: a command was refused when queued, e.g. out of
    memory) raises the refusal.
    """
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
