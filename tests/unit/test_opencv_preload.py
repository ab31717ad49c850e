"""The `opencv` app loads its Haar cascade once per worker, never per job: the zygote
imports the app's `preload` modules before it forks (`csml.worker.zygote.main`), the
cascade is loaded by that import, and every job child (a fork of the zygote, reused
for its owner's next jobs) finds it loaded."""

from __future__ import annotations

import importlib
import os

from csml.apps.opencv import app


def test_the_cascade_is_loaded_by_the_zygotes_preload_and_inherited_by_a_forked_child() -> None:
    assert "csml.apps._opencv_init" in app.preload
    init = importlib.import_module("csml.apps._opencv_init")  # as the zygote does
    assert init.face_cascade.cache_info().currsize == 1  # loaded by the import itself
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a job child: the cascade is the zygote's, not loaded again
        try:
            before = init.face_cascade.cache_info().misses
            cascade = init.face_cascade()
            loaded_here = init.face_cascade.cache_info().misses - before
            os.write(write, f"{loaded_here} {int(cascade.empty())}".encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as answer:
        assert answer.read() == "0 0"  # no load in the child; the cascade is usable
