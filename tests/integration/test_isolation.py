"""The sandbox's isolation pieces, in process (and in forked children), and image headers."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import socket
import stat
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from csml.apps.base import JobError
from csml.apps.imagesafety import MAX_IMAGE_PIXELS, check_image_size, declared_size
from csml.worker import isolation, isolation_procs
from csml.worker.isolation_files import grant_files, hand_over, new_grant, remove_tmp, take_back

# Forks sandboxed job processes and waits for the kernel to reap them.
pytestmark = pytest.mark.timeout(120)

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root")


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG declaring width by height pixels, with a small IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 65536, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# -- image headers -------------------------------------------------------------


def _encoded(ext: str, params: list[int] | None = None, channels: int = 3) -> bytes:
    import cv2
    import numpy as np

    shape = (37, 53) if channels == 1 else (37, 53, channels)
    ok, data = cv2.imencode(ext, np.zeros(shape, np.uint8), params or [])
    assert ok
    return bytes(data.tobytes())


def _bigtiff(width: int, height: int) -> bytes:
    head = b"II+\x00" + struct.pack("<HHQ", 8, 0, 16)
    entries = [struct.pack("<HHQQ", 256, 4, 1, width), struct.pack("<HHQQ", 257, 16, 1, height)]
    return head + struct.pack("<Q", 2) + b"".join(entries)


def _tiff_be(width: int, height: int) -> bytes:
    ifd = struct.pack(">H", 2) + struct.pack(">HHII", 256, 3, 1, width << 16)
    return b"MM\x00*" + struct.pack(">I", 8) + ifd + struct.pack(">HHII", 257, 4, 1, height)


def _jpeg_with_big_exif() -> bytes:
    data = _encoded(".jpg", [1, 90, 2, 1])  # quality 90, progressive: SOF2
    app1 = b"\xff\xe1" + struct.pack(">H", 60002) + b"E" * 60000
    return data[:2] + app1 * 3 + data[2:]


CASES: dict[str, Callable[[], bytes]] = {
    "png": lambda: _encoded(".png"),
    "jpeg": lambda: _encoded(".jpg"),
    "jpeg progressive after 180 kB of EXIF": _jpeg_with_big_exif,
    "gif": lambda: _encoded(".gif"),
    "bmp": lambda: _encoded(".bmp"),
    "bmp os/2": lambda: b"BM" + b"\0" * 12 + struct.pack("<IHH", 12, 53, 37) + b"\0" * 16,
    "webp lossy": lambda: _encoded(".webp", [64, 80]),
    "webp lossless": lambda: _encoded(".webp", [64, 101]),
    "webp extended": lambda: _encoded(".webp", [64, 80], channels=4),
    "tiff": lambda: _encoded(".tiff"),
    "tiff big-endian": lambda: _tiff_be(53, 37),
    "bigtiff": lambda: _bigtiff(53, 37),
    "ppm": lambda: _encoded(".ppm"),
    "pgm with a comment": lambda: b"P5\n# made by hand\n53 37\n255\n" + b"\0" * 1961,
}


@pytest.mark.parametrize("kind", list(CASES))
def test_the_size_is_read_from_the_header(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "image"
    path.write_bytes(CASES[kind]())
    assert declared_size(path) == (53, 37)


@pytest.mark.parametrize(
    "data",
    [b"", b"hello", b"\x89PNG\r\n\x1a\n\0\0", b"\xff\xd8\xff\xd9", b"II*\x00\xff\xff\xff\x7f"],
)
def test_unknown_or_broken_headers_are_left_to_the_decoder(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "image"
    path.write_bytes(data)
    assert declared_size(path) is None
    check_image_size(path)  # no opinion: not refused here


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    import cv2  # noqa: F401 - loaded before measuring

    from csml.apps.opencv import read_image

    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(100_000, 100_000))
    assert path.stat().st_size < 1000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    message = (
        "input 'image' declares 100000 \N{MULTIPLICATION SIGN} 100000 pixels (10 gigapixels), "
        "over the limit of 256 megapixels"
    )
    with pytest.raises(JobError) as err:
        read_image(path)
    assert str(err.value) == message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 20 * 1024  # kB
    ok = tmp_path / "ok.png"
    ok.write_bytes(png_bomb(16_000, 16_000))  # 256 megapixels: at the limit, not over
    check_image_size(ok)
    assert MAX_IMAGE_PIXELS == 16_000 * 16_000


def test_opencv_itself_refuses_huge_images_in_the_zygote_environment(tmp_path: Path) -> None:
    """The second guard, for formats without a header reader here (PAM)."""
    pam = b"P7\nWIDTH 30000\nHEIGHT 20000\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n"
    (tmp_path / "huge.pam").write_bytes(pam + b"\0" * 100)
    code = (
        "import sys, cv2, numpy as np\n"
        "data = np.fromfile(sys.argv[1], np.uint8)\n"
        "try:\n    cv2.imdecode(data, cv2.IMREAD_COLOR)\n"
        "except cv2.error as exc:\n    print(exc)\n"
    )
    env = isolation.zygote_env({**os.environ, "CSML_JOIN_TOKEN": "csmljoin_x"})
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "huge.pam")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "pixels <= CV_IO_MAX_IMAGE_PIXELS" in out.stdout, out.stdout + out.stderr


# -- environment, description --------------------------------------------------


def test_the_zygote_and_jobs_get_no_secret() -> None:
    worker = {
        "CSML_JOIN_TOKEN": "csmljoin_secret",
        "AWS_SECRET_ACCESS_KEY": "x",
        "PATH": "/opt/bin:/usr/bin",
        "PYTHONPATH": "/apps",
        "OMP_NUM_THREADS": "2",
        "HOME": "/root",
    }
    zygote = isolation.zygote_env(worker)
    assert zygote == {
        "PATH": "/opt/bin:/usr/bin",
        "PYTHONPATH": "/apps",
        "OMP_NUM_THREADS": "2",
        "LANG": "C.UTF-8",
        "OPENCV_IO_MAX_IMAGE_PIXELS": "400000000",
    }
    job = isolation.job_env("/tmp/job-1", worker)
    assert job == {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "2",
        "OPENCV_IO_MAX_IMAGE_PIXELS": "400000000",
        "HOME": "/tmp/job-1",
        "TMPDIR": "/tmp/job-1",
    }


@pytest.mark.parametrize(
    ("features", "own_uid", "says"),
    [
        (["netns", "mountns", "hidepid"], True, "no network (netns); own random uid per owner"),
        (["userns-netns"], False, "no network (user+net namespace); worker's uid"),
        ([], False, "NO network isolation available"),
        (None, True, "sandbox not started"),
    ],
)
def test_the_description_says_what_is_active(
    features: list[str] | None, own_uid: bool, says: str
) -> None:
    text = isolation.describe(features, own_uid)
    assert says in text
    assert len(text) <= 200  # the registration field's limit


# -- namespaces and privileges, in forked children ------------------------------


def in_child(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `fn` in a forked child (namespaces and uids change for good) and return its dict."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            try:
                result = fn()
            except BaseException as exc:
                result = {"exception": f"{type(exc).__name__}: {exc}"}
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return dict(json.loads(data))


@pytest.fixture
def listener() -> Any:
    """A TCP server on loopback that the test process itself can reach."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with socket.create_connection(s.getsockname(), timeout=5):
            pass
        yield s.getsockname()


def _try_connect(address: tuple[str, int]) -> str:
    try:
        with socket.create_connection(address, timeout=2):
            return "connected"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


@needs_root
def test_as_root_the_zygote_gets_no_network_and_a_private_proc(listener: Any) -> None:
    def child() -> dict[str, Any]:
        features = isolation.isolate_zygote()
        return {"features": features, "connect": _try_connect(listener)}

    out = in_child(child)
    assert out["features"] == ["netns", "mountns", "hidepid"], out
    assert "Network is unreachable" in out["connect"]


@needs_root
def test_an_unprivileged_worker_uses_a_user_namespace(listener: Any) -> None:
    def child() -> dict[str, Any]:
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        isolation._prctl(isolation.PR_SET_DUMPABLE, 1)  # as after exec by a normal user
        features = isolation.isolate_zygote()
        return {"features": features, "uid": os.getuid(), "connect": _try_connect(listener)}

    out = in_child(child)
    assert out["features"] == ["userns-netns"], out
    assert out["uid"] == 65534
    assert "Network is unreachable" in out["connect"]


def test_without_namespaces_the_fallback_is_said(listener: Any, monkeypatch: Any) -> None:
    def refuse(flags: int) -> None:
        raise OSError(1, "unshare: Operation not permitted")

    monkeypatch.setattr(isolation, "_unshare", refuse)

    def child() -> dict[str, Any]:
        features = isolation.isolate_zygote()
        return {"features": features, "connect": _try_connect(listener)}

    out = in_child(child)
    assert out == {"features": [], "connect": "connected"}
    assert "NO network isolation" in isolation.describe(out["features"], ROOT)


@needs_root
def test_a_job_drops_every_privilege() -> None:
    uid = isolation.draw_uid()

    def child() -> dict[str, Any]:
        isolation.enter_job(uid, uid, isolation.job_env("/nonexistent"))
        with open("/proc/self/status") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        try:
            os.setuid(0)
            regained = True
        except PermissionError:
            regained = False
        return {
            "ids": [*os.getresuid(), *os.getresgid()],
            "groups": os.getgroups(),
            "status": {k: status[k] for k in ("NoNewPrivs", "CapEff", "CapPrm")},
            "dumpable": ctypes.CDLL(None).prctl(3, 0, 0, 0, 0),  # PR_GET_DUMPABLE
            "env": dict(os.environ),
            "umask": os.umask(0o077),
            "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
            "regained_root": regained,
        }

    out = in_child(child)
    assert isolation.UID_RANGE.start <= uid < isolation.UID_RANGE.stop
    assert out["ids"] == [uid] * 6
    assert out["groups"] == []
    assert out["status"] == {
        "NoNewPrivs": "1",
        "CapEff": "0000000000000000",
        "CapPrm": "0000000000000000",
    }
    assert out["dumpable"] == 0
    assert set(out["env"]) == {"PATH", "LANG", "HOME", "TMPDIR", "OPENCV_IO_MAX_IMAGE_PIXELS"}
    assert out["umask"] == 0o077
    assert out["nproc"] == isolation.JOB_NPROC
    assert out["regained_root"] is False


def test_the_zygote_kills_what_a_job_leaves_behind() -> None:
    def zygote() -> dict[str, Any]:
        isolation._prctl(isolation.PR_SET_CHILD_SUBREAPER, 1)
        r, w = os.pipe()
        job = os.fork()
        if job == 0:  # the job: a detached grandchild (setsid + double fork), then exit
            os.setsid()
            if os.fork() == 0:
                if (left := os.fork()) == 0:
                    time.sleep(60)
                    os._exit(0)
                os.write(w, str(left).encode())
                os._exit(0)
            os._exit(0)
        os.waitpid(job, 0)
        left = int(os.read(r, 32))
        deadline = time.monotonic() + 5
        while left not in isolation_procs.children(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.01)
        adopted = left in isolation_procs.children(os.getpid())
        clean = isolation_procs.sweep(())
        signum = None
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid == left:
                signum = os.WTERMSIG(status)
        return {"adopted": adopted, "clean": clean, "left_killed_by": signum}

    out = in_child(zygote)
    assert out["adopted"] and out["clean"], out
    assert out["left_killed_by"] == 9


# -- files handed over and taken back --------------------------------------------


@needs_root
def test_files_are_handed_to_the_job_and_taken_back(tmp_path: Path) -> None:
    tmp_root = tmp_path / "sandbox"
    tmp_root.mkdir(mode=0o700)
    work = tmp_path / "worker" / "job"
    (work / "inputs").mkdir(parents=True)
    (work / "outputs").mkdir()
    for d in (work, work.parent):
        d.chmod(0o700)
    data = work / "inputs" / "data"
    data.write_bytes(b"input")
    data.chmod(0o644)

    grant = hand_over([data], work / "outputs", tmp_root, own_uid=True)
    uid = grant.uid
    assert uid is not None and grant.gid == uid
    mode: Callable[[Path], tuple[int, int]] = lambda p: (  # noqa: E731
        p.stat().st_uid,
        stat.S_IMODE(p.stat().st_mode),
    )
    assert mode(data) == (uid, 0o400)
    assert mode(work / "outputs") == (uid, 0o700)
    assert mode(grant.tmp) == (uid, 0o700)
    assert mode(work) == (0, 0o701) and mode(work.parent) == (0, 0o701)  # traverse only
    assert grant.payload()["env"]["TMPDIR"] == str(grant.tmp)

    out = work / "outputs"
    (out / "annotated").write_bytes(b"made by the job")
    os.chown(out / "annotated", uid, uid)
    (out / "link").symlink_to("/etc/shadow")
    (out / "foreign").write_bytes(b"not the job's")  # e.g. a hard link to a root file
    (out / "sub").mkdir()
    os.mkfifo(out / "fifo")
    take_back(grant)
    assert sorted(p.name for p in out.iterdir()) == ["annotated"]
    assert mode(out / "annotated")[0] == 0
    assert mode(out) == (0, 0o700)
    assert mode(data) == (0, 0o400)
    remove_tmp(grant)
    assert not grant.tmp.exists()


@needs_root
def test_folders_known_to_be_traversable_are_not_looked_at_again(tmp_path: Path) -> None:
    """A folder reused from job to job is made traversable once (`reachable`); one known
    so is left as it is (one that is not traversable after all keeps jobs out: closed)."""
    tmp_root = tmp_path / "sandbox"
    tmp_root.mkdir(mode=0o700)
    job = tmp_path / "worker" / "job-1"
    (job / "outputs").mkdir(parents=True)
    for d in (job, job.parent):
        d.chmod(0o700)
    base = new_grant(tmp_root, own_uid=True)
    reachable: set[str] = set()
    first = grant_files(base, [], job / "outputs", (tmp_path,), reachable)
    assert reachable == {str(job), str(job.parent)}
    assert stat.S_IMODE(job.stat().st_mode) == 0o701
    take_back(first)
    job.chmod(0o700)  # (as if it were replaced): known, so not looked at again
    take_back(grant_files(base, [], job / "outputs", (tmp_path,), reachable))
    assert stat.S_IMODE(job.stat().st_mode) == 0o700
    take_back(grant_files(base, [], job / "outputs", (tmp_path,)))  # nothing known
    assert stat.S_IMODE(job.stat().st_mode) == 0o701
    remove_tmp(base)


@needs_root
def test_a_worker_folder_behind_a_closed_directory_is_reached(tmp_path: Path) -> None:
    """pytest's folders are 0700 (like /root): the zygote's mount namespace shows jobs
    the worker's folder, and nothing else of what lies behind that closed directory."""
    from csml.worker.sandbox import Sandbox, SandboxJob

    assert not tmp_path.stat().st_mode & stat.S_IXOTH
    (tmp_path / "secret.txt").write_bytes(b"not for jobs")
    (tmp_path / "secret.txt").chmod(0o644)
    workdir = tmp_path / "work" / "csml-worker-1"
    job_dir = workdir / "job-1"
    (job_dir / "inputs").mkdir(parents=True)
    (job_dir / "outputs").mkdir()
    (job_dir / "inputs" / "data").write_bytes(b"hello")
    for d in (tmp_path / "work", workdir, job_dir):
        d.chmod(0o700)
    sandbox = Sandbox("echo", workdir=workdir)
    try:
        assert "own random uid" in sandbox.description

        def run(op: str, params: dict[str, Any], inputs: dict[str, Path]) -> Any:
            job = SandboxJob(op, params, inputs, job_dir / "outputs", 30, 512, 30)
            return sandbox.run(job)

        echoed = run("echo", {}, {"data": job_dir / "inputs" / "data"})
        assert echoed.ok, echoed.error
        assert (job_dir / "outputs" / "data").read_bytes() == b"hello"
        hidden = run("read_file", {"path": str(tmp_path / "secret.txt")}, {})
        assert hidden.ok and hidden.result is not None
        assert "No such file" in hidden.result["error"]
    finally:
        sandbox.close()


def _opencv_job_threads(folder: Path, slots: int | None) -> int:
    """The threads of an `opencv` job's process (kept for its owner) after a face
    detection, in a real sandbox of a worker of `slots` slots."""
    import cv2
    import numpy as np
    import psutil

    from csml.worker.sandbox import Sandbox, SandboxJob

    workdir = folder / f"csml-worker-{slots}"
    (workdir / "inputs").mkdir(parents=True)
    (workdir / "outputs").mkdir()
    image = workdir / "inputs" / "image.png"
    noise = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    assert cv2.imwrite(str(image), noise)
    sandbox = Sandbox("opencv", workdir=workdir, slots=slots)
    try:
        job = SandboxJob("detect_faces", {}, {"image": image}, workdir / "outputs", 60, 1024, 60)
        outcome = sandbox.run(job, owner="alice")
        assert outcome.ok, outcome.error
        zygotes = [p for p in psutil.Process().children() if "csml.worker.zygote" in p.cmdline()]
        (child,) = zygotes[0].children()  # the owner's, idle
        return int(child.num_threads())
    finally:
        sandbox.close()


def test_a_worker_with_a_slot_per_cpu_runs_each_opencv_job_in_one_thread(tmp_path: Path) -> None:
    assert _opencv_job_threads(tmp_path, isolation.usable_cpus()) == 1
    if isolation.usable_cpus() > 1:  # OpenCV's own default: a thread per CPU, per job
        assert _opencv_job_threads(tmp_path, None) > 1
