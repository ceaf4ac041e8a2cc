"""The DVC stages and the repository's commands: each ``pipeline/<name>.py`` is a thin command line over the
library, run as ``python -m pipeline.<name>`` (``dvc repro``, ``dvc exp run``, ``torchrun -m``).

A command's ``if __name__ == "__main__":`` calls :func:`start` before ``main()``, and its module imports the
library inside ``main()``: so the reproducible-numerics environment is in place before torch loads (held by
tests/tools/test_pipeline_commands.py); importing ``pipeline`` changes nothing.
"""

import atexit
import gc
import sys


def start(params_file: str = "params.yaml") -> None:
    """What a stage's process does first, before torch loads.

    - The reproducible-numerics environment, unless ``params_file`` switches the mode off (a stage given another
      file with ``--params`` still gets it; the training code then checks that its own file's setting can hold).
    - A full disk ends the stage with one line naming the outputs and the space they need, not pages of torch or
      SQLAlchemy tracebacks that never say so.
    - The teardown skips its garbage collections over torch's, timm's and MLflow's objects, freed anyway (a stage
      spent 3 s exiting, 0.5 s with this); registered before torch loads, it runs after their exit handlers.
    """
    from hdkd.infra import numerics

    if numerics.reproducible_in(params_file):
        numerics.apply_env()
    sys.excepthook = _disk_full_in_one_line
    atexit.register(gc.freeze)


def _disk_full_in_one_line(kind, error, traceback) -> None:
    from hdkd.infra.io import disk_full_message

    message = disk_full_message(error)
    if message is None:
        sys.__excepthook__(kind, error, traceback)
    else:
        print(f"error: {message}", file=sys.stderr)
