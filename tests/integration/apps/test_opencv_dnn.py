"""`opencv.dnn_infer` on tiny real networks built here (ONNX, Caffe, TensorFlow),
checked against numpy computations of the same graphs."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from csml.apps import opencv_dnn
from csml.apps.base import JobError
from csml.apps.opencv import app
from tests.cluster import Cluster
from tests.integration.apps import dnn_builders as nets
from tests.integration.apps.support import Runner

# Runs OpenCV DNN networks, in process and on a cluster.
pytestmark = pytest.mark.timeout(600)


def close(actual: Any, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4, atol=1e-5)


def write(folder: Path, name: str, data: bytes | np.ndarray) -> Path:
    path = folder / name
    if isinstance(data, np.ndarray):
        assert path.suffix == ".npy"  # else np.save adds it
        np.save(path, data, allow_pickle=False)
    else:
        path.write_bytes(data)
    return path


def tensors(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def infer(run: Runner, inputs: dict[str, Path], **params: Any) -> tuple[dict[str, Any], Path]:
    ran = run(app, "dnn_infer", inputs, params)
    return ran.result, ran.out


@pytest.fixture
def cnn(tmp_path: Path) -> tuple[nets.OnnxNet, Path]:
    net = nets.onnx_cnn(seed=1)
    return net, write(tmp_path, "cnn.onnx", net.data)


def test_onnx_network_on_a_tensor_matches_numpy(
    run: Runner, tmp_path: Path, cnn: tuple[nets.OnnxNet, Path]
) -> None:
    net, network = cnn
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    result, out = infer(run, {"network": network, "tensor": write(tmp_path, "x.npy", x)})
    expected = net.reference(x)
    assert result["framework"] == "onnx"
    assert result["input"] == {"shape": [1, 3, 8, 8], "dtype": "float32"}
    [prob] = result["outputs"]
    assert (prob["name"], prob["key"], prob["shape"]) == ("prob", "prob", [1, 10])
    assert prob["dtype"] == "float32"
    close(prob["values"], expected)
    close(tensors(out / "tensors")["prob"], expected)
    with zipfile.ZipFile(out / "model") as zf:
        header = json.loads(zf.read(opencv_dnn.HEADER))
        assert zf.read("network.onnx") == net.data
    assert header["format"] == "csml-opencv-dnn" and header["framework"] == "onnx"
    assert header["preprocessing"] == {}


def test_onnx_nhwc_tensor_is_transposed(
    run: Runner, tmp_path: Path, cnn: tuple[nets.OnnxNet, Path]
) -> None:
    net, network = cnn
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    nhwc = write(tmp_path, "x.npy", x.transpose(0, 2, 3, 1).astype(np.float64))
    result, out = infer(run, {"network": network, "tensor": nhwc}, layout="NHWC")
    assert result["input"]["shape"] == [1, 3, 8, 8]
    close(tensors(out / "tensors")["prob"], net.reference(x))


def test_caffe_weight_free_prototxt_matches_numpy(run: Runner, tmp_path: Path) -> None:
    x = np.random.default_rng(4).standard_normal((1, 2, 6, 6)).astype(np.float32)
    inputs = {
        "network": write(tmp_path, "net.prototxt", nets.CAFFE_WEIGHT_FREE.encode()),
        "tensor": write(tmp_path, "x.npy", x),
    }
    expected = nets.caffe_weight_free_reference(x)
    result, out = infer(run, inputs)
    assert result["framework"] == "caffe"
    assert [o["name"] for o in result["outputs"]] == ["avg"]  # the graph's only end
    close(result["outputs"][0]["values"], expected["avg"])

    result, out = infer(run, inputs, output_names=["sum", "avg"])
    got = tensors(out / "tensors")
    for name in ("sum", "avg"):
        close(got[name], expected[name])
    with zipfile.ZipFile(out / "model") as zf:  # no weights: the bundle has the prototxt only
        assert sorted(zf.namelist()) == [opencv_dnn.HEADER, "network.prototxt"]


@pytest.mark.parametrize("order", ["caffemodel first", "prototxt first"])
def test_caffemodel_with_its_prototxt_matches_numpy(
    run: Runner, tmp_path: Path, order: str
) -> None:
    net = nets.caffe_conv_fc(seed=5)
    model = write(tmp_path, "w.caffemodel", net.caffemodel)
    proto = write(tmp_path, "net.prototxt", net.prototxt)
    network, config = (model, proto) if order == "caffemodel first" else (proto, model)
    x = np.random.default_rng(6).standard_normal((1, 3, 6, 6)).astype(np.float32)
    result, out = infer(
        run, {"network": network, "config": config, "tensor": write(tmp_path, "x.npy", x)}
    )
    assert result["framework"] == "caffe"
    close(tensors(out / "tensors")["fc"], net.reference(x))


def test_tensorflow_frozen_graph_matches_numpy(run: Runner, tmp_path: Path) -> None:
    net = nets.tf_mlp(seed=7)
    x = np.random.default_rng(8).standard_normal((3, 6)).astype(np.float32)
    inputs = {"network": write(tmp_path, "g.pb", net.data), "tensor": write(tmp_path, "x.npy", x)}
    result, out = infer(run, inputs)
    assert result["framework"] == "tensorflow"
    close(tensors(out / "tensors")["prob"], net.reference(x))


def test_tensorflow_graph_with_a_text_graph_config(run: Runner, tmp_path: Path) -> None:
    net = nets.tf_mlp(seed=12)
    x = np.random.default_rng(13).standard_normal((2, 6)).astype(np.float32)
    inputs = {
        "network": write(tmp_path, "g.pb", net.data),
        "config": write(tmp_path, "g.pbtxt", nets.TF_MLP_PBTXT_NO_SOFTMAX.encode()),
        "tensor": write(tmp_path, "x.npy", x),
    }
    result, out = infer(run, inputs, input_name="x")
    assert result["framework"] == "tensorflow"
    assert [o["name"] for o in result["outputs"]] == ["relu"]  # the text graph's end
    close(tensors(out / "tensors")["relu"], np.maximum(x @ net.w + net.b, 0))
    with zipfile.ZipFile(out / "model") as zf:
        assert sorted(zf.namelist()) == [opencv_dnn.HEADER, "network.pb", "network.pbtxt"]
        assert json.loads(zf.read(opencv_dnn.HEADER))["preprocessing"] == {"input_name": "x"}


def numpy_blob(
    image: np.ndarray,
    size: tuple[int, int],
    mean: list[float],
    scale: float,
    swap_rb: bool,
    crop: bool,
) -> np.ndarray:
    """What blobFromImage documents: resize (or scale and centre-crop), swap, (x - mean) * s."""
    if crop:
        factor = max(size[0] / image.shape[1], size[1] / image.shape[0])
        image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
        x0, y0 = int(0.5 * (image.shape[1] - size[0])), int(0.5 * (image.shape[0] - size[1]))
        image = image[y0 : y0 + size[1], x0 : x0 + size[0]]
    else:
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    pixels = image.astype(np.float32).reshape(size[1], size[0], -1)
    if swap_rb:
        pixels = pixels[..., ::-1]
    channels = pixels.shape[2]
    m = np.array((mean * channels)[:channels] if len(mean) == 1 else mean[:channels] or [0.0])
    return cast(np.ndarray, ((pixels - m) * scale).transpose(2, 0, 1)[None])


@pytest.mark.parametrize(
    "params",
    [
        {"size": (64, 48), "mean": [104.0, 117.0, 123.0], "scale": 1 / 255, "swap_rb": True},
        {"size": (40, 40), "mean": [127.5], "scale": 0.0078125, "crop": True},
        {"size": (16, 12), "color": "gray", "mean": [100.0]},
    ],
    ids=["resize-swap", "crop", "gray"],
)
def test_image_preprocessing_matches_numpy(
    run: Runner, tmp_path: Path, photo: Path, params: dict[str, Any]
) -> None:
    network = write(tmp_path, "id.onnx", nets.onnx_identity(["n", "c", "h", "w"]))
    result, out = infer(run, {"network": network, "image": photo}, **params)
    image = cv2.imread(str(photo), cv2.IMREAD_COLOR)
    assert image is not None
    if params.get("color") == "gray":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    expected = numpy_blob(
        image,
        params["size"],
        params.get("mean", []),
        params.get("scale", 1.0),
        params.get("swap_rb", False),
        params.get("crop", False),
    )
    got = tensors(out / "tensors")["y"]
    assert got.shape == expected.shape == tuple(result["input"]["shape"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)
    [y] = result["outputs"]
    assert ("values" in y) == (expected.size <= 4096)  # 3x64x48 and 3x40x40 are not inlined
    if "values" in y:
        np.testing.assert_allclose(np.array(y["values"]), expected, rtol=1e-5, atol=1e-3)


def test_stored_model_keeps_its_preprocessing(run: Runner, tmp_path: Path, photo: Path) -> None:
    network = write(tmp_path, "id.onnx", nets.onnx_identity(["n", "c", "h", "w"]))
    first, out = infer(
        run, {"network": network, "image": photo}, size=[20, 10], mean=[50.0], scale=0.5
    )
    bundle = out / "model"
    again, out2 = infer(run, {"model": bundle, "image": photo})
    assert "model" not in {p.name for p in out2.iterdir()}  # a stored model is not re-kept
    assert again["preprocessing"] == first["preprocessing"]
    np.testing.assert_array_equal(tensors(out2 / "tensors")["y"], tensors(out / "tensors")["y"])
    scaled, out3 = infer(run, {"model": bundle, "image": photo}, scale=1.0)
    assert scaled["preprocessing"]["size"] == [20, 10] and scaled["preprocessing"]["scale"] == 1.0
    np.testing.assert_allclose(
        tensors(out3 / "tensors")["y"], 2 * tensors(out / "tensors")["y"], rtol=1e-6
    )
    x = np.random.default_rng(14).standard_normal((1, 2, 3, 4)).astype(np.float32)
    as_tensor, out4 = infer(run, {"model": bundle, "tensor": write(tmp_path, "x.npy", x)})
    np.testing.assert_array_equal(tensors(out4 / "tensors")["y"], x)  # image steps not applied
    assert as_tensor["preprocessing"] == {
        "layout": "NCHW",
        "input_name": None,
        "output_names": None,
    }


def test_large_outputs_only_in_the_npz(run: Runner, tmp_path: Path) -> None:
    network = write(tmp_path, "id.onnx", nets.onnx_identity(["n", "c", "h", "w"]))
    big = np.arange(3 * 40 * 40, dtype=np.float32).reshape(1, 3, 40, 40)
    inputs = {"network": network, "tensor": write(tmp_path, "big.npy", big)}
    result, out = infer(run, inputs)
    [y] = result["outputs"]
    assert y == {"name": "y", "key": "y", "shape": [1, 3, 40, 40], "dtype": "float32"}
    np.testing.assert_array_equal(tensors(out / "tensors")["y"], big)
    result, _ = infer(run, inputs, inline_max_values=5000)
    np.testing.assert_array_equal(np.array(result["outputs"][0]["values"]), big)


def test_non_finite_outputs_become_null(run: Runner, tmp_path: Path) -> None:
    network = write(tmp_path, "id.onnx", nets.onnx_identity(["n", "c"]))
    x = np.array([[1.0, np.nan, np.inf, -2.0]], dtype=np.float32)
    result, _ = infer(run, {"network": network, "tensor": write(tmp_path, "x.npy", x)})
    assert result["outputs"][0]["values"] == [[1.0, None, None, -2.0]]
    json.dumps(result, allow_nan=False)


def test_onnx_external_data_is_never_read(run: Runner, tmp_path: Path) -> None:
    """An initializer pointing at a file of the worker must not pull that file in."""
    secret = write(tmp_path, "secret", bytes([1, 2, 3, 4]))
    network = write(tmp_path, "ext.onnx", nets.onnx_external_data(str(secret)))
    x = write(tmp_path, "x.npy", np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(JobError, match=r"could not load|failed on this input") as caught:
        infer(run, {"network": network, "tensor": x})
    assert "/io/opencv" not in str(caught.value) and "\n" not in str(caught.value)


def test_npz_keys_are_safe_member_names() -> None:
    names = ["prob", "dense/BiasAdd", "../../etc/x", "onnx::Gemm_5", "a:b", "a/b", "..", ""]
    keys = opencv_dnn._npz_keys(names)
    assert keys == [
        "prob", "dense_BiasAdd", "_.._etc_x", "onnx__Gemm_5", "a_b", "a_b_2", "output",
        "output_2",
    ]  # fmt: skip


def bundle(path: Path, header: dict[str, Any], members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(opencv_dnn.HEADER, json.dumps(header))
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_hostile_bundles_are_refused(
    run: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = write(tmp_path, "x.npy", np.zeros((1, 3, 8, 8), dtype=np.float32))
    onnx = nets.onnx_cnn().data
    ok = {"format": "csml-opencv-dnn", "version": 1, "framework": "onnx", "network": "n"}
    cases: list[tuple[Path, str]] = [
        (write(tmp_path, "raw", onnx), "not a csml-opencv-dnn bundle"),
        (bundle(tmp_path / "a", {**ok, "format": "other"}, {}), "another format"),
        (bundle(tmp_path / "b", {**ok, "version": 9}, {}), "version 9"),
        (bundle(tmp_path / "c", {**ok, "framework": "torch"}, {}), "unknown framework"),
        (bundle(tmp_path / "d", ok, {}), "lacks its file 'network.onnx'"),
        (bundle(tmp_path / "d2", {**ok, "network": None}, {}), "lacks the network's files"),
        (bundle(tmp_path / "d3", {**ok, "framework": "caffe"}, {"network.caffemodel": b"x"}),
         "lacks the network's files"),
        (
            bundle(tmp_path / "e", {**ok, "preprocessing": {"size": [9999999, 1]}},
                   {"network.onnx": onnx}),
            r"invalid parameter size.0 \(with the model's stored preprocessing\): Input should",
        ),
        (
            bundle(tmp_path / "f", {**ok, "preprocessing": {"eval": "x"}}, {"network.onnx": onnx}),
            "preprocessing is not valid",
        ),
    ]  # fmt: skip
    for path, message in cases:
        with pytest.raises(JobError, match=message):
            infer(run, {"model": path, "tensor": x})
    monkeypatch.setattr(opencv_dnn, "MAX_NETWORK_BYTES", 1000)
    big = bundle(tmp_path / "g", ok, {"network.onnx": onnx + bytes(2000)})
    with pytest.raises(JobError, match="over 1000 bytes"):
        infer(run, {"model": big, "tensor": x})


def test_job_errors_are_short_and_clear(
    run: Runner, tmp_path: Path, photo: Path, cnn: tuple[nets.OnnxNet, Path]
) -> None:
    _, network = cnn
    x = write(tmp_path, "x.npy", np.zeros((1, 3, 8, 8), dtype=np.float32))
    garbage = write(tmp_path, "garbage", b"\x08" + bytes(range(256)) * 4)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    huge = tmp_path / "huge.npy"
    with open(huge, "wb") as f:  # declares 400 GB, holds 100 bytes
        header = {"descr": "<f4", "fortran_order": False, "shape": (10**11,)}
        np.lib.format.write_array_header_1_0(f, header)
        f.write(bytes(100))
    cases: list[tuple[dict[str, Path], dict[str, Any], str]] = [
        ({"tensor": x}, {}, "exactly one of the inputs `network`"),
        ({"network": network, "model": network, "tensor": x}, {}, "exactly one of the inputs"),
        ({"network": network}, {}, "exactly one of the inputs `image` and `tensor`"),
        ({"network": network, "tensor": x, "image": photo}, {}, "`image` and `tensor`"),
        ({"network": garbage, "tensor": x}, {}, "OpenCV could not load the onnx network"),
        ({"network": network, "tensor": x}, {"output_names": ["nope"]}, "no layer named 'nope'"),
        ({"network": network, "tensor": objects}, {}, "must be a numeric .npy array, not |O"),
        ({"network": network, "tensor": huge}, {}, "declares shape \\[100000000000\\]: more"),
        ({"network": network, "tensor": photo}, {}, "not a .npy array"),
        (
            {"network": network, "tensor": x},
            {"mean": [1.0], "crop": False},
            "crop, mean: only for an image",
        ),
        ({"network": network, "image": photo}, {"layout": "NCHW"}, "layout: only for a tensor"),
        ({"network": network, "tensor": x}, {"framework": "caffe"}, "needs its prototxt"),
        (
            {"network": network, "tensor": x},
            {"framework": "tensorflow"},
            "tensorflow network has no",
        ),
        ({"network": network, "config": x, "tensor": x}, {"framework": "onnx"}, "takes no"),
        ({"network": write(tmp_path, "empty", b""), "tensor": x}, {}, "'network' is empty"),
    ]
    for inputs, params, message in cases:
        with pytest.raises(JobError, match=message) as caught:
            infer(run, inputs, **params)
        assert "/io/opencv" not in str(caught.value) and len(str(caught.value)) < 500
    wrong_shape = write(tmp_path, "w.npy", np.zeros((1, 5, 8, 8), dtype=np.float32))
    with pytest.raises(JobError, match="the network failed on this input"):
        infer(run, {"network": network, "tensor": wrong_shape})


@pytest.mark.parametrize(
    "params",
    [
        {"size": [1_000_000_000, 10]},
        {"size": [0, 10]},
        {"mean": [1.0, 2.0, 3.0, 4.0, 5.0]},
        {"mean": [float("nan")]},
        {"scale": 0},
        {"scale": float("inf")},
        {"crop": True},
        {"output_names": ["x"] * 65},
        {"inline_max_values": 10**9},
        {"framework": "torch"},
        {"unknown": 1},
    ],
)
def test_parameters_are_bounded(run: Runner, tmp_path: Path, params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        infer(run, {}, **params)


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_upload_then_reuse_by_id(cluster: Cluster, tmp_path: Path) -> None:
    user = cluster.new_user()
    net = nets.onnx_cnn(seed=9)
    network = write(tmp_path, "cnn.onnx", net.data)
    rng = np.random.default_rng(10)
    x1, x2 = (rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(2))

    job = user.submit(
        "opencv", "dnn_infer", files={"network": network, "tensor": write(tmp_path, "1.npy", x1)}
    ).wait(timeout=120)
    assert job.state.value == "succeeded", job.error
    assert job.result is not None
    close(job.result["outputs"][0]["values"], net.reference(x1))
    got = tensors(job.download("tensors", tmp_path / "t1.npz"))
    close(got["prob"], net.reference(x1))

    model_id = job.models["model"]
    info = user.model(model_id)
    assert (info.app, info.format, info.format_version) == ("opencv", "csml-opencv-dnn", 1)
    assert info.metrics["network_sha256"] == job.result["network_sha256"]

    again = user.submit(
        "opencv",
        "dnn_infer",
        files={"tensor": write(tmp_path, "2.npy", x2)},
        params={"model": model_id},
    ).wait(timeout=120)
    assert again.state.value == "succeeded", again.error
    assert again.models == {}  # reusing a model keeps no new one
    got = tensors(again.download("tensors", tmp_path / "t2.npz"))
    close(got["prob"], net.reference(x2))


def test_end_to_end_caffe_prototxt(cluster: Cluster, tmp_path: Path) -> None:
    user = cluster.new_user()
    x = np.random.default_rng(11).standard_normal((1, 2, 6, 6)).astype(np.float32)
    files: dict[str, Any] = {
        "network": write(tmp_path, "net.prototxt", nets.CAFFE_WEIGHT_FREE.encode()),
        "tensor": write(tmp_path, "x.npy", x),
    }
    job = user.submit(
        "opencv", "dnn_infer", files=files, params={"output_names": ["sum", "avg"]}
    ).wait(timeout=120)
    assert job.state.value == "succeeded", job.error
    got = tensors(job.download("tensors", tmp_path / "t.npz"))
    for name, expected in nets.caffe_weight_free_reference(x).items():
        close(got[name], expected)


def test_end_to_end_bad_networks_fail_cleanly_and_quietly(cluster: Cluster, tmp_path: Path) -> None:
    user = cluster.new_user()
    files: dict[str, Any] = {
        "network": write(tmp_path, "bad.onnx", b"\x08\x07" + bytes(5000)),
        "tensor": write(tmp_path, "x.npy", np.zeros((1, 3), dtype=np.float32)),
    }
    job = user.submit("opencv", "dnn_infer", files=files).wait(timeout=120)
    assert job.state.value == "failed"
    assert job.error is not None and "OpenCV could not load the onnx network" in job.error
    assert job.models == {}

    files["network"] = write(tmp_path, "ext.onnx", nets.onnx_external_data("/etc/hostname"))
    files["tensor"] = write(tmp_path, "x4.npy", np.zeros((1, 4), dtype=np.float32))
    job = user.submit("opencv", "dnn_infer", files=files).wait(timeout=120)
    assert job.state.value == "failed" and job.error is not None, (job.state, job.error)
    assert "/io/opencv" not in job.error
    assert "onnx_node_output" not in cluster.logs()  # OpenCV logs the user's layer names


def test_end_to_end_command_line_upload_then_predict(
    cluster: Cluster, photo: Path, tmp_path: Path
) -> None:
    env = {**cluster.env, "CSML_CONFIG": str(tmp_path / "cfg" / "config.toml")}

    def csml(*args: str | Path) -> str:
        return cluster.csml(*(str(a) for a in args), env=env).stdout

    csml("id", "new", "--url", cluster.url)
    network = write(tmp_path, "id.onnx", nets.onnx_identity(["n", "c", "h", "w"]))
    out = csml(
        "submit", "opencv", "dnn-infer", photo, network, "-p", "size=[32,24]",
        "-p", "mean=[127.5]", "-p", "scale=0.0078125", "-p", "swap_rb=true",
        "--wait", "-o", tmp_path / "first",
    )  # fmt: skip
    assert "succeeded" in out
    found = re.search(r"kept as model ([0-9a-f]{12,64})", out)
    assert found, out
    first = tensors(tmp_path / "first" / "tensors")["y"]
    image = cv2.imread(str(photo), cv2.IMREAD_COLOR)
    assert image is not None
    np.testing.assert_allclose(
        first, numpy_blob(image, (32, 24), [127.5], 0.0078125, True, False), atol=1e-5
    )
    assert found.group(1)[:12] in csml("models")
    out = csml("predict", found.group(1), photo, "-o", tmp_path / "second")
    assert "succeeded" in out
    np.testing.assert_array_equal(tensors(tmp_path / "second" / "tensors")["y"], first)
