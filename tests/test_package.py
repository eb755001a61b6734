"""The package behaves like a library: curated exports, one error root, quiet import."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

import relaybus
from relaybus import EmbeddedServer, errors
from relaybus.keys import QueueKeys
from relaybus.testing import delete_prefix, plain_client


def test_all_lists_exactly_the_public_names() -> None:
    public = {n for n in vars(relaybus) if not n.startswith("_")}
    modules = {n for n in public if inspect.ismodule(getattr(relaybus, n))}
    assert set(relaybus.__all__) == public - modules - {"annotations", "logging"}
    for name in relaybus.__all__:
        assert getattr(relaybus, name) is not None


def test_every_exception_derives_from_relaybus_error() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, relaybus.RelaybusError), name
    assert issubclass(relaybus.InvalidNameError, ValueError)
    assert issubclass(relaybus.SerializationError, ValueError)
    assert relaybus.LeanMQ is relaybus.MessageQueue


def test_public_objects_have_docstrings() -> None:
    for name in relaybus.__all__:
        obj = getattr(relaybus, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__ and obj.__doc__.strip(), name


def test_import_prints_nothing_and_configures_no_logging() -> None:
    code = ("import logging, relaybus, relaybus.cli, relaybus.demo; "
            "root = logging.getLogger(); "
            "assert not root.handlers, root.handlers; "
            "assert root.level == logging.WARNING")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


def test_loggers_live_under_relaybus() -> None:
    import logging

    import relaybus.bus
    import relaybus.demo
    import relaybus.queue
    import relaybus.service  # noqa: F401

    names = [n for n in logging.root.manager.loggerDict
             if n.startswith("relaybus") or n in ("EventBus", "LeanMQ")]
    assert names and all(n == "relaybus" or n.startswith("relaybus.") for n in names)


def test_the_readmes_first_example_runs_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """Pasted into a file and run: it prints its line, exits 0, and leaves no server
    running and nothing pending in the subscription."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "example.py").write_text(example)
    env = {k: v for k, v in os.environ.items() if k != "RELAYBUS_URL"}
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "charging A-1 9.5\n"
    data_dir = tmp_path / ".relaybus"
    server = EmbeddedServer(data_dir)
    assert server.status() is None  # the example stopped the server it started
    url = server.start().url  # from its append-only file: what the example left
    try:
        client = redis.Redis.from_url(url)
        log = QueueKeys("events:", "all").stream
        [group] = [g for g in client.xinfo_groups(log) if g["name"] == b"sub:billing"]
        assert group["pending"] == 0 and group.get("lag") in (0, None)
        assert client.xlen(QueueKeys("events:", "sub:billing").stream) == 0
    finally:
        server.stop()


@pytest.mark.parametrize("glob", ["*", "?", "[ab]", "\\"])
def test_delete_prefix_deletes_its_own_prefix_only(redis_url: str, prefix: str,
                                                   glob: str) -> None:
    """A prefix with glob characters matches itself only, not its neighbours."""
    mine, theirs = f"{prefix}{glob}:", f"{prefix}a:"
    client = plain_client(redis_url)
    client.set(mine + "k", 1)
    client.set(theirs + "k", 1)
    assert delete_prefix(redis_url, mine) == 1
    assert client.exists(mine + "k") == 0 and client.exists(theirs + "k") == 1
