"""Configure DyNet before it is imported: import this module before ``import dynet``.

DyNet reads its global settings (autobatching, random seed, initial memory) once,
when ``dynet`` is first imported; ``dynet_config.set`` must run before that.
The `dynet` app lists this module in ``App.preload`` ahead of ``dynet``, so a
worker's zygote configures DyNet and then imports it once; every job is a fork
that inherits the initialised library. The operations import this module too,
so calling them in a plain process (tests, benchmarks) configures DyNet the same.

Settings:

- ``autobatch=1``: DyNet's automatic batching, on for every job (the char-RNN
  builds one graph per sequence and lets the autobatcher batch them).
- ``random_seed=INIT_SEED``: fixed, so the zygote's state is reproducible; each
  job then calls ``dynet.reset_random_seed(seed)`` with its own ``seed``
  parameter before creating parameters, so results depend on that seed only.
- ``mem=MEM_MB`` (64 MB) for the initial memory pools; DyNet grows them on
  demand, within the job's memory limit.

If ``dynet`` was imported before this module (without configuration), it is
too late to change the settings: `configured()` returns False and a warning is
printed; DyNet then runs with its defaults (no autobatching).
"""

from __future__ import annotations

import sys

INIT_SEED = 1
MEM_MB = 64

_already_imported = "dynet" in sys.modules or "_dynet" in sys.modules

if not _already_imported:
    import dynet_config

    dynet_config.set(mem=str(MEM_MB), random_seed=INIT_SEED, autobatch=1)
else:  # pragma: no cover - depends on import order outside our control
    print(
        "csml: dynet was imported before csml.apps._dynet_init; autobatching is off",
        file=sys.stderr,
    )


def configured() -> bool:
    """Whether DyNet was configured by this module (autobatching on)."""
    return not _already_imported
