"""The documentation site builds with `mkdocs build --strict` and is complete and self-contained.

Strict: any warning fails the build (a broken link, a page missing from the nav, a nav
entry without a page, a docstring mkdocstrings cannot read). The generated REST reference
covers every path of the coordinator's OpenAPI document, and no page loads a script,
style sheet or font from another site. Skipped only when MkDocs is not installed
(`pip install -e '.[docs]'`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="MkDocs is not installed: pip install -e '.[docs]'")
# Building the site imports the coordinator and renders every page: 10-100 s here.
pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    config = ["--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", *config],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def test_every_nav_page_is_built(site: Path) -> None:
    for page in ("index.html", "reference/cli/index.html", "reference/sdk/index.html"):
        assert (site / page).is_file(), page
    assert (site / "screenshots" / "main.png").is_file()


def test_rest_reference_covers_the_openapi_document(site: Path) -> None:
    document = json.loads((site / "reference" / "openapi.json").read_text())
    page = (site / "reference" / "rest-api" / "index.html").read_text()
    assert document["paths"], "the OpenAPI document has no paths"
    missing = [path for path in document["paths"] if path not in page]
    assert not missing, f"paths missing from the REST reference: {missing}"


def test_sdk_reference_documents_the_client(site: Path) -> None:
    page = (site / "reference" / "sdk" / "index.html").read_text()
    for name in ("Client.submit", "Job.wait", "Job.download", "QueueFull", "CsmlError"):
        assert f'id="csml.client.{name}"' in page, name


def test_no_page_loads_from_another_site(site: Path) -> None:
    remote = re.compile(r"<(?:script|link|img)\b[^>]*\b(?:src|href)=\"(?:https?:)?//", re.I)
    offending = [
        str(page.relative_to(site))
        for page in site.rglob("*.html")
        if remote.search(page.read_text())
    ]
    assert not offending, f"pages loading from another site: {offending}"
