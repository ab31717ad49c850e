"""Tiny real networks for the `dnn_infer` tests, with numpy references of the same graphs.

ONNX graphs are written with the `onnx` package. TensorFlow GraphDefs and Caffe
caffemodels are protobuf messages too: without TensorFlow or Caffe installed,
`Proto` writes their few fields by hand in the protobuf wire format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int = 0) -> np.ndarray:
    """NCHW convolution, stride 1 (cross-correlation, as every framework does)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(x, w.shape[2:], axis=(2, 3))  # n c h w kh kw
    return cast(np.ndarray, np.einsum("nchwij,ocij->nohw", win, w) + b[None, :, None, None])


def max_pool(x: np.ndarray, k: int) -> np.ndarray:
    n, c, h, w = x.shape
    pooled = x[:, :, : h - h % k, : w - w % k].reshape(n, c, h // k, k, w // k, k).max(axis=(3, 5))
    return cast(np.ndarray, pooled)


def ave_pool(x: np.ndarray, k: int) -> np.ndarray:
    n, c, h, w = x.shape
    pooled = x[:, :, : h - h % k, : w - w % k].reshape(n, c, h // k, k, w // k, k).mean(axis=(3, 5))
    return cast(np.ndarray, pooled)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return cast(np.ndarray, e / e.sum(axis=-1, keepdims=True))


@dataclass
class OnnxNet:
    data: bytes
    conv_w: np.ndarray
    conv_b: np.ndarray
    fc_w: np.ndarray
    fc_b: np.ndarray

    def reference(self, x: np.ndarray) -> np.ndarray:
        h = max_pool(np.maximum(conv2d(x, self.conv_w, self.conv_b, pad=1), 0), 2)
        return softmax(h.reshape(len(x), -1) @ self.fc_w.T + self.fc_b)


def onnx_cnn(seed: int = 0, side: int = 8, classes: int = 10) -> OnnxNet:
    """Conv 3x3 (pad 1) -> Relu -> MaxPool 2 -> Flatten -> Gemm -> Softmax, on 1x3xSxS."""
    from onnx import TensorProto, checker, helper, numpy_helper

    rng = np.random.default_rng(seed)
    cw = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    cb = rng.standard_normal(4).astype(np.float32)
    fw = rng.standard_normal((classes, 4 * (side // 2) ** 2)).astype(np.float32) * 0.1
    fb = rng.standard_normal(classes).astype(np.float32)
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in ((cw, "conv_w"), (cb, "conv_b"), (fw, "fc_w"), (fb, "fc_b"))
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, side, side])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    checker.check_model(model)
    return OnnxNet(model.SerializeToString(), cw, cb, fw, fb)


def onnx_deep(layers: int = 400, width: int = 64, seed: int = 0) -> bytes:
    """A chain of `layers` fully connected layers (MatMul -> Add -> Relu) on 1x`width`:
    small to run, slow to load (OpenCV builds every layer), for warm-network tests."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        b = (rng.standard_normal(width) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "deep-mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return cast(bytes, model.SerializeToString())


def onnx_identity(shape: list[int | str]) -> bytes:
    """y = x: shows exactly what preprocessing fed the network."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return cast(bytes, model.SerializeToString())


def onnx_external_data(location: str) -> bytes:
    """y = x + W, with W's bytes said to be in the file `location` (ONNX external data)."""
    from onnx import TensorProto, helper

    w = TensorProto(name="W", data_type=TensorProto.UINT8, dims=[4])
    w.data_location = TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "location", location
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["W"], ["wf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["x", "wf"], ["y"]),
        ],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return cast(bytes, model.SerializeToString())


CAFFE_WEIGHT_FREE = """name: "weight-free"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 2 dim: 6 dim: 6 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "relu" type: "ReLU" bottom: "pool" top: "relu" }
layer { name: "power" type: "Power" bottom: "pool" top: "power"
        power_param { power: 2 scale: 0.5 shift: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "relu" bottom: "power" top: "sum"
        eltwise_param { operation: SUM } }
layer { name: "avg" type: "Pooling" bottom: "sum" top: "avg"
        pooling_param { pool: AVE kernel_size: 3 stride: 3 } }
"""


def caffe_weight_free_reference(x: np.ndarray) -> dict[str, np.ndarray]:
    pool = max_pool(x, 2)
    total = np.maximum(pool, 0) + (0.5 * pool + 1) ** 2
    return {"sum": total, "avg": ave_pool(total, 3)}


class Proto:
    """The protobuf wire format, just what the networks below need."""

    @staticmethod
    def varint(n: int) -> bytes:
        out = bytearray()
        n &= (1 << 64) - 1
        while True:
            low, n = n & 0x7F, n >> 7
            out.append(low | (0x80 if n else 0))
            if not n:
                return bytes(out)

    @classmethod
    def num(cls, field: int, n: int) -> bytes:
        return cls.varint(field << 3) + cls.varint(n)

    @classmethod
    def raw(cls, field: int, data: bytes | str) -> bytes:
        raw = data.encode() if isinstance(data, str) else data
        return cls.varint(field << 3 | 2) + cls.varint(len(raw)) + raw


P = Proto
TF_FLOAT = 1


def _tf_shape(dims: tuple[int, ...]) -> bytes:
    return b"".join(P.raw(2, P.num(1, d)) for d in dims)  # TensorShapeProto.dim.size


def _tf_node(name: str, op: str, inputs: tuple[str, ...], **attrs: bytes) -> bytes:
    body = P.raw(1, name) + P.raw(2, op) + b"".join(P.raw(3, i) for i in inputs)
    body += b"".join(P.raw(5, P.raw(1, k) + P.raw(2, v)) for k, v in attrs.items())
    return P.raw(1, body)  # GraphDef.node


def _tf_const(name: str, a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a, dtype=np.float32)
    tensor = P.num(1, TF_FLOAT) + P.raw(2, _tf_shape(a.shape)) + P.raw(4, a.tobytes())
    return _tf_node(name, "Const", (), dtype=P.num(6, TF_FLOAT), value=P.raw(8, tensor))


@dataclass
class TfNet:
    data: bytes
    w: np.ndarray
    b: np.ndarray

    def reference(self, x: np.ndarray) -> np.ndarray:
        return softmax(np.maximum(x @ self.w + self.b, 0))


def tf_mlp(seed: int = 0, inputs: int = 6, outputs: int = 4) -> TfNet:
    """A frozen GraphDef: Placeholder -> MatMul -> BiasAdd -> Relu -> Softmax ("prob")."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((inputs, outputs)).astype(np.float32)
    b = rng.standard_normal(outputs).astype(np.float32)
    t = P.num(6, TF_FLOAT)
    graph = (
        _tf_node("x", "Placeholder", (), dtype=t, shape=P.raw(7, _tf_shape((1, inputs))))
        + _tf_const("w", w)
        + _tf_const("b", b)
        + _tf_node(
            "mm", "MatMul", ("x", "w"), T=t, transpose_a=P.num(5, 0), transpose_b=P.num(5, 0)
        )
        + _tf_node("bias", "BiasAdd", ("mm", "b"), T=t)
        + _tf_node("relu", "Relu", ("bias",), T=t)
        + _tf_node("prob", "Softmax", ("relu",), T=t)
    )
    return TfNet(graph, w, b)


TF_MLP_PBTXT_NO_SOFTMAX = """
node { name: "x" op: "Placeholder" attr { key: "dtype" value { type: DT_FLOAT } } }
node { name: "w" op: "Const" attr { key: "dtype" value { type: DT_FLOAT } } }
node { name: "b" op: "Const" attr { key: "dtype" value { type: DT_FLOAT } } }
node { name: "mm" op: "MatMul" input: "x" input: "w"
       attr { key: "transpose_a" value { b: false } }
       attr { key: "transpose_b" value { b: false } } }
node { name: "bias" op: "BiasAdd" input: "mm" input: "b" }
node { name: "relu" op: "Relu" input: "bias" }
"""
"""A text graph for `tf_mlp`'s weights that stops before the softmax."""


def _caffe_blob(a: np.ndarray) -> bytes:
    shape = b"".join(P.num(1, d) for d in a.shape)  # BlobShape.dim
    return P.raw(7, shape) + P.raw(5, np.ascontiguousarray(a, np.float32).tobytes())


def _caffe_layer(name: str, kind: str, bottom: str, top: str, *blobs: np.ndarray) -> bytes:
    body = P.raw(1, name) + P.raw(2, kind) + P.raw(3, bottom) + P.raw(4, top)
    return P.raw(100, body + b"".join(P.raw(7, _caffe_blob(b)) for b in blobs))


CAFFE_CONV_PROTOTXT = """name: "conv-fc"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 2 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "relu" }
layer { name: "fc" type: "InnerProduct" bottom: "relu" top: "fc"
        inner_product_param { num_output: 5 } }
"""


@dataclass
class CaffeNet:
    caffemodel: bytes
    prototxt: bytes
    conv_w: np.ndarray
    conv_b: np.ndarray
    fc_w: np.ndarray
    fc_b: np.ndarray

    def reference(self, x: np.ndarray) -> np.ndarray:
        h = np.maximum(conv2d(x, self.conv_w, self.conv_b), 0)
        return cast(np.ndarray, h.reshape(len(x), -1) @ self.fc_w.T + self.fc_b)


def caffe_conv_fc(seed: int = 0) -> CaffeNet:
    """A caffemodel (weights) with its prototxt: Convolution 3x3 -> ReLU -> InnerProduct."""
    rng = np.random.default_rng(seed)
    cw = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    cb = rng.standard_normal(2).astype(np.float32)
    fw = rng.standard_normal((5, 2 * 4 * 4)).astype(np.float32)
    fb = rng.standard_normal(5).astype(np.float32)
    model = (
        P.raw(1, "conv-fc")
        + _caffe_layer("conv", "Convolution", "data", "conv", cw, cb)
        + _caffe_layer("fc", "InnerProduct", "relu", "fc", fw, fb)
    )
    return CaffeNet(model, CAFFE_CONV_PROTOTXT.encode(), cw, cb, fw, fb)
