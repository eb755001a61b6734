"""The web dashboard in a real browser: headless Chromium driven by Playwright (issue 13).

Debian's ``chromium`` at /usr/bin/chromium (``apt-get install chromium``; Playwright's
own browser download is never used): the module is skipped when it is absent. Each
test runs the order-flow demo on its own prefix, serves the dashboard with uvicorn in a
thread on a free port, and checks what the page shows against the library's reads.
Waiting is Playwright's auto-waiting ``expect``, never a sleep.

Screenshots of the overview and of a dead letter's page are taken every run; with
``RELAYBUS_SCREENSHOTS=1`` they are written to docs/images/ (dashboard-overview.png,
dashboard-dlq.png), otherwise to the test's temporary directory.
"""

from __future__ import annotations

import io
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")

from playwright.sync_api import Browser, Page, expect  # noqa: E402
from rich.console import Console  # noqa: E402

from relaybus import EventBus, MessageQueue, Microservice  # noqa: E402
from relaybus.dashboard import create_app  # noqa: E402
from relaybus.demo import run_demo  # noqa: E402
from relaybus.demo.events import OrderCreated, OrderShipped  # noqa: E402
from relaybus.testing import delete_prefix, unique_prefix  # noqa: E402
from waiting import wait_for  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "browser-test-token"
IMAGES = Path(__file__).parent.parent / "docs" / "images"
#: Longest a page may take to show what is expected, in milliseconds.
expect.set_options(timeout=15_000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    pg = context.new_page()
    yield pg
    context.close()


@pytest.fixture
def demo_prefix(redis_url: str) -> Iterator[str]:
    """A prefix of this test's own, holding a finished demo run (with its dead letter)."""
    prefix = unique_prefix("demo")
    assert run_demo(url=redis_url, prefix=prefix, orders=12, seed=1,
                    console=Console(file=io.StringIO())) == 0
    yield prefix
    delete_prefix(redis_url, prefix)


@dataclass
class Dashboard:
    """A dashboard served by uvicorn in a thread."""

    base: str
    server: uvicorn.Server
    thread: threading.Thread


def serve(url: str, prefix: str, token: str | None) -> Dashboard:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(url, prefix, token), log_level="warning",
                            access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="the dashboard to listen")
    return Dashboard(f"http://127.0.0.1:{port}", server, thread)


@pytest.fixture
def dashboards(redis_url: str) -> Iterator[list[Dashboard]]:
    running: list[Dashboard] = []
    yield running
    for d in running:
        d.server.should_exit = True
        d.thread.join(timeout=10)


def shot(page: Page, name: str, tmp_path: Path) -> None:
    folder = IMAGES if os.environ.get("RELAYBUS_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=True)


def test_the_overview_shows_the_demos_queues_with_the_right_counts(
        page: Page, redis_url: str, demo_prefix: str, dashboards: list[Dashboard],
        tmp_path: Path) -> None:
    dash = serve(redis_url, demo_prefix, TOKEN)
    dashboards.append(dash)
    page.goto(dash.base + "/")
    expect(page.locator("tr[data-queue='sub:notification'] td[data-field='dlq']")
           ).to_have_text("1")
    # a live run while the page is open: the charts move by themselves
    audit = Microservice("audit", url=redis_url, prefix=demo_prefix)

    @audit.on(OrderShipped)
    def record(event: OrderShipped) -> None:
        """An auditor of shipments, still running when the screenshot is taken."""

    with audit, EventBus(redis_url, prefix=demo_prefix) as bus:
        audit.start()
        assert run_demo(url=redis_url, prefix=demo_prefix, orders=100, seed=2,
                        console=Console(file=io.StringIO())) == 0
        for n in range(3):  # waiting for services that are not running
            bus.publish(OrderCreated(order_id=f"LATE-{n}", customer_id="CUST-7",
                                     items=["mug"], amount=12.5))
        mq = bus.mq
        wait_for(lambda: _settled(mq, "sub:audit"), what="the auditor to be idle")
        expect(page.locator("#chart polyline.published")).to_have_count(1)
        # the page, refreshing itself, comes to show what the library reads
        wait_for(lambda: _shown(page) == _counts(mq), timeout=15,
                 what="the page to show the library's counts")
        assert _counts(mq)["sub:order"] == ("3", "0", "0")  # the late orders wait there
        expect(page.locator("#stat-dlq")).to_have_text(
            str(sum(i.dlq_messages for i in mq.list_queues() if not i.is_dlq)))
        expect(page.locator("#consumers")).to_contain_text("sub:audit")
        expect(page.locator("#subscriptions")).to_contain_text("order.shipped")
        shot(page, "dashboard-overview.png", tmp_path)


def _counts(mq: MessageQueue) -> dict[str, tuple[str, str, str]]:
    """Waiting, pending and DLQ of every queue as the overview shows them."""
    return {i.name: ("–" if i.name == "all" else str(i.waiting_messages),
                     "–" if i.name == "all" else str(i.pending_messages), str(i.dlq_messages))
            for i in mq.list_queues() if not i.is_dlq}


def _shown(page: Page) -> dict[str, tuple[str, str, str]]:
    """The same, read from the page's queue table."""
    rows: dict[str, tuple[str, str, str]] = page.eval_on_selector_all(
        "#queues tr[data-queue]", """rows => Object.fromEntries(rows.map(r => [r.dataset.queue,
            ['waiting', 'pending', 'dlq'].map(f =>
                r.querySelector(`td[data-field='${f}']`).textContent.trim())]))""")
    return {k: tuple(v) for k, v in rows.items()}  # type: ignore[misc]


def _settled(mq: MessageQueue, name: str) -> bool:
    info = next((i for i in mq.list_queues() if i.name == name), None)
    return info is not None and info.waiting_messages == 0 and info.pending_messages == 0


def test_a_dead_letter_is_opened_requeued_through_the_page_and_back_in_its_queue(
        page: Page, redis_url: str, demo_prefix: str, dashboards: list[Dashboard],
        tmp_path: Path) -> None:
    dash = serve(redis_url, demo_prefix, TOKEN)
    dashboards.append(dash)
    mq = MessageQueue(redis_url, prefix=demo_prefix)
    dlq = mq.require_queue("sub:notification:dlq")
    [dead] = dlq.peek()
    page.goto(dash.base + "/dlq/sub:notification")
    page.get_by_role("link", name="Log in").first.click()
    page.fill("#token", "wrong")
    page.click("#login")
    expect(page.locator("#login-error")).to_have_text("wrong token")
    page.fill("#token", TOKEN)
    page.click("#login")
    expect(page.locator("#mode")).to_have_text("logged in")
    page.get_by_role("link", name=dead.id).click()
    expect(page.locator("#message-id")).to_have_text(dead.id)
    expect(page.locator("#event-type")).to_have_text("order.created")
    expect(page.locator("#failure-1")).to_contain_text("unavailable (550)")
    expect(page.locator("#failure-1")).to_contain_text("notification")
    expect(page.locator("#payload")).to_contain_text(dead.data["order_id"])
    shot(page, "dashboard-dlq.png", tmp_path)
    page.click("#requeue")
    expect(page.locator(".banner.flash")).to_contain_text(
        "requeued 1 message from sub:notification:dlq to sub:notification")
    expect(page.locator("#dlq-messages")).to_contain_text("is empty")
    assert dlq.peek() == []
    back = mq.require_queue("sub:notification").peek()
    assert [m.data["event_id"] for m in back] == [dead.data["event_id"]]
    assert back[0].failures[-1]["reason"] == dead.reason
    mq.close()


def test_without_a_token_the_requeue_is_refused(
        page: Page, redis_url: str, demo_prefix: str, dashboards: list[Dashboard]) -> None:
    dash = serve(redis_url, demo_prefix, None)
    dashboards.append(dash)
    mq = MessageQueue(redis_url, prefix=demo_prefix)
    dlq = mq.require_queue("sub:notification:dlq")
    [dead] = dlq.peek()
    page.goto(f"{dash.base}/dlq/sub:notification/{dead.id}")
    expect(page.locator(".banner.readonly")).to_contain_text("Read-only")
    expect(page.locator("#readonly-note")).to_be_visible()
    expect(page.locator("#requeue")).to_have_count(0)
    # the page's own origin posting the form anyway: refused
    status = page.evaluate(
        """async (id) => (await fetch('/dlq/sub:notification/requeue', {method: 'POST',
             headers: {'Content-Type': 'application/x-www-form-urlencoded'},
             body: 'ids=' + id + '&csrf='})).status""", dead.id)
    assert status == 403
    page.goto(dash.base + "/dlq/sub:notification/purge")
    expect(page.locator("#purge")).to_have_count(0)
    assert [m.id for m in dlq.peek()] == [dead.id]
    mq.close()
