"""docs/examples/fastapi_app.py runs as written: its lifespan starts the service, its
endpoint publishes, the service handles the event, shutdown stops it."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import redis
from fastapi.testclient import TestClient

from relaybus.keys import QueueKeys
from waiting import wait_for

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "fastapi_app.py"


@pytest.fixture
def example(redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The example module, imported from its file with the test server and prefix."""
    monkeypatch.setenv("RELAYBUS_URL", redis_url)
    monkeypatch.setenv("RELAYBUS_PREFIX", prefix)
    spec = importlib.util.spec_from_file_location("fastapi_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "fastapi_app", module)
    spec.loader.exec_module(module)
    yield module


def test_the_endpoint_publishes_and_the_service_handles(example: ModuleType, prefix: str,
                                                        raw: redis.Redis) -> None:
    assert not example.billing.running  # importing it started nothing
    with TestClient(example.app) as client:
        assert example.billing.running  # the lifespan started it
        response = client.post("/orders/A-1", params={"amount": 9.5})
        assert response.status_code == 200, response.text
        log_id = response.json()["log_id"]
        wait_for(lambda: example.charged == ["A-1"], what="the service to handle the event")
        wait_for(lambda: example.billing.stats["handled"] == 1, what="the event acknowledged")
        assert client.post("/orders/B-2", params={"amount": "lots"}).status_code == 422
    assert not example.billing.running  # the lifespan stopped it
    [(entry_id, fields)] = raw.xrange(QueueKeys(prefix, "all").stream)
    assert entry_id.decode() == log_id and b"A-1" in fields[b"d"]
    assert example.charged == ["A-1"]
