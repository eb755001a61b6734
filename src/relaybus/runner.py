"""Running a service as a process: find it by import path, run it until signalled.

``relaybus run module:attribute`` is :func:`load_service` then :func:`run_service`::

    service = load_service("billing.app:svc", url="redis://localhost:6379/0")
    run_service(service)        # returns after SIGTERM/SIGINT and a graceful stop

The attribute may be a :class:`~relaybus.service.Microservice` or an
:class:`~relaybus.aio.AsyncMicroservice` instance, a subclass of either (built with
no arguments) or a zero-argument factory returning an instance. An async service runs
on a new event loop (``asyncio.run(service.run())``).
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from types import FrameType

from .aio import AsyncMicroservice
from .errors import ConfigurationError
from .service import Microservice

#: What :func:`load_service` returns: a service of either front.
AnyService = Microservice | AsyncMicroservice
_KINDS = (Microservice, AsyncMicroservice)

__all__ = ["load_service", "run_service"]

logger = logging.getLogger("relaybus.service")


def _where(exc: BaseException) -> str:
    """`` at FILE:LINE`` of the user's code where ``exc`` was raised during an import."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" at {exc.filename}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<frozen")]
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _resolve(target: str) -> object:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"service target {target!r} must look like 'module:attribute' "
                                 "(for example 'billing.app:service')")
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)  # `relaybus run app:svc` finds app.py where it is run
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name
                                     or module_name.startswith(exc.name + ".")):
            raise ConfigurationError(f"cannot import module {module_name!r} (service target "
                                     f"{target!r}): {exc}") from exc
        raise ConfigurationError(f"importing {module_name!r} failed{_where(exc)}: {exc}"
                                 ) from exc
    except Exception as exc:
        raise ConfigurationError(f"importing {module_name!r} failed{_where(exc)}: "
                                 f"{type(exc).__name__}: {exc}") from exc
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(f"module {module_name!r} has no attribute {attr!r} "
                                     f"(service target {target!r})") from None
    return obj


def load_service(target: str, *, url: str | None = None,
                 metrics_port: int | None = None) -> AnyService:
    """The service named by ``target`` (``module:attribute``): a ``Microservice`` or an
    ``AsyncMicroservice``.

    The attribute (dots allowed: ``module:holder.service``) may be an instance, a
    subclass of either (instantiated with no arguments) or a zero-argument factory
    returning an instance. The current directory is importable. ``url``, when
    given, points the service at that server (it wins over the service's own
    settings); the service must not have connected yet. ``metrics_port``, when given,
    serves its metrics there (as its ``metrics_port`` option does).

    Raises :class:`~relaybus.errors.ConfigurationError` (a ``ValueError``) saying
    what is wrong: a malformed target, a module that cannot be imported (the cause
    is chained), a missing attribute, or an object that is none of the above.
    """
    obj = _resolve(target)
    service: AnyService
    if isinstance(obj, _KINDS):
        service = obj
    elif isinstance(obj, type):
        if not issubclass(obj, _KINDS):
            raise ConfigurationError(f"{target!r} is the class {obj.__qualname__}, which is not "
                                     "a Microservice subclass")
        cls: Callable[[], AnyService] = obj  # subclasses may take no arguments
        try:
            service = cls()
        except TypeError as exc:
            raise ConfigurationError(f"{target!r} is a Microservice subclass that cannot be "
                                     f"built without arguments ({exc}); expose an instance or "
                                     "a zero-argument factory instead") from exc
    elif callable(obj):
        made = obj()
        if not isinstance(made, _KINDS):
            raise ConfigurationError(f"factory {target!r} returned {type(made).__name__}, not a "
                                     "Microservice")
        service = made
    else:
        raise ConfigurationError(f"{target!r} is a {type(obj).__name__}, not a Microservice, a "
                                 "Microservice subclass or a factory of one")
    if url is not None:
        service._apply_url(url)
    if metrics_port is not None:
        service._apply_metrics(metrics_port, service.metrics_host)
    return service


def run_service(service: AnyService, *, install_signals: bool = True,
                freeze_heap: bool = True, start_timeout: float | None = None) -> None:
    """Run ``service`` until SIGTERM or SIGINT (or its ``stop``), then close it.

    A broker that does not answer yet (normal in containers, where the service may
    start first) is waited for: one warning names it (password redacted), and the
    service keeps trying until it answers, or for ``start_timeout`` seconds, after
    which :class:`~relaybus.errors.BrokerUnavailableError` names its URL. A signal
    during the wait ends it.

    The first signal stops it gracefully (in-flight handlers finish within its
    ``shutdown_timeout`` and are acknowledged; fetched events not started are handed
    back for redelivery); a second one cuts the wait short. Signal handlers are
    installed only with ``install_signals`` (which needs the main thread) and the
    previous ones are restored on return. Raises what the service's ``start`` raises
    (refused credentials, say). An :class:`~relaybus.aio.AsyncMicroservice` runs on a
    new event loop until then (its :meth:`~relaybus.aio.AsyncMicroservice.run`).

    ``freeze_heap``: the objects made so far (imported modules, event classes, the
    service) are moved out of the garbage collector's sight first (``gc.freeze()``), so
    that a full collection, which otherwise walks them all and stalled every event in
    flight for 45-66 ms on a 2-vCPU VM, stays short (``python bench/gc_pause.py``).
    """
    start_timeout = service._start_bound(start_timeout)
    if install_signals and threading.current_thread() is not threading.main_thread():
        raise ConfigurationError("run_service installs signal handlers, which only the main "
                                 "thread can do; pass install_signals=False")
    if freeze_heap:
        gc.collect()
        gc.freeze()
    if isinstance(service, AsyncMicroservice):
        logger.info("running service %s (pid %d)%s", service.service_name, os.getpid(),
                    "; SIGTERM or Ctrl-C stops it gracefully" if install_signals else "")
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} \
            if install_signals else {}
        try:
            asyncio.run(service.run(install_signals=install_signals,
                                    start_timeout=start_timeout))
        finally:
            for signum, before in saved.items():  # the loop leaves the defaults behind
                signal.signal(signum, before)
        return
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread: set flags only, no locks or logging.
        received.append(signum)
        if len(received) == 1:
            service.stop()  # during run_forever this only asks its loop to stop
        else:
            service._force_stop()

    previous: dict[signal.Signals, object] = {}
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    logger.info("running service %s (pid %d)%s", service.service_name, os.getpid(),
                "; SIGTERM or Ctrl-C stops it gracefully" if install_signals else "")
    try:
        service.run_forever(start_timeout=start_timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        if received:
            logger.info("service %s: stopped on %s%s", service.service_name,
                        signal.Signals(received[0]).name,
                        " (forced)" if len(received) > 1 else "")
        service.close()
