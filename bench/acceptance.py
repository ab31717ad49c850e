"""Every acceptance benchmark of issue 11, in sequence, and one table of the results.

    /work/venv/bin/python bench/acceptance.py            # full: about 20-30 minutes
    /work/venv/bin/python bench/acceptance.py --quick    # smoke test of every part
    /work/venv/bin/python bench/acceptance.py --only batch,e
    make bench-full                                      # the same, full

Parts, each its own script run as a subprocess (its own output streams through):

- core.py: (a) 2,000 no-op jobs through the SDK, both ways (one `submit` per job, and
  `submit_many` over the batch route), with the Celery + Redis anchor in the same run,
  the SIGKILL durability check and CPU-ms per job of each process role, (b) one job at
  a time, (c) face detection over 200 photos vs Pool(2), (d) coordinator CPU, SQL
  statements and fsyncs per job;
- batch_photos.py: (c) 1,000 small photos through `csml batch` vs Pool(2);
- coordinators.py: (e) PostgreSQL with 1, 2, 4 coordinators, free and CPU-capped.

`--only` takes a comma-separated subset of a, b, c, d, batch, e (a, b, c and d are one
core.py run; d needs a). The machine's load (`uptime`) is recorded before and after
every part and shown next to its rows: this machine is shared, and a part measured
under load says so. One table with target / reached / PASS-MISS, and everything in
bench/results/acceptance-<timestamp>.json (each part's own JSON is kept too).
Exit status 1 if any target was missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
ALL = ("a", "b", "c", "d", "batch", "e")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load average {os.getloadavg()}"


def run_part(name: str, argv: list[str]) -> dict[str, Any]:
    """Run one script, stream its output, return its JSON (path from `written <path>`
    or the --json-out given) with the load around it."""
    print(f"\n===== {name}: {' '.join(argv)}", flush=True)
    before, load0, t0 = uptime(), [round(x, 2) for x in os.getloadavg()], time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, *argv], stdout=subprocess.PIPE, text=True, cwd=BENCH_DIR.parent
    )
    written = None
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.startswith("written "):
            written = line.split(" ", 1)[1].strip()
    status = proc.wait()
    out: dict[str, Any] = {
        "exit_status": status,
        "seconds": round(time.monotonic() - t0, 1),
        "uptime_before": before,
        "load_before": load0,
        "uptime_after": uptime(),
    }
    if written and Path(written).exists():
        out["json"] = written
        out["result"] = json.loads(Path(written).read_text())
    else:
        out["error"] = "no result written (see its output above)"
    return out


NOISY_SHARE = 0.25  # other processes above this share of the machine: wall figures are noise
WINDOWS = {"a": "throughput", "d": "throughput", "c": "opencv"}


def others_share(cpu: dict[str, Any] | None) -> float:
    """The share of the machine's CPU other processes took during a CpuWindow report."""
    if not cpu:
        return 0.0
    return float(cpu["everything_else_cpu_s"] / max(1e-9, (os.cpu_count() or 1) * cpu["wall_s"]))


def noise_note(share: float) -> str:
    if share <= NOISY_SHARE:
        return ""
    return f"other processes took {share:.0%} of the machine during the window(s)"


def rows_core(part: dict[str, Any], wanted: set[str]) -> list[dict[str, Any]]:
    rows = []
    res = part.get("result", {})
    for r in res.get("summary", []):
        tag = r["metric"][1 : r["metric"].index(")")] if r["metric"].startswith("(") else ""
        if set(tag.split(",")) & wanted:
            window = (res.get(r.get("window") or WINDOWS.get(tag, ""), {}) or {}).get("cpu")
            counts = any(
                w in r["metric"] for w in ("requests per", "statements", "commits", "CPU-ms per")
            )
            note = "" if counts else noise_note(others_share(window))
            rows.append({**r, "note": note})
    return rows


def rows_batch(part: dict[str, Any]) -> list[dict[str, Any]]:
    r = part.get("result")
    if not r:
        return []
    return [
        {
            "metric": f"(c) csml batch {r['photos']} photos / Pool(2), wall",
            "target": f"<= {r['target_ratio']}",
            "reached": r["ratio_wall_end_to_end"],
            "status": r["status"],
            "note": r.get("note", ""),
        },
        {
            "metric": "(c) csml batch / Pool(2), warm wall",
            "target": "-",
            "reached": r["ratio_wall_warm"],
            "status": "-",
        },
        {
            "metric": "(c) csml batch / Pool(2), CPU",
            "target": "-",
            "reached": r["ratio_cpu"],
            "status": "-",
        },
    ]


def rows_coordinators(part: dict[str, Any]) -> list[dict[str, Any]]:
    res = part.get("result", {})
    rows = []
    for r in res.get("summary", []):
        words = r["metric"].split()
        mode = "capped" if words[1] == "capped" else "uncapped"
        n = words[2] if mode == "capped" else words[1]
        runs = res.get(mode) or {}
        involved = (
            [runs.get(n), runs.get("1")]
            if mode == "capped" or "vs one" in r["metric"]
            else [runs.get(n)]
        )
        shares = [others_share(x.get("cpu")) for x in involved if isinstance(x, dict)]
        rows.append({**r, "note": noise_note(max(shares, default=0.0))})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every part's smoke-test size")
    p.add_argument("--only", default=",".join(ALL), help=f"subset of {','.join(ALL)}")
    p.add_argument("--no-anchor", action="store_true", help="core.py without Celery + Redis")
    a = p.parse_args(argv)
    wanted = {s.strip() for s in a.only.split(",") if s.strip()}
    unknown = wanted - set(ALL)
    if unknown:
        p.error(f"unknown parts: {sorted(unknown)}")
    quick = ["--quick"] if a.quick else []
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    report: dict[str, Any] = {"started": uptime(), "quick": a.quick, "parts": {}}
    table: list[dict[str, Any]] = []

    core_parts = sorted({"a" if x == "d" else x for x in wanted} & {"a", "b", "c"})
    if core_parts:
        argv_core = ["bench/core.py", *quick, "--only", ",".join(core_parts)]
        argv_core += ["--no-anchor"] if a.no_anchor else []
        part = run_part("core (a, b, c, d)", argv_core)
        report["parts"]["core"] = part
        table += [{**r, "load": part["load_before"][0]} for r in rows_core(part, wanted)]
    if "batch" in wanted:
        out = RESULTS / f"batch-photos-{stamp}.json"
        part = run_part(
            "batch photos (c)", ["bench/batch_photos.py", *quick, "--json-out", str(out)]
        )
        report["parts"]["batch_photos"] = part
        table += [{**r, "load": part["load_before"][0]} for r in rows_batch(part)]
    if "e" in wanted:
        out = RESULTS / f"coordinators-{stamp}.json"
        part = run_part(
            "coordinators (e)", ["bench/coordinators.py", *quick, "--json-out", str(out)]
        )
        report["parts"]["coordinators"] = part
        table += [{**r, "load": part["load_before"][0]} for r in rows_coordinators(part)]

    failed_parts = [name for name, part in report["parts"].items() if "result" not in part]
    report["finished"] = uptime()
    report["table"] = table
    print_table(report, failed_parts)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"acceptance-{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"written {path}")
    missed = any(r["status"] == "MISS" for r in table) or failed_parts
    return 1 if missed else 0


def print_table(report: dict[str, Any], failed_parts: list[str]) -> None:
    table = report["table"]
    print("\n===== acceptance (issue 11)" + (" -- quick sizes" if report["quick"] else ""))
    print(f"started:  {report['started']}")
    print(f"finished: {report['finished']}")
    print("shared machine: 'load' is the 1-minute load average when the part started")
    if table:
        width = max(len(r["metric"]) for r in table)
        print(f"{'metric':<{width}}  {'target':>9}  {'reached':>10}  {'status':<6}  load")
        print("-" * (width + 40))
        for r in table:
            print(
                f"{r['metric']:<{width}}  {r['target']:>9}  {r['reached']!s:>10}  "
                f"{r['status']:<6}  {r['load']}" + ("  (*)" if r.get("note") else "")
            )
        for r in table:
            if r.get("note"):
                print(f"(*) {r['metric']}: {r['note']}")
    for name, part in report["parts"].items():
        res = part.get("result") or {}
        others = _everything_else(name, res)
        print(
            f"{name}: exit {part['exit_status']}, {part['seconds']} s; load "
            f"{part['load_before']} -> {part['uptime_after'].split('load average:')[-1].strip()}"
            + (f"; everything else's CPU-s per window: {others}" if others else "")
        )
    for name in failed_parts:
        print(f"{name}: FAILED, no result ({report['parts'][name].get('error')})")


def _everything_else(name: str, res: dict[str, Any]) -> dict[str, float]:
    """CPU seconds other processes took during each measured window of a part."""
    out: dict[str, float] = {}
    if name == "core":
        for key in ("throughput", "throughput_batch", "latency", "opencv"):
            cpu = (res.get(key) or {}).get("cpu")
            if cpu:
                out[key] = cpu["everything_else_cpu_s"]
    elif name == "batch_photos" and res:
        out["pool before"] = res["pool"]["windows"][0]["everything_else_cpu_s"]
        out["csml batch"] = res["csml_batch"]["cpu"]["everything_else_cpu_s"]
        out["pool after"] = res["pool"]["windows"][1]["everything_else_cpu_s"]
    elif name == "coordinators":
        for mode in ("uncapped", "capped"):
            for n, r in (res.get(mode) or {}).items():
                if isinstance(r, dict) and "cpu" in r:
                    out[f"{mode} {n}"] = r["cpu"]["everything_else_cpu_s"]
    return out


if __name__ == "__main__":
    sys.exit(main())
