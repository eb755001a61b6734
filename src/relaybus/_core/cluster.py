"""Redis Cluster routing, IO excluded: where each command of a step goes, and what a
redirect asks for.

Every key of one queue pair carries one hash tag (:mod:`relaybus.keys`), so every
script call and transaction of relaybus touches one slot. A step (one round trip on a
single server) becomes, on a cluster, one batch per node that owns its commands'
slots, all written before any is read; the replies come back in the step's order, so
the core's parsing is the same on both deployments.

:func:`exchange` is a generator the drivers run: it yields :class:`Send` (batches to
write to nodes, each answered with its raw replies; a failed write is thrown back in)
and returns the step's replies. The slot map (:class:`SlotMap`) is read with
``CLUSTER SLOTS`` from the first node that answers, at first use and again after a
``MOVED`` or a failed exchange; commands a node answers ``MOVED`` (the slot moved) are
sent again where the new map says; ``ASK`` (the slot is migrating) sends the command
again to the named node after ``ASKING``. A transaction runs on one node, so its
commands must share a slot: one that does not raises
:class:`~relaybus.errors.CrossSlotError` before anything is sent.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.crc import key_slot

from ..errors import CrossSlotError
from .outage import role_changed
from .resp import pack
from .steps import Command, Replication, ScriptCall, Step, command_args, framed, unwrap

__all__ = ["Node", "Batch", "Send", "SlotMap", "exchange", "refresh", "command_slot",
           "redirect_of", "MAX_REDIRECTS"]

#: A node: ``(host, port)``.
Node = tuple[str, int]
#: Slots of a Redis Cluster.
SLOTS = 16384
#: Redirects followed for one step before it fails (a slot moving twice is rare).
MAX_REDIRECTS = 5
#: Commands with no key: sent to any primary (``SCRIPT`` to every primary).
_KEYLESS = frozenset({"PING", "INFO", "TIME", "SCRIPT", "CLUSTER", "CLIENT", "CONFIG",
                      "DBSIZE", "ECHO", "FUNCTION"})
#: Commands whose key is their third argument (a subcommand comes first).
_SUBCOMMAND = frozenset({"XGROUP", "XINFO", "OBJECT", "MEMORY"})
#: Commands every argument of which is a key.
_ALL_KEYS = frozenset({"DEL", "UNLINK", "EXISTS", "TOUCH"})


def _bytes(key: Any) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode("utf-8", "surrogatepass")


def command_keys(command: Command) -> Sequence[Any]:
    """The keys ``command`` touches."""
    if isinstance(command, ScriptCall):
        return command.keys
    args = command.args
    name = str(args[0]).upper()
    if name in _KEYLESS:
        return ()
    if name in _SUBCOMMAND:
        return args[2:3]
    if name in ("XREAD", "XREADGROUP"):
        upper = [str(a).upper() if isinstance(a, str) else a for a in args]
        rest = args[upper.index("STREAMS") + 1:]
        return rest[:len(rest) // 2]
    if name in _ALL_KEYS:
        return args[1:]
    return args[1:2]


def command_slot(command: Command) -> int | None:
    """The slot of ``command``'s keys (None: it has none); :class:`CrossSlotError` when
    they hash to different slots."""
    slots = {key_slot(_bytes(k)) for k in command_keys(command)}
    if len(slots) > 1:
        raise CrossSlotError(
            f"{command_args(command)[0]} touches keys in {len(slots)} cluster slots "
            f"({', '.join(map(str, command_keys(command)))}); on Redis Cluster one command "
            "or transaction must stay within one slot (one queue pair)")
    return next(iter(slots), None)


def redirect_of(reply: Any) -> tuple[str, Node] | None:
    """``("MOVED" | "ASK", (host, port))`` for a redirect error reply, else None.

    redis-py's sync parser gives :class:`redis.exceptions.MovedError` (its text without
    the word); a raw hiredis reader gives the whole text.
    """
    if not isinstance(reply, redis.ResponseError):
        return None
    text = str(reply)
    if isinstance(reply, redis.exceptions.MovedError):
        kind = "MOVED"
    elif isinstance(reply, redis.exceptions.AskError):
        kind = "ASK"
    else:
        kind, _, text = text.partition(" ")
        if kind not in ("MOVED", "ASK"):
            return None
    _, _, where = text.strip().partition(" ")
    host, _, port = where.rpartition(":")
    if not port.isdigit():
        return None
    return kind, (host.strip("[]"), int(port))


@dataclass(frozen=True, slots=True)
class Batch:
    """What to write to one node (None: the one server of a standalone deployment):
    ``packed`` bytes bringing back ``replies`` replies (``block``: the seconds a
    blocking read may wait there)."""

    node: Node | None
    packed: bytes
    replies: int
    block: float | None = None


@dataclass(frozen=True, slots=True)
class Send:
    """Write every batch (to its node), then read each one's raw replies; the driver
    sends back a list of reply lists, one per batch, in order."""

    batches: tuple[Batch, ...]


#: What :func:`exchange` yields, is sent, and returns.
Exchange = Generator[Send, Any, list[Any]]


@dataclass(slots=True)
class _Part:
    node: Node
    indices: list[int]
    asking: bool = False


class SlotMap:
    """Which node owns each slot: read from ``CLUSTER SLOTS`` (:func:`refresh`), again
    once ``stale`` (a ``MOVED``, a demoted primary, a failed exchange). ``seeds``: the
    nodes a URL names, asked when no primary answers."""

    def __init__(self, seeds: Sequence[Node]) -> None:
        self.seeds = list(seeds)
        self.owner: list[Node | None] = [None] * SLOTS
        self.primaries: list[Node] = []
        self.stale = True

    def load(self, reply: Any, asked: Node) -> None:
        """Take a ``CLUSTER SLOTS`` reply (read from ``asked``)."""
        owner: list[Node | None] = [None] * SLOTS
        primaries: list[Node] = []
        for row in reply:
            start, end, primary = int(row[0]), int(row[1]), row[2]
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            node = (host if host and host != "?" else asked[0], int(primary[1]))
            owner[start:end + 1] = [node] * (end - start + 1)
            if node not in primaries:
                primaries.append(node)
        if not primaries:
            raise redis.exceptions.ClusterDownError("CLUSTERDOWN the cluster has no slots")
        self.owner, self.primaries, self.stale = owner, primaries, False

    def locate(self, slot: int | None) -> Node:
        """The node of ``slot`` (a primary for None)."""
        if slot is None:
            return self.primaries[0] if self.primaries else self.seeds[0]
        node = self.owner[slot]
        if node is None:
            raise redis.exceptions.ClusterDownError(
                f"CLUSTERDOWN slot {slot} is not served by any node")
        return node

    def candidates(self) -> list[Node]:
        """Where to ask for the slot map: known primaries, then the seeds."""
        return list(dict.fromkeys([*self.primaries, *self.seeds]))


_CLUSTER_SLOTS = pack([("CLUSTER", "SLOTS")])


def refresh(slots: SlotMap) -> Generator[Send, Any, None]:
    """Read the slot map from the first node that answers."""
    error: Exception | None = None
    for node in slots.candidates():
        try:
            answers = yield Send((Batch(node, _CLUSTER_SLOTS, 1),))
        except Exception as exc:  # that node is down: ask the next one
            error = exc
            continue
        reply = answers[0][0]
        if isinstance(reply, Exception):
            error = reply
            continue
        slots.load(reply, node)
        return
    assert error is not None
    raise error


def exchange(step: Step[Any], slots: SlotMap, replication: Replication | None = None
             ) -> Exchange:
    """Run ``step`` over the cluster whose slot map is ``slots``: its replies, in order
    (as a single server's). The map is refreshed first when stale (at the start, after
    a ``MOVED`` or a failed exchange)."""
    commands = step.commands
    where = [command_slot(c) for c in commands]
    if step.transaction and len({s for s in where if s is not None}) > 1:
        raise CrossSlotError(
            f"a transaction of {len(commands)} commands touches keys in several cluster "
            "slots; on Redis Cluster a transaction must stay within one slot (one queue "
            "pair): " + ", ".join(str(command_args(c)[0]) for c in commands))
    replies: list[Any] = [None] * len(commands)
    todo = list(range(len(commands)))
    asked: dict[int, Node] = {}
    for _ in range(MAX_REDIRECTS + 1):
        if slots.stale:
            yield from refresh(slots)
        parts = _plan(step, todo, where, asked, slots)
        try:
            answers = yield Send(tuple(_batch(step, part, replication) for part in parts))
        except Exception:
            slots.stale = True  # a node down or gone: ask where the slots are next time
            raise
        todo, asked = [], {}
        for part, raw in zip(parts, answers, strict=True):
            got = _own_replies(step, part, raw, replication)
            for i, reply in zip(part.indices, got, strict=True):
                redirect = redirect_of(reply)
                if redirect is None and role_changed(reply):
                    slots.stale = True  # a demoted primary: its slots moved to another
                if redirect is None:
                    if replies[i] is None or not isinstance(reply, Exception):
                        replies[i] = reply  # (a broadcast keeps a success)
                    continue
                if i not in todo:
                    todo.append(i)
                if redirect[0] == "ASK":
                    asked[i] = redirect[1]
                else:
                    slots.stale = True
        if not todo:
            return replies
        if step.transaction:  # a redirected command aborted the whole transaction
            todo = list(range(len(commands)))
            if asked:  # a slot being migrated: no ASKING inside MULTI; try again later
                raise redis.exceptions.TryAgainError(
                    "TRYAGAIN a transaction's slot is being migrated")
    raise redis.exceptions.ClusterError(
        f"a command was redirected more than {MAX_REDIRECTS} times; the cluster's slots "
        "keep moving")


def _plan(step: Step[Any], todo: list[int], where: list[int | None], asked: dict[int, Node],
          slots: SlotMap) -> list[_Part]:
    """One part per node (and one per command sent after ``ASKING``)."""
    parts: dict[Node, _Part] = {}
    extra: list[_Part] = []
    for i in todo:
        if i in asked:
            extra.append(_Part(asked[i], [i], asking=True))
            continue
        command = step.commands[i]
        if where[i] is None and str(command_args(command)[0]).upper() == "SCRIPT":
            for node in slots.primaries:
                extra.append(_Part(node, [i]))
            continue
        node = slots.locate(where[i] if where[i] is not None else _anchor(where))
        parts.setdefault(node, _Part(node, [])).indices.append(i)
    return [*parts.values(), *extra]


def _anchor(where: list[int | None]) -> int | None:
    """Where a keyless command of a step goes: with the step's keys (a transaction's
    PING stays on its node), else anywhere."""
    return next((s for s in where if s is not None), None)


def _batch(step: Step[Any], part: _Part, replication: Replication | None) -> Batch:
    cmds = framed(step, [command_args(step.commands[i]) for i in part.indices], replication)
    if part.asking:
        cmds = [("ASKING",), *cmds]
    return Batch(part.node, pack(cmds), len(cmds), step.block)


def _own_replies(step: Step[Any], part: _Part, raw: list[Any],
                 replication: Replication | None) -> list[Any]:
    """The replies of ``part``'s own commands (ASKING, MULTI/EXEC and WAIT taken off); a
    transaction a redirect aborted gives the redirect for each command."""
    if part.asking:
        raw = raw[1:]
    redirect = next((r for r in raw if redirect_of(r) is not None), None)
    if step.transaction and redirect is not None:
        return [redirect] * len(part.indices)
    if redirect is not None and replication is not None and replication.applies(step):
        return raw[:-1]  # sent again where the slot is now: its WAIT there counts
    return unwrap(step, raw, replication)
