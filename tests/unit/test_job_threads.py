"""Each job's libraries get the worker's CPUs shared by its slots as their thread pools.

A worker of S slots on C CPUs runs S jobs at once; a library that sizes its own pool
(OpenMP, OpenBLAS, MKL, OpenCV) would otherwise start C threads per job, which only
wait for each other once every slot is busy. The zygote's environment says
`job_threads(S)`, unless the worker's own environment sets a pool's size."""

from __future__ import annotations

import subprocess
import sys

import pytest

from csml.worker.isolation import THREAD_POOLS, job_threads, usable_cpus, zygote_env


@pytest.mark.parametrize(
    ("slots", "cpus", "threads"),
    [(1, 2, 2), (2, 2, 1), (3, 2, 1), (4, 16, 4), (3, 16, 5), (0, 8, 8)],
)
def test_the_cpus_are_shared_by_the_slots(slots: int, cpus: int, threads: int) -> None:
    assert job_threads(slots, cpus) == threads


def test_the_cpus_are_those_the_worker_may_run_on() -> None:
    assert job_threads(1) == usable_cpus() >= 1


def test_the_zygote_environment_sizes_every_pool() -> None:
    env = zygote_env({"PATH": "/usr/bin"}, threads=3)
    assert {name: env[name] for name in THREAD_POOLS} == dict.fromkeys(THREAD_POOLS, "3")


def test_a_size_the_worker_was_given_wins() -> None:
    env = zygote_env({"OMP_NUM_THREADS": "4", "OPENCV_FOR_THREADS_NUM": "2"}, threads=1)
    assert env["OMP_NUM_THREADS"] == "4"
    assert env["OPENCV_FOR_THREADS_NUM"] == "2"
    assert env["OPENBLAS_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"


def test_without_slots_the_libraries_keep_their_defaults() -> None:
    assert not set(THREAD_POOLS) & set(zygote_env({"PATH": "/usr/bin"}))


def test_opencv_reads_its_pool_size_from_the_zygote_environment() -> None:
    """(The variable is OpenCV's own: if a release stopped reading it, jobs would be
    back to one thread per CPU each, and this says so.)"""
    for threads in (1, 3):
        out = subprocess.run(
            [sys.executable, "-c", "import cv2; print(cv2.getNumThreads())"],
            env=zygote_env({}, threads=threads),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert out.stdout.split() == [str(threads)]
