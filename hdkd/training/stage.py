"""The training stage: every (seed, fraction) run of one of the roster's models, by the executor params name,
then the stage's outputs (the files ``dvc.yaml`` declares) at once.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from hdkd.config import Params
from hdkd.infra.distributed import device_type, init_distributed, shutdown
from hdkd.infra.io import output_set, read_json, write_json
from hdkd.infra.tracking import Tracker
from hdkd.roster import RunKey, primary_run, roster_entry, run_file, run_name, training_runs
from hdkd.training.local_executor import train_one_after_another, train_side_by_side
from hdkd.training.run import PendingRun, StagePaths, input_fingerprint

logger = logging.getLogger(__name__)


def train_stage(name: str, params: Params, paths: StagePaths) -> dict[str, Any]:
    """A training stage (``train_<name>``, ``train_baseline@<name>``), plain or under torchrun: every
    (seed, fraction) run of the model (:func:`hdkd.roster.training_runs`), then the stage's outputs.

    Each run trains into ``<resume_dir>/<run_name>/`` (outside DVC's outputs, so a killed stage
    keeps its finished runs and resumes the unfinished one); the outputs (``run_file`` of every run,
    the primary's run record, the metrics with every run's summary) appear together at the end.
    On the CPU, ``train.run_workers`` runs train side by side, one process and one thread each; with
    ``train.executor: ray``, each run is a task on a Ray cluster (:mod:`hdkd.training.ray_executor`).
    """
    entry = roster_entry(name, params)
    primary = primary_run(params)
    staged: dict[RunKey, StagePaths] = {}
    todo = []  # the runs not finished for these inputs
    for run in training_runs(params, name):
        work = paths.resume_dir / run_name(run)
        staged[run] = StagePaths(paths.train, paths.val, work / "out", work / "out" / "metrics.json", work / "state",
                                 run_file(paths.teacher, run, params) if paths.teacher else None)
        pending = PendingRun(run, input_fingerprint(name, params, staged[run], run), work / "done.json")
        if not pending.is_done():
            todo.append(pending)
    ray = params.train.executor == "ray"  # the runs train in Ray tasks, on the cluster's devices
    dist = init_distributed("cpu" if ray else device_type(params.train.device))
    parent = None
    if dist.is_main and todo:  # the experiment and parent run exist before runs start side by side
        parent = Tracker(params.tracking, params, entry.stage)
        parent.open_parent()
        if params.tracking.enabled and not parent.enabled:  # unreachable, said once: the runs go untracked
            params = params.model_copy(update={"tracking": params.tracking.model_copy(update={"enabled": False})})
    try:
        # Side by side only on the CPU of one process: a GPU, or torchrun's ranks, train one run at a time.
        workers = min(params.train.run_workers or os.cpu_count() or 1, len(todo))
        if ray:
            from hdkd.training.ray_executor import train_on_ray  # Ray: an optional extra, imported when asked for

            train_on_ray(name, params, staged, todo)
        elif workers > 1 and not dist.enabled and device_type(params.train.device) == "cpu":
            train_side_by_side(name, params, staged, todo, workers)
        else:
            train_one_after_another(name, params, staged, todo, mark_done=dist.is_main)
    except BaseException:
        if parent is not None:  # never left RUNNING: the pipeline's parent run failed with the stage
            parent.end_parent("FAILED")
        raise
    finally:
        shutdown(dist)
    if not dist.is_main:
        return {}
    summaries = {run: read_json(staged[run].metrics) for run in staged}
    metrics = {**summaries[primary], "runs": {run_name(run): summary for run, summary in summaries.items()}}
    with output_set() as outputs:
        runs_dir = outputs.dir(paths.out_dir / "runs")  # every run but the primary; replaced whole
        for run, stage_paths in staged.items():
            target = run_file(paths.out_dir, run, params)
            target = outputs.file(target) if run == primary else runs_dir / target.name
            shutil.copyfile(stage_paths.out_dir / "model.pt", target)
        shutil.copyfile(staged[primary].run_record, outputs.file(paths.run_record))
        write_json(outputs.file(paths.metrics), metrics)
    shutil.rmtree(paths.resume_dir, ignore_errors=True)  # done: nothing left to resume
    logger.info("%s: %d runs (%d trained now) -> %s", entry.stage, len(staged), len(todo), paths.out_dir)
    return metrics
