"""The documented "Adding an application" example (docs/user-guide/adding-an-application.md),
installed with pip, serves a real job."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cluster import install_to_folder, running_cluster

# Pip-installs a third-party app and runs it on a cluster.
pytestmark = pytest.mark.timeout(600)

PAGE = Path(__file__).parents[2] / "docs" / "user-guide" / "adding-an-application.md"


def example_blocks() -> tuple[str, str]:
    page = PAGE.read_text()
    python = re.search(r"```python\n(# mypkg/app.py\n.*?)```", page, re.S)
    toml = re.search(r"```toml\n# mypkg/pyproject.toml\n(.*?)```", page, re.S)
    assert python and toml, f"example blocks not found in {PAGE}"
    return python.group(1), toml.group(1)


def test_documented_app_installs_and_serves_a_job(tmp_path: Path) -> None:
    code, entry_points = example_blocks()
    pkg = tmp_path / "mypkg"
    (pkg / "mypkg").mkdir(parents=True)
    (pkg / "mypkg" / "__init__.py").write_text("")
    (pkg / "mypkg" / "app.py").write_text(code)
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "mypkg"\nversion = "1.0"\n' + entry_points
    )
    site = install_to_folder(pkg, tmp_path / "site")
    with running_cluster(tmp_path / "cluster") as cluster:
        cluster.env["PYTHONPATH"] = str(site)
        cluster.start_worker("textstats")
        cluster.wait_workers("textstats", 1)
        client = cluster.new_user()
        job = client.submit(
            "textstats", "count_words", files={"text": b"to be or not to be"}, params={"top": 3}
        ).wait(30)
        assert job.state.value == "succeeded", job.error
        assert job.result == {"count": 6}
        assert job.download("words", tmp_path / "w").read_text().split() == [
            "to",
            "be",
            "or",
            "not",
            "to",
            "be",
        ]
        bad = client.submit("textstats", "count_words", files={"text": b"\xff\xfe\x00"}).wait(30)
        assert bad.state.value == "failed" and "not UTF-8" in (bad.error or "")
        app = client.app("textstats")
        assert app.operations[0].params_schema["properties"]["top"]["maximum"] == 100
