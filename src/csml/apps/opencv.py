"""`opencv`: classic computer vision with OpenCV (opencv-python-headless<5).

OpenCV is imported inside the operations, so the coordinator can list this
app without the library; workers preload it once before forking jobs.

An OpenCV error never reaches a user as it is: its message names the library's
build paths and source lines (`/io/opencv/modules/...cpp:103`). Every operation
here turns `cv2.error` into a `JobError` with `opencv_message`, which keeps only
OpenCV's own sentence.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from csml.apps.base import App, Input, JobContext, JobError, OperationFn, OperationParams, Output

if TYPE_CHECKING:
    import numpy as np

app = App(
    "opencv",
    version="1.0",
    description="Computer vision with OpenCV: face detection, edges, resizing, filters, and "
    "your own ONNX, Caffe or TensorFlow networks (dnn_infer).",
    preload=("cv2", "numpy", "csml.apps._opencv_init"),
)

IMAGE_IN = Input("image", "An image (PNG, JPEG, BMP, TIFF, WebP, ...).", media_type="image/*")


_CV_SENTENCE = re.compile(r"error: \(-?\d+:[^)]*\) ([^\n]*)")
_LINE_SUFFIX = re.compile(r"(?::\d+|\(\d+\))$")
_BANNER = re.compile(r"OpenCV\([^)]*\)\s*")
_SOURCE_EXTENSIONS = (".cpp", ".cc", ".cxx", ".c", ".hpp", ".hxx", ".h", ".inl", ".cu")


def _is_source_path(token: str) -> bool:
    """`/io/opencv/modules/x/src/y.cpp:103:` or `C:\\build\\y.cpp(103)`: a build path."""
    core = _LINE_SUFFIX.sub("", token.rstrip(":,;"))
    return ("/" in core or "\\" in core) and core.lower().endswith(_SOURCE_EXTENSIONS)


def opencv_message(exc: Exception) -> str:
    """OpenCV's own sentence from a `cv2.error`, without build paths, source lines or
    version banner (the last `error: (code:kind) text` part, else the last line)."""
    text = str(exc)[-4000:]
    found = _CV_SENTENCE.findall(text)
    message = found[-1] if found else text.strip().splitlines()[-1] if text.strip() else ""
    words = _BANNER.sub("", message).split()
    return " ".join(w for w in words if not _is_source_path(w))[:300] or type(exc).__name__


def read_image(path: Path, name: str = "image") -> np.ndarray:
    """Decode an image, or fail the job saying the file is not one."""
    import cv2
    import numpy as np

    from csml.apps.imagesafety import check_image_size

    check_image_size(path, name)  # a decompression bomb is refused before decoding
    data = np.fromfile(path, dtype=np.uint8)
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except cv2.error as exc:
        raise JobError(
            f"input {name!r} is not an image this worker decodes ({opencv_message(exc)}); "
            "send a PNG, JPEG, BMP, TIFF or WebP file"
        ) from None
    if image is None:
        raise JobError(
            f"input {name!r} is not a decodable image ({data.size} bytes); "
            "send a PNG, JPEG, BMP, TIFF or WebP file"
        )
    return image


def write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise JobError("could not encode the output image")
    path.write_bytes(encoded.tobytes())


def _shape(image: np.ndarray) -> dict[str, int]:
    return {"width": int(image.shape[1]), "height": int(image.shape[0])}


class DetectFacesParams(OperationParams):
    scale_factor: float = Field(1.1, gt=1.0, le=2.0, description="Image pyramid step.")
    min_neighbors: int = Field(5, ge=0, le=50, description="Higher: fewer, surer detections.")
    min_size: int = Field(30, ge=1, le=10_000, description="Smallest face side, in pixels.")


@app.operation(
    inputs=[IMAGE_IN],
    outputs=[Output("annotated", "The image with a box around each face.", "image/png")],
    deterministic=True,
)
def detect_faces(ctx: JobContext, params: DetectFacesParams) -> dict[str, Any]:
    """Find frontal faces with the Haar cascade that ships with OpenCV."""
    import cv2

    from csml.apps._opencv_init import face_cascade

    image = read_image(ctx.input("image"))
    gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    found = face_cascade().detectMultiScale(
        gray,
        scaleFactor=params.scale_factor,
        minNeighbors=params.min_neighbors,
        minSize=(params.min_size, params.min_size),
    )
    faces = [{"x": int(x), "y": int(y), "w": int(w), "h": int(h)} for (x, y, w, h) in found]
    for f in faces:
        cv2.rectangle(image, (f["x"], f["y"]), (f["x"] + f["w"], f["y"] + f["h"]), (0, 255, 0), 2)
    write_png(ctx.output("annotated"), image)
    return {"count": len(faces), "faces": faces, **_shape(image)}


class EdgesParams(OperationParams):
    threshold1: float = Field(100.0, ge=0, le=10_000, description="Lower hysteresis threshold.")
    threshold2: float = Field(200.0, ge=0, le=10_000, description="Upper hysteresis threshold.")
    aperture_size: Literal[3, 5, 7] = Field(3, description="Sobel aperture.")


@app.operation(
    inputs=[IMAGE_IN], outputs=[Output("edges", "Edge map.", "image/png")], deterministic=True
)
def edges(ctx: JobContext, params: EdgesParams) -> dict[str, Any]:
    """Canny edge detection."""
    import cv2
    import numpy as np

    image = read_image(ctx.input("image"))
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    result = cv2.Canny(
        gray, params.threshold1, params.threshold2, apertureSize=params.aperture_size
    )
    write_png(ctx.output("edges"), result)
    return {"edge_pixels": int(np.count_nonzero(result)), **_shape(result)}


Interpolation = Literal["nearest", "linear", "cubic", "area", "lanczos"]


class ResizeParams(OperationParams):
    width: int | None = Field(None, ge=1, le=20_000, description="Target width in pixels.")
    height: int | None = Field(None, ge=1, le=20_000, description="Target height in pixels.")
    scale: float | None = Field(None, gt=0, le=16, description="Scale both sides by this.")
    interpolation: Interpolation = "area"


@app.operation(
    inputs=[IMAGE_IN],
    outputs=[Output("resized", "Resized image.", "image/png")],
    deterministic=True,
)
def resize(ctx: JobContext, params: ResizeParams) -> dict[str, Any]:
    """Resize to a width and/or height (one keeps the aspect ratio), or by a scale."""
    import cv2

    image = read_image(ctx.input("image"))
    h, w = image.shape[:2]
    if params.scale is not None:
        size = (max(1, round(w * params.scale)), max(1, round(h * params.scale)))
    elif params.width and params.height:
        size = (params.width, params.height)
    elif params.width:
        size = (params.width, max(1, round(h * params.width / w)))
    elif params.height:
        size = (max(1, round(w * params.height / h)), params.height)
    else:
        raise JobError("give `width`, `height` or `scale`")
    flag = {
        "nearest": cv2.INTER_NEAREST,
        "linear": cv2.INTER_LINEAR,
        "cubic": cv2.INTER_CUBIC,
        "area": cv2.INTER_AREA,
        "lanczos": cv2.INTER_LANCZOS4,
    }[params.interpolation]
    result = cv2.resize(image, size, interpolation=flag)
    write_png(ctx.output("resized"), result)
    return _shape(result)


class GrayscaleParams(OperationParams):
    pass


@app.operation(
    inputs=[IMAGE_IN], outputs=[Output("gray", "Grayscale image.", "image/png")], deterministic=True
)
def grayscale(ctx: JobContext, params: GrayscaleParams) -> dict[str, Any]:
    """Convert to one grey channel."""
    import cv2

    result = cv2.cvtColor(read_image(ctx.input("image")), cv2.COLOR_BGR2GRAY)
    write_png(ctx.output("gray"), result)
    return _shape(result)


class BlurParams(OperationParams):
    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {value}")
        return value

    kernel_size: int = Field(
        5,
        ge=1,
        le=255,
        description="Odd kernel side in pixels.",
        json_schema_extra={"not": {"multipleOf": 2}},
    )
    sigma: float = Field(0.0, ge=0, le=1000, description="Gaussian sigma; 0 derives it.")


@app.operation(
    inputs=[IMAGE_IN],
    outputs=[Output("blurred", "Blurred image.", "image/png")],
    deterministic=True,
)
def blur(ctx: JobContext, params: BlurParams) -> dict[str, Any]:
    """Gaussian blur."""
    import cv2

    image = read_image(ctx.input("image"))
    k = params.kernel_size
    result = cv2.GaussianBlur(image, (k, k), params.sigma)
    write_png(ctx.output("blurred"), result)
    return _shape(result)


from csml.apps import opencv_dnn as _opencv_dnn  # noqa: E402, F401 (registers dnn_infer)


def _without_opencv_paths(func: OperationFn) -> OperationFn:
    @functools.wraps(func)
    def run(ctx: JobContext, params: Any) -> dict[str, Any]:
        import cv2

        try:
            return func(ctx, params)
        except cv2.error as exc:
            raise JobError(f"OpenCV failed: {opencv_message(exc)}") from None

    return run


for _operation in app.operations.values():
    _operation.func = _without_opencv_paths(_operation.func)
