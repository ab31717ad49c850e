"""dlib and DyNet through CSML versus the same library called directly, on the same data.

    /work/venv/bin/python bench/apps.py              # 5 rounds of each (about 6 minutes)
    /work/venv/bin/python bench/apps.py --quick      # 1 round, smaller data (smoke test)
    /work/venv/bin/python bench/apps.py --only dlib  # or dynet

Data: scikit-learn's bundled digits (1,797 8x8 images, 10 classes; no download) plus
eight copies shifted by one pixel (the four sides and the four diagonals): 16,173 rows
x 64 features, a CSV of 2.4 MB (`--quick`: two copies, 5,391 rows). Every side reads
that same CSV file.

Three sides per library, each round running them back to back (rotating the order):

- direct: a plain script calling the library, in a fresh process (imports done
  before timing): read the CSV (csv + numpy), standardise, train.
  dlib: 45 one-vs-one `dlib.svm_c_trainer_radial_basis` (C=10, gamma=1/64).
  DyNet (configured like the worker: autobatching on): a 64-256-128-10 ReLU MLP,
  Adam 0.01, batches of 32, `renew_cg` per batch, every row trained.
- operation: the app's operation (`dlib train_svm`, `dynet train_mlp`) called in a
  fresh process through a `JobContext`, without CSML: what the app adds (training
  accuracy, the model file) without what the platform adds.
- CSML: the same operation as a job on a real loopback cluster (coordinator + one
  worker, 1 slot), timed from submit to the client seeing it succeed.

Targets (medians over the rounds):
- training through CSML vs directly <= 1.10: dlib training seconds (measured in the
  job around the dlib calls / the direct script's; for >= 2 s of direct training);
  DyNet epochs/s of the training loop (direct / in the job);
- the platform's cost <= 1.10: wall time of the job through CSML / the same
  operation without CSML (dlib); epochs per second of wall time, operation without
  CSML / through CSML (DyNet).
Also reported: end to end through CSML vs the direct script (what the app's extras
cost), and the CPU other processes took meanwhile (the machine may be shared).
Results: stdout and bench/results/apps-<timestamp>.json. Exit status 1 on a miss.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
TARGET_RATIO = 1.10
MIN_DIRECT_SVM_S = 2.0

SVM_PARAMS = {"kernel": "rbf", "c": 10.0, "gamma": 1 / 64, "epsilon": 0.001}
MLP_PARAMS: dict[str, Any] = {
    "hidden": [256, 128],
    "activation": "relu",
    "learning_rate": 0.01,
    "batch_size": 32,
    "seed": 0,
    "held_out_fraction": 0.0,
}


# -- data ---------------------------------------------------------------------------


def make_digits_csv(path: Path, shifts: int) -> dict[str, Any]:
    """Digits plus `shifts` one-pixel-shifted copies (up to 8: the four sides, then the
    diagonals), as a CSV with a header."""
    import numpy as np
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = x.reshape(-1, 8, 8)
    blocks = [images]
    for dy, dx in [(0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)][:shifts]:
        shifted = np.zeros_like(images)
        ys, yd = (slice(0, 8 - dy), slice(dy, 8)) if dy >= 0 else (slice(-dy, 8), slice(0, 8 + dy))
        xs, xd = (slice(0, 8 - dx), slice(dx, 8)) if dx >= 0 else (slice(-dx, 8), slice(0, 8 + dx))
        shifted[:, yd, xd] = images[:, ys, xs]
        blocks.append(shifted)
    data = np.concatenate(blocks).reshape(-1, 64)
    labels = np.concatenate([y] * len(blocks))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*(f"p{i}" for i in range(64)), "label"])
        for row, label in zip(data, labels, strict=True):
            writer.writerow([*(f"{v:g}" for v in row), int(label)])
    return {"rows": len(labels), "features": 64, "classes": 10, "bytes": path.stat().st_size}


# -- the direct side (runs in a fresh process: python bench/apps.py --direct ...) ----


def _read_csv(path: Path) -> tuple[Any, list[str]]:
    import numpy as np

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    label = header.index("label")
    features = [i for i in range(len(header)) if i != label]
    x = np.array([[r[i] for i in features] for r in body], dtype=np.float64)
    return x, [r[label] for r in body]


def _standardise(x: Any) -> Any:
    import numpy as np

    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def direct_svm(data: Path) -> dict[str, float]:
    """Plain dlib: one-vs-one RBF C-SVMs on the standardised table."""
    import dlib
    import numpy as np

    t0, cpu0 = time.perf_counter(), time.process_time()
    x_raw, labels = _read_csv(data)
    x = _standardise(x_raw)
    classes = sorted(set(labels), key=float)
    y = np.array([classes.index(v) for v in labels])
    t1 = time.perf_counter()
    machines = 0
    rows = [dlib.vector(row.tolist()) for row in x]
    for i in range(len(classes)):
        for j in range(i + 1, len(classes)):
            chosen = np.flatnonzero((y == i) | (y == j))
            samples = dlib.vectors()
            samples.extend(rows[k] for k in chosen)
            targets = dlib.array([1.0 if y[k] == i else -1.0 for k in chosen])
            trainer = dlib.svm_c_trainer_radial_basis()
            trainer.gamma = SVM_PARAMS["gamma"]
            trainer.set_c(SVM_PARAMS["c"])
            trainer.epsilon = SVM_PARAMS["epsilon"]
            trainer.train(samples, targets)
            machines += 1
    t2 = time.perf_counter()
    cpu = time.process_time() - cpu0
    return {"wall_s": t2 - t0, "train_s": t2 - t1, "cpu_s": cpu, "machines": machines}


def direct_mlp(data: Path, epochs: int, out: Path) -> dict[str, float]:
    """Plain DyNet (configured like the worker: autobatching on), same net and batches."""
    import numpy as np

    from csml.apps import _dynet_init  # the worker's DyNet settings, before `import dynet`

    _dynet_init.configured()
    import dynet as dy

    t0, cpu0 = time.perf_counter(), time.process_time()
    x_raw, labels = _read_csv(data)
    x = _standardise(x_raw)
    classes = sorted(set(labels), key=float)
    y = np.array([classes.index(v) for v in labels])
    dy.reset_random_seed(MLP_PARAMS["seed"])
    rng = np.random.default_rng(MLP_PARAMS["seed"])
    sizes = [x.shape[1], *MLP_PARAMS["hidden"], len(classes)]
    pc = dy.ParameterCollection()
    layers = [
        (pc.add_parameters((n_out, n_in)), pc.add_parameters(n_out))
        for n_in, n_out in itertools.pairwise(sizes)
    ]
    trainer = dy.AdamTrainer(pc, alpha=MLP_PARAMS["learning_rate"])
    batch_size = int(MLP_PARAMS["batch_size"])
    t1 = time.perf_counter()
    losses = []
    for _ in range(epochs):
        order = rng.permutation(len(x))
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            dy.renew_cg()
            h = dy.inputTensor(x[batch].T, batched=True)
            for k, (w, b) in enumerate(layers):
                h = dy.affine_transform([b, w, h])
                if k < len(layers) - 1:
                    h = dy.rectify(h)
            loss = dy.sum_batches(dy.pickneglogsoftmax_batch(h, y[batch].tolist())) / len(batch)
            total += loss.scalar_value() * len(batch)
            loss.backward()
            trainer.update()
        losses.append(total / len(order))
    t2 = time.perf_counter()
    pc.save(str(out))
    t3 = time.perf_counter()
    return {
        "wall_s": t3 - t0,
        "cpu_s": time.process_time() - cpu0,
        "train_s": t2 - t1,
        "epochs_per_s_wall": epochs / (t3 - t0),
        "epochs_per_s_train": epochs / (t2 - t1),
        "final_loss": losses[-1],
    }


def operation_without_csml(kind: str, data: Path, epochs: int, scratch: Path) -> dict[str, Any]:
    """The app's operation in this process, through a JobContext (the zygote's preloads
    imported before timing, as in a worker)."""
    import importlib

    from csml.apps.base import JobContext
    from csml.apps.registry import load_app

    name, op, params = (
        ("dlib", "train_svm", SVM_PARAMS)
        if kind == "op-svm"
        else ("dynet", "train_mlp", {**MLP_PARAMS, "epochs": epochs})
    )
    app = load_app(name)
    for module in app.preload:
        importlib.import_module(module)
    work = Path(tempfile.mkdtemp(dir=scratch))
    (work / "out").mkdir()
    ctx = JobContext({"data": data}, work / "out", scratch=work)
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = app.operations[op].run(ctx, params)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"wall_s": wall, "cpu_s": cpu, "result": _short(result)}


def run_direct(kind: str, data: Path, epochs: int, scratch: Path) -> dict[str, Any]:
    """Run a direct baseline in a fresh interpreter (libraries imported before timing)."""
    cmd = [sys.executable, __file__, "--direct", kind, "--data", str(data)]
    cmd += ["--epochs", str(epochs), "--scratch", str(scratch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"direct {kind} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# -- the CSML side ---------------------------------------------------------------------


def run_csml(client: Any, app: str, op: str, data: Path, params: dict[str, Any]) -> dict[str, Any]:
    """One job, submit to success; with where its time went (the coordinator's timestamps)."""
    t0, epoch0 = time.perf_counter(), time.time()
    job = client.submit(app, op, files={"data": data}, params=params)
    job.wait(timeout=1800)
    wall, epoch2 = time.perf_counter() - t0, time.time()
    if job.state.value != "succeeded":
        raise RuntimeError(f"{app}.{op} failed: {job.error}")
    d = job.data
    phases = {}
    if d.started_at is not None and d.finished_at is not None:
        created, started = d.created_at.timestamp(), d.started_at.timestamp()
        finished = d.finished_at.timestamp()
        phases = {
            "submit_until_created_s": round(created - epoch0, 3),
            "queued_until_claimed_s": round(started - created, 3),
            "claimed_until_finished_s": round(finished - started, 3),
            "finished_until_client_sees_s": round(epoch2 - finished, 3),
        }
    return {"wall_s": wall, "phases": phases, "result": job.result}


# -- the benchmark ---------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    import csml

    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "load_avg_at_start": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "csml": csml.__version__,
        "dlib": version("dlib-bin"),
        "dynet": version("dynet"),
    }


def median(values: list[float]) -> float:
    return float(statistics.median(values))


SIDES = ("direct", "operation", "csml")


def measure(
    cluster: Any, rounds: int, sides: dict[str, Callable[[], dict[str, Any]]], label: str
) -> dict[str, list[dict[str, Any]]]:
    """Run every side once per round, rotating which goes first; CPU of each window."""
    from cluster import CpuWindow

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            with CpuWindow(cluster.pids()) as window:
                run = sides[name]()
            run["cpu"] = window.report()
            if "cpu_s" not in run:  # through CSML: coordinator, workers and jobs, this client
                run["cpu_s"] = sum(window.used.values())
            runs[name].append(run)
            _say(f"  {label} round {r + 1} {name}: {run['wall_s']:.2f} s")
    return runs


def paired(runs: list[dict[str, Any]], others: list[dict[str, Any]], value: Any) -> float:
    """Median over rounds of value(run) / value(other run of the same round): robust to a
    machine whose load drifts between rounds."""
    return median([value(a) / value(b) for a, b in zip(runs, others, strict=True)])


def bench_dlib(cluster: Any, data: Path, rounds: int, scratch: Path) -> dict[str, Any]:
    client = cluster.new_user(timeout=1800)
    run_csml(client, "dlib", "train_svm", data, {**SVM_PARAMS, "c": 1.0})  # warm-up
    runs = measure(
        cluster,
        rounds,
        {
            "direct": lambda: run_direct("svm", data, 0, scratch),
            "operation": lambda: run_direct("op-svm", data, 0, scratch),
            "csml": lambda: run_csml(client, "dlib", "train_svm", data, SVM_PARAMS),
        },
        "dlib",
    )
    direct, op, via = runs["direct"], runs["operation"], runs["csml"]

    def train(r: dict[str, Any]) -> float:
        return float(r["train_s"] if "train_s" in r else r["result"]["training_seconds"])

    def wall(r: dict[str, Any]) -> float:
        return float(r["wall_s"])

    def cpu(r: dict[str, Any]) -> float:
        return float(r["cpu_s"])

    last = via[-1]["result"]
    return {
        "direct_train_s": round(median([train(r) for r in direct]), 3),
        "direct_wall_s": round(median([wall(r) for r in direct]), 3),
        "operation_train_s": round(median([train(r) for r in op]), 3),
        "operation_wall_s": round(median([wall(r) for r in op]), 3),
        "csml_train_s": round(median([train(r) for r in via]), 3),
        "csml_wall_s": round(median([wall(r) for r in via]), 3),
        "train_ratio_csml_over_direct": round(paired(via, direct, train), 3),
        "wall_ratio_csml_over_operation": round(paired(via, op, wall), 3),
        "cpu_ratio_csml_over_operation": round(paired(via, op, cpu), 3),
        "wall_ratio_csml_over_direct": round(paired(via, direct, wall), 3),
        "platform_overhead_s": round(
            median([wall(a) - wall(b) for a, b in zip(via, op, strict=True)]), 3
        ),
        "everything_else_cpu_s_median": round(
            median([r["cpu"]["everything_else_cpu_s"] for v in runs.values() for r in v]), 2
        ),
        "train_accuracy": last["train_accuracy"],
        "binary_machines": last["binary_machines"],
        "support_vectors": last["support_vectors"],
        "rounds": {k: [_short(r) for r in v] for k, v in runs.items()},
    }


def bench_dynet(
    cluster: Any, data: Path, rounds: int, epochs: int, scratch: Path
) -> dict[str, Any]:
    client = cluster.new_user(timeout=1800)
    params = {**MLP_PARAMS, "epochs": epochs}
    run_csml(client, "dynet", "train_mlp", data, {**params, "epochs": 1})  # warm-up
    runs = measure(
        cluster,
        rounds,
        {
            "direct": lambda: run_direct("mlp", data, epochs, scratch),
            "operation": lambda: run_direct("op-mlp", data, epochs, scratch),
            "csml": lambda: run_csml(client, "dynet", "train_mlp", data, params),
        },
        "dynet",
    )
    direct, op, via = runs["direct"], runs["operation"], runs["csml"]

    def loop_eps(r: dict[str, Any]) -> float:
        if "epochs_per_s_train" in r:
            return float(r["epochs_per_s_train"])
        return float(r["result"]["epochs_per_second"])

    def wall_eps(r: dict[str, Any]) -> float:
        return epochs / float(r["wall_s"])

    def cpu_eps(r: dict[str, Any]) -> float:
        return epochs / float(r["cpu_s"])

    return {
        "epochs": epochs,
        "direct_loop_epochs_per_s": round(median([loop_eps(r) for r in direct]), 3),
        "direct_wall_epochs_per_s": round(median([wall_eps(r) for r in direct]), 3),
        "operation_loop_epochs_per_s": round(median([loop_eps(r) for r in op]), 3),
        "operation_wall_epochs_per_s": round(median([wall_eps(r) for r in op]), 3),
        "csml_loop_epochs_per_s": round(median([loop_eps(r) for r in via]), 3),
        "csml_wall_epochs_per_s": round(median([wall_eps(r) for r in via]), 3),
        "loop_ratio_direct_over_csml": round(paired(direct, via, loop_eps), 3),
        "wall_ratio_operation_over_csml": round(paired(op, via, wall_eps), 3),
        "cpu_ratio_operation_over_csml": round(paired(op, via, cpu_eps), 3),
        "wall_ratio_direct_over_csml": round(paired(direct, via, wall_eps), 3),
        "everything_else_cpu_s_median": round(
            median([r["cpu"]["everything_else_cpu_s"] for v in runs.values() for r in v]), 2
        ),
        "final_loss_direct": direct[-1]["final_loss"],
        "final_loss_csml": via[-1]["result"]["final_loss"],
        "rounds": {k: [_short(r) for r in v] for k, v in runs.items()},
    }


def _short(run: dict[str, Any]) -> dict[str, Any]:
    """A run (or a result) without its long lists."""
    out = {k: v for k, v in run.items() if k not in ("history", "feature_names")}
    if isinstance(out.get("result"), dict):
        out["result"] = _short(out["result"])
    return out


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    if "dlib" in results:
        d = results["dlib"]
        enough = d["direct_train_s"] >= MIN_DIRECT_SVM_S
        rows.append(
            _target(
                "dlib training s: through CSML / direct",
                d["train_ratio_csml_over_direct"],
                None if enough else f"direct training {d['direct_train_s']} s < 2 s",
            )
        )
        rows.append(
            _target("dlib train_svm wall: CSML / operation", d["wall_ratio_csml_over_operation"])
        )
        rows.append(
            _info("dlib train_svm CPU: CSML / operation", d["cpu_ratio_csml_over_operation"])
        )
        rows.append(_info("dlib train_svm wall: CSML / direct", d["wall_ratio_csml_over_direct"]))
        rows.append(
            _info(
                "dlib seconds: direct / operation / CSML",
                f"{d['direct_wall_s']} / {d['operation_wall_s']} / {d['csml_wall_s']}",
            )
        )
    if "dynet" in results:
        n = results["dynet"]
        rows.append(
            _target("dynet MLP loop epochs/s: direct / CSML", n["loop_ratio_direct_over_csml"])
        )
        rows.append(
            _target(
                "dynet train_mlp epochs/s: operation / CSML", n["wall_ratio_operation_over_csml"]
            )
        )
        rows.append(
            _info(
                "dynet train_mlp epochs/CPU-s: operation / CSML", n["cpu_ratio_operation_over_csml"]
            )
        )
        rows.append(
            _info("dynet train_mlp epochs/s: direct / CSML", n["wall_ratio_direct_over_csml"])
        )
        rows.append(
            _info(
                "dynet epochs/s (wall): direct / operation / CSML",
                f"{n['direct_wall_epochs_per_s']} / {n['operation_wall_epochs_per_s']} / "
                f"{n['csml_wall_epochs_per_s']}",
            )
        )
    return rows


def _target(metric: str, reached: float, not_applicable: str | None = None) -> dict[str, Any]:
    if not_applicable:
        status = f"- ({not_applicable})"
    else:
        status = "PASS" if reached <= TARGET_RATIO else "MISS"
    return {"metric": metric, "target": f"<= {TARGET_RATIO}", "reached": reached, "status": status}


def _info(metric: str, reached: Any) -> dict[str, Any]:
    return {"metric": metric, "target": "-", "reached": reached, "status": "-"}


def print_table(machine: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    print()
    print(
        f"machine: {machine['cpu_model']}, {machine['logical_cores']} cores, Python "
        f"{machine['python']}, dlib {machine['dlib']}, dynet {machine['dynet']}, "
        f"load {machine['load_avg_at_start']}"
    )
    width = max(len(r["metric"]) for r in rows)
    print(f"{'metric':<{width}}  {'target':>7}  {'reached':>16}  status")
    print("-" * (width + 40))
    for r in rows:
        print(f"{r['metric']:<{width}}  {r['target']:>7}  {r['reached']!s:>16}  {r['status']}")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 round, less data (smoke test)")
    p.add_argument("--rounds", type=int, help="measured rounds per side [5; quick 1]")
    p.add_argument("--epochs", type=int, help="MLP epochs [20; quick 5]")
    p.add_argument("--only", default="dlib,dynet", help="comma-separated subset of dlib,dynet")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--direct", choices=["svm", "mlp", "op-svm", "op-mlp"], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.direct:  # a baseline's own process
        if a.direct == "svm":
            out: dict[str, Any] = direct_svm(a.data)
        elif a.direct == "mlp":
            out = direct_mlp(a.data, a.epochs, a.scratch / "direct-mlp.params")
        else:
            out = operation_without_csml(a.direct, a.data, a.epochs, a.scratch)
        print(json.dumps(out))
        return 0

    import shutil

    from cluster import Cluster

    rounds = a.rounds or (1 if a.quick else 5)
    epochs = a.epochs or (5 if a.quick else 20)
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    machine = machine_info()
    root = Path(tempfile.mkdtemp(prefix="csml-bench-apps-"))
    _say(f"working in {root}")
    data = root / "digits.csv"
    dataset = make_digits_csv(data, shifts=2 if a.quick else 8)
    _say(f"data: {dataset}")
    results: dict[str, Any] = {"dataset": dataset}
    try:
        with Cluster(root / "cluster") as cluster:
            cluster.start_coordinator()
            if "dlib" in only:
                cluster.start_workers("dlib", 1, 1)
            if "dynet" in only:
                cluster.start_workers("dynet", 1, 1)
            if "dlib" in only:
                results["dlib"] = bench_dlib(cluster, data, rounds, root)
            if "dynet" in only:
                results["dynet"] = bench_dynet(cluster, data, rounds, epochs, root)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")
    rows = summary_rows(results)
    results["summary"] = rows
    print_table(machine, rows)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"apps-{datetime.now():%Y%m%d-%H%M%S}.json"
    doc = {
        "machine": machine,
        "config": {
            "rounds": rounds,
            "epochs": epochs,
            "quick": a.quick,
            "svm": SVM_PARAMS,
            "mlp": MLP_PARAMS,
        },
        **results,
    }
    path.write_text(json.dumps(doc, indent=2, default=str))
    print(f"\nwritten {path}")
    return 0 if all(r["status"] != "MISS" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
