"""The web dashboard (issue 13) through Starlette's TestClient, on the real test server.

Each test builds the app for its own prefix (``create_app(redis_url, prefix, token)``)
and checks what it shows against the library's own reads. Waiting is polling a
condition with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import html
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

pytest.importorskip("starlette")
pytest.importorskip("jinja2")

from starlette.testclient import TestClient  # noqa: E402

from relaybus import Event, EventBus, MessageQueue, Microservice, Queue  # noqa: E402
from relaybus.cli import app as cli_app  # noqa: E402
from relaybus.dashboard import create_app  # noqa: E402
from relaybus.dashboard.security import SESSION_COOKIE  # noqa: E402
from waiting import wait_for  # noqa: E402

TOKEN = "t0ken-for-the-tests"
BASE = "http://127.0.0.1"


class Placed(Event, event_type="dash.OrderPlaced"):
    """An order (the type the failing service handles)."""

    order_id: str
    note: str = ""


class Cancelled(Event, event_type="dash.OrderCancelled"):
    """Another type, for the tail's filter."""

    order_id: str


Client = Callable[..., TestClient]


@pytest.fixture
def client(redis_url: str, prefix: str) -> Iterator[Client]:
    """``client(token=None)``: a TestClient of a dashboard on this test's prefix."""
    opened: list[TestClient] = []

    def make(token: str | None = None, url: str | None = None, **options: Any) -> TestClient:
        c = TestClient(create_app(url or redis_url, prefix, token, **options), base_url=BASE,
                       follow_redirects=False)
        c.__enter__()
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


@pytest.fixture
def bus(redis_url: str, prefix: str) -> Iterator[EventBus]:
    b = EventBus(redis_url, prefix=prefix, retry_timeout=5.0)
    yield b
    b.close()


def dead_letters(bus: EventBus, service: str, count: int) -> tuple[Queue, Queue, list[str]]:
    """``count`` events dead-lettered in ``sub:SERVICE`` with service-like records."""
    queue, dlq = bus.mq.create_queue_pair(f"sub:{service}")
    for n in range(count):
        queue.send_message({"event_type": "dash.OrderPlaced", "event_id": f"e{n}",
                            "order_id": f"A-{n}"})
    got = queue.get_messages(count=count)
    queue.move_to_dlq([m.id for m in got], "ValueError: card declined", details={
        "service": service, "exception_type": "ValueError", "attempts": 3,
        "traceback": "Traceback (most recent call last):\nValueError: card declined"})
    return queue, dlq, [m.id for m in dlq.peek(count=count)]


def rows_of(page: str, attr: str = "data-queue") -> dict[str, dict[str, str]]:
    """The rows of a page's table marked ``attr``: their cells by ``data-field``."""
    out = {}
    for key, body in re.findall(rf'<tr {attr}="([^"]+)">(.*?)</tr>', page, re.S):
        cells = re.findall(r'data-field="(\w+)">(.*?)</td>', body, re.S)
        out[html.unescape(key)] = {f: html.unescape(re.sub(r"<[^>]+>", "", v)).strip()
                                   for f, v in cells}
    return out


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]*)"', page)
    assert found and found.group(1), "no CSRF token in the page"
    return found.group(1)


def login(c: TestClient) -> str:
    """Log in with the token; return the session's CSRF token."""
    r = c.post("/login", data={"token": TOKEN, "next": "/dlq"})
    assert r.status_code == 303, r.text
    return csrf_of(c.get("/dlq").text)


# -- the overview ------------------------------------------------------------------------

def test_overview_shows_every_queue_with_the_counts_the_library_reads(
        client: Client, bus: EventBus) -> None:
    mq = bus.mq
    orders, _ = mq.create_queue_pair("orders")
    orders.send_messages([{"n": i} for i in range(5)])
    got = orders.get_messages(count=3)
    orders.schedule_retry([got[0].id], 60, "later")
    orders.move_to_dlq([got[1].id], "broken")
    bus.subscribe("billing", ["dash.OrderPlaced"])
    bus.publish(Placed(order_id="A-1"))
    bus.publish(Placed(order_id="A-2"))

    page = client().get("/")
    assert page.status_code == 200
    shown = rows_of(page.text)
    assert shown["orders"] == {"waiting": "2", "pending": "1", "delayed": "1",
                               "consumers": "1", "oldest_waiting": shown["orders"]["oldest_waiting"],
                               "rate_in": "–", "rate_out": "–", "dlq": "1"}
    assert shown["sub:billing"]["waiting"] == "2" and shown["sub:billing"]["dlq"] == "0"
    assert shown["all"]["waiting"] == "–" and shown["all"]["dlq"] == "0"  # the log: its DLQ only
    for info in mq.list_queues():
        if not info.is_dlq and info.name != "all":
            assert shown[info.name]["waiting"] == str(info.waiting_messages), info.name
            assert shown[info.name]["pending"] == str(info.pending_messages), info.name
            assert shown[info.name]["dlq"] == str(info.dlq_messages), info.name
    # subscriptions with their types, consumers with their idle times
    assert "billing" in page.text and "dash.OrderPlaced" in page.text
    assert mq.consumer_id in page.text
    data = client().get("/api/overview").json()
    by_name = {q["name"]: q for q in data["queues"]}
    assert by_name["orders"]["waiting"] == 2 and by_name["orders"]["delayed"] == 1
    assert data["totals"]["dlq"] == 1 and data["totals"]["waiting"] == 4
    [consumer] = [c for c in data["consumers"] if c["queue"] == "orders"]
    assert consumer["name"] == mq.consumer_id and consumer["pending"] == 1
    assert consumer["idle"] >= 0 and consumer["idle_text"].endswith("s")


def test_the_overview_endpoint_gives_rates_from_samples_a_second_apart(
        client: Client, bus: EventBus) -> None:
    bus.subscribe("billing")
    c = client()
    assert c.get("/api/overview").json()["history"] == []  # one sample: no rate yet
    for n in range(10):
        bus.publish(Placed(order_id=f"A-{n}"))

    def rated() -> dict[str, Any] | None:
        data: dict[str, Any] = c.get("/api/overview").json()
        return data if data["history"] else None

    data = wait_for(rated, timeout=10, what="a second sample")
    [point] = data["history"]
    assert point["published"] > 0 and point["queues"]["sub:billing"][0] > 0
    assert data["totals"]["published"] == point["published"]
    billing = next(q for q in data["queues"] if q["name"] == "sub:billing")
    assert billing["rate_in"] == point["queues"]["sub:billing"][0]
    assert billing["rate_in_text"] != "–"


# -- the dead-letter queues --------------------------------------------------------------

def test_dlq_list_and_a_message_with_its_real_failure_record(
        client: Client, bus: EventBus, redis_url: str, prefix: str) -> None:
    svc = Microservice("billing", url=redis_url, prefix=prefix, max_attempts=1)

    @svc.on(Placed)
    def charge(event: Placed) -> None:
        raise ValueError(f"card declined for {event.order_id}")

    with svc:
        svc.start()
        bus.publish(Placed(order_id="A-7", note="<script>alert(1)</script>"))
        _, dlq = bus.mq.create_queue_pair("sub:billing")
        wait_for(lambda: dlq.peek(count=1), what="the dead letter")
    [msg] = dlq.peek(count=1)
    c = client()
    listing = c.get("/dlq/sub:billing")
    assert listing.status_code == 200
    assert msg.id in listing.text and "dash.OrderPlaced" in listing.text
    assert "card declined for A-7" in listing.text
    assert c.get("/dlq/billing").status_code == 200  # a service's name works too
    assert "sub:billing:dlq" in c.get("/dlq").text

    page = c.get(f"/dlq/sub:billing/{msg.id}")
    assert page.status_code == 200
    text = page.text
    for shown in ("ValueError", "card declined for A-7", "Traceback (most recent call last)",
                  "billing", "attempt 1", "exception_type", "charge", "A-7"):
        assert shown in text, shown
    assert "<script>alert(1)</script>" not in text  # escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert c.get("/dlq/sub:billing/1-0").status_code == 404
    assert c.get("/dlq/sub:nothing").status_code == 404


def test_dlq_pages_go_on_after_the_last_id_shown(client: Client, bus: EventBus) -> None:
    _, _, ids = dead_letters(bus, "billing", 55)
    c = client()
    first = c.get("/dlq/sub:billing").text
    assert "55 messages" in first and ids[49] in first and ids[50] not in first
    after = re.search(r'href="([^"]+)" id="next-page"', first)
    assert after is not None
    second = c.get(html.unescape(after.group(1))).text
    assert ids[50] in second and ids[54] in second and ids[49] not in second
    assert 'id="next-page"' not in second


# -- who may change what -----------------------------------------------------------------

def test_without_a_token_the_dashboard_is_read_only(client: Client, bus: EventBus) -> None:
    _, dlq, ids = dead_letters(bus, "billing", 1)
    c = client(token=None)
    page = c.get(f"/dlq/sub:billing/{ids[0]}").text
    assert "Read-only" in page and 'id="requeue"' not in page
    assert "read-only" in c.get("/").text
    refused = c.post("/dlq/sub:billing/requeue", data={"ids": ids[0], "csrf": "x"})
    assert refused.status_code == 403 and "read-only" in refused.text
    assert c.post("/dlq/sub:billing/purge", data={"confirm": "sub:billing:dlq"}
                  ).status_code == 403
    assert c.post("/login", data={"token": ""}).status_code == 403
    assert [m.id for m in dlq.peek()] == ids


def test_with_a_token_changes_need_a_login_and_the_sessions_csrf_token(
        client: Client, bus: EventBus) -> None:
    _, dlq, ids = dead_letters(bus, "billing", 1)
    c = client(token=TOKEN)
    page = c.get(f"/dlq/sub:billing/{ids[0]}").text
    assert 'id="requeue"' not in page and "Log in" in page
    assert c.post("/dlq/sub:billing/requeue", data={"ids": ids[0]}).status_code == 403
    wrong = c.post("/login", data={"token": "not-it"})
    assert wrong.status_code == 401 and "wrong token" in wrong.text
    assert SESSION_COOKIE not in c.cookies
    csrf = login(c)
    assert c.post("/dlq/sub:billing/requeue", data={"ids": ids[0]}).status_code == 403
    assert c.post("/dlq/sub:billing/requeue",
                  data={"ids": ids[0], "csrf": csrf + "x"}).status_code == 403
    assert c.get("/dlq/sub:billing/requeue").status_code in (404, 405)  # POST only
    assert [m.id for m in dlq.peek()] == ids
    # another client's cookie of no session is worth nothing
    other = client(token=TOKEN)
    other.cookies.set(SESSION_COOKIE, "forged")
    assert other.post("/dlq/sub:billing/requeue",
                      data={"ids": ids[0], "csrf": csrf}).status_code == 403


def test_login_sets_a_strict_http_only_cookie_and_requeue_puts_the_message_back(
        client: Client, bus: EventBus) -> None:
    queue, dlq, ids = dead_letters(bus, "billing", 3)
    c = client(token=TOKEN)
    r = c.post("/login", data={"token": TOKEN, "next": f"/dlq/sub:billing/{ids[0]}"})
    assert r.status_code == 303 and r.headers["location"] == f"/dlq/sub:billing/{ids[0]}"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    page = c.get(r.headers["location"]).text
    assert 'id="requeue"' in page
    done = c.post("/dlq/sub:billing/requeue", data={"ids": ids[0], "csrf": csrf_of(page)})
    assert done.status_code == 303 and done.headers["location"] == "/dlq/sub:billing"
    listing = c.get("/dlq/sub:billing").text
    assert "requeued 1 message from sub:billing:dlq to sub:billing" in listing
    assert [m.id for m in dlq.peek()] == ids[1:]
    back = queue.peek(count=10)
    assert [m.data["event_id"] for m in back] == ["e0"]
    assert back[0].failures and back[0].failures[-1]["reason"] == "ValueError: card declined"
    # all of them; then an id no longer there is said so
    assert c.post("/dlq/sub:billing/requeue", data={"all": "1", "csrf": csrf_of(listing)}
                  ).status_code == 303
    assert dlq.peek() == [] and len(queue.peek(count=10)) == 3
    c.post("/dlq/sub:billing/requeue", data={"ids": ids[0], "csrf": csrf_of(listing)})
    assert "1 message was no longer in sub:billing:dlq" in c.get("/dlq/sub:billing").text
    # a bad request, and logging out ends the session
    assert c.post("/dlq/sub:billing/requeue", data={"csrf": csrf_of(listing)}
                  ).status_code == 400
    assert c.post("/logout", data={"csrf": csrf_of(listing)}).status_code == 303
    assert c.post("/dlq/sub:billing/requeue", data={"all": "1", "csrf": csrf_of(listing)}
                  ).status_code == 403


def test_cross_site_posts_are_refused_even_with_a_session(
        client: Client, bus: EventBus) -> None:
    _, dlq, ids = dead_letters(bus, "billing", 2)
    c = client(token=TOKEN)
    csrf = login(c)
    form = {"ids": ids[0], "csrf": csrf}
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Origin": "http://127.0.0.1:9999"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site"}):
        r = c.post("/dlq/sub:billing/requeue", data=form, headers=headers)
        assert r.status_code == 403 and "cross-site" in r.text, headers
    assert c.post("/login", data={"token": TOKEN},
                  headers={"Origin": "http://evil.example"}).status_code == 403
    assert [m.id for m in dlq.peek()] == ids
    ok = c.post("/dlq/sub:billing/requeue", data=form,
                headers={"Origin": BASE, "Sec-Fetch-Site": "same-origin"})
    assert ok.status_code == 303
    assert [m.id for m in dlq.peek()] == ids[1:]
    # a page of another name for this address (DNS rebinding) is not served at all
    assert c.get("/", headers={"Host": "evil.example"}).status_code == 400


def test_purge_needs_the_dlqs_name_typed(client: Client, bus: EventBus) -> None:
    _, dlq, ids = dead_letters(bus, "billing", 2)
    c = client(token=TOKEN)
    csrf = login(c)
    confirm = c.get("/dlq/sub:billing/purge").text
    assert "now 2" in confirm and 'name="confirm"' in confirm
    for typed in ("", "yes", "sub:billing"):
        r = c.post("/dlq/sub:billing/purge", data={"csrf": csrf, "confirm": typed})
        assert r.status_code == 400 and "nothing was deleted" in r.text, typed
    assert [m.id for m in dlq.peek()] == ids
    r = c.post("/dlq/sub:billing/purge", data={"csrf": csrf, "confirm": "sub:billing:dlq"})
    assert r.status_code == 303
    assert dlq.peek() == []
    assert "purged 2 messages from sub:billing:dlq" in c.get("/dlq/sub:billing").text


def test_every_response_forbids_framing_and_foreign_scripts(client: Client) -> None:
    c = client(token=TOKEN)
    for path in ("/", "/login", "/static/dashboard.js"):
        r = c.get(path)
        assert r.status_code == 200, path
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY"
    assert c.get("/").headers["cache-control"] == "no-store"
    assert c.post("/login", content="token=" + TOKEN,
                  headers={"Content-Type": "text/plain"}).status_code == 415
    assert c.post("/login", content=b"token=" + b"x" * 70000,
                  headers={"Content-Type": "application/x-www-form-urlencoded"}
                  ).status_code == 413


def test_the_urls_password_never_reaches_a_page(
        client: Client, bus: EventBus, redis_url: str, prefix: str) -> None:
    dead_letters(bus, "billing", 1)
    bus.publish(Placed(order_id="A-1"))
    secrets = [p for p in (urlsplit(redis_url).password,) if p]
    c = client(token=TOKEN)
    [dead] = bus.mq.get_queue("sub:billing:dlq").peek()  # type: ignore[union-attr]
    pages = ["/", "/api/overview", "/dlq", "/dlq/sub:billing", f"/dlq/sub:billing/{dead.id}",
             "/dlq/sub:billing/purge", "/tail", "/api/tail?from=start", "/login", "/nothing",
             "/dlq/sub:nothing"]
    seen = [c.get(p).text for p in pages]
    seen.append(c.post("/login", data={"token": "wrong"}).text)
    for text in seen:
        for secret in secrets:
            assert secret not in text
    # a broker that does not answer: the page says where, without the password
    down = client(token=TOKEN, url="redis://:pa55-w0rd-secret@127.0.0.1:1/0",
                  retry_timeout=0.2)
    for path in ("/", "/api/overview", "/dlq/sub:billing", "/tail"):
        r = down.get(path)
        assert r.status_code == 503, (path, r.text)
        assert "cannot reach the broker at 127.0.0.1:1" in r.text
        assert "pa55-w0rd-secret" not in r.text


# -- the live tail -----------------------------------------------------------------------

def test_the_tail_endpoint_gives_the_events_after_its_cursor_of_the_types_asked(
        client: Client, bus: EventBus) -> None:
    bus.subscribe("billing")
    bus.publish(Placed(order_id="before"))
    c = client()
    start = c.get("/api/tail").json()
    assert start["events"] == []  # from now on
    placed = [bus.publish(Placed(order_id=f"A-{n}")) for n in range(3)]
    cancelled = bus.publish(Cancelled(order_id="A-0"))
    only = c.get("/api/tail", params={"cursor": start["cursor"], "type": "dash.OrderPlaced"}
                 ).json()
    assert [e["id"] for e in only["events"]] == placed
    assert {e["type"] for e in only["events"]} == {"dash.OrderPlaced"}
    assert '"order_id":"A-1"' in only["events"][1]["payload"]
    both = c.get("/api/tail", params=[("cursor", start["cursor"]),
                                      ("type", "dash.OrderPlaced,dash.OrderCancelled")]).json()
    assert [e["id"] for e in both["events"]] == [*placed, cancelled]
    assert both["cursor"] == only["cursor"]
    assert c.get("/api/tail", params={"cursor": only["cursor"]}).json()["events"] == []
    everything = c.get("/api/tail", params={"from": "start"}).json()
    assert len(everything["events"]) == 5
    assert c.get("/api/tail", params={"cursor": "x; DROP"}).status_code == 400
    page = c.get("/tail", params={"type": "dash.OrderPlaced"}).text
    assert 'value="dash.OrderPlaced"' in page and "data-cursor=" in page


# -- the command -------------------------------------------------------------------------

def test_the_command_names_its_options() -> None:
    out = CliRunner().invoke(cli_app, ["dashboard", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    for option in ("--host", "--port", "--token", "--url", "--prefix",
                   "RELAYBUS_DASHBOARD_TOKEN", "read-only"):
        assert option in out.stdout, option


def test_the_command_without_the_extra_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch, redis_url: str, prefix: str) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    out = CliRunner().invoke(cli_app, ["dashboard", "--url", redis_url, "--prefix", prefix])
    assert out.exit_code == 1
    assert "pip install 'relaybus[dashboard]'" in out.output
    assert "Traceback" not in out.output


def test_the_sampler_is_shared_by_concurrent_requests(client: Client, bus: EventBus) -> None:
    """Several tabs polling at once take one sample a second between them."""
    bus.subscribe("billing")
    c = client()
    results: list[int] = []

    def poll() -> None:
        results.append(len(c.get("/api/overview").json()["history"]))

    threads = [threading.Thread(target=poll) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0] * 8


def test_a_queue_layer_read_lists_consumers_once_with_their_idle_time(
        mq: MessageQueue, bus: EventBus) -> None:
    orders, _ = mq.create_queue_pair("orders")
    orders.send_messages([{"n": 1}, {"n": 2}])
    orders.get_messages(count=2, consumer_id="worker-a")
    found = mq.consumers(["orders", "all", "missing"])
    assert [(c.name, c.pending) for c in found["orders"]] == [("worker-a", 2)]
    assert found["orders"][0].idle >= 0
    assert found["all"] == [] and found["missing"] == []
