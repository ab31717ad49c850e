"""Warm-up for the `opencv` app: load the Haar cascade once per worker.

Loading `haarcascade_frontalface_default.xml` costs ~10 ms of CPU. The `opencv`
app lists this module in ``App.preload``, so a worker's zygote loads it once and
every job, a fork of the zygote, inherits it; elsewhere it loads on first use.
"""

from __future__ import annotations

from functools import cache
from typing import Any

FRONTAL_FACE = "haarcascade_frontalface_default.xml"


@cache
def face_cascade() -> Any:
    """OpenCV's shipped frontal-face Haar cascade (read-only once loaded)."""
    import cv2

    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + FRONTAL_FACE)  # type: ignore[attr-defined]
    if cascade.empty():
        raise RuntimeError(f"OpenCV's {FRONTAL_FACE} could not be loaded")
    return cascade


face_cascade()
