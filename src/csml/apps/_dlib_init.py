"""Warm-up for the `dlib` app: build dlib's face detector once per worker.

``dlib.get_frontal_face_detector()`` deserialises its HOG filters each time it is
called (about half a second of CPU). The `dlib` app lists this module in
``App.preload``, so a worker's zygote builds the detector once and every job,
a fork of the zygote, inherits it ready to use; elsewhere (tests, a plain
process) it is built on first use and kept.
"""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def face_detector() -> Any:
    """dlib's HOG + linear SVM frontal face detector (shared; it keeps no per-image state)."""
    import dlib

    return dlib.get_frontal_face_detector()


face_detector()
