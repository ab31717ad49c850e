"""Real test images (from scikit-image's bundled photos) and the plain-OpenCV baseline.

The baseline does what the `opencv` app's `detect_faces` does, minus CSML:
decode the file, equalise the grey image, run the frontal-face Haar cascade with
the same parameters, draw the boxes, PNG-encode the result and write it to disk.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

CASCADE = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"  # type: ignore[attr-defined]
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 5
MIN_SIZE = 30

# Photographs shipped inside scikit-image (no download needed).
SOURCES = (
    "astronaut.png",
    "camera.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "coins.png",
    "moon.png",
    "ihc.png",
    "grass.png",
    "gravel.png",
    "brick.png",
    "page.png",
    "text.png",
    "clock_motion.png",
    "color.png",
)


def skimage_data_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def load_sources() -> list[np.ndarray]:
    folder = skimage_data_dir()
    images = []
    for name in SOURCES:
        path = folder / name
        image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
        if image is not None:
            images.append(image)
    if not images:
        raise RuntimeError(f"no source photos found in {folder}")
    return images


def _variant(
    image: np.ndarray, rng: np.random.Generator, sides: tuple[int, int] = (300, 600)
) -> np.ndarray:
    """A random crop (60-100 % of each side), resized to a long side in `sides` px
    (300-600 by default), maybe flipped."""
    h, w = image.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = image[y : y + ch, x : x + cw]
    scale = rng.uniform(*sides) / max(ch, cw)
    size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
    out = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    return cv2.flip(out, 1) if rng.random() < 0.5 else out


def make_images(
    folder: Path, count: int, seed: int = 7, sides: tuple[int, int] = (300, 600)
) -> list[Path]:
    """Write `count` distinct images (alternately JPEG and PNG), each a random crop of a
    scikit-image photo with a long side in `sides` px, and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = load_sources()
    paths = []
    for i in range(count):
        image = _variant(sources[i % len(sources)], rng, sides)
        path = folder / f"img{i:04d}.{'jpg' if i % 2 else 'png'}"
        if not cv2.imwrite(str(path), image):
            raise RuntimeError(f"could not write {path}")
        paths.append(path)
    return paths


# -- the baseline ----------------------------------------------------------------

_cascade: cv2.CascadeClassifier | None = None


def _init_worker() -> None:
    global _cascade
    _cascade = cv2.CascadeClassifier(CASCADE)


def detect_file(job: tuple[str, str]) -> tuple[str, int, float, float]:
    """(image name, faces found, wall s, CPU s of all threads) for one file; writes the PNG."""
    src, dst = job
    start, cpu0 = time.perf_counter(), time.process_time()
    assert _cascade is not None
    image = cv2.imdecode(np.fromfile(src, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise RuntimeError(f"could not decode {src}")
    gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    found = _cascade.detectMultiScale(
        gray, scaleFactor=SCALE_FACTOR, minNeighbors=MIN_NEIGHBORS, minSize=(MIN_SIZE, MIN_SIZE)
    )
    for x, y, w, h in found:
        cv2.rectangle(image, (int(x), int(y)), (int(x + w), int(y + h)), (0, 255, 0), 2)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError(f"could not encode {src}")
    Path(dst).write_bytes(encoded.tobytes())
    return Path(src).name, len(found), time.perf_counter() - start, time.process_time() - cpu0


@dataclass
class BaselineRun:
    wall_s: float
    startup_s: float
    faces: dict[str, int]
    per_image_s: list[float]
    cpu_s: float  # CPU of the detections alone (inside the pool's processes)
    # The timed window seen from outside: CPU of each pool process and of this process,
    # machine busy %, everything else (bench.cluster.CpuWindow.report()).
    window: dict[str, Any] = field(default_factory=dict)


def _ready(_: int) -> bool:
    return _cascade is not None


def run_baseline(images: list[Path], out_dir: Path, processes: int = 2) -> BaselineRun:
    """`multiprocessing.Pool(processes)` over the files.

    The pool uses the "spawn" start method (fresh interpreters: this process has used
    OpenCV's thread pool, which a fork would inherit half-initialised) and is started
    and warmed before the clock starts, as CSML's workers are.
    """
    from cluster import CpuWindow

    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(p), str(out_dir / f"{p.stem}.png")) for p in images]
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(processes, initializer=_init_worker) as pool:
        if not all(pool.map(_ready, range(processes), chunksize=1)):
            raise RuntimeError("baseline pool did not load the cascade")
        pids = {f"pool process {i}": p.pid for i, p in enumerate(pool._pool)}  # type: ignore[attr-defined]
        start = time.perf_counter()
        with CpuWindow(pids) as cpu:
            rows = pool.map(detect_file, jobs, chunksize=1)
        wall = time.perf_counter() - start
    return BaselineRun(
        wall_s=wall,
        startup_s=start - t0,
        faces={row[0]: row[1] for row in rows},
        per_image_s=[row[2] for row in rows],
        cpu_s=sum(row[3] for row in rows),
        window=cpu.report(),
    )


def cascade_load_seconds(repeat: int = 5) -> float:
    """Median time to construct the classifier from its XML. The app does it once per
    worker, in its zygote's preload (`csml.apps._opencv_init`), before any job child is
    forked: no job pays it (tests/unit/test_opencv_preload.py); the baseline pays it once
    per pool process."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        cv2.CascadeClassifier(CASCADE)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
