"""Batches from the page: several files on one input, one ordinary job each, in headless
Chromium against a real coordinator and real workers (the package's `web_cluster`).
Small files go inline through the batch route; larger ones one by one (multipart)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from csml.client import Client
from csml.schemas.workers import INLINE_MAX_BYTES
from tests.cluster import Cluster, wait_for
from tests.conftest import SKIMAGE_DATA
from tests.e2e.web.browser import PHONE, axe_violations, no_horizontal_scroll, screenshot
from tests.e2e.web.conftest import token_of

# A cluster and a headless browser; a batch waited for up to 180 s.
pytestmark = pytest.mark.timeout(600)

PHOTOS = ["astronaut.png", "camera.png", "coins.png", "horse.png", "moon.png"]
JOB_GET = re.compile(r"/v1/jobs/[^/?]+(\?|$)")


def drop_files(page: Any, selector: str, paths: list[Path]) -> None:
    """Drag several real files from outside the browser and drop them on `selector`."""
    files = [[base64.b64encode(p.read_bytes()).decode(), p.name] for p in paths]
    transfer = page.evaluate_handle(
        """(files) => {
            const dt = new DataTransfer();
            for (const [b64, name] of files) {
                const bin = atob(b64);
                const bytes = new Uint8Array(bin.length);
                for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
                dt.items.add(new File([bytes], name, { type: "text/plain" }));
            }
            return dt;
        }""",
        files,
    )
    for event in ("dragenter", "dragover", "drop"):
        page.dispatch_event(selector, event, {"dataTransfer": transfer})


class Submissions:
    """The page's submissions as the browser sent them, by route: each batch request's
    inputs (one dict per item) and each single (multipart) submission."""

    def __init__(self, page: Any) -> None:
        self.batches: list[list[dict[str, str]]] = []
        self.singles = 0
        page.on("request", self._seen)

    def _seen(self, request: Any) -> None:
        if request.method != "POST":
            return
        path = urlsplit(request.url).path
        if path == "/v1/jobs/batch":
            self.batches.append([item["inputs"] for item in request.post_data_json["items"]])
        elif path == "/v1/jobs":
            self.singles += 1


def batch_files(tmp: Path) -> list[Path]:
    """Five real images and, third, a text file named like an image (the job fails)."""
    paths = []
    for name in PHOTOS:
        shutil.copy(SKIMAGE_DATA / name, tmp / name)
        paths.append(tmp / name)
    bogus = tmp / "notes.png"
    bogus.write_text("these are notes, not a picture\n")
    paths.insert(2, bogus)
    return paths


def test_a_dropped_batch_with_a_failing_item(
    joined: Any, web_cluster: Cluster, tmp_path: Path
) -> None:
    page = joined()
    client = Client(web_cluster.url, token_of(page))
    sent = Submissions(page)
    gets: list[str] = []
    page.on(
        "request",
        lambda r: gets.append(r.url) if r.method == "GET" and JOB_GET.search(r.url) else None,
    )
    page.select_option("#app", "opencv")
    page.select_option("#operation", "detect_faces")
    page.get_by_label("Min Neighbors").fill("4")  # the same parameters for every item
    files = batch_files(tmp_path)
    page.locator('.drop[data-input="image"] input[type=file]').set_input_files(
        [str(p) for p in files]
    )
    assert "6 files" in page.inner_text('.drop[data-input="image"]')
    page.get_by_role("button", name="Submit 6 jobs").click()

    panel = page.locator("section.batch")
    counts = panel.get_by_test_id("batch-counts")
    counts.wait_for()
    wait_for(lambda: counts.inner_text().startswith("6/6 finished"), timeout=180)
    assert counts.inner_text() == "6/6 finished · 5 done · 1 failed"
    bar = panel.get_by_role("progressbar")
    assert bar.get_attribute("aria-valuenow") == "6"
    assert bar.get_attribute("aria-valuemax") == "6"
    failed = panel.locator("li.batch-item[data-state=failed]")
    assert failed.count() == 1
    assert "notes.png" in failed.inner_text()
    assert "not a decodable image" in failed.inner_text()  # the worker's reason, verbatim
    assert panel.locator("li.batch-item[data-state=succeeded]").count() == 5
    # The results arrived through the page's event stream, not by asking for each job.
    assert len(gets) < len(files), gets
    # The small files went together, inline, in one request to the batch route, in order;
    # only the file over the inline bound (astronaut.png) was sent on its own.
    small = [p for p in files if p.stat().st_size <= INLINE_MAX_BYTES]
    assert 0 < len(small) < len(files)
    assert len(sent.batches) == 1
    assert [base64.b64decode(item["image"]) for item in sent.batches[0]] == [
        p.read_bytes() for p in small
    ]
    assert sent.singles == len(files) - len(small)
    # Every item is an ordinary job of this identity, with the form's parameters.
    mine = {j.id: j for j in client.jobs()}
    assert len(mine) == 6
    assert {j.data.params.get("min_neighbors") for j in mine.values()} == {4}
    wait_for(lambda: page.locator("li.job").count() == 6)

    # The manifest: one JSON line per item, in the order the files were given.
    button = panel.get_by_role("button", name="Download manifest")
    button.focus()
    with page.expect_download() as info:
        page.keyboard.press("Enter")  # keyboard alone
    saved = tmp_path / "manifest.jsonl"
    info.value.save_as(saved)
    assert info.value.suggested_filename.endswith(".jsonl")
    lines = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [line["input"] for line in lines] == [p.name for p in files]
    assert set(mine) == {line["job_id"] for line in lines}
    for line in lines:
        job = mine[line["job_id"]]
        assert line["state"] == job.state.value
        if line["input"] == "notes.png":
            assert line["state"] == "failed"
            assert line["error"] == job.error and "not a decodable image" in line["error"]
            assert line["result"] is None and line["outputs"] == {}
        else:
            assert line["state"] == "succeeded" and line["error"] is None
            assert line["result"] == job.result
            stem = line["input"].removesuffix(".png")
            assert line["outputs"]["annotated"]["file"] == f"{stem}-annotated.png"
            assert line["outputs"]["annotated"]["media_type"] == "image/png"
    astronaut = next(line for line in lines if line["input"] == "astronaut.png")
    assert astronaut["result"]["count"] >= 1
    row = panel.locator("li.batch-item", has_text="astronaut.png")
    count = astronaut["result"]["count"]
    assert f"{count} face{'s' if count != 1 else ''} found" in row.inner_text()

    # Per-item outputs, as the job page offers them.
    with page.expect_download() as info:
        row.get_by_role("button", name="Download annotated of astronaut.png").click()
    one = tmp_path / "one.png"
    info.value.save_as(one)
    expected = tmp_path / "expected.png"
    client.job(astronaut["job_id"]).download("annotated", expected)
    assert one.read_bytes() == expected.read_bytes()

    # All outputs at once, under the manifest's names.
    with page.expect_download() as info:
        panel.get_by_role("button", name="Download outputs (zip)").click()
    archive = tmp_path / "outputs.zip"
    info.value.save_as(archive)
    with zipfile.ZipFile(io.BytesIO(archive.read_bytes())) as z:
        assert z.testzip() is None
        names = sorted(z.namelist())
        assert names == sorted(
            line["outputs"]["annotated"]["file"] for line in lines if line["state"] == "succeeded"
        )
        assert z.read("astronaut-annotated.png") == expected.read_bytes()

    row.get_by_role("link", name="Results of astronaut.png").click()
    page.wait_for_url(f"**#/jobs/{astronaut['job_id']}")
    page.get_by_test_id("face-count").wait_for()
    page.go_back()
    page.locator("section.batch").get_by_test_id("batch-counts").wait_for()  # kept on the page
    screenshot(page, "batch-desktop")
    assert axe_violations(page) == []
    page.set_viewport_size(PHONE)
    page.wait_for_timeout(200)
    assert no_horizontal_scroll(page)
    screenshot(page, "batch-phone")
    assert axe_violations(page) == []


def test_several_inputs_with_several_files_are_refused_before_sending(
    joined: Any, web_cluster: Cluster, tmp_path: Path
) -> None:
    page = joined()
    page.select_option("#app", "dlib")
    page.select_option("#operation", "predict_svm")
    data = [tmp_path / f"d{i}.csv" for i in range(2)]
    for p in data:
        p.write_text("a,b\n1,2\n")
    models = [tmp_path / f"m{i}.bin" for i in range(2)]
    for p in models:
        p.write_bytes(b"x")
    page.locator('.drop[data-input="data"] input[type=file]').set_input_files(
        [str(p) for p in data]
    )
    page.locator('.drop[data-input="model"] input[type=file]').set_input_files(
        [str(p) for p in models]
    )
    page.get_by_role("button", name="Submit job").click()
    assert page.get_by_text("Several files can go in one input only").is_visible()
    assert Client(web_cluster.url, token_of(page)).jobs() == []


def test_a_folder_past_the_submission_rate_waits_and_finishes(
    joined: Any, web_cluster: Cluster, tmp_path: Path
) -> None:
    """A folder of 62 files against the identity's submission rate (60 per minute, the
    default): the items past it are refused with 429 and Retry-After, wait that long,
    are sent again, and the whole batch ends done."""
    page = joined()
    sent = Submissions(page)
    folder = tmp_path / "many"
    (folder / "sub").mkdir(parents=True)
    for i in range(62):
        where = folder / "sub" if i % 10 == 0 else folder
        (where / f"item-{i:02d}.txt").write_text(f"item {i}\n")
    (folder / ".hidden").write_text("skipped\n")
    page.select_option("#app", "echo")
    page.select_option("#operation", "echo")
    page.locator('.field:has(.drop[data-input="data"]) input[webkitdirectory]').set_input_files(
        str(folder)
    )
    page.get_by_role("button", name="Submit 62 jobs").click()
    panel = page.locator("section.batch")
    waiting = panel.locator("li.batch-item[data-state=retrying]").first
    waiting.wait_for(timeout=60_000)
    assert "sending again in" in waiting.inner_text()
    assert "submission rate limit" in waiting.inner_text()
    counts = panel.get_by_test_id("batch-counts")
    wait_for(lambda: counts.inner_text().startswith("62/62 finished"), timeout=240)
    assert counts.inner_text() == "62/62 finished · 62 done · 0 failed"
    with page.expect_download() as info:
        panel.get_by_role("button", name="Download manifest").click()
    saved = tmp_path / "manifest.jsonl"
    info.value.save_as(saved)
    lines = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(lines) == 62 and {line["state"] for line in lines} == {"succeeded"}
    assert {line["input"] for line in lines} == {
        str(p.relative_to(tmp_path)) for p in folder.rglob("item-*.txt")
    }
    assert len({line["job_id"] for line in lines}) == 62
    assert len(Client(web_cluster.url, token_of(page)).jobs(limit=500)) == 62
    # All through the batch route: the first request carried every file, the items it
    # refused for now (429, per item) went again in later requests, nothing one by one.
    assert sent.singles == 0
    assert len(sent.batches) >= 2 and len(sent.batches[0]) == 62
    assert all(len(b) < 62 for b in sent.batches[1:])


def test_cancel_batch_cancels_its_jobs(joined: Any, web_cluster: Cluster, tmp_path: Path) -> None:
    page = joined()
    files = []
    for i in range(6):
        files.append(tmp_path / f"slow-{i}.txt")
        files[-1].write_text(f"{i}\n")
    page.select_option("#app", "echo")
    page.select_option("#operation", "echo")
    page.get_by_label("Sleep").fill("30")
    drop_files(page, '.drop[data-input="data"]', files)
    assert "6 files" in page.inner_text('.drop[data-input="data"]')
    page.get_by_role("button", name="Submit 6 jobs").click()
    panel = page.locator("section.batch")
    panel.locator("li.batch-item[data-state=running]").first.wait_for(timeout=60_000)
    wait_for(lambda: panel.locator("li.batch-item[data-state=queued]").count() == 5)
    panel.get_by_role("button", name="Cancel batch").click()
    counts = panel.get_by_test_id("batch-counts")
    wait_for(lambda: counts.inner_text().startswith("6/6 finished"), timeout=60)
    assert counts.inner_text() == "6/6 finished · 0 done · 0 failed · 6 cancelled"
    jobs = Client(web_cluster.url, token_of(page)).jobs()
    assert len(jobs) == 6 and {j.state.value for j in jobs} == {"cancelled"}
    panel.get_by_role("button", name="Download manifest").wait_for()
    panel.get_by_role("button", name="Remove from page").click()
    assert page.locator("section.batch").count() == 0


def test_without_the_batch_route_each_file_goes_alone(
    joined: Any, web_cluster: Cluster, tmp_path: Path
) -> None:
    """A coordinator without `POST /v1/jobs/batch` (an older one: 404, played here by the
    browser's routing) still gets the batch, one multipart submission per file."""
    page = joined()
    sent = Submissions(page)
    page.route(
        "**/v1/jobs/batch",
        lambda route: route.fulfill(
            status=404,
            content_type="application/json",
            body=json.dumps({"error": {"code": "not_found", "message": "Not Found"}}),
        ),
    )
    files = []
    for i in range(3):
        files.append(tmp_path / f"old-{i}.txt")
        files[-1].write_text(f"{i}\n")
    page.select_option("#app", "echo")
    page.select_option("#operation", "echo")
    drop_files(page, '.drop[data-input="data"]', files)
    page.get_by_role("button", name="Submit 3 jobs").click()
    counts = page.locator("section.batch").get_by_test_id("batch-counts")
    counts.wait_for()
    wait_for(lambda: counts.inner_text().startswith("3/3 finished"), timeout=120)
    assert counts.inner_text() == "3/3 finished · 3 done · 0 failed"
    assert len(sent.batches) == 1 and len(sent.batches[0]) == 3
    assert sent.singles == 3
    jobs = Client(web_cluster.url, token_of(page)).jobs()
    assert len(jobs) == 3 and {j.state.value for j in jobs} == {"succeeded"}
