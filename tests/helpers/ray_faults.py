"""Faults injected into the training runs of Ray workers (tests/unit/training/test_ray_executor.py).

``install`` is the test cluster's ``worker_process_setup_hook``: in each Ray worker it wraps the
training loop, :func:`hdkd.training.run.fit`. ``$HDKD_TEST_FAULTS`` is a directory where the tests arm a run
(named ``<model>-seed<s>-frac<f>``) and read what happened to it:

* ``<run>.kill``: after the run's first epoch (its resume state saved) the worker kills itself with
  SIGKILL, once (the file becomes ``<run>.killed``): Ray retries the task.
* ``<run>.fail``: the run raises after its first epoch, at every attempt.
* ``<run>.attempts``: a line per attempt at the run; ``<run>.trained``: written when the run's
  training loop ends, holding the epoch it resumed from.
* ``node-local``: every task removes the files it wrote once it has returned their bytes, as on a
  node whose disk the driver does not see (the driver must write them from the bytes).
"""

from __future__ import annotations

import inspect
import os
import shutil
import signal
from pathlib import Path


class InjectedFault(RuntimeError):
    pass


def install() -> None:
    import hdkd.training.ray_executor
    import hdkd.training.run

    faults, real, task = Path(os.environ["HDKD_TEST_FAULTS"]), hdkd.training.run.fit, hdkd.training.ray_executor._run_task

    def run_task(name, params, paths, *args):
        files = task(name, params, paths, *args)
        if (faults / "node-local").exists():
            shutil.rmtree(paths.out_dir)
        return files

    def fit(*args, **kwargs):
        bound = inspect.signature(real).bind(*args, **kwargs)
        run = bound.arguments["settings"].desc.replace(" ", "-")
        on_epoch = bound.arguments.get("on_epoch")

        def marker(kind: str) -> Path:
            return faults / f"{run}.{kind}"

        def after_epoch(row):
            if on_epoch is not None:
                on_epoch(row)
            if marker("fail").exists():
                raise InjectedFault(f"{run} failed")
            if marker("kill").exists():
                marker("kill").rename(marker("killed"))
                os.kill(os.getpid(), signal.SIGKILL)

        bound.arguments["on_epoch"] = after_epoch
        with open(marker("attempts"), "a") as attempts:
            attempts.write(f"{os.getpid()}\n")
        result = real(*bound.args, **bound.kwargs)
        marker("trained").write_text(str(result.resumed_from))
        return result

    hdkd.training.run.fit, hdkd.training.ray_executor._run_task = fit, run_task
