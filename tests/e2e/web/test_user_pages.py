"""The user page in headless Chromium against a real coordinator and real workers."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from csml.client import Client
from tests.cluster import Cluster, wait_for
from tests.e2e.web.browser import (
    DESKTOP,
    PHONE,
    axe_violations,
    drop_file,
    no_horizontal_scroll,
    screenshot,
)
from tests.e2e.web.conftest import Pages, token_of

# A cluster and a headless browser; jobs waited for up to 120 s.
pytestmark = pytest.mark.timeout(600)

LAYOUT_SHIFTS = """() => {
    window.__shift = 0;
    new PerformanceObserver((list) => {
        for (const e of list.getEntries()) if (!e.hadRecentInput) window.__shift += e.value;
    }).observe({ type: "layout-shift", buffered: false });
}"""


def job_row(page: Any, job_id: str) -> Any:
    return page.locator(f'li.job[data-job-id="{job_id}"]')


def newest_job_id(page: Any) -> str:
    page.wait_for_selector("li.job")
    return str(page.locator("li.job").first.get_attribute("data-job-id"))


def listed_job_ids(page: Any) -> list[str]:
    ids: list[str] = page.locator("li.job").evaluate_all("els => els.map(e => e.dataset.jobId)")
    return ids


def submit_job(page: Any) -> str:
    """Click "Submit job" and return the id of the job that then joins the list: not the
    first row, which may still be an earlier job (pushed there by the event stream)."""
    before = set(listed_job_ids(page))
    page.get_by_role("button", name="Submit job").click()
    new = wait_for(lambda: [i for i in listed_job_ids(page) if i not in before], timeout=60)
    return str(new[0])


def choose(page: Any, app: str, operation: str) -> None:
    page.select_option("#app", app)
    page.select_option("#operation", operation)


def test_join_page(pages: Pages, web_cluster: Cluster) -> None:
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page = pages.new(viewport)
        response = page.goto("/")
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp
        page.get_by_role("button", name="Join anonymously").wait_for()
        assert "all this service knows about you" in page.inner_text("main")
        assert no_horizontal_scroll(page)
        screenshot(page, f"join-{name}")
        assert axe_violations(page) == []


def test_face_detection_from_a_dropped_photo(
    joined: Any, web_cluster: Cluster, photo: Path, tmp_path: Path
) -> None:
    page = joined()
    page.evaluate(LAYOUT_SHIFTS)
    assert axe_violations(page) == []
    choose(page, "opencv", "detect_faces")
    drop_file(page, '.drop[data-input="image"]', photo, "image/png")
    assert photo.name in page.inner_text('.drop[data-input="image"]')
    job_id = submit_job(page)
    row = job_row(page, job_id)
    # The row has its progress bar from the start (exposed while the job is in flight,
    # which the sleeper below checks: this job may already have ended), then "Done".
    assert row.locator(".bar").count() == 1
    row.locator(".badge-succeeded").wait_for()
    assert row.locator(".bar").get_attribute("aria-valuenow") == "100"
    shift = page.evaluate("() => window.__shift")
    assert shift < 0.05, f"layout shifted by {shift} while the job updated"

    client = Client(web_cluster.url, token_of(page))
    # A job submitted elsewhere (the SDK) shows up live, with its progress and message.
    sleeper = client.submit("echo", "echo", params={"sleep": 30})
    sleeping = job_row(page, sleeper.id)
    sleeping.get_by_text("sleeping").wait_for()
    wait_for(lambda: int(sleeping.get_by_role("progressbar").get_attribute("aria-valuenow")) > 0)
    screenshot(page, "main-desktop")
    sleeping.get_by_role("button", name="Cancel").click()
    sleeping.locator(".badge-cancelled").wait_for()
    shift = page.evaluate("() => window.__shift")
    assert shift < 0.05, f"layout shifted by {shift} while the jobs updated"
    job = client.job(job_id)
    assert job.state.value == "succeeded" and job.result is not None
    count = job.result["count"]
    assert count >= 1

    row.get_by_role("link", name=re.compile("^Results of job")).click()
    page.wait_for_url(f"**#/jobs/{job_id}")
    assert page.get_by_test_id("face-count").inner_text() == (
        f"{count} face{'s' if count != 1 else ''} found"
    )
    image = page.locator('.output[data-output="annotated"] img')
    image.wait_for()
    wait_for(
        lambda: page.evaluate("(img) => img.complete && img.naturalWidth", image.element_handle())
    )
    assert image.get_attribute("alt")
    # The faces are a readable table, not raw JSON.
    assert page.locator("table th", has_text="X").count() >= 1
    with page.expect_download() as info:
        page.get_by_role("button", name="Download annotated").click()
    saved = tmp_path / "annotated.png"
    info.value.save_as(saved)
    expected = tmp_path / "expected.png"
    client.job(job_id).download("annotated", expected)
    assert saved.read_bytes() == expected.read_bytes()
    assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    screenshot(page, "result-desktop")
    assert axe_violations(page) == []

    page.set_viewport_size(PHONE)
    page.wait_for_timeout(200)
    assert no_horizontal_scroll(page)
    screenshot(page, "result-phone")
    assert axe_violations(page) == []
    page.goto("/#/work")
    page.wait_for_selector("li.job")
    assert no_horizontal_scroll(page)
    screenshot(page, "main-phone")
    assert axe_violations(page) == []


def test_queue_position_and_cancel(joined: Any, web_cluster: Cluster) -> None:
    page = joined()
    choose(page, "echo", "echo")
    page.fill("#" + page.get_by_label("Sleep").get_attribute("id"), "60")
    ids: list[str] = []
    for _ in range(2):  # the echo worker has one slot: the second one waits in line
        page.get_by_role("button", name="Submit job").click()
        wait_for(lambda n=len(ids): page.locator("li.job").count() > n)
        ids.append(newest_job_id(page))
    first, second = ids
    job_row(page, first).locator(".badge-running").wait_for()
    client = Client(web_cluster.url, token_of(page))
    api_place = httpx.get(
        f"{web_cluster.url}/v1/jobs/{second}",
        params={"positions": "true"},
        headers={"Authorization": f"Bearer {token_of(page)}"},
    ).json()["queue_position"]
    assert api_place >= 1
    job_row(page, second).get_by_text(f"position {api_place} in line").wait_for()
    # Elapsed time ticks on the running job.
    elapsed = job_row(page, first).locator(".job-elapsed")
    before = elapsed.inner_text()
    wait_for(lambda: elapsed.inner_text() != before, timeout=5)
    assert elapsed.inner_text().startswith("running")
    screenshot(page, "jobs-queued-desktop")
    for job_id in ids:
        job_row(page, job_id).get_by_role("button", name="Cancel").click()
        job_row(page, job_id).locator(".badge-cancelled").wait_for()
        assert client.job(job_id).state.value == "cancelled"


def test_form_checks_values_before_sending(joined: Any, web_cluster: Cluster) -> None:
    page = joined()
    choose(page, "opencv", "detect_faces")
    field = page.get_by_label("Min Neighbors")
    field.fill("99")
    field.blur()
    error = page.locator(f"#{field.get_attribute('id')}-error")
    assert error.inner_text() == "Must be at most 50."
    assert field.get_attribute("aria-invalid") == "true"
    page.get_by_role("button", name="Submit job").click()
    assert page.get_by_text('Choose a file for "image".').is_visible()
    assert page.evaluate("() => document.activeElement.id") == field.get_attribute("id")
    assert Client(web_cluster.url, token_of(page)).jobs() == []
    assert axe_violations(page) == []


def test_key_file_moves_an_identity_and_identities_are_apart(
    joined: Any, pages: Pages, web_cluster: Cluster, tmp_path: Path
) -> None:
    page = joined()
    client = Client(web_cluster.url, token_of(page))
    mine = {client.submit("echo", "echo", files={"data": b"hello"}).wait(60).id for _ in range(2)}
    page.goto("/#/identity")
    with page.expect_download() as info:
        page.get_by_role("button", name="Export key file").click()
    key = tmp_path / "key.json"
    info.value.save_as(key)
    saved = json.loads(key.read_text())
    assert saved["url"] == web_cluster.url and saved["token"] == token_of(page)
    screenshot(page, "identity-desktop")
    assert axe_violations(page) == []

    fresh = pages.new(PHONE)  # a new browser profile: nothing in its storage
    fresh.goto("/")
    fresh.get_by_role("button", name="Join anonymously").wait_for()
    fresh.locator("input[type=file]").set_input_files(str(key))
    fresh.wait_for_url("**#/work")
    wait_for(lambda: fresh.locator("li.job").count() == 2)
    shown = {fresh.locator("li.job").nth(i).get_attribute("data-job-id") for i in range(2)}
    assert shown == mine
    screenshot(fresh, "identity-imported-phone")

    other = joined()
    other.wait_for_selector("#live-mode[data-mode=stream]")
    assert other.locator("li.job").count() == 0
    assert "No jobs yet" in other.inner_text("main")
    other_client = Client(web_cluster.url, token_of(other))
    assert other_client.jobs() == []
    for job_id in mine:
        other.goto(f"/#/jobs/{job_id}")
        other.get_by_text("is visible to you").wait_for()


def test_forget_me_erases_the_identity(joined: Any, web_cluster: Cluster) -> None:
    page = joined()
    token = token_of(page)
    page.goto("/#/identity")
    page.get_by_role("button", name="Forget me…").click()
    page.get_by_role("button", name="Yes, erase everything").click()
    page.get_by_role("button", name="Join anonymously").wait_for()
    assert page.evaluate("() => localStorage.getItem('csml.identity')") is None
    r = httpx.get(
        f"{web_cluster.url}/v1/identities/me", headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code == 401


def test_polling_when_the_stream_fails(joined: Any, web_cluster: Cluster) -> None:
    page = joined()
    page.route("**/v1/jobs/events", lambda route: route.abort())
    page.reload()
    page.wait_for_selector("#live-mode[data-mode=poll]")
    job = Client(web_cluster.url, token_of(page)).submit("echo", "echo", files={"data": b"x"})
    job_row(page, job.id).locator(".badge-succeeded").wait_for(timeout=30_000)


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_models_page_and_use_for_prediction(
    joined: Any, web_cluster: Cluster, tmp_path: Path, viewport: str
) -> None:
    page = joined(DESKTOP if viewport == "desktop" else PHONE)
    client = Client(web_cluster.url, token_of(page))
    rows = ["a,b,label"] + [f"{i % 7},{(i * 3) % 5},{'x' if i % 7 < 3 else 'y'}" for i in range(40)]
    data = tmp_path / "train.csv"
    data.write_text("\n".join(rows) + "\n")
    trained = client.submit(
        "dlib", "train_svm", files={"data": str(data)}, params={"kernel": "linear", "cv_folds": 2}
    ).wait(120)
    assert trained.state.value == "succeeded", trained.error
    page.goto("/#/models")
    model_row = page.locator("tr[data-model-id]")
    model_row.first.wait_for()
    assert model_row.count() == 1
    screenshot(page, f"models-{viewport}")
    assert axe_violations(page) == []
    model_id = model_row.first.get_attribute("data-model-id")
    page.get_by_role("button", name=re.compile("^Use for prediction: model")).click()
    page.wait_for_selector("form.submit-form")
    assert page.input_value("#operation") == "predict_svm"
    wait_for(lambda: page.input_value('select[name="model"]') == model_id)
    assert page.locator('.drop[data-input="model"]').is_hidden()
    drop_file(page, '.drop[data-input="data"]', data, "text/csv")
    job_id = submit_job(page)
    job_row(page, job_id).locator(".badge-succeeded").wait_for(timeout=60_000)
    job_row(page, job_id).get_by_role("link", name=re.compile("^Results of job")).click()
    try:
        page.locator('.output[data-output="predictions"] table').wait_for()
    finally:
        screenshot(page, f"prediction-{viewport}")
    assert client.job(job_id).state.value == "succeeded"


def test_confidential_toggle_says_what_the_workers_prove(joined: Any) -> None:
    page = joined()
    choose(page, "opencv", "detect_faces")
    page.get_by_label("Confidential (end-to-end encrypted)").check()
    words = page.locator("#confidential-words")
    page.wait_for_function(
        "() => !document.querySelector('#confidential-words').textContent.startsWith('Checking')"
    )
    text = words.inner_text()
    assert "1 of 1 opencv workers has no attestation" in text
    assert "csml submit" in text
    assert page.get_by_role("button", name="Submit job").is_disabled()
    page.get_by_label("Confidential (end-to-end encrypted)").uncheck()
    assert page.get_by_role("button", name="Submit job").is_enabled()


def test_operator_workers_only_is_sent_with_the_job(joined: Any, web_cluster: Cluster) -> None:
    page = joined()
    choose(page, "echo", "echo")
    words = page.locator("#trusted-words").inner_text()
    assert "no contributed worker serves this app now" in words
    page.get_by_label("Operator's workers only").check()
    job_id = submit_job(page)
    job = Client(web_cluster.url, token_of(page)).job(job_id)
    assert job.data.trusted_only is True


def test_training_metrics_are_plotted_per_epoch(
    joined: Any, web_cluster: Cluster, tmp_path: Path
) -> None:
    # find_spec, not import: importing dynet here, unconfigured, would turn autobatching
    # off for every later in-process DyNet test of the session.
    if importlib.util.find_spec("dynet") is None:
        pytest.skip("DyNet is installed from the wheel .ci builds")
    web_cluster.start_worker("dynet")
    web_cluster.wait_workers("dynet", 1, timeout=60)
    page = joined()
    rows = ["a,b,label"] + [f"{i % 5},{(i * 7) % 3},{'p' if i % 5 < 2 else 'q'}" for i in range(60)]
    data = tmp_path / "train.csv"
    data.write_text("\n".join(rows) + "\n")
    choose(page, "dynet", "train_mlp")
    page.get_by_label("Epochs").fill("5")
    page.get_by_label("Hidden").fill("8, 4")
    drop_file(page, '.drop[data-input="data"]', data, "text/csv")
    job_id = submit_job(page)
    job_row(page, job_id).locator(".badge-succeeded").wait_for(timeout=120_000)
    job_row(page, job_id).get_by_role("link", name=re.compile("^Results of job")).click()
    chart = page.locator("figure", has_text="Loss per epoch")
    chart.wait_for()
    result = Client(web_cluster.url, token_of(page)).job(job_id).result
    assert result is not None
    history = result["history"]
    assert len(history) == 5
    assert chart.locator("svg path.line").count() == 1
    last = history[-1]["loss"]
    assert f"over {len(history)} epochs" in chart.inner_text()
    shown = page.evaluate("(v) => v.toLocaleString(undefined, {maximumFractionDigits: 4})", last)
    assert f"to {shown} over" in chart.inner_text()
    page.locator("section[aria-labelledby=models-title]").wait_for()
    screenshot(page, "training-desktop")
    assert axe_violations(page) == []


def tab_to(page: Any, predicate: str, limit: int = 40) -> None:
    """Press Tab until the focused element satisfies the JS `predicate(el)`."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate(f"() => ({predicate})(document.activeElement)"):
            return
    raise AssertionError(f"no element matching {predicate} in the tab order")


def chooser_by_keyboard(page: Any, presses: int = 3) -> Any:
    """Open the focused file input's chooser with Space, as a keyboard user does.

    In one full CI run of ~17 (run 38), headless Chromium did not open the chooser for a
    Space that reached the focused input (the failure screenshot showed the focus on it);
    the same test then passed 5 of 5 alone. So the key is pressed again, at most
    `presses` times, each only while the input still has the focus: the test still fails
    if the keyboard cannot open the chooser at all, or if the focus moved."""
    for _ in range(presses):
        focused = page.evaluate("() => document.activeElement?.type ?? null")
        assert focused == "file", f"the file input lost the focus to {focused!r}"
        try:
            with page.expect_file_chooser(timeout=10_000) as chooser:
                page.keyboard.press("Space")
        except PlaywrightTimeoutError:
            continue
        return chooser.value
    raise AssertionError(f"Space on the focused file input opened no chooser in {presses} presses")


def test_keyboard_alone_joins_and_submits(pages: Pages, photo: Path) -> None:
    page = pages.new()
    page.goto("/")
    tab_to(page, "(el) => el.textContent === 'Join anonymously'")
    page.keyboard.press("Enter")
    page.wait_for_url("**#/work")
    page.wait_for_selector("form.submit-form")
    tab_to(page, "(el) => el.type === 'file'")
    chooser_by_keyboard(page).set_files(str(photo))
    tab_to(page, "(el) => el.textContent === 'Submit job'")
    page.keyboard.press("Enter")
    job_id = newest_job_id(page)
    job_row(page, job_id).locator(".badge-succeeded").wait_for()
    tab_to(page, f"(el) => el.getAttribute('aria-label') === 'Results of job {job_id[:12]}'")
    page.keyboard.press("Enter")
    page.wait_for_url(f"**#/jobs/{job_id}")
    page.locator(".output img").wait_for()


def test_a_late_answer_to_a_submission_does_not_undo_what_the_stream_told(
    joined: Any,
) -> None:
    """The answer to "Submit job" and the event stream come on two connections: a fast
    job can end, and the stream tell the page so, before the answer arrives (a loaded
    machine; here the browser's routing holds the answer). The answer is the job's
    first state: it must not put the row back to "Queued", where it would stay (no
    event follows an end), with a Cancel button instead of its results."""
    page = joined()
    held: list[tuple[Any, Any]] = []

    def hold(route: Any) -> None:  # sent to the coordinator; its answer kept from the page
        if route.request.method != "POST":
            route.fallback()
            return
        held.append((route, route.fetch()))

    page.route("**/v1/jobs", hold)
    choose(page, "echo", "echo")
    page.get_by_role("button", name="Submit job").click()
    wait_for(lambda: held or page.wait_for_timeout(50), timeout=30)
    route, answer = held[0]
    assert answer.status == 202, answer.text()
    job_id = str(answer.json()["id"])
    assert answer.json()["state"] == "queued"
    row = job_row(page, job_id)
    row.locator(".badge-succeeded").wait_for()  # told by the stream alone
    route.fulfill(response=answer)
    page.locator("#notice").filter(has_text=f"Job {job_id[:12]} submitted").wait_for()
    page.unroute("**/v1/jobs", hold)
    assert row.locator(".badge-succeeded").count() == 1
    assert row.get_by_role("link", name=f"Results of job {job_id[:12]}").count() == 1
    assert page.get_by_role("button", name="Submit job").is_enabled()


def test_credit_page_shows_balance_and_ledger(joined: Any, web_cluster: Cluster) -> None:
    """The page shows what the ledger holds: two earnings written by the store's own
    `earn` (the acceptance test earns for real: tests/integration/test_credit.py)."""

    from csml.store import credit as ledger
    from csml.store.db import make_engine, sqlite_url, transaction
    from csml.store.db import make_sessionmaker as sessions_of
    from csml.store.tables import utcnow

    page = joined(DESKTOP)
    me = str(page.evaluate("() => JSON.parse(localStorage.getItem('csml.identity')).id"))
    page.goto("/#/credit")
    page.locator("#credit-balance").wait_for()
    assert page.locator("#credit-balance").inner_text() == "0.000 credits"
    engine = make_engine(sqlite_url(web_cluster.data_dir))
    try:
        for seconds in (1.25, 2.5):
            now = utcnow()
            with transaction(sessions_of(engine)) as session:
                ledger.earn(
                    session.connection(),
                    ledger.Run("a" * 64, "echo", "b" * 64, seconds),
                    contributor_id=me,
                    owner_id="another identity",
                    now=now,
                    max_seconds=600,
                )
    finally:
        engine.dispose()
    page.reload()
    page.locator('tr[data-kind="earned"]').nth(1).wait_for()
    assert page.locator("#credit-balance").inner_text() == "3.750 credits"
    assert page.locator('tr[data-kind="earned"] td.credit-earned').all_inner_texts() == [
        "+2.500",
        "+1.250",
    ]
    screenshot(page, "credit-desktop")
    assert axe_violations(page) == []
