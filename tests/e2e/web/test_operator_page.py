"""The operator view in headless Chromium: workers, queues, charts, failures, join tokens."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from csml.client import Client
from tests.cluster import Cluster, wait_for
from tests.e2e.web.browser import DESKTOP, PHONE, axe_violations, no_horizontal_scroll, screenshot
from tests.e2e.web.conftest import OPERATOR_TOKEN, Pages

# A cluster and a headless browser.
pytestmark = pytest.mark.timeout(300)

OP = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


def overview(cluster: Cluster) -> dict[str, Any]:
    return dict(httpx.get(f"{cluster.url}/v1/operator/overview", headers=OP, timeout=30).json())


def join_tokens(cluster: Cluster) -> list[dict[str, Any]]:
    r = httpx.get(f"{cluster.url}/v1/operator/join-tokens", headers=OP, timeout=30)
    return list(r.json()["tokens"])


def sign_in(page: Any, token: str) -> None:
    page.goto("/operator")
    page.get_by_label("Operator token").fill(token)
    page.get_by_role("button", name="Open the operator view").click()


def test_operator_view(pages: Pages, web_cluster: Cluster) -> None:
    page = pages.new(DESKTOP)
    page.goto("/operator")
    page.get_by_label("Operator token").wait_for()
    assert axe_violations(page) == []
    sign_in(page, "not-the-token")
    page.get_by_text("That is not the operator token.").wait_for()

    user = Client(web_cluster.url)
    user.create_identity()
    failed = user.submit("echo", "crash").wait(60)
    assert failed.state.value == "failed"
    sleepers = [user.submit("echo", "echo", params={"sleep": 60}) for _ in range(3)]
    try:
        # The echo worker has one slot: one runs, two wait.
        wait_for(lambda: user.job(sleepers[0].id).state.value == "running", timeout=30)
        sign_in(page, OPERATOR_TOKEN)
        page.get_by_role("heading", name="Workers").wait_for()

        def depth_on_page() -> str:
            return str(page.locator('tr[data-app="echo"] td[data-col="depth"]').inner_text())

        api_apps = {a["name"]: a for a in overview(web_cluster)["apps"]}
        echo = api_apps["echo"]["queue"]
        assert echo["depth"] == 2
        wait_for(lambda: depth_on_page() == f"{echo['depth']} / {echo['capacity']}", timeout=20)
        api_apps = {a["name"]: a for a in overview(web_cluster)["apps"]}
        assert depth_on_page() == f"{api_apps['echo']['queue']['depth']} / {echo['capacity']}"

        live = [w for w in overview(web_cluster)["workers"] if w["state"] == "live"]
        assert {w["app"] for w in live} >= {"echo", "opencv", "dlib"}
        for w in live:
            row = page.locator(f'tr[data-worker="{w["id"]}"]')
            assert row.count() == 1
            assert "Live" in row.inner_text()
            assert f"/ {w['slots']}" in row.inner_text()

        # Charts of the last hour and failures by reason.
        assert page.locator("svg.chart").count() == 2
        assert page.locator("svg.chart path.line").count() >= 1
        failures = page.locator("section[aria-labelledby=failures-title] tbody tr")
        assert failures.count() >= 1
        stats = httpx.get(f"{web_cluster.url}/v1/operator/stats", headers=OP).json()
        reasons = [f["reason"] for f in stats["failures"]]
        assert any("SIGSEGV" in r for r in reasons), reasons
        shown = [failures.nth(i).locator("td").first.inner_text() for i in range(failures.count())]
        assert shown == reasons

        # The credit ledger's totals, as the API gives them.
        totals = httpx.get(f"{web_cluster.url}/v1/operator/credit", headers=OP).json()
        credit = page.locator("#credit-totals").inner_text()
        assert f"Earned {totals['earned_milli'] / 1000:.3f}" in credit
        assert f"at most {totals['priority']['k']} of every {totals['priority']['n']}" in credit

        screenshot(page, "operator-desktop")
        assert axe_violations(page) == []

        # Join tokens: create one (shown once), then revoke it.
        page.get_by_label("Label for a new join token").fill("web-test-box")
        page.get_by_role("button", name="Create join token").click()
        new_token = page.get_by_test_id("new-join-token").inner_text()
        assert new_token.startswith("csmljoin_")
        tokens = join_tokens(web_cluster)
        created = [t for t in tokens if t["label"] == "web-test-box"]
        assert len(created) == 1 and created[0]["revoked_at"] is None
        # The new token lets a worker join.
        r = httpx.post(
            f"{web_cluster.url}/v1/workers",
            headers={"Authorization": f"Bearer {new_token}"},
            json={"app": {"name": "webtest", "version": "1", "operations": []}, "slots": 1},
        )
        assert r.status_code == 201, r.text
        row = page.locator(f'tr[data-token="{created[0]["id"]}"]')
        row.get_by_role("button", name="Revoke join token").click()
        wait_for(lambda: "revoked" in row.inner_text())
        revoked = [t["revoked_at"] for t in join_tokens(web_cluster) if t["id"] == created[0]["id"]]
        assert revoked != [None]

        page.set_viewport_size(PHONE)
        page.wait_for_timeout(300)
        assert no_horizontal_scroll(page)
        screenshot(page, "operator-phone")
        assert axe_violations(page) == []
    finally:
        for job in sleepers:
            job.cancel()
