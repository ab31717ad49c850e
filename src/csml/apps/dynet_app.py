"""`dynet`: neural networks with DyNet 2.1.2 (dynamic computation graphs, autobatching).

Operations:

- ``train_mlp``: a multi-layer perceptron classifier on a CSV table (numeric
  features, a label column), trained with Adam on minibatches (DyNet's native
  batching), a stratified held-out split for the final accuracy. Loss per epoch
  is the job's progress and the result's ``history``.
- ``predict_mlp``: a model from ``train_mlp`` + a CSV table -> predictions CSV.
- ``train_char_rnn``: a character-level LSTM language model on a UTF-8 text:
  one graph per sequence, batched by DyNet's autobatcher. Perplexity per epoch
  is the job's progress and the result's ``history``.
- ``generate_text``: sample text from a char-RNN model; the same model, prompt,
  temperature and seed always give the same text.

DyNet is configured before it is imported (`csml.apps._dynet_init`: autobatching
on, a fixed initial seed); each operation then calls ``dynet.reset_random_seed``
with its ``seed`` parameter, so parameter initialisation, shuffling and sampling
depend on that seed only. ``dynet.renew_cg()`` starts a fresh graph per batch.

Model file (``format: "csml-dynet-model"``, ``format_version: 1``): a zip archive
holding exactly two members:

- ``header.json`` (UTF-8 JSON)::

    {"format": "csml-dynet-model", "format_version": 1,
     "kind": "mlp" | "char_rnn",
     "created_by": {"csml": "0.1.0", "dynet": "2.1.2"},
     # kind "mlp":
     "layers": [n_features, hidden..., n_classes], "activation": "relu" | "tanh",
     "feature_names": [...], "label_column": "label", "classes": ["a", ...],
     "normalization": {"mean": [...], "std": [...]},     # x' = (x - mean) / std
     # kind "char_rnn":
     "vocabulary": ["a", "b", ...],   # character of index i + 1; index 0 starts a sequence
     "layers": 1, "hidden": 64, "embedding": 32}

- ``params.dynet``: the weights, written by DyNet's ``ParameterCollection.save``
  and read back with ``ParameterCollection.populate`` into a collection built
  from the header, in this order. MLP: for each layer ``i``, ``W{i}``
  (out x in) and ``b{i}``; hidden layers apply the activation, the last gives
  logits. char-RNN: lookup parameters ``E`` (vocabulary + 1 x embedding), a
  ``VanillaLSTMBuilder(layers, embedding, hidden)``, then ``Wout`` and ``bout``.

A reader refuses another ``format``, ``kind`` or ``format_version``.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from csml.apps import tabular
from csml.apps.base import (
    App,
    Input,
    JobContext,
    JobError,
    ModelSpec,
    OperationParams,
    Output,
)

if TYPE_CHECKING:
    import numpy as np

MODEL_FORMAT = "csml-dynet-model"
MODEL_FORMAT_VERSION = 1
HEADER = "header.json"
PARAMS = "params.dynet"
MAX_HEADER_BYTES = 64 << 20
MAX_PARAMS_BYTES = 2 << 30
MAX_LAYER = 4096
MAX_VOCABULARY = 10_000
MAX_PARAMETERS = 50_000_000

app = App(
    "dynet",
    version="1.0",
    description="DyNet: MLP classifiers on CSV tables; character-level LSTM language models.",
    preload=("numpy", "csml.apps._dynet_init", "dynet"),
)


def _dynet() -> Any:
    """The configured `dynet` module (autobatching on; see `csml.apps._dynet_init`)."""
    from csml.apps import _dynet_init

    _dynet_init.configured()  # the import above configures DyNet; it must come first
    import dynet

    return dynet


# ----------------------------------------------------------------------------- model files


def _created_by() -> dict[str, str]:
    from importlib.metadata import version

    from csml import __version__

    return {"csml": __version__, "dynet": version("dynet")}


def save_model(path: Path, header: dict[str, Any], pc: Any, scratch: Path) -> None:
    params_file = scratch / "params.dynet.tmp"
    pc.save(str(params_file))
    header = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, **header}
    header["created_by"] = _created_by()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(HEADER, json.dumps(header, ensure_ascii=False))
        zf.write(params_file, PARAMS)
    params_file.unlink()


def open_model(path: Path, kind: str, scratch: Path) -> tuple[dict[str, Any], Path]:
    """Check a model archive; return its header and its weights extracted to `scratch`."""
    producer = {"mlp": "dynet.train_mlp", "char_rnn": "dynet.train_char_rnn"}[kind]
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise JobError(
            f"input 'model' is not a DyNet model (not a zip archive); use the `model` output "
            f"of {producer}"
        ) from None
    with zf:
        members = {i.filename: i for i in zf.infolist()}
        if HEADER not in members or PARAMS not in members:
            raise JobError(
                f"input 'model' is not a DyNet model (it lacks {HEADER} or {PARAMS}); use the "
                f"`model` output of {producer}"
            )
        if members[HEADER].file_size > MAX_HEADER_BYTES:
            raise JobError("the model's header is too large")
        try:
            header = json.loads(zf.read(HEADER))
        except (UnicodeDecodeError, json.JSONDecodeError, zipfile.BadZipFile):
            raise JobError("the model's header is not JSON") from None
        if not isinstance(header, dict) or header.get("format") != MODEL_FORMAT:
            raise JobError(f"input 'model' is not a {MODEL_FORMAT!r} file")
        version = header.get("format_version")
        if version != MODEL_FORMAT_VERSION:
            raise JobError(
                f"unsupported model format_version {version!r}: this worker reads "
                f"{MODEL_FORMAT} version {MODEL_FORMAT_VERSION} only"
            )
        if header.get("kind") != kind:
            raise JobError(
                f"input 'model' is a {header.get('kind')!r} model; this operation needs a "
                f"{kind!r} model from {producer}"
            )
        if members[PARAMS].file_size > MAX_PARAMS_BYTES:
            raise JobError("the model's weights are too large")
        target = scratch / "params.dynet"
        try:
            with zf.open(PARAMS) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise JobError(f"the model's weights cannot be read: {exc}") from None
    return header, target


def _populate(pc: Any, params_file: Path) -> None:
    try:
        pc.populate(str(params_file))
    except RuntimeError as exc:
        raise JobError(f"the model's weights do not match its header: {exc}") from None


def _int_in(value: Any, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise JobError(f"the model header's {what} must be an integer in [{low}, {high}]")
    return value


# ----------------------------------------------------------------------------- MLP


@dataclass
class Mlp:
    """Layers [n_in, hidden..., n_out] as DyNet parameters W{i} (out x in), b{i}."""

    sizes: list[int]
    activation: str
    pc: Any
    weights: list[tuple[Any, Any]] = field(default_factory=list)

    @classmethod
    def build(cls, sizes: list[int], activation: str) -> Mlp:
        dy = _dynet()
        pc = dy.ParameterCollection()
        weights = [
            (pc.add_parameters((n_out, n_in), name=f"W{i}"), pc.add_parameters(n_out, name=f"b{i}"))
            for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes))
        ]
        return cls(sizes, activation, pc, weights)

    def logits(self, x: np.ndarray) -> Any:
        """Expression: logits for a batch (rows of x); call within a fresh graph."""
        dy = _dynet()
        act = dy.rectify if self.activation == "relu" else dy.tanh
        h = dy.inputTensor(x.T, batched=True)
        for i, (w, b) in enumerate(self.weights):
            h = dy.affine_transform([b, w, h])
            if i < len(self.weights) - 1:
                h = act(h)
        return h

    def predict(self, x: np.ndarray, batch: int = 1024) -> np.ndarray:
        import numpy as np

        dy = _dynet()
        out = np.empty(len(x), dtype=np.int64)
        for start in range(0, len(x), batch):
            dy.renew_cg()
            scores = self.logits(x[start : start + batch]).npvalue()
            scores = scores.reshape(self.sizes[-1], -1)
            out[start : start + batch] = scores.argmax(axis=0)
        return out


Hidden = Annotated[int, Field(ge=1, le=MAX_LAYER)]


class TrainMlpParams(OperationParams):
    label: str = Field("label", min_length=1, description="The column holding the class.")
    hidden: list[Hidden] = Field(
        [64], max_length=8, description="Sizes of the hidden layers ([] is softmax regression)."
    )
    activation: Literal["relu", "tanh"] = "relu"
    epochs: int = Field(30, ge=1, le=10_000)
    learning_rate: float = Field(0.01, gt=0, le=10, description="Adam's step size.")
    batch_size: int = Field(32, ge=1, le=65_536)
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Initialisation, split and shuffling.")
    held_out_fraction: float = Field(
        0.2, ge=0, le=0.9, description="Share of each class kept out of training for accuracy."
    )
    id_column: str | None = Field(None, description="A column to ignore (row identifiers).")
    features: list[str] | None = Field(
        None, description="Feature columns; default: every column but the label and id."
    )


TABLE_IN = Input(
    "data", "CSV with a header row: numeric feature columns and a label column.", "text/csv"
)
MLP_MODEL = ModelSpec("mlp", MODEL_FORMAT, MODEL_FORMAT_VERSION)
RNN_MODEL = ModelSpec("char-rnn", MODEL_FORMAT, MODEL_FORMAT_VERSION)
MODEL_DOC = (
    f"Zip archive, format {MODEL_FORMAT!r} version {MODEL_FORMAT_VERSION} (header.json + "
    "DyNet weights); kept as one of your models."
)


@app.operation(
    inputs=[TABLE_IN], outputs=[Output("model", MODEL_DOC, "application/zip", model=MLP_MODEL)]
)
def train_mlp(ctx: JobContext, params: TrainMlpParams) -> dict[str, Any]:
    """Train an MLP classifier on a CSV table; loss per epoch is reported as progress."""
    import numpy as np

    dy = _dynet()
    data = tabular.labelled_table(
        ctx.input("data"), params.label, params.id_column, params.features, MAX_LAYER
    )
    features, x_raw, classes, y = data.features, data.x, data.classes, data.y
    sizes = [len(features), *params.hidden, len(classes)]
    n_params = sum((a + 1) * b for a, b in itertools.pairwise(sizes))
    if n_params > MAX_PARAMETERS:
        raise JobError(f"the network would have {n_params} parameters (limit {MAX_PARAMETERS})")

    train_idx, held_idx = tabular.stratified_split(y, params.held_out_fraction, params.seed)
    if len(train_idx) == 0:
        raise JobError("no row is left for training")
    scaler = tabular.Standardizer.fit(x_raw[train_idx])
    x = scaler.transform(x_raw)
    x_train, y_train = x[train_idx], y[train_idx]

    dy.reset_random_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    mlp = Mlp.build(sizes, params.activation)
    trainer = dy.AdamTrainer(mlp.pc, alpha=params.learning_rate)
    history = []
    started = time.perf_counter()
    for epoch in range(1, params.epochs + 1):
        order = rng.permutation(len(x_train))
        total = 0.0
        for start in range(0, len(order), params.batch_size):
            batch = order[start : start + params.batch_size]
            dy.renew_cg()
            losses = dy.pickneglogsoftmax_batch(mlp.logits(x_train[batch]), y_train[batch].tolist())
            loss = dy.sum_batches(losses) / len(batch)
            total += loss.scalar_value() * len(batch)
            loss.backward()
            trainer.update()
        mean_loss = total / len(order)
        if not math.isfinite(mean_loss):
            raise JobError(
                f"training diverged at epoch {epoch} (loss {mean_loss}); lower the learning_rate"
            )
        history.append({"epoch": epoch, "loss": round(mean_loss, 6)})
        ctx.progress(epoch / params.epochs, f"epoch {epoch}/{params.epochs}, loss {mean_loss:.3f}")
    training_seconds = time.perf_counter() - started

    train_acc = float((mlp.predict(x_train) == y_train).mean())
    held_acc = float((mlp.predict(x[held_idx]) == y[held_idx]).mean()) if len(held_idx) else None
    header = {
        "kind": "mlp",
        "layers": sizes,
        "activation": params.activation,
        "feature_names": features,
        "label_column": params.label,
        "classes": classes,
        "normalization": scaler.to_json(),
    }
    save_model(ctx.output("model"), header, mlp.pc, ctx.scratch)
    return {
        "rows": len(y),
        "train_rows": len(train_idx),
        "held_out_rows": len(held_idx),
        "classes": classes,
        "class_counts": {c: int((y == i).sum()) for i, c in enumerate(classes)},
        "feature_names": features,
        "layers": sizes,
        "parameters": n_params,
        "epochs": params.epochs,
        "history": history,
        "final_loss": history[-1]["loss"],
        "train_accuracy": train_acc,
        "held_out_accuracy": held_acc,
        "training_seconds": round(training_seconds, 4),
        "epochs_per_second": round(params.epochs / training_seconds, 3),
        "model_format": {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION},
    }


def load_mlp(ctx: JobContext) -> tuple[Mlp, dict[str, Any], tabular.Standardizer]:
    header, params_file = open_model(ctx.input("model"), "mlp", ctx.scratch)
    try:
        sizes = header["layers"]
        if not isinstance(sizes, list) or not 2 <= len(sizes) <= 10:
            raise JobError("the model header's layers must list 2 to 10 sizes")
        sizes = [
            _int_in(s, 1, 100_000 if i == 0 else MAX_LAYER, "layer sizes")
            for i, s in enumerate(sizes)
        ]
        if sum((a + 1) * b for a, b in itertools.pairwise(sizes)) > MAX_PARAMETERS:
            raise JobError("the model is larger than any train_mlp makes")
        activation = header["activation"]
        if activation not in ("relu", "tanh"):
            raise JobError(f"unknown activation {activation!r} in the model header")
        features = [str(f) for f in header["feature_names"]]
        classes = [str(c) for c in header["classes"]]
        if len(features) != sizes[0] or len(classes) != sizes[-1]:
            raise JobError("the model header's features or classes do not match its layers")
        scaler = tabular.Standardizer.from_json(header["normalization"], len(features))
        header = {
            **header,
            "feature_names": features,
            "classes": classes,
            "label_column": str(header["label_column"]),
        }
    except (KeyError, TypeError) as exc:
        raise JobError(f"the model header is malformed: {exc!r}") from None
    mlp = Mlp.build(sizes, activation)
    _populate(mlp.pc, params_file)
    return mlp, header, scaler


class PredictParams(OperationParams):
    id_column: str | None = Field(
        None, description="A column copied into the predictions (default: the row number)."
    )


@app.operation(
    inputs=[
        Input("model", "A model from dynet.train_mlp.", "application/zip", model=MLP_MODEL),
        Input(
            "data",
            "CSV with the model's feature columns (and optionally its label column).",
            "text/csv",
        ),
    ],
    outputs=[
        Output("predictions", "CSV: the row id (or number) and the predicted class.", "text/csv")
    ],
)
def predict_mlp(ctx: JobContext, params: PredictParams) -> dict[str, Any]:
    """Classify each row of a CSV table with a model from train_mlp."""
    mlp, header, scaler = load_mlp(ctx)
    features, classes, label = header["feature_names"], header["classes"], header["label_column"]
    table = tabular.read_table(ctx.input("data"), "data")
    tabular.check_columns(table, features, (label, params.id_column))
    if params.id_column is not None:
        table.index(params.id_column)
    x = scaler.transform(table.numeric(features))
    started = time.perf_counter()
    predicted = [classes[i] for i in mlp.predict(x)]
    seconds = time.perf_counter() - started
    id_name, ids = tabular.row_ids(table, params.id_column)
    tabular.write_predictions(ctx.output("predictions"), id_name, ids, predicted)
    truth = table.labels(label) if label in table.columns else None
    ctx.progress(1.0, "predicted")
    return {
        **tabular.prediction_summary(predicted, classes, truth),
        "predict_seconds": round(seconds, 4),
    }


# ----------------------------------------------------------------------------- char-RNN


@dataclass
class CharRnn:
    vocabulary: list[str]
    layers: int
    hidden: int
    embedding: int
    pc: Any
    lookup: Any
    lstm: Any
    w_out: Any
    b_out: Any

    @classmethod
    def build(cls, vocabulary: list[str], layers: int, hidden: int, embedding: int) -> CharRnn:
        dy = _dynet()
        pc = dy.ParameterCollection()
        n = len(vocabulary) + 1  # index 0: start of a sequence
        lookup = pc.add_lookup_parameters((n, embedding), name="E")
        lstm = dy.VanillaLSTMBuilder(layers, embedding, hidden, pc)
        w_out = pc.add_parameters((n, hidden), name="Wout")
        b_out = pc.add_parameters(n, name="bout")
        return cls(vocabulary, layers, hidden, embedding, pc, lookup, lstm, w_out, b_out)

    def sequence_loss(self, ids: list[int]) -> Any:
        """Summed negative log-likelihood of ids[1:] given the prefix (ids[0] is 0)."""
        dy = _dynet()
        state = self.lstm.initial_state()
        losses = []
        for prev, nxt in itertools.pairwise(ids):
            state = state.add_input(self.lookup[prev])
            logits = dy.affine_transform([self.b_out, self.w_out, state.output()])
            losses.append(dy.pickneglogsoftmax(logits, nxt))
        return dy.esum(losses)

    def header(self) -> dict[str, Any]:
        return {
            "kind": "char_rnn",
            "vocabulary": self.vocabulary,
            "layers": self.layers,
            "hidden": self.hidden,
            "embedding": self.embedding,
        }


class TrainCharRnnParams(OperationParams):
    layers: int = Field(1, ge=1, le=4, description="Stacked LSTM layers.")
    hidden: int = Field(64, ge=1, le=1024, description="LSTM state size.")
    embedding: int = Field(32, ge=1, le=1024, description="Character embedding size.")
    epochs: int = Field(10, ge=1, le=10_000)
    seq_length: int = Field(32, ge=2, le=1000, description="Characters per training sequence.")
    batch_size: int = Field(16, ge=1, le=1024, description="Sequences per update (autobatched).")
    learning_rate: float = Field(0.005, gt=0, le=10, description="Adam's step size.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    max_chars: int = Field(
        1_000_000, ge=100, le=50_000_000, description="Use at most this many characters."
    )


@app.operation(
    inputs=[Input("text", "UTF-8 text to learn from.", "text/plain")],
    outputs=[Output("model", MODEL_DOC, "application/zip", model=RNN_MODEL)],
)
def train_char_rnn(ctx: JobContext, params: TrainCharRnnParams) -> dict[str, Any]:
    """Train a character-level LSTM language model; perplexity per epoch is the progress."""
    import numpy as np

    dy = _dynet()
    try:
        text = ctx.input("text").read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise JobError("input 'text' is not UTF-8 text") from None
    text = text[: params.max_chars]
    if len(text) < 2:
        raise JobError("input 'text' needs two characters at least")
    vocabulary = sorted(set(text))
    if len(vocabulary) > MAX_VOCABULARY:
        raise JobError(
            f"input 'text' has {len(vocabulary)} distinct characters (limit {MAX_VOCABULARY})"
        )
    index = {ch: i + 1 for i, ch in enumerate(vocabulary)}
    encoded = [index[ch] for ch in text]
    sequences = [
        [0, *encoded[i : i + params.seq_length]] for i in range(0, len(encoded), params.seq_length)
    ]
    sequences = [s for s in sequences if len(s) >= 2]
    n_chars = sum(len(s) - 1 for s in sequences)

    dy.reset_random_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    model = CharRnn.build(vocabulary, params.layers, params.hidden, params.embedding)
    trainer = dy.AdamTrainer(model.pc, alpha=params.learning_rate)
    history = []
    started = time.perf_counter()
    for epoch in range(1, params.epochs + 1):
        total = 0.0
        order = rng.permutation(len(sequences))
        for start in range(0, len(order), params.batch_size):
            dy.renew_cg()
            batch = [sequences[i] for i in order[start : start + params.batch_size]]
            # one graph per sequence; forward() lets the autobatcher run them together
            loss = dy.esum([model.sequence_loss(s) for s in batch])
            chars = sum(len(s) - 1 for s in batch)
            total += loss.scalar_value()
            (loss / chars).backward()
            trainer.update()
        mean = total / n_chars
        if not math.isfinite(mean):
            raise JobError(f"training diverged at epoch {epoch}; lower the learning_rate")
        perplexity = math.exp(mean)
        history.append({"epoch": epoch, "loss": round(mean, 6), "perplexity": round(perplexity, 4)})
        ctx.progress(
            epoch / params.epochs,
            f"epoch {epoch}/{params.epochs}, loss {mean:.3f}, perplexity {perplexity:.2f}",
        )
    training_seconds = time.perf_counter() - started
    save_model(ctx.output("model"), model.header(), model.pc, ctx.scratch)
    return {
        "characters": n_chars,
        "vocabulary_size": len(vocabulary),
        "sequences": len(sequences),
        "epochs": params.epochs,
        "history": history,
        "final_perplexity": history[-1]["perplexity"],
        "training_seconds": round(training_seconds, 4),
        "autobatch": _autobatch_on(),
        "model_format": {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION},
    }


def _autobatch_on() -> bool:
    from csml.apps import _dynet_init

    return _dynet_init.configured()


def load_char_rnn(ctx: JobContext) -> CharRnn:
    header, params_file = open_model(ctx.input("model"), "char_rnn", ctx.scratch)
    try:
        vocabulary = header["vocabulary"]
        if (
            not isinstance(vocabulary, list)
            or not 1 <= len(vocabulary) <= MAX_VOCABULARY
            or not all(isinstance(c, str) and len(c) == 1 for c in vocabulary)
            or len(set(vocabulary)) != len(vocabulary)
        ):
            raise JobError("the model header's vocabulary must list distinct characters")
        layers = _int_in(header["layers"], 1, 4, "layers")
        hidden = _int_in(header["hidden"], 1, 1024, "hidden")
        embedding = _int_in(header["embedding"], 1, 1024, "embedding")
    except (KeyError, TypeError) as exc:
        raise JobError(f"the model header is malformed: {exc!r}") from None
    model = CharRnn.build(vocabulary, layers, hidden, embedding)
    _populate(model.pc, params_file)
    return model


class GenerateTextParams(OperationParams):
    prompt: str = Field("", max_length=10_000, description="Text to continue.")
    length: int = Field(200, ge=1, le=100_000, description="Characters to generate.")
    temperature: float = Field(
        1.0, ge=0, le=10, description="Sampling temperature; 0 always takes the likeliest."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="The same seed gives the same text.")


@app.operation(
    inputs=[
        Input("model", "A model from dynet.train_char_rnn.", "application/zip", model=RNN_MODEL)
    ]
)
def generate_text(ctx: JobContext, params: GenerateTextParams) -> dict[str, Any]:
    """Continue a prompt with text sampled from a char-RNN model."""
    import numpy as np

    dy = _dynet()
    model = load_char_rnn(ctx)
    index = {ch: i + 1 for i, ch in enumerate(model.vocabulary)}
    unknown = sorted({ch for ch in params.prompt if ch not in index})
    if unknown:
        raise JobError(f"the prompt has characters the model never saw: {''.join(unknown)[:50]!r}")
    dy.reset_random_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    n_layers = model.layers

    def step(prev: int, carry: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Feed one character; return next-character logits and the LSTM's state values."""
        dy.renew_cg()  # a fresh, small graph per character: memory stays flat
        state = model.lstm.initial_state(
            None if carry is None else [dy.inputVector(v.tolist()) for v in carry]
        )
        state = state.add_input(model.lookup[prev])
        logits = dy.affine_transform([model.b_out, model.w_out, state.output()])
        values = logits.npvalue().astype(np.float64)
        return values, [e.npvalue() for e in state.s()[: 2 * n_layers]]

    carry = None
    logits = np.zeros(0)
    for ch_id in [0, *(index[ch] for ch in params.prompt)]:
        logits, carry = step(ch_id, carry)
    out = []
    started = time.perf_counter()
    for n in range(params.length):
        logits[0] = -np.inf  # never the start symbol
        if params.temperature == 0:
            nxt = int(np.argmax(logits))
        else:
            z = logits / params.temperature
            p = np.exp(z - z.max())
            p /= p.sum()
            nxt = int(rng.choice(len(p), p=p))
        out.append(model.vocabulary[nxt - 1])
        if n + 1 < params.length:
            logits, carry = step(nxt, carry)
        if n % 500 == 499:
            ctx.progress(n / params.length, f"{n + 1}/{params.length} characters")
    generated = "".join(out)
    return {
        "text": params.prompt + generated,
        "prompt": params.prompt,
        "generated": generated,
        "seed": params.seed,
        "temperature": params.temperature,
        "generate_seconds": round(time.perf_counter() - started, 4),
    }
