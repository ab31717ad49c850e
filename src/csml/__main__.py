"""`python -m csml`: the CLI (`csml.cli.main`).

The garbage collector is off while the CLI's modules load: they make ~50,000 objects
(classes, functions, schemas) that live as long as the process, and none is garbage, yet
~125 collections walked them (~10% of the start-up's CPU). Once loaded they are frozen
(`gc.freeze`: no later collection walks them) and collecting resumes.
"""

import gc

gc.disable()
from csml.cli.main import main  # noqa: E402

gc.freeze()
gc.enable()
main()
