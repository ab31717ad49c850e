from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster, running_cluster
from tests.e2e.web.browser import ARGS, DESKTOP, chromium_path, screenshot

OPERATOR_TOKEN = "csmlop_test-operator-token-0123456789"


# Package scope: the cluster and Playwright (whose sync API keeps an event loop running in
# the main thread) stop when the web tests are done, not at the end of the whole session.
@pytest.fixture(scope="package")
def web_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real coordinator (operator view on) with real echo, opencv and dlib workers."""
    root = tmp_path_factory.mktemp("web")
    settings = {
        "CSML_OPERATOR_TOKEN": OPERATOR_TOKEN,
        "CSML_MAX_UPLOAD_BYTES": str(8 * 1024 * 1024),
    }
    with running_cluster(root, settings, {"echo": 1, "opencv": 1, "dlib": 1}) as c:
        yield c


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    path = chromium_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: apt-get install chromium chromium-driver")
        pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=ARGS)
        yield b
        b.close()


class Pages:
    """New browser contexts (each a fresh browser profile) whose console errors are kept."""

    def __init__(self, browser: Any, base_url: str) -> None:
        self.browser = browser
        self.base_url = base_url
        self.contexts: list[Any] = []
        self.errors: list[str] = []

    def new(self, viewport: dict[str, int] | None = None, **kw: Any) -> Any:
        ctx = self.browser.new_context(
            viewport=viewport or DESKTOP, base_url=self.base_url, accept_downloads=True, **kw
        )
        self.contexts.append(ctx)
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on(
            "console",
            lambda m: (
                self.errors.append(f"console {m.type}: {m.text}")
                if m.type == "error" and "Content Security Policy" in m.text
                else None
            ),
        )
        return page

    def close(self) -> None:
        for ctx in self.contexts:
            ctx.close()


@pytest.fixture
def pages(browser: Any, web_cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Pages]:
    p = Pages(browser, web_cluster.url)
    yield p
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:  # keep what the browser showed, for diagnosis
        for i, ctx in enumerate(p.contexts):
            for j, page in enumerate(ctx.pages):
                with contextlib.suppress(Exception):
                    screenshot(page, f"failed-{request.node.name}-{i}-{j}")
    p.close()
    assert not p.errors, p.errors


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def joined(pages: Pages) -> Callable[..., Any]:
    """A page whose browser has just joined (solved the proof of work in the page)."""

    def make(viewport: dict[str, int] | None = None) -> Any:
        page = pages.new(viewport)
        page.goto("/")
        page.get_by_role("button", name="Join anonymously").click()
        page.wait_for_url("**#/work")
        page.wait_for_selector("form.submit-form")
        return page

    return make


def token_of(page: Any) -> str:
    return str(page.evaluate("() => JSON.parse(localStorage.getItem('csml.identity')).token"))


def data_file(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path
