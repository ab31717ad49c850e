"""Leaving a view while it still loads, in headless Chromium against a real coordinator
(the package's `web_cluster`): a late response of the view left never draws over the
view the user went to."""

from __future__ import annotations

import contextlib
import re
import time
from typing import Any

import pytest

from csml.client import Client
from tests.cluster import Cluster
from tests.e2e.web.browser import axe_violations
from tests.e2e.web.conftest import token_of

pytestmark = pytest.mark.timeout(300)

JOB_LOAD = re.compile(r"/v1/jobs/[^/?]+\?positions=true$")


def test_a_job_page_left_while_loading_does_not_draw_over_the_next_view(
    joined: Any, web_cluster: Cluster
) -> None:
    page = joined()
    job = Client(web_cluster.url, token_of(page)).submit("echo", "echo", files={"data": b"late"})
    job.wait(timeout=60)
    held: list[Any] = []

    def hold(route: Any) -> None:  # the job page's load waits until we let it go
        held.append(route)

    page.route(JOB_LOAD, hold)
    page.evaluate("id => { location.hash = `#/jobs/${id}`; }", job.id)
    deadline = time.monotonic() + 30
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(50)  # lets Playwright deliver the routed request
    assert held, "the job page did not ask for its job"

    page.evaluate("() => { location.hash = '#/work'; }")  # leave before it has loaded
    page.wait_for_selector("form.submit-form")
    page.unroute(JOB_LOAD, hold)
    with contextlib.suppress(Exception):  # with the fix the page has aborted it already
        held[0].continue_()
    # The late answer (if the page still wants it) arrives in milliseconds here: watch the
    # view for a while; the job must never be drawn over the form.
    for _ in range(20):
        page.wait_for_timeout(100)
        assert page.locator("#job-title").count() == 0
        assert page.locator("form.submit-form").is_visible()
    assert page.title().startswith("Submit and follow jobs")
    assert page.locator("main h1").count() == 1

    # The job page itself still works when it is given the time to load.
    page.evaluate("id => { location.hash = `#/jobs/${id}`; }", job.id)
    page.locator("#job-title").wait_for()
    page.locator(".badge-succeeded").wait_for()
    assert page.locator("form.submit-form").count() == 0
    assert axe_violations(page) == []
