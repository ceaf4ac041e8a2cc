"""The ablation grids are spelled once (hdkd.report.ablations.ABLATIONS): the DVC queue is generated
from them, and every queued experiment lands in the table of the ablation that queued it."""

import os
import subprocess
import sys

import pytest
import yaml

from hdkd.report.ablations import ABLATIONS, UnknownAblation, group_ablations, queue_commands
from pipeline.ablations import main as ablations_cli
from pipeline.report import main as report_cli
from tests.helpers.params import ROOT, make_params


def as_bundle(params, name=None):
    """What group_ablations reads of a results bundle."""
    return {"params": params.to_dict(), "params_hash": params.digest(), "dvc_exp_name": name}


def queued(command):
    """(experiment name, {dotted key: value}) of one ``dvc exp run --queue`` command, values parsed as DVC does."""
    assert command[:4] == ["dvc", "exp", "run", "--queue"] and command[4] == "-n"
    assert command[-1] == "evaluate"  # up to the stage that writes the results bundle the tables read
    sets = command[6:-1]
    assert sets[::2] == ["-S"] * (len(sets) // 2)
    settings = dict(s.split("=", 1) for s in sets[1::2])
    return command[5], {k: yaml.safe_load(v) for k, v in settings.items()}


def nested(settings):
    out = {}
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def test_every_queued_experiment_lands_in_the_ablation_that_queued_it():
    reference = as_bundle(make_params())
    names = []
    for ablation in ABLATIONS:
        commands = queue_commands([ablation.name])
        assert len(commands) == len(ablation.grid) >= 1
        for command, variant in zip(commands, ablation.grid):
            name, settings = queued(command)
            assert settings == dict(variant) and set(settings) <= set(ablation.keys)
            run = as_bundle(make_params(nested(settings)), name)  # validates the variant against params.yaml
            groups, unused = group_ablations(reference, [run])
            assert groups == {ablation.name: [run]} and not unused, f"{name} is not a {ablation.name} run"
            names.append(name)
    assert len(set(names)) == len(names) and all(n.startswith("abl-") for n in names)
    assert [queued(c)[0] for c in queue_commands()] == names  # no names: every grid, in ABLATIONS order


def test_experiment_names_and_values_as_dvc_reads_them():
    commands = {queued(c)[0]: c[6:-1] for c in queue_commands(["stages", "stem_stride", "block"])}
    assert commands == {
        "abl-stages-3": ["-S", "distill.stages=[3]"],
        "abl-stages-2-3": ["-S", "distill.stages=[2,3]"],
        "abl-stages-1": ["-S", "distill.stages=[1]"],
        "abl-block-mbconv": ["-S", "model.block=mbconv"],
        "abl-stem-stride-4": ["-S", "model.stem_stride=4"],
    }


def test_an_unknown_ablation_fails_before_anything_is_queued(capsys):
    with pytest.raises(UnknownAblation, match=r"ablation\(s\) alpha \(one of: lambda, alpha_tau,"):
        queue_commands(["lambda", "alpha"])
    with pytest.raises(SystemExit, match="unknown ablation"):
        ablations_cli(["queue", "lambda", "nope"])
    assert capsys.readouterr().out == ""


def test_the_queue_command_runs_the_generated_commands(tmp_path):
    # a stand-in `dvc` that records its arguments: the command queues exactly the generated experiments
    log = tmp_path / "dvc.log"
    fake = tmp_path / "bin" / "dvc"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$*" >> "$DVC_LOG"\n')
    fake.chmod(0o755)
    env = {**os.environ, "DVC_LOG": str(log), "PYTHONPATH": str(ROOT),
           "PATH": os.pathsep.join([str(fake.parent), os.path.dirname(sys.executable), os.environ["PATH"]])}
    subprocess.run([sys.executable, "-m", "pipeline.ablations", "queue", "lambda", "block"], env=env, cwd=ROOT,
                   check=True, capture_output=True, text=True)
    expected = [" ".join(c[1:]) for c in queue_commands(["lambda", "block"])]
    assert log.read_text().splitlines() == expected


def test_dry_run_prints_the_commands(capsys):
    ablations_cli(["queue", "block", "--dry-run"])
    assert capsys.readouterr().out == "dvc exp run --queue -n abl-block-mbconv -S model.block=mbconv evaluate\n"
    with pytest.raises(SystemExit):
        report_cli(["--dry-run"])  # the report stage has no such option: never a silent full report build
    assert "unrecognized arguments: --dry-run" in capsys.readouterr().err
