"""The package behaves like a library: curated exports, one error root, quiet import."""

from __future__ import annotations

import inspect
import subprocess
import sys

import relaybus
from relaybus import errors


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
