"""(c)'s work itself: `detect_faces` CPU per photo in CSML's job children vs Pool(2)'s processes.

    PYTHONPATH=src /work/venv/bin/python bench/face_children.py            # 300 photos, 2 rounds
    PYTHONPATH=src /work/venv/bin/python bench/face_children.py --owners 8 --sides 300,600

No coordinator and no HTTP: a real `Sandbox` (zygote, job children, isolation: run it as
root for a uid per owner) in this process, fed by `--slots` threads as a worker's slots
feed it, against `multiprocessing.Pool(2)` (`faces.run_baseline`'s work) on the same
files, alternately, `--rounds` times. Jobs go to `--owners` owners in turn (one child
each, reused; (c) has 8 identities, the 1,000-photo batch 1). The sandbox sizes each
job's library thread pools as a worker of `--slots` slots does (`isolation.job_threads`);
`--pool-threads N` gives the pool's processes N OpenCV threads (default: OpenCV's own).

Per photo, for each side: CPU of the processes doing the work (the job children, the
pool's processes), minor page faults, voluntary and involuntary context switches, the
threads per process, and the wall; for CSML also this process's CPU (the worker's side
of the sandbox: file hand-over, channel, supervision). Then the extra CPU of a fresh
child (a child per job) over a reused one. Counts are load-robust; CPU and wall are not:
the load average is printed with each line.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from faces import _init_worker, _ready, detect_file, make_images

from csml.worker.sandbox import Sandbox, SandboxJob

TICKS = os.sysconf("SC_CLK_TCK")
Counts = dict[str, float]


def counts(pids: list[int], reaped: bool = False) -> Counts:
    """CPU seconds, minor faults and context switches of processes (with `reaped`, also
    what they reaped: a zygote's ended children)."""
    out: Counts = {"cpu_s": 0.0, "minor_faults": 0.0, "voluntary_cs": 0.0, "involuntary_cs": 0.0}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        cpu = int(fields[11]) + int(fields[12])
        faults = int(fields[7])
        if reaped:
            cpu += int(fields[13]) + int(fields[14])
            faults += int(fields[8])
        out["cpu_s"] += cpu / TICKS
        out["minor_faults"] += faults
        for line in status:
            name, _, value = line.partition(":")
            if name == "voluntary_ctxt_switches":
                out["voluntary_cs"] += int(value)
            elif name == "nonvoluntary_ctxt_switches":
                out["involuntary_cs"] += int(value)
    return out


def per_photo(before: Counts, after: Counts, photos: int) -> dict[str, float]:
    out = {k: (after[k] - before[k]) / photos for k in before}
    out["cpu_ms"] = 1000 * out.pop("cpu_s")
    return {k: round(v, 2) for k, v in out.items()}


def pool_side(photos: list[Path], out: Path, threads: int | None) -> dict[str, Any]:
    out.mkdir(exist_ok=True)
    jobs = [(str(p), str(out / f"{p.stem}.png")) for p in photos]
    if threads:
        os.environ["OPENCV_FOR_THREADS_NUM"] = str(threads)  # the spawned processes read it
    try:
        with multiprocessing.get_context("spawn").Pool(2, initializer=_init_worker) as pool:
            pool.map(_ready, range(2), chunksize=1)
            pids = [p.pid for p in pool._pool]  # type: ignore[attr-defined]
            before, start = counts(pids), time.perf_counter()
            pool.map(detect_file, jobs, chunksize=1)
            wall = time.perf_counter() - start
            result = per_photo(before, counts(pids), len(photos))
            result["threads_per_process"] = max(psutil.Process(p).num_threads() for p in pids)
    finally:
        os.environ.pop("OPENCV_FOR_THREADS_NUM", None)
    result["wall_s"] = round(wall, 3)
    return result


class SandboxSide:
    """A worker's sandbox and its slot threads, in this process."""

    def __init__(self, root: Path, slots: int) -> None:
        self.root, self.slots = root, slots
        self.sandbox = Sandbox("opencv", workdir=root / "work", slots=slots)
        self.description = self.sandbox.description  # (waits for the zygote)
        self.zygote = self.sandbox._zygote.pid

    def run(self, photos: list[Path], owners: list[str]) -> dict[str, Any]:
        todo: queue.SimpleQueue[tuple[int, Path]] = queue.SimpleQueue()
        for item in enumerate(photos):
            todo.put(item)

        def slot(number: int) -> None:
            folder = self.root / "work" / f"slot-{number}"  # reused, as the agent does
            (folder / "outputs").mkdir(parents=True, exist_ok=True)
            while True:
                try:
                    i, photo = todo.get_nowait()
                except queue.Empty:
                    return
                image = folder / f"image{photo.suffix}"
                shutil.copyfile(photo, image)
                job = SandboxJob(
                    "detect_faces", {}, {"image": image}, folder / "outputs", 60, 1024, 60
                )
                outcome = self.sandbox.run(job, owner=owners[i % len(owners)])
                if not outcome.ok:
                    raise RuntimeError(f"{photo.name}: {outcome.error}")
                for name in outcome.outputs or []:
                    (folder / "outputs" / name).unlink()
                image.unlink()

        before, own0 = self._children(), time.process_time()
        start = time.perf_counter()
        threads = [threading.Thread(target=slot, args=(n,)) for n in range(self.slots)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        own = time.process_time() - own0
        result = per_photo(before, self._children(), len(photos))
        children = psutil.Process(self.zygote).children()
        result["threads_per_process"] = max((c.num_threads() for c in children), default=0)
        result["children"] = len(children)
        result["worker_side_cpu_ms"] = round(1000 * own / len(photos), 2)
        result["wall_s"] = round(wall, 3)
        return result

    def _children(self) -> Counts:
        """The zygote's children, alive and reaped (the zygote itself only forks)."""
        alive = [c.pid for c in psutil.Process(self.zygote).children()]
        total = counts(alive)
        reaped = counts([self.zygote], reaped=True)
        own = counts([self.zygote])
        for k in total:
            total[k] += reaped[k] - own[k]
        return total

    def close(self) -> None:
        self.sandbox.close()


def fresh_child_cost(side: SandboxSide, photo: Path, jobs: int) -> dict[str, float]:
    """CPU-ms and faults per job of a child per job ("" owner) minus a reused child's."""
    one = [photo] * jobs
    rows = {}
    for label, owner in (("reused", "bench-owner"), ("fresh", "")):
        side.run(one[:2], [owner])  # warm (the reused child exists)
        time.sleep(0.3)
        before = side._children()
        side.run(one, [owner])
        time.sleep(0.5)  # ended children are reaped into the zygote's counts
        rows[label] = per_photo(before, side._children(), jobs)
    return {k: round(rows["fresh"][k] - rows["reused"][k], 2) for k in ("cpu_ms", "minor_faults")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--photos", type=int, default=300)
    p.add_argument("--sides", default="160,320", help="long side range, px [160,320: the batch's]")
    p.add_argument("--owners", type=int, default=1, help="owners the jobs go to in turn")
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pool-threads", type=int, help="OpenCV threads per pool process")
    p.add_argument("--fresh-jobs", type=int, default=40, help="jobs for the fresh-child cost")
    a = p.parse_args()
    low, high = (int(x) for x in a.sides.split(","))
    root = Path(tempfile.mkdtemp(prefix="csml-face-children-"))
    os.chmod(root, 0o711)
    try:
        photos = make_images(root / "photos", a.photos, sides=(low, high))
        owners = [f"owner-{i}" for i in range(a.owners)]
        side = SandboxSide(root, a.slots)
        print(side.description)
        print(f"{a.photos} photos {low}-{high} px; {a.owners} owner(s), {a.slots} slots")
        try:
            side.run(photos[: 2 * a.owners], owners)  # each owner's child exists, as Pool's
            for r in range(a.rounds):
                pool = pool_side(photos, root / "pool-out", a.pool_threads)
                print(f"round {r + 1} Pool(2)   {pool}  load {os.getloadavg()[0]:.2f}")
                csml = side.run(photos, owners)
                print(f"round {r + 1} sandbox   {csml}  load {os.getloadavg()[0]:.2f}")
                ratio = csml["cpu_ms"] / pool["cpu_ms"]
                print(f"round {r + 1} job children / pool processes, CPU per photo: {ratio:.3f}")
            extra = fresh_child_cost(side, photos[0], a.fresh_jobs)
            print(f"a fresh child per job, over a reused one, per job: {extra}")
        finally:
            side.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
