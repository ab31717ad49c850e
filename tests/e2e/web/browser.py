"""Headless Chromium (Debian's package, driven by Playwright) for the page tests.

No browser is downloaded: Playwright launches /usr/bin/chromium. axe-core is
vendored (tests/e2e/web/vendor/axe.min.js, MPL-2.0) and run inside the page.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
AXE = HERE / "vendor" / "axe.min.js"
SCREENSHOTS = Path(os.environ.get("CSML_SCREENSHOTS", HERE / "screenshots"))
CHROMIUM = os.environ.get("CSML_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def chromium_path() -> str | None:
    path = shutil.which(CHROMIUM) or (CHROMIUM if Path(CHROMIUM).exists() else None)
    return path


def axe_violations(page: Any) -> list[dict[str, Any]]:
    """Serious and critical accessibility violations of the page as it is now."""
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.evaluate(AXE.read_text())
    result = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
    )
    return [
        {
            "id": v["id"],
            "impact": v["impact"],
            "help": v["help"],
            "nodes": [n["target"] for n in v["nodes"]][:5],
        }
        for v in result
        if v["impact"] in ("serious", "critical")
    ]


def drop_file(page: Any, selector: str, path: Path, media_type: str) -> None:
    """Drag a real file from outside the browser and drop it on `selector`."""
    data = base64.b64encode(path.read_bytes()).decode()
    transfer = page.evaluate_handle(
        """([b64, name, type]) => {
            const bin = atob(b64);
            const bytes = new Uint8Array(bin.length);
            for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type }));
            return dt;
        }""",
        [data, path.name, media_type],
    )
    page.dispatch_event(selector, "dragenter", {"dataTransfer": transfer})
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def screenshot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    # Toasts float over the page; keep them out of the review shots.
    page.evaluate("() => { const n = document.getElementById('notice'); if (n) n.hidden = true; }")
    page.screenshot(path=str(path), full_page=True)
    return path


def no_horizontal_scroll(page: Any) -> bool:
    return bool(
        page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth + 1")
    )
