"""Confidential jobs: what end-to-end encryption costs.

    /work/venv/bin/python bench/confidential.py             # 200 images, 1 GiB stream
    /work/venv/bin/python bench/confidential.py --quick     # 40 images, 256 MiB
    /work/venv/bin/python bench/confidential.py --only crypto

(crypto) Throughput of the streaming construction on a file (secretstream in 1 MiB
         chunks, file -> file, encrypt and decrypt) versus a plain copy of the same file,
         plus the cipher alone in memory; and, as the evaluated alternative, AES-256-GCM in
         a STREAM construction (OpenSSL through `cryptography`; this bench only, not shipped).
(faces)  `opencv detect_faces` over the same images through a real loopback cluster
         (1 worker x 2 slots, 8 client threads), plain versus confidential (the worker is
         unattested `none`, so the figure is the cost of the encryption and protocol, not
         of a TEE), in alternating passes. Results land in bench/results/confidential-*.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from core import drain, machine_info, ms_summary
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl import bindings as sodium

from cluster import Cluster, CpuWindow
from csml.client import Client
from csml.crypto import (
    CHUNK_SIZE,
    associated_data,
    decrypt_file,
    encrypt_file,
    new_data_key,
    new_job_nonce,
)

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
TARGET_RATIO = 1.10
TARGET_GBPS = 1.0
MIB = 1 << 20


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- crypto ----------------------------------------------------------------------


def _copy(src: BinaryIO, dst: BinaryIO) -> None:
    while chunk := src.read(CHUNK_SIZE):
        dst.write(chunk)


def aes_gcm_stream_encrypt(src: BinaryIO, dst: BinaryIO, key: bytes, ad: bytes) -> None:
    """STREAM (Hoang et al. 2015) over AES-256-GCM: nonce = 7-byte random prefix ||
    32-bit chunk counter || last-chunk flag. For comparison only."""
    aead = AESGCM(key)
    prefix = secrets.token_bytes(7)
    dst.write(prefix)
    counter = 0
    chunk = src.read(CHUNK_SIZE)
    while True:
        following = src.read(CHUNK_SIZE) if len(chunk) == CHUNK_SIZE else b""
        last = not following
        nonce = prefix + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")
        dst.write(aead.encrypt(nonce, chunk, ad))
        if last:
            return
        counter += 1
        chunk = following


def _timed(fn: Callable[[], None], repeat: int, fresh: list[Path] | None = None) -> float:
    """Best of `repeat`; the files in `fresh` are deleted (untimed) before each run, so
    every run writes a new file, as an upload or download does."""
    best = float("inf")
    for _ in range(repeat):
        for path in fresh or []:
            path.unlink(missing_ok=True)
        os.sync()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_crypto(root: Path, mib: int, repeat: int) -> dict[str, Any]:
    src = root / "plain.bin"
    with open(src, "wb") as f:
        block = os.urandom(MIB)
        for _ in range(mib):
            f.write(block)
    size = src.stat().st_size
    key, ad = new_data_key(), associated_data("input", new_job_nonce(), "data")
    out, back = root / "out.bin", root / "back.bin"

    def copy() -> None:
        with open(src, "rb") as s, open(out, "wb") as d:
            _copy(s, d)

    def enc() -> None:
        with open(src, "rb") as s, open(out, "wb") as d:
            encrypt_file(s, d, key, ad)

    def dec() -> None:
        with open(out, "rb") as s, open(back, "wb") as d:
            decrypt_file(s, d, key, ad)

    def aes() -> None:
        with open(src, "rb") as s, open(out, "wb") as d:
            aes_gcm_stream_encrypt(s, d, key, ad)

    results: dict[str, float] = {}
    _say(f"(crypto) {mib} MiB file: plain copy ...")
    results["plain_copy"] = _timed(copy, repeat, [out])
    _say("(crypto) secretstream encrypt / decrypt ...")
    results["secretstream_encrypt_file"] = _timed(enc, repeat, [out])
    results["secretstream_decrypt_file"] = _timed(dec, repeat, [back])
    with open(back, "rb") as a, open(src, "rb") as b:
        assert a.read(MIB) == b.read(MIB), "round trip failed"
    _say("(crypto) AES-256-GCM STREAM encrypt ...")
    results["aes256gcm_stream_encrypt_file"] = _timed(aes, repeat, [out])

    # The ciphers alone, in memory (64 chunks of 1 MiB).
    chunk = os.urandom(CHUNK_SIZE)
    n = 64

    def ss_mem() -> None:
        state = sodium.crypto_secretstream_xchacha20poly1305_state()
        sodium.crypto_secretstream_xchacha20poly1305_init_push(state, key)
        for _ in range(n):
            sodium.crypto_secretstream_xchacha20poly1305_push(state, chunk, ad)

    def aes_mem() -> None:
        aead = AESGCM(key)
        for i in range(n):
            aead.encrypt(i.to_bytes(12, "big"), chunk, ad)

    def memcpy() -> None:
        sink = io.BytesIO()
        for _ in range(n):
            sink.write(chunk)

    mem = {
        "memory_copy": _timed(memcpy, repeat),
        "secretstream_in_memory": _timed(ss_mem, repeat),
        "aes256gcm_in_memory": _timed(aes_mem, repeat),
    }
    gbps = {k: round(size / v / 1e9, 3) for k, v in results.items()}
    gbps.update({k: round(n * CHUNK_SIZE / v / 1e9, 3) for k, v in mem.items()})
    for path in (src, out, back):
        path.unlink(missing_ok=True)
    return {
        "file_bytes": size,
        "chunk_bytes": CHUNK_SIZE,
        "best_of": repeat,
        "gb_per_s": gbps,
        "secretstream_encrypt_over_copy": round(
            results["secretstream_encrypt_file"] / results["plain_copy"], 2
        ),
        "via": "libsodium through PyNaCl's bindings; AES-GCM through OpenSSL (cryptography)",
    }


# -- faces -----------------------------------------------------------------------


def _faces_pass(
    cluster: Cluster, images: list[Path], out_dir: Path, threads: int, confidential: bool
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    clients = [cluster.new_user(timeout=300) for _ in range(threads)]

    def one(client: Client, path: Path) -> tuple[str, int | None]:
        job = client.submit(
            "opencv",
            "detect_faces",
            files={"image": path},
            confidential=confidential,
            allow_unattested=confidential,
        )
        job.wait(timeout=600)
        if job.state.value != "succeeded":
            return path.name, None
        job.download("annotated", out_dir / f"{path.stem}.png")
        return path.name, int((job.result or {}).get("count", -1))

    with CpuWindow(cluster.pids()) as cpu:
        rows = drain(clients, images, one)
    for c in clients:
        c.close()
    return {
        "wall_s": cpu.wall,
        "faces": {n: c for n, c in rows if c is not None},
        "failed": sum(1 for _, c in rows if c is None),
        "cpu": cpu.report(),
    }


def run_faces(root: Path, count: int, rounds: int, threads: int) -> dict[str, Any]:
    from faces import make_images

    images = make_images(root / "images", count)
    cluster = Cluster(root / "cluster")
    passes: dict[str, list[dict[str, Any]]] = {"plain": [], "confidential": []}
    try:
        cluster.start_coordinator()
        cluster.start_workers("opencv", 1, 2)
        _say("(faces) warm-up ...")
        _faces_pass(cluster, images[:8], root / "warm", 4, True)
        for r in range(rounds):
            order = ("plain", "confidential") if r % 2 == 0 else ("confidential", "plain")
            for kind in order:
                _say(f"(faces) round {r + 1}/{rounds}: {kind} ...")
                out = root / f"out-{kind}-{r}"
                passes[kind].append(
                    _faces_pass(cluster, images, out, threads, kind == "confidential")
                )
                shutil.rmtree(out, ignore_errors=True)
    finally:
        cluster.stop()
    walls = {k: [p["wall_s"] for p in v] for k, v in passes.items()}
    total = {k: sum(v) for k, v in walls.items()}
    cpu = {
        k: round(sum(sum(x["cpu_s"] for x in p["cpu"]["processes"].values()) for p in v), 2)
        for k, v in passes.items()
    }
    by_process: dict[str, dict[str, float]] = {}
    for kind, runs in passes.items():
        for run in runs:
            for name, used in run["cpu"]["processes"].items():
                slot = by_process.setdefault(name, {})
                slot[kind] = round(slot.get(kind, 0.0) + used["cpu_s"], 2)
    plain_faces = passes["plain"][0]["faces"]
    mismatched = sorted(
        n for p in passes["confidential"] for n, c in p["faces"].items() if plain_faces.get(n) != c
    )
    return {
        "images": len(images),
        "rounds_each": rounds,
        "wall_s": {k: [round(x, 3) for x in v] for k, v in walls.items()},
        "per_image_ms": {k: round(1000 * total[k] / (rounds * len(images)), 1) for k in total},
        "ratio_confidential_over_plain": round(total["confidential"] / total["plain"], 3),
        "cpu_s_all_processes": cpu,
        "cpu_ratio": round(cpu["confidential"] / cpu["plain"], 3),
        "cpu_s_by_process": by_process,
        "failed_jobs": sum(p["failed"] for v in passes.values() for p in v),
        "face_count_mismatches": mismatched,
        "everything_else_cpu_s": {
            k: [p["cpu"]["everything_else_cpu_s"] for p in v] for k, v in passes.items()
        },
        "per_image_wall_ms": ms_summary(
            [p["wall_s"] / len(images) for v in passes.values() for p in v]
        ),
    }


# -- report ----------------------------------------------------------------------


def summary(results: dict[str, Any]) -> list[tuple[str, str, Any, str]]:
    rows = []
    if "faces" in results:
        r = results["faces"]["ratio_confidential_over_plain"]
        ok = r <= TARGET_RATIO and not results["faces"]["failed_jobs"]
        rows.append(("faces: confidential / plain wall", f"<= {TARGET_RATIO}", r, ok))
    if "crypto" in results:
        g = results["crypto"]["gb_per_s"]
        rows.append(
            (
                "secretstream encrypt, file -> file (GB/s)",
                f">= {TARGET_GBPS}",
                g["secretstream_encrypt_file"],
                g["secretstream_encrypt_file"] >= TARGET_GBPS,
            )
        )
        rows.append(("plain copy, file -> file (GB/s)", "-", g["plain_copy"], None))
        rows.append(
            (
                "AES-256-GCM STREAM encrypt, file -> file (GB/s)",
                "-",
                g["aes256gcm_stream_encrypt_file"],
                None,
            )
        )
    return [(m, t, v, "-" if ok is None else "PASS" if ok else "MISS") for m, t, v, ok in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="40 images, 256 MiB")
    p.add_argument("--images", type=int, help="images per pass [200; quick 40]")
    p.add_argument("--rounds", type=int, default=2, help="passes of each kind, alternating")
    p.add_argument("--threads", type=int, default=8, help="client threads")
    p.add_argument("--mib", type=int, help="size of the streamed file [1024; quick 256]")
    p.add_argument("--repeat", type=int, default=3, help="best of N for the crypto figures")
    p.add_argument("--only", default="crypto,faces", help="crypto, faces")
    p.add_argument("--base-dir", help="parent of the temporary folder")
    a = p.parse_args(argv)
    only = {s.strip() for s in a.only.split(",")}
    root = Path(tempfile.mkdtemp(prefix="csml-bench-conf-", dir=a.base_dir))
    machine = machine_info(a.base_dir or tempfile.gettempdir())
    results: dict[str, Any] = {}
    try:
        if "crypto" in only:
            results["crypto"] = run_crypto(root, a.mib or (256 if a.quick else 1024), a.repeat)
        if "faces" in only:
            count = a.images or (40 if a.quick else 200)
            results["faces"] = run_faces(root, count, a.rounds, a.threads)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = summary(results)
    print(
        f"\nmachine: {machine['cpu_model']}, {machine['logical_cores']} cores, "
        f"load {machine['load_avg_at_start']}"
    )
    for name, data in results.items():
        print(f"\n[{name}]")
        for key, value in data.items():
            print(f"  {key}: {json.dumps(value) if isinstance(value, dict | list) else value}")
    print()
    width = max(len(r[0]) for r in rows)
    for metric, target, value, status in rows:
        print(f"{metric:<{width}}  {target:>8}  {value!s:>8}  {status}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"confidential-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"machine": machine, **results, "summary": rows}, indent=2))
    print(f"\nwritten {path}")
    return 0 if all(r[3] != "MISS" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
