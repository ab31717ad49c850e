"""`opencv.dnn_infer`: run a network the user uploads through OpenCV's DNN module.

The network (ONNX; Caffe prototxt with an optional caffemodel; TensorFlow frozen
graph with an optional pbtxt) is untrusted: files are size-bounded, read into
memory and parsed only by OpenCV's own readers, in the job's sandbox. OpenCV
ignores ONNX external-data references, so a network cannot make the job read a
file of the worker (a test checks it).

Warm networks: the job's process keeps the last network it loaded (`_WARM`, one, by
the SHA-256 of its files) once a job on it succeeded, and reuses it for the next job
on the same network. A process serves one owner only (`csml.worker.sandbox`), so a
network loaded for one owner never serves another's job; the worker announces what
its idle processes hold (`keeps_model`, see `csml.placement`). The result is the same
whether the network was warm or not (nothing in it says which).

An uploaded network is written back as a model bundle (output `model`, format
`csml-opencv-dnn`): a zip holding the network files and a JSON header naming the
framework and the preprocessing the job used. The coordinator keeps it as a model
of the caller, reusable with `params: {"model": "<id>"}`; the preprocessing stored
in it applies unless the new job's parameters say otherwise.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from csml.apps.base import Input, JobContext, JobError, ModelSpec, OperationParams, Output
from csml.apps.opencv import app, opencv_message, read_image

if TYPE_CHECKING:
    import numpy as np

DNN_MODEL = ModelSpec(kind="dnn", format="csml-opencv-dnn", version=1)
MAX_NETWORK_BYTES = 512 * 1024 * 1024
MAX_CONFIG_BYTES = 64 * 1024 * 1024
MAX_TENSOR_BYTES = 512 * 1024 * 1024
MAX_INPUT_VALUES = 64 * 1024 * 1024
"""Largest input blob (256 MB as float32)."""
MAX_SIDE = 4096
MAX_INLINE_TOTAL = 16384
"""Most output values returned in the result, all outputs together; the rest: `tensors`."""
HEADER = "csml-dnn.json"
FILES = {"onnx": "network.onnx", "caffe": "network.caffemodel", "tensorflow": "network.pb"}
CONFIGS = {"caffe": "network.prototxt", "tensorflow": "network.pbtxt"}
IMAGE_ONLY = {"size", "mean", "scale", "swap_rb", "crop", "color"}
STORED = (*sorted(IMAGE_ONLY), "layout", "input_name", "output_names")
"""The parameters a model bundle remembers: how to feed the network."""
_WARM: dict[str, Any] = {}
"""The network this process loaded last for a job that succeeded: digest -> cv2.dnn.Net."""

Framework = Literal["onnx", "caffe", "tensorflow"]
Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]
Bounded = Annotated[float, Field(ge=-1e6, le=1e6, allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1, max_length=256)]


class DnnInferParams(OperationParams):
    framework: Literal["auto", "onnx", "caffe", "tensorflow"] = Field(
        "auto",
        description="auto: ONNX by its header; text is a Caffe prototxt; "
        "other binary graphs are TensorFlow unless `config` is a Caffe prototxt.",
    )
    size: tuple[Side, Side] | None = Field(
        None, description="Image input: resize to (width, height); default the image's size."
    )
    mean: list[Bounded] = Field(
        [],
        max_length=4,
        description="Subtracted per channel, in the order fed (after swap_rb); one value: all.",
    )
    scale: float = Field(
        1.0, gt=0, le=1e6, allow_inf_nan=False, description="Multiplies (pixel - mean)."
    )
    swap_rb: bool = Field(False, description="Image input: feed RGB instead of OpenCV's BGR.")
    crop: bool = Field(False, description="Image input: resize keeping the aspect, crop centre.")
    color: Literal["bgr", "gray"] = Field("bgr", description="Image input: 3 channels or 1.")
    layout: Literal["NCHW", "NHWC"] = Field(
        "NCHW",
        description="Tensor input: its layout. OpenCV's DNN takes NCHW (TensorFlow graphs "
        "too), so a 4-D NHWC tensor is transposed; NCHW passes it unchanged.",
    )
    input_name: Name | None = Field(None, description="The network input to feed.")
    output_names: list[Name] | None = Field(
        None, max_length=64, description="Layers to return; default the network's outputs."
    )
    inline_max_values: int = Field(
        4096, ge=0, le=MAX_INLINE_TOTAL, description="Outputs this small are also in the result."
    )

    @model_validator(mode="after")
    def _crop_needs_size(self) -> DnnInferParams:
        if self.crop and self.size is None:
            raise ValueError("crop needs a size")
        return self


@dataclass
class Network:
    framework: Framework
    network: bytes
    config: bytes | None
    preprocessing: dict[str, Any]


def _read_bounded(path: Path, name: str, limit: int) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise JobError(f"input {name!r} is {size} bytes, over the limit of {limit}")
    if size == 0:
        raise JobError(f"input {name!r} is empty")
    return path.read_bytes()


def _is_text(data: bytes) -> bool:
    head = data[:4096]
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start > len(head) - 4  # a character cut at the end of the sample
    return True


def _detect(network: bytes, config: bytes | None) -> Framework:
    """ONNX starts with its ir_version field (0x08); a Caffe prototxt is text; a caffemodel
    and a TensorFlow GraphDef both start with field 1 (0x0a): the config tells them apart."""
    if _is_text(network):
        return "caffe"
    if network[:1] == b"\x08":
        return "onnx"
    if config is not None and _is_text(config):
        text = config[:65536].decode("utf-8", "replace")
        if re.search(r"\bnode\s*\{", text) and re.search(r"\bop\s*:", text):
            return "tensorflow"
        return "caffe"
    return "tensorflow"


def _uploaded(ctx: JobContext, params: DnnInferParams) -> Network:
    network = _read_bounded(ctx.input("network"), "network", MAX_NETWORK_BYTES)
    config = None
    if ctx.has_input("config"):
        config = _read_bounded(ctx.input("config"), "config", MAX_CONFIG_BYTES)
    framework = _detect(network, config) if params.framework == "auto" else params.framework
    if framework == "onnx" and config is not None:
        raise JobError("an ONNX network takes no `config`")
    if framework == "caffe":
        if _is_text(network):  # the prototxt came as `network`, the weights (if any) as config
            network, config = config or b"", network
        elif config is None or not _is_text(config):
            raise JobError("a caffemodel needs its prototxt as the `config` input")
    explicit = params.model_dump(mode="json", include=set(STORED) & params.model_fields_set)
    return Network(framework, network, config, explicit)


def _member_info(name: str) -> zipfile.ZipInfo:
    return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))


def write_bundle(path: Path, net: Network) -> str:
    """Write the model bundle; return the network's SHA-256."""
    digest = hashlib.sha256(net.network + (net.config or b"")).hexdigest()
    header = {
        "format": DNN_MODEL.format,
        "version": DNN_MODEL.version,
        "framework": net.framework,
        "network": FILES[net.framework] if net.network else None,
        "config": CONFIGS[net.framework] if net.config is not None else None,
        "preprocessing": net.preprocessing,
        "sha256": digest,
    }
    # Members dated 1980-01-01 (not now): the same network gives the same bundle bytes, so
    # dnn_infer is deterministic (its outputs are compared when a result is verified).
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(_member_info(HEADER), json.dumps(header, indent=1))
        if net.network:
            zf.writestr(_member_info(FILES[net.framework]), net.network)
        if net.config is not None:
            zf.writestr(_member_info(CONFIGS[net.framework]), net.config)
    return digest


def _member(zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise JobError(f"the model bundle lacks its file {name!r}") from None
    if info.file_size > limit:
        raise JobError(f"the model bundle's {name!r} is over {limit} bytes")
    with zf.open(info) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise JobError(f"the model bundle's {name!r} is over {limit} bytes")
    return data


def read_bundle(path: Path) -> Network:
    """Open a bundle from `write_bundle` (or imported by a user: checked as untrusted)."""
    if path.stat().st_size > MAX_NETWORK_BYTES + MAX_CONFIG_BYTES:
        raise JobError("the model bundle is too large")
    bad = f"input 'model' is not a {DNN_MODEL.format} bundle"
    try:
        with zipfile.ZipFile(path) as zf:
            try:
                header = json.loads(_member(zf, HEADER, 65536))
            except ValueError:
                raise JobError(f"{bad}: its {HEADER} is not JSON") from None
            if not isinstance(header, dict) or header.get("format") != DNN_MODEL.format:
                raise JobError(f"{bad}: its header names another format")
            version, framework = header.get("version"), header.get("framework")
            if not isinstance(version, int) or not 1 <= version <= DNN_MODEL.version:
                raise JobError(f"{bad}: version {version!r} is not one this worker reads")
            if framework not in FILES:
                raise JobError(f"{bad}: unknown framework {framework!r}")
            network, config = b"", None
            if header.get("network") is not None:
                network = _member(zf, FILES[framework], MAX_NETWORK_BYTES)
            if header.get("config") is not None and framework in CONFIGS:
                config = _member(zf, CONFIGS[framework], MAX_CONFIG_BYTES)
            if (framework == "caffe" and config is None) or (framework != "caffe" and not network):
                raise JobError(f"{bad}: it lacks the network's files")
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError):
        raise JobError(f"{bad} (a zip archive)") from None
    pre = header.get("preprocessing") or {}
    if not isinstance(pre, dict) or not set(pre) <= set(STORED):
        raise JobError(f"{bad}: its preprocessing is not valid")
    return Network(framework, network, config, pre)


def _effective(params: DnnInferParams, stored: dict[str, Any]) -> DnnInferParams:
    """The bundle's preprocessing, overridden by what this job's parameters set."""
    try:
        merged = {**stored, **params.model_dump(mode="json", include=params.model_fields_set)}
        return DnnInferParams.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise JobError(
            f"invalid parameter {field} (with the model's stored preprocessing): {err['msg']}"
        ) from None


def _cv_message(exc: Exception) -> str:
    """OpenCV's message without its source paths (see `opencv_message`)."""
    return opencv_message(exc)


@contextmanager
def _quiet_opencv() -> Iterator[None]:
    """OpenCV logs a failing network's layer names to stderr: they are the user's data."""
    import cv2

    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def _load(net: Network) -> Any:
    import cv2
    import numpy as np

    def buf(data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)

    try:
        if net.framework == "onnx":
            loaded = cv2.dnn.readNetFromONNX(buf(net.network))
        elif net.framework == "caffe":
            assert net.config is not None
            args = [buf(net.config)] + ([buf(net.network)] if net.network else [])
            loaded = cv2.dnn.readNetFromCaffe(*args)
        elif net.config is not None:
            loaded = cv2.dnn.readNetFromTensorflow(buf(net.network), buf(net.config))
        else:
            loaded = cv2.dnn.readNetFromTensorflow(buf(net.network))
    except cv2.error as exc:
        raise JobError(
            f"OpenCV could not load the {net.framework} network: {_cv_message(exc)} "
            "(is `framework` right?)"
        ) from None
    if loaded.empty():
        raise JobError(f"the {net.framework} network has no layers (is `framework` right?)")
    return loaded


def _image_blob(ctx: JobContext, params: DnnInferParams) -> np.ndarray:
    import cv2

    image = read_image(ctx.input("image"))
    if params.color == "gray":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    h, w = image.shape[:2]
    if params.size is None and max(h, w) > MAX_SIDE:
        raise JobError(f"the image is {w}x{h}: give a `size` of at most {MAX_SIDE} a side")
    size = params.size or (w, h)
    mean = params.mean * 4 if len(params.mean) == 1 else params.mean + [0.0] * 4
    return cv2.dnn.blobFromImage(
        image,
        scalefactor=params.scale,
        size=size,
        mean=tuple(mean[:4]),
        swapRB=params.swap_rb,
        crop=params.crop,
        ddepth=cv2.CV_32F,
    )


def _check_npy(path: Path) -> None:
    """Read the .npy header only: a numeric dtype, and no more data than the file holds
    (numpy would allocate what a crafted header declares before reading)."""
    import numpy as np

    fmt = np.lib.format
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            data_bytes = size - f.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise JobError(f"input 'tensor' is not a .npy array: {str(exc)[:200]}") from None
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise JobError(f"input 'tensor' must be a numeric .npy array, not {dtype.str}")
    count = 1
    for side in shape:
        count *= side
    if count * dtype.itemsize > data_bytes:
        raise JobError(f"input 'tensor' declares shape {list(shape)}: more than the file holds")


def _tensor_blob(ctx: JobContext, params: DnnInferParams) -> np.ndarray:
    import numpy as np

    path = ctx.input("tensor")
    _read_bounded(path, "tensor", MAX_TENSOR_BYTES)
    _check_npy(path)
    try:
        tensor = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise JobError(f"input 'tensor' is not a .npy array: {str(exc)[:200]}") from None
    if not isinstance(tensor, np.ndarray):
        raise JobError("input 'tensor' must be a .npy array")
    if not 2 <= tensor.ndim <= 8:
        raise JobError(f"input 'tensor' has {tensor.ndim} dimensions; give 2 to 8")
    if params.layout == "NHWC":
        if tensor.ndim != 4:
            raise JobError(f"layout NHWC needs a 4-D tensor, not {tensor.ndim}-D")
        tensor = tensor.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(tensor, dtype=np.float32)


def _npz_keys(names: list[str]) -> list[str]:
    """Archive member names: layer names may hold `/`, `..` or `:`, which unzip tools
    would take for paths; anything but letters, digits, `_`, `.`, `-` becomes `_`."""
    keys: list[str] = []
    for name in names:
        key = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "output"
        base, n = key, 1
        while key in keys:
            n += 1
            key = f"{base}_{n}"
        keys.append(key)
    return keys


def _describe(name: str, key: str, value: np.ndarray, inline: bool) -> dict[str, Any]:
    import numpy as np

    info: dict[str, Any] = {"name": name, "key": key, "shape": list(value.shape)}
    info["dtype"] = str(value.dtype)
    if inline:
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            values = value.astype(object)
            values[~np.isfinite(value)] = None  # JSON has no NaN or infinity
            info["values"] = values.tolist()
        else:
            info["values"] = value.tolist()
    return info


def _outputs(net: Any, params: DnnInferParams) -> list[str]:
    if params.output_names is None:
        return list(net.getUnconnectedOutLayersNames())
    known = set(net.getLayerNames()) | set(net.getUnconnectedOutLayersNames())
    missing = [n for n in params.output_names if n not in known]
    if missing:
        shown = ", ".join(sorted(known)[:20])
        raise JobError(f"no layer named {missing[0]!r} in the network; it has: {shown}")
    return list(params.output_names)


@app.operation(
    # In this order, bare paths on the command line fill image, network, config.
    inputs=[
        Input("image", "An image to feed (preprocessed by size, mean, scale, swap_rb, crop).",
              media_type="image/*", required=False),
        Input("network", "A network: .onnx, Caffe .prototxt or .caffemodel, TensorFlow .pb.",
              required=False),
        Input("config", "Caffe: the prototxt for a caffemodel. TensorFlow: a .pbtxt.",
              required=False),
        Input("tensor", "A .npy array to feed instead of an image (see layout).",
              required=False),
        Input("model", "A network kept by an earlier dnn_infer job (zip bundle).",
              media_type="application/zip", required=False, model=DNN_MODEL),
    ],
    outputs=[
        Output("model", "The uploaded network as a reusable model (zip bundle).",
               "application/zip", model=DNN_MODEL),
        Output("tensors", "Every output tensor, in a NumPy .npz archive (see outputs[].key).",
               "application/x-npz"),
    ],
    keeps_model=True,
    deterministic=True,
)  # fmt: skip
def dnn_infer(ctx: JobContext, params: DnnInferParams) -> dict[str, Any]:
    """Run an uploaded ONNX, Caffe or TensorFlow network on an image or a tensor."""
    import cv2
    import numpy as np

    if ctx.has_input("network") == ctx.has_input("model"):
        raise JobError("give exactly one of the inputs `network` (a file) and `model` (an id)")
    if ctx.has_input("image") == ctx.has_input("tensor"):
        raise JobError("give exactly one of the inputs `image` and `tensor`")
    if ctx.has_input("config") and not ctx.has_input("network"):
        raise JobError("`config` goes with an uploaded `network`, not a stored model")
    wrong = (IMAGE_ONLY if ctx.has_input("tensor") else {"layout"}) & params.model_fields_set
    if wrong:
        kind = "an image" if ctx.has_input("tensor") else "a tensor"
        raise JobError(f"{', '.join(sorted(wrong))}: only for {kind} input")
    ctx.progress(0.05, "reading the network")
    if ctx.has_input("network"):
        net = _uploaded(ctx, params)
        digest = write_bundle(ctx.output("model"), net)
    else:
        net = read_bundle(ctx.input("model"))
        if params.framework not in ("auto", net.framework):
            raise JobError(f"the stored model is a {net.framework} network")
        digest = hashlib.sha256(net.network + (net.config or b"")).hexdigest()
        params = _effective(params, net.preprocessing)
    if ctx.has_input("image"):
        blob, applied = _image_blob(ctx, params), IMAGE_ONLY | {"input_name", "output_names"}
    else:
        blob, applied = _tensor_blob(ctx, params), {"layout", "input_name", "output_names"}
    if blob.size > MAX_INPUT_VALUES:
        raise JobError(f"the input is {blob.size} values, over the limit of {MAX_INPUT_VALUES}")
    with _quiet_opencv():
        loaded = _WARM.get(digest)
        if loaded is None:
            ctx.progress(0.15, "loading the network")
            loaded = _load(net)
        else:
            ctx.progress(0.15, "network already loaded")
        names = _outputs(loaded, params)
        ctx.progress(0.3, "running the network")
        try:
            if params.input_name is None:
                loaded.setInput(blob)
            else:
                loaded.setInput(blob, params.input_name)
            values = loaded.forward(names)
        except cv2.error as exc:
            raise JobError(f"the network failed on this input: {_cv_message(exc)}") from None
    _WARM.clear()  # one network at a time: the last one that ran
    _WARM[digest] = loaded
    ctx.progress(0.9, "writing the outputs")
    arrays = [np.asarray(v) for v in values]
    keys = _npz_keys(names)
    with open(ctx.output("tensors"), "wb") as f:
        np.savez(f, **dict(zip(keys, arrays, strict=True)))  # type: ignore[arg-type]
    described, budget = [], MAX_INLINE_TOTAL
    for name, key, array in zip(names, keys, arrays, strict=True):
        inline = array.size <= min(params.inline_max_values, budget)
        budget -= array.size if inline else 0
        described.append(_describe(name, key, array, inline))
    return {
        "framework": net.framework,
        "network_sha256": digest,
        "input": {"shape": list(blob.shape), "dtype": str(blob.dtype)},
        "outputs": described,
        "preprocessing": params.model_dump(mode="json", include=applied),
    }
