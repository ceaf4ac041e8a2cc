"""One run's contract (hdkd.training.run): which recipe and network each model of the roster trains with, what a
run's record says, which MLflow run an interrupted run goes on logging to, and the loss each kind of model gets.
(tests/unit/training/test_run.py trains runs end to end; test_stage.py holds the data of a run.)"""

from __future__ import annotations

import pytest

from hdkd.infra.io import read_json, write_json
from hdkd.roster import roster_entry
from hdkd.training.losses import AlignedFeatureDistillationLoss, FeatureDistillationLoss
from hdkd.training.run import (
    MLFLOW_RUN,
    StagePaths,
    TrainedRun,
    build_criterion,
    network_spec,
    recipe,
    resumable_run_id,
    write_run_files,
)
from tests.helpers.params import make_params

KD = {"deit_vit": {"method": "deit", "timm": "deit_tiny_distilled_patch16_224",
                   "kwargs": {"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2},
                   "distill": {"type": "hard", "alpha": 0.5, "lambda": 0, "lr": 5e-4}},
      "logit_kd": {"method": "logit", "timm": None, "kwargs": {}, "distill": {"lambda": 0}},
      "aligned_kd": {"method": "aligned", "timm": None, "kwargs": {}, "distill": {}}}


@pytest.fixture(scope="module")
def params():
    return make_params({"kd": KD, "model": {"size": "tiny", "block": "mbconv", "stem_stride": 4, "dropout": 0.1}})


def test_each_model_trains_with_its_own_sections_recipe(params):
    assert recipe(params, roster_entry("teacher", params)) == params.teacher
    assert recipe(params, roster_entry("student", params)) == params.student
    assert recipe(params, roster_entry("hdkd", params)) == params.distill
    assert recipe(params, roster_entry("vit", params)) == params.baselines["vit"].optim
    assert recipe(params, roster_entry("vit", params)).lr == 5e-4  # the ViT's own warmup recipe
    assert recipe(params, roster_entry("deit_vit", params)) == params.kd["deit_vit"].distill
    assert recipe(params, roster_entry("logit_kd", params)).lambda_ == 0.0


def test_each_model_is_built_from_the_network_its_entry_names(params):
    paper = {"block": "mbconv", "stem_stride": 4, "dropout": 0.1}  # the model section reaches the paper's networks
    assert network_spec(params, roster_entry("teacher", params)) == ("teacher_tiny", paper)
    assert network_spec(params, roster_entry("hdkd", params)) == ("hdkd_tiny", paper)
    assert network_spec(params, roster_entry("resnet", params)) == (
        "timm:resnet18", {"channels": [8, 16, 32, 64], "stem_width": 8})
    assert network_spec(params, roster_entry("deit_vit", params)) == (
        "timm:deit_tiny_distilled_patch16_224", KD["deit_vit"]["kwargs"])
    # logit-only and aligned feature KD distil into the HDKD student itself
    assert network_spec(params, roster_entry("aligned_kd", params)) == ("hdkd_tiny", paper)
    assert network_spec(params, roster_entry("logit_kd", params)) == ("hdkd_tiny", paper)


def test_each_model_gets_the_loss_of_its_method(params):
    alone = build_criterion("student", params.student)
    assert alone.feature is None and alone.lambda_ == 0.0 and alone.logit.kind == "none"
    hdkd = build_criterion("hdkd", params.distill)
    assert type(hdkd.feature) is FeatureDistillationLoss and hdkd.lambda_ == params.distill.lambda_
    assert hdkd.logit.kind == params.distill.type and hdkd.logit.alpha == params.distill.alpha
    assert hdkd.logit.tau == params.distill.tau
    aligned = build_criterion(roster_entry("aligned_kd", params), params.kd["aligned_kd"].distill, (8, 16, 24))
    assert type(aligned.feature) is AlignedFeatureDistillationLoss
    assert sorted(aligned.feature.projectors) == sorted(str(s) for s in params.distill.stages)
    deit = build_criterion(roster_entry("deit_vit", params), params.kd["deit_vit"].distill)
    assert deit.logit.kind == "hard" and deit.lambda_ == 0.0


def test_an_interrupted_run_goes_on_logging_to_its_mlflow_run_only_for_the_same_inputs(tmp_path):
    assert resumable_run_id(tmp_path, "fp") is None  # nothing recorded
    write_json(tmp_path / MLFLOW_RUN, {"fingerprint": "fp", "run_id": "abc"})
    assert resumable_run_id(tmp_path, "fp") == "abc"
    assert resumable_run_id(tmp_path, "other inputs") is None


def test_a_runs_record_names_its_model_seed_fraction_params_and_mlflow_run(tmp_path):
    import torch

    params = make_params()
    paths = StagePaths(tmp_path / "train", tmp_path / "val", tmp_path / "out", tmp_path / "m" / "teacher.json",
                       tmp_path / "state")
    summary = {"val_accuracy": 0.75, "val_loss": 0.5, "best_epoch": 2, "epochs": 3}
    trained = TrainedRun("teacher", "teacher_tiny", {}, ["a", "b"], (4, 0.25), torch.nn.Linear(2, 2), summary,
                         [{"epoch": 1}])
    write_run_files(trained, params, paths, {"run_id": "r1", "tracking_uri": "sqlite:///x.db"})
    assert read_json(paths.metrics) == summary
    assert paths.run_record == tmp_path / "m" / "teacher.run.json"
    assert read_json(paths.run_record) == {"run_id": "r1", "tracking_uri": "sqlite:///x.db",
                                           "params_hash": params.digest(), "model": "teacher_tiny", "seed": 4,
                                           "fraction": 0.25, **summary}
    assert (paths.out_dir / "model.pt").is_file()


def test_the_runtime_takes_mixed_precision_and_channels_last_on_cuda_only_and_rank_0_shows_progress(params):
    import torch

    from hdkd.infra import numerics
    from hdkd.infra.distributed import DistInfo
    from hdkd.training.run import make_runtime

    asked = params.model_copy(update={"train": params.train.model_copy(update={
        "amp": True, "channels_last": True, "reproducible": False})})
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        make_runtime(asked, torch.device("cuda", 0), DistInfo())
        assert not torch.are_deterministic_algorithms_enabled()  # CUDA's own kernels: left as they are
        rt = make_runtime(asked, torch.device("cpu"), DistInfo())
        assert rt.amp_dtype is None and not rt.channels_last and rt.progress and rt.device == torch.device("cpu")
        assert torch.are_deterministic_algorithms_enabled()  # the same numbers on every CPU run
        # an op without a deterministic kernel warns, never stops a run
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.mkldnn.enabled  # the fast numerics: oneDNN kept
        assert not make_runtime(asked, torch.device("cpu"), DistInfo(rank=1, world_size=2)).progress
        reproducible = asked.model_copy(update={"train": asked.train.model_copy(update={"reproducible": True})})
        make_runtime(reproducible, torch.device("cpu"), DistInfo())
        assert not torch.backends.mkldnn.enabled  # the reproducible mode (hdkd.infra.numerics): on the CPU only
        make_runtime(reproducible, torch.device("cuda", 0), DistInfo())
        assert torch.backends.mkldnn.enabled
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        numerics.apply_runtime(False)


def test_on_cuda_the_runtime_takes_bfloat16_where_the_gpu_has_it_else_float16(params, monkeypatch):
    import torch

    from hdkd.infra.distributed import DistInfo
    from hdkd.training.run import make_runtime

    asked = params.model_copy(update={"train": params.train.model_copy(update={
        "amp": True, "channels_last": True, "reproducible": False})})
    gpu = torch.device("cuda", 0)  # no kernel runs: the runtime only names the device
    for bf16, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        rt = make_runtime(asked, gpu, DistInfo())
        assert rt.amp_dtype == dtype and rt.channels_last and rt.device == gpu
    plain = asked.model_copy(update={"train": asked.train.model_copy(update={"amp": False, "channels_last": False})})
    rt = make_runtime(plain, gpu, DistInfo())
    assert rt.amp_dtype is None and not rt.channels_last


class RecordingTracker:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_a_finished_run_logs_its_best_metrics_and_history_and_only_the_registered_one_its_model(tmp_path):
    import torch

    from hdkd.models import create_model
    from hdkd.models.checkpoint import save_model
    from hdkd.training.engine import FitResult
    from hdkd.training.run import track_run

    params = make_params()
    model = create_model("teacher_tiny", 2, image_size=32)
    history = [{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.75}]
    save_model(tmp_path / "model.pt", model, "teacher_tiny", ["a", "b"], 32, {}, {"val_accuracy": 0.75}, history)
    trained = TrainedRun("teacher", "teacher_tiny", {}, ["a", "b"], (0, 1.0), model, {"val_accuracy": 0.75,
                                                                                     "best_epoch": 2}, history)
    for register, resumed_from in ((False, 0), (True, 1)):
        tracker = RecordingTracker()
        track_run(tracker, trained, params, tmp_path / "model.pt", FitResult(history, 2, {}, resumed_from), register)
        names = [c[0] for c in tracker.calls]
        assert tracker.calls[0] == ("log_metrics", ({"best_val_accuracy": 0.75, "best_best_epoch": 2},), {})
        assert ("log_dict", (history, "history.json"), {}) in tracker.calls
        # an epoch saved just before a kill may not have reached MLflow: the epochs before the resume, again
        assert (("log_missing_steps", (history[:1],), {}) in tracker.calls) == bool(resumed_from)
        if not register:
            assert names == ["log_metrics", "log_dict"]
            continue
        assert ("log_artifact", (tmp_path / "model.pt", "checkpoint"), {}) in tracker.calls
        png = next(c[1] for c in tracker.calls if c[0] == "log_bytes")
        assert png[1] == "training_curves.png" and png[0].startswith(b"\x89PNG")
        logged, meta, registered = next(c[1] for c in tracker.calls if c[0] == "log_model")
        assert meta == {"model_name": "teacher_tiny", "classes": ["a", "b"], "image_size": 32}
        assert registered == f"hdkd-{params.data.dataset}-teacher"
        assert all(torch.equal(a, b) for a, b in zip(logged.state_dict().values(), model.state_dict().values(),
                                                     strict=True))


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A teacher model file of classes a, b at 32 px (random weights: only its checks are tested)."""
    from hdkd.models import create_model
    from hdkd.models.checkpoint import save_model

    path = tmp_path_factory.mktemp("teacher") / "model.pt"
    save_model(path, create_model("teacher_tiny", 2, 32), "teacher_tiny", ["a", "b"], 32, {})
    return path


def test_a_missing_teacher_says_which_stage_makes_it(tmp_path):
    from hdkd.models import create_model
    from hdkd.training.run import load_teacher

    for path in (None, tmp_path / "none.pt"):
        with pytest.raises(FileNotFoundError) as e:
            load_teacher(path, ["a", "b"], create_model("student_tiny", 2, 32), [1], "cpu")
        assert str(e.value) == (f"teacher checkpoint {path} not found: distillation needs the train_teacher stage's "
                                "output (run `dvc repro train_teacher`)")


def test_a_teacher_of_other_classes_or_other_maps_is_refused_before_training(teacher_file):
    from hdkd.models import create_model
    from hdkd.training.run import load_teacher

    with pytest.raises(ValueError) as e:
        load_teacher(teacher_file, ["b", "a"], create_model("student_tiny", 2, 32), [1], "cpu")
    assert str(e.value) == (f"teacher {teacher_file} was trained on classes ['a', 'b'], the data has ['b', 'a']: "
                            "retrain the teacher on this data (`dvc repro train_teacher`)")
    student = create_model("student_tiny", 2, 64)  # twice the image size: every map twice as large
    teacher = create_model("teacher_tiny", 2, 32)
    with pytest.raises(ValueError) as e:
        load_teacher(teacher_file, ["a", "b"], student, [2], "cpu")
    assert str(e.value) == (f"teacher {teacher_file} stage 2 maps are {teacher.feature_shapes[1]}, the student's are "
                            f"{student.feature_shapes[1]}: teacher and student need the same image size, stem stride "
                            "and stage widths for feature distillation")


def test_the_teacher_is_loaded_onto_the_device_asked_for_and_frozen(teacher_file, monkeypatch):
    import hdkd.training.run as run
    from hdkd.models import create_model
    from hdkd.models.checkpoint import load_model

    mapped_to = []  # the weights are mapped as they load: a teacher trained on a GPU opens on a CPU machine
    monkeypatch.setattr(run, "load_model", lambda path, device: mapped_to.append(device) or load_model(path))
    teacher = run.load_teacher(teacher_file, ["a", "b"], create_model("student_tiny", 2, 32), [1, 2, 3], "meta")
    assert mapped_to == ["meta"]
    assert {p.device.type for p in teacher.parameters()} == {"meta"}  # "meta": not the CPU, on every machine
    assert not any(p.requires_grad for p in teacher.parameters())


def write_packed_train(root, groups, size, classes=("a", "b"), name="train"):
    """A prepared directory whose ``name`` split (the training split) holds one image a group entry (image i
    filled with i), the labels alternating by group; returns the labels."""
    import numpy as np
    import pandas as pd

    from hdkd.data.packed import IMAGES, MANIFEST, write_labels_and_index

    split = root / name
    split.mkdir(parents=True)
    write_json(root / MANIFEST, {"classes": list(classes)})
    n = len(groups)
    np.save(split / IMAGES, np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(size, 1).repeat(size, 2)
            .repeat(3, 3))
    order = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    labels = np.array([order[g] % len(classes) for g in groups], dtype=np.int64)
    write_labels_and_index(split, labels, pd.DataFrame({"image_id": [f"img{i}" for i in range(n)], "group": groups}))
    return labels


def test_a_training_subset_keeps_group_ids_as_written_and_checks_the_image_size(tmp_path):
    import numpy as np

    from hdkd.data.errors import DataError
    from hdkd.data.splits import nested_subsets
    from hdkd.training.run import training_subset

    # ids a CSV reader would turn into the same number or into "missing": each its own lesion group, in a split
    # of such ids alone (numbers) and among others
    numeric = ["007", "007", "7", "7", "3.0", "3", "10", "10", "010", "11", "12", "12", "1e1", "13", "14", "14"]
    mixed = ["NA", "NA", "N/A", "", "", "g1", "g2", "g2", "null", "null", "NaN", "nan", "None", "g3", "g3", "#N/A"]
    params = make_params({})
    assert params.data.image_size == 32
    for name, groups in (("numeric", numeric), ("mixed", mixed + numeric)):
        labels = write_packed_train(tmp_path / name, groups, size=32)
        for seed in range(8):
            subset = training_subset(tmp_path / name, params, seed, 0.5)
            rows = nested_subsets(labels, np.array(groups, dtype=object), [0.5], seed)[0.5]
            assert list(subset.ids) == [f"img{i}" for i in rows], (name, seed)
            assert subset.images[:, 0, 0, 0].tolist() == list(rows) and subset.labels.tolist() == labels[rows].tolist()
    with pytest.raises(DataError, match=r"holds 32px images but data\.image_size is 64"):
        training_subset(tmp_path / "mixed", make_params({"data": {"image_size": 64}}), 0, 0.5)


@pytest.fixture
def stage_data(tmp_path):
    """StagePaths over a prepared directory (train: 8 groups, val: 4 images) and a balanced one (train: 12
    images, as SMOTE would leave it), 32 px."""
    prepared, balanced = tmp_path / "prepared", tmp_path / "balanced"
    write_packed_train(prepared, [f"g{i // 2}" for i in range(16)], size=32)
    write_packed_train(prepared, ["v0", "v1", "v2", "v3"], size=32, name="val")
    write_packed_train(balanced, [f"b{i}" for i in range(12)], size=32)
    return StagePaths(balanced, prepared, tmp_path / "out", tmp_path / "metrics.json", tmp_path / "resume")


def cpu_runtime(rank=0, world_size=1, **options):
    """The engine's runtime on the CPU, as process ``rank`` of ``world_size`` (``options``: its other fields)."""
    import torch

    from hdkd.infra.distributed import DistInfo
    from hdkd.training.engine import Runtime

    return Runtime(torch.device("cpu"), DistInfo(rank=rank, world_size=world_size), **options)


def stored_image(root, index):
    """Image ``index`` of ``root``'s training split as the loader reads it (uint8, channels first)."""
    import numpy as np
    import torch

    from hdkd.data.packed import load_split

    return torch.from_numpy(np.array(load_split(root, "train").images[index])).permute(2, 0, 1)


def test_full_data_trains_on_the_balanced_split_and_a_fraction_on_a_subset_of_the_prepared_one(stage_data):
    from hdkd.training.run import training_data, training_subset

    params = make_params()
    for run_key in (None, (0, 1.0), (3, 1.0)):
        (train, val, classes), _ = training_data(params, stage_data, cpu_runtime(), run_key)
        assert train.split.root == stage_data.train and len(train) == 12, run_key
        assert val.split.root == stage_data.val and val.split.name == "val" and len(val) == 4
        assert classes == ["a", "b"]
    (train, _, _), _ = training_data(params, stage_data, cpu_runtime(), (3, 0.5))
    subset = training_subset(stage_data.val, params, 3, 0.5)
    assert train.split.root == stage_data.val and list(train.split.ids) == list(subset.ids)
    assert 0 < len(train) < 16


def test_training_data_refuses_packs_of_another_image_size_or_other_classes(stage_data):
    import re
    import shutil

    from hdkd.data.errors import DataError
    from hdkd.training.run import training_data

    train_split, val_split = (re.escape(str(p)) for p in (stage_data.train / "train", stage_data.val / "val"))
    with pytest.raises(DataError, match=rf"{train_split}.* holds 32px images but data\.image_size is 64"):
        training_data(make_params({"data": {"image_size": 64}}), stage_data, cpu_runtime())
    shutil.rmtree(stage_data.val / "val")
    write_packed_train(stage_data.val, ["v0", "v1"], size=16, name="val")  # the training split still 32 px
    with pytest.raises(DataError, match=rf"{val_split}.* holds 16px images but data\.image_size is 32"):
        training_data(make_params(), stage_data, cpu_runtime())
    shutil.rmtree(stage_data.val / "val")
    write_packed_train(stage_data.val, ["v0", "v1"], size=32, classes=("b", "a"), name="val")
    with pytest.raises(ValueError) as e:
        training_data(make_params(), stage_data, cpu_runtime())
    assert str(e.value) == (f"{stage_data.train} and {stage_data.val} disagree on the classes: rerun "
                            "`dvc repro balance`")


def test_each_augmentation_setting_gives_the_images_it_promises(stage_data):
    import torch

    from hdkd.data.augment import BatchAugment, eval_transform
    from hdkd.training.run import training_data

    stored = stored_image(stage_data.train, 5)
    # no augmentation: the evaluation transform of the stored image, the same at every epoch, no batch hook
    plain = make_params({"augment": {"enabled": False}})
    (train, _, _), hook = training_data(plain, stage_data, cpu_runtime(), (3, 1.0))
    assert hook is None and torch.equal(train[5][0], eval_transform()(stored))
    train.set_epoch(1)
    assert torch.equal(train[5][0], eval_transform()(stored)) and train[5][1].item() == 1
    # batched: the stored uint8 images, augmented on the device by a hook drawing from the run's seed and the rank
    batched = make_params({"augment": {"batched": True}})
    (train, _, _), hook = training_data(batched, stage_data, cpu_runtime(1, 2), (3, 1.0))
    assert train[5][0].dtype == torch.uint8 and torch.equal(train[5][0], stored)
    batch = torch.stack([train[i][0] for i in range(4)])
    assert torch.equal(hook(batch), BatchAugment(batched.augment, 3, 1)(batch))
    assert not torch.equal(hook(batch), BatchAugment(batched.augment, 3, 0)(batch))
    assert not torch.equal(hook(batch), BatchAugment(batched.augment, 1, 1)(batch))
    # image by image: augmented in the loader, the draws the run's seed's (another seed, other images)
    per_image = make_params({"augment": {"batched": False}})
    images = {s: training_data(per_image, stage_data, cpu_runtime(), (s, 1.0))[0][0][5][0] for s in (0, 3)}
    again, hook = training_data(per_image, stage_data, cpu_runtime(), (3, 1.0))
    assert hook is None and images[3].dtype == torch.float32
    assert torch.equal(again[0][5][0], images[3]) and not torch.equal(images[0], images[3])


@pytest.fixture
def train_run_calls(monkeypatch):
    """hdkd.training.run.train_run with the runtime and the run recorded instead of built and trained."""
    import torch

    from hdkd.training import run

    calls = {}

    def make_runtime(params, device, dist):
        calls["device"] = device
        return cpu_runtime()

    def run_training(*args, **kwargs):
        calls["args"], calls["kwargs"] = args, kwargs
        return {"trained": args[0]}

    monkeypatch.setattr(run, "make_runtime", make_runtime)
    monkeypatch.setattr(run, "run_training", run_training)
    threads = torch.get_num_threads()
    yield calls
    torch.set_num_threads(threads)


def test_a_run_trains_its_key_with_its_data_and_registers_only_when_asked(train_run_calls, stage_data, monkeypatch):
    import logging

    from hdkd.training.run import train_run

    # as in a fresh worker process: no logging configured (pytest's capture handlers are added for the test call)
    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr(logging.root, "level", logging.WARNING)
    params = make_params({"augment": {"batched": True}, "train": {"device": "cpu"}})
    for register in (False, True):
        assert train_run("student", params, stage_data, (3, 0.5), register) == {"trained": "student"}
        args, kwargs = train_run_calls["args"], train_run_calls["kwargs"]
        assert args[:3] == ("student", params, stage_data) and kwargs["run"] == (3, 0.5)
        assert kwargs["register"] is register and kwargs["batch_hook"].seed == 3
        train, val, classes = args[3]
        assert train.split.root == stage_data.val and len(val) == 4 and classes == ["a", "b"]
        assert train_run_calls["device"].type == "cpu"
    # a spawned worker's messages show as its stage's do: INFO and above, the message alone
    assert logging.root.level == logging.INFO
    assert logging.root.handlers[0].formatter._fmt == "%(message)s"


def test_a_run_takes_its_thread_count_unless_the_reproducible_mode_fixes_it(train_run_calls, stage_data):
    import torch

    from hdkd.training.run import train_run

    torch.set_num_threads(2)
    free = make_params({"train": {"reproducible": False}})
    train_run("student", free, stage_data, (0, 1.0), False, threads=None)
    assert torch.get_num_threads() == 2
    train_run("student", make_params({"train": {"reproducible": True}}), stage_data, (0, 1.0), False, threads=1)
    assert torch.get_num_threads() == 2
    train_run("student", free, stage_data, (0, 1.0), False, threads=1)
    assert torch.get_num_threads() == 1


def test_on_a_cuda_machine_a_run_trains_on_the_gpu_of_its_local_rank(train_run_calls, stage_data, monkeypatch):
    import torch

    from hdkd.training.run import train_run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    train_run("student", make_params({"train": {"device": "cuda"}}), stage_data, (0, 1.0), False)
    assert train_run_calls["device"] == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="train.device is 'cuda' but no CUDA device is available"):
        train_run("student", make_params({"train": {"device": "cuda"}}), stage_data, (0, 1.0), False)


class FitStopped(Exception):
    """Raised by a recorded fit that stops the run there (its modules live on a device no kernel runs on)."""


@pytest.fixture
def fit_calls(monkeypatch):
    """hdkd.training.run.fit recorded: what a run hands the training loop; one epoch at 75 % is its result
    (``calls["stop"] = True``: it raises FitStopped instead)."""
    from hdkd.training import run
    from hdkd.training.engine import FitResult

    calls = {"stop": False}

    def fit(train_model, criterion, data, rt, settings, teacher=None, on_epoch=None):
        record = settings.resume_dir / run.MLFLOW_RUN  # what a kill at this point would leave to resume with
        calls.update(model=train_model, criterion=criterion, data=data, rt=rt, teacher=teacher, settings=settings,
                     mlflow_run=read_json(record) if record.is_file() else None)
        if calls["stop"]:
            raise FitStopped
        row = {"epoch": 1, "train_loss": 1.0, "val_loss": 0.5, "val_accuracy": 0.75, "epoch_time_s": 2.5}
        on_epoch(row)
        return FitResult([row], 1, row, 0)

    monkeypatch.setattr(run, "fit", fit)
    return calls


@pytest.fixture
def wrapped(monkeypatch):
    """hdkd.training.run's DistributedDataParallel recorded (module, device_ids, find_unused_parameters) and the
    module handed on unwrapped: no process group is needed."""
    from hdkd.training import run

    calls = []

    def ddp(module, device_ids, find_unused_parameters):
        calls.append((module, device_ids, find_unused_parameters))
        return module

    monkeypatch.setattr(run, "DistributedDataParallel", ddp)
    return calls


def quick_params(**change):
    return make_params({"tracking": {"enabled": False}, "kd": KD} | change)


def with_teacher(paths, teacher):
    import dataclasses

    return dataclasses.replace(paths, teacher=teacher)


def test_every_module_of_a_run_lives_on_the_runs_device(fit_calls, stage_data, teacher_file, monkeypatch):
    import torch

    from hdkd.models.checkpoint import load_model
    from hdkd.training import run
    from hdkd.training.engine import Runtime
    from hdkd.training.run import run_training

    fit_calls["stop"] = True  # "meta": not the CPU, on every machine; nothing is computed on it
    monkeypatch.setattr(run, "load_model", lambda path, device: load_model(path))  # meta tensors hold no weights
    meta = Runtime(torch.device("meta"))
    for name in ("hdkd", "aligned_kd"):
        with pytest.raises(FitStopped):
            run_training(name, quick_params(), with_teacher(stage_data, teacher_file), (None, None, ["a", "b"]), meta)
        assert {p.device.type for p in fit_calls["model"].parameters()} == {"meta"}, name
        assert {p.device.type for p in fit_calls["teacher"].parameters()} == {"meta"}, name
    assert len(list(fit_calls["criterion"].parameters())) > 0  # the alignment layers train beside the network
    assert {p.device.type for p in fit_calls["criterion"].parameters()} == {"meta"}


def test_a_run_hands_the_loop_a_channels_last_and_a_compiled_network_when_asked(fit_calls, stage_data):
    import torch

    from hdkd.training.run import run_training

    run_training("student", quick_params(), stage_data, (None, None, ["a", "b"]), cpu_runtime())
    plain = fit_calls["model"]
    assert not isinstance(plain, torch._dynamo.eval_frame.OptimizedModule)
    conv = next(m.weight for m in plain.modules() if isinstance(m, torch.nn.Conv2d))
    assert not conv.is_contiguous(memory_format=torch.channels_last)
    params = quick_params(train={"compile": True})
    run_training("student", params, stage_data, (None, None, ["a", "b"]), cpu_runtime(channels_last=True))
    compiled = fit_calls["model"]  # torch.compile wraps lazily: nothing is compiled before a forward pass
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    conv = next(m.weight for m in compiled._orig_mod.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.is_contiguous(memory_format=torch.channels_last) and conv.ndim == 4


def test_feature_distillation_refuses_a_teacher_of_other_maps_and_logit_distillation_takes_it(
        fit_calls, stage_data, teacher_file):
    from hdkd.training.run import run_training

    params = quick_params(model={"stem_stride": 4})  # the student's maps half the teacher's
    paths, cpu = with_teacher(stage_data, teacher_file), cpu_runtime()
    with pytest.raises(ValueError, match=r"stage 1 maps are .* teacher and student need the same image size"):
        run_training("hdkd", params, paths, (None, None, ["a", "b"]), cpu)
    assert "model" not in fit_calls  # refused before training
    assert run_training("logit_kd", params, paths, (None, None, ["a", "b"]), cpu)["val_accuracy"] == 0.75
    assert fit_calls["teacher"] is not None


def test_a_run_registers_its_model_unless_told_not_to_and_its_model_file_holds_its_summary(
        fit_calls, stage_data, monkeypatch):
    from hdkd.models.checkpoint import load_model
    from hdkd.training import run

    registered = []
    real = run.track_run
    monkeypatch.setattr(run, "track_run", lambda *a: registered.append(a[-1]) or real(*a))
    params, cpu = quick_params(), cpu_runtime()
    run.run_training("student", params, stage_data, (None, None, ["a", "b"]), cpu)
    run.run_training("student", params, stage_data, (None, None, ["a", "b"]), cpu, register=False)
    assert registered == [True, False]
    assert fit_calls["mlflow_run"] is None  # tracking off: no MLflow run to go on logging to after a kill
    summary = {"val_accuracy": 0.75, "val_loss": 0.5, "best_epoch": 1, "epochs": params.student.epochs}
    assert load_model(stage_data.out_dir / "model.pt")[1]["metrics"] == summary
    assert read_json(stage_data.metrics) == summary


def test_a_registered_runs_curves_name_the_model_as_the_report_does(params, tmp_path, monkeypatch):
    from hdkd.evidence import plots
    from hdkd.models import create_model
    from hdkd.models.checkpoint import save_model
    from hdkd.roster import roster_entry
    from hdkd.training.engine import FitResult
    from hdkd.training.run import track_run

    figures = []
    monkeypatch.setattr(plots, "figure_png", lambda fig, *a, **k: figures.append(fig) or b"\x89PNG")
    model = create_model("hdkd_tiny", 2, image_size=32)
    save_model(tmp_path / "model.pt", model, "hdkd_tiny", ["a", "b"], 32, {})
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.5, "val_accuracy": 0.75}]
    trained = TrainedRun("logit_kd", "hdkd_tiny", {}, ["a", "b"], (0, 1.0), model, {"val_accuracy": 0.75}, history)
    track_run(RecordingTracker(), trained, params, tmp_path / "model.pt", FitResult(history, 1, {}, 0), True)
    accuracy = figures[0].axes[1]
    assert [t.get_text() for t in accuracy.get_legend().get_texts()] == [roster_entry("logit_kd", params).label]
    assert roster_entry("logit_kd", params).label == "Logit-only KD"


def test_under_several_processes_the_loop_gets_a_ddp_network_told_of_a_head_without_gradient(
        fit_calls, wrapped, stage_data, teacher_file):
    import torch

    from hdkd.training import run

    rank0 = cpu_runtime(0, 2)
    paths = with_teacher(stage_data, teacher_file)
    # the student alone, HDKD's soft distillation (both heads trained), HDKD with no logit distillation (the
    # distillation head gets no gradient: DDP must be told, or it waits for that gradient forever)
    for name, change, unused in (("student", {}, False), ("hdkd", {}, False),
                                 ("hdkd", {"distill": {"type": "none"}, "kd": {}}, True)):
        run.run_training(name, quick_params(**change), paths, (None, None, ["a", "b"]), rank0)
        module, device_ids, find_unused = wrapped.pop()
        assert isinstance(module, torch.nn.Module) and module is fit_calls["model"], (name, change)
        assert device_ids is None and find_unused is unused, (name, change)
    run.run_training("student", quick_params(), paths, (None, None, ["a", "b"]), cpu_runtime())
    assert wrapped == []  # one process: no wrapper


class RecordingRunTracker(RecordingTracker):
    """A Tracker that records how a run opens it and what it logs (an MLflow run id only when tracking is on)."""

    def __init__(self, tracking, params, stage, **kwargs):
        super().__init__()
        self.tracking, self.stage, self.kwargs = tracking, stage, kwargs
        self.run_id = "run-1" if tracking.enabled else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def info(self):
        return {"mlflow_run_id": self.run_id}


@pytest.fixture
def tracker(monkeypatch):
    from hdkd.training import run

    opened = []

    def open_tracker(*args, **kwargs):
        opened.append(RecordingRunTracker(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(run, "Tracker", open_tracker)
    return opened


def test_a_run_hands_the_loop_its_settings_and_data_and_tracks_itself_under_its_name(
        fit_calls, tracker, stage_data, tmp_path, monkeypatch):
    from hdkd.evidence import plots
    from hdkd.models.checkpoint import load_model
    from hdkd.roster import roster_entry
    from hdkd.training import run

    params = quick_params(tracking={"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                          train={"batch_size": 4, "eval_batch_size": 9, "grad_clip": 1.5, "log_every": 7})
    figures = []
    monkeypatch.setattr(plots, "figure_png", lambda fig, *a, **k: figures.append(fig) or b"\x89PNG")
    datasets, hook = (object(), object(), ["a+b", "c"]), object()
    fingerprint = run.input_fingerprint("student", params, stage_data, (3, 0.5))
    assert fingerprint != run.input_fingerprint("student", params, stage_data)  # the default run's
    stage_data.resume_dir.mkdir()
    write_json(stage_data.resume_dir / run.MLFLOW_RUN, {"fingerprint": fingerprint, "run_id": "killed-run"})
    result = run.run_training("student", params, stage_data, datasets, cpu_runtime(), hook, (3, 0.5))

    s = fit_calls["settings"]
    assert (s.optim, s.seed, s.batch_size, s.eval_batch_size, s.grad_clip, s.log_every) == (
        params.student, 3, 4, 9, 1.5, 7)
    assert s.total_steps == run.step_budget(params, params.student, stage_data, 0.5) and s.total_steps > 0
    assert s.class_names == ("a_b", "c")  # names MLflow takes as metric names
    assert (s.resume_dir, s.fingerprint, s.desc) == (stage_data.resume_dir, fingerprint, "student seed3-frac0.5")
    data = fit_calls["data"]
    assert (data.train_set, data.val_set, data.batch_hook) == (datasets[0], datasets[1], hook)
    (opened,) = tracker
    stage = roster_entry("student", params).stage
    assert opened.tracking == params.tracking and opened.stage == stage
    assert opened.kwargs == {
        "extra_tags": {"hdkd.model": "student_tiny", "hdkd.world_size": "1", "hdkd.device": "cpu", "hdkd.seed": "3",
                       "hdkd.fraction": "0.5"},
        "resume_run_id": "killed-run",  # an interrupted run of the same inputs goes on logging to its MLflow run
        "datasets": {str(stage_data.train): "training", str(stage_data.val): "validation"},
        "run_name": f"{stage} seed3-frac0.5"}
    # the MLflow run is recorded for a resume before training starts, and the resume state goes once done
    assert fit_calls["mlflow_run"] == {"fingerprint": fingerprint, "run_id": "run-1"}
    assert not stage_data.resume_dir.exists()
    row = {"epoch": 1, "train_loss": 1.0, "val_loss": 0.5, "val_accuracy": 0.75, "epoch_time_s": 2.5}
    assert ("log_metrics", (row,), {"step": 1}) in opened.calls  # each epoch as it ends
    record = read_json(stage_data.run_record)
    assert (record["mlflow_run_id"], record["seed"], record["fraction"]) == ("run-1", 3, 0.5)
    assert load_model(stage_data.out_dir / "model.pt")[1]["history"] == [
        {k: v for k, v in row.items() if k != "epoch_time_s"}]  # timings vary by run: kept out of the files
    assert result == {"val_accuracy": 0.75, "val_loss": 0.5, "best_epoch": 1, "epochs": params.student.epochs,
                      "history": [row], "resumed_from": 0}
    curves = figures[0].axes[1]  # the registered run's curves, under the model's name
    assert [t.get_text() for t in curves.get_legend().get_texts()] == [roster_entry("student", params).label]


def test_another_rank_trains_only_no_tracking_no_files_and_its_resume_state_kept(
        fit_calls, wrapped, tracker, stage_data, tmp_path):
    from hdkd.training import run

    params = quick_params(tracking={"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    stage_data.resume_dir.mkdir()
    (stage_data.resume_dir / "last.pt").write_bytes(b"rank 0 writes it")
    rank1 = cpu_runtime(1, 2)
    run.run_training("student", params, stage_data, (None, None, ["a", "b"]), rank1)
    (opened,) = tracker
    assert not opened.tracking.enabled and opened.kwargs["extra_tags"]["hdkd.world_size"] == "2"
    # epochs go to a tracker that is off (it drops them); nothing of a finished run is logged
    assert fit_calls["mlflow_run"] is None and {c[0] for c in opened.calls} == {"log_metrics"}
    assert not stage_data.out_dir.exists() and not stage_data.metrics.exists()
    assert (stage_data.resume_dir / "last.pt").is_file()


def test_under_several_processes_the_step_budget_counts_the_steps_of_each_process(fit_calls, wrapped, stage_data):
    from hdkd.training import run
    from hdkd.training.engine import steps_per_epoch

    params = quick_params(train={"batch_size": 4})
    # 12 balanced images, 4 a step: 3 steps a pass in one process; in three, each takes its 4 images in batches of
    # 4 // 3 = 1: 4 steps
    assert (steps_per_epoch(12, 4), steps_per_epoch(12, 4, 3)) == (3, 4)
    run.run_training("student", params, stage_data, (None, None, ["a", "b"]),
                     cpu_runtime(0, 3), run=(0, 0.5))
    assert fit_calls["settings"].total_steps == params.student.epochs * 4


def test_the_feature_loss_distils_the_stages_and_weights_the_params_give(params):
    import torch

    from hdkd.roster import roster_entry

    cfg = params.distill.model_copy(update={"stages": [2, 3], "beta": 2.0})
    ones, zeros = [torch.ones(1, 4, 2, 2)] * 3, [torch.zeros(1, 4, 2, 2)] * 3
    direct = build_criterion("hdkd", cfg).feature
    aligned = build_criterion(roster_entry("aligned_kd", params), cfg, (4, 4, 4)).feature
    for projector in aligned.projectors.values():  # the identity: the same terms as the direct loss
        torch.nn.init.dirac_(projector.weight)
        torch.nn.init.zeros_(projector.bias)
    for feature in (direct, aligned):  # (i + 1)^β · MSE at the i-th listed stage: 1 · 1 at stage 2, 2² · 1 at 3
        terms = {s: t.item() for s, t in feature.stage_losses(ones, zeros).items()}
        assert terms == {2: 1.0, 3: 4.0}
    assert sorted(aligned.projectors) == ["2", "3"]
    batch = params.distill.model_copy(update={"kl_reduction": "batch"})  # the KL term's reduction, as given
    assert build_criterion("hdkd", batch).logit.reduction == "batch"


def test_the_step_budget_is_the_whole_splits_passes_in_one_process_unless_told_otherwise(tmp_path):
    from hdkd.training.run import step_budget

    write_packed_train(tmp_path / "balanced", [f"b{i}" for i in range(7)], size=32)
    paths = StagePaths(tmp_path / "balanced", tmp_path / "prepared", tmp_path / "out", tmp_path / "m.json",
                       tmp_path / "resume")
    params = quick_params(train={"batch_size": 4})
    cfg = params.student
    # 7 images, 4 a step: 1 step a pass (the partial batch dropped); two processes take 4 each in batches of 2
    assert step_budget(params, cfg, paths, 0.5) == cfg.epochs
    assert step_budget(params, cfg, paths, 0.5, 2) == 2 * cfg.epochs
    assert step_budget(params, cfg, paths, 1.0) is None  # the whole split: its own epochs
    assert step_budget(quick_params(train={"batch_size": 4, "budget": "epochs"}), cfg, paths, 0.5) is None


def test_a_runs_resume_fingerprint_ignores_what_cannot_change_its_result(stage_data):
    from hdkd.training.run import input_fingerprint

    def fingerprint(name, params):
        return input_fingerprint(name, params, stage_data, (0, 1.0))

    params = quick_params()
    grown = quick_params(seeds=[0, 1, 2, 3], fractions=[0.1, 0.25, 1.0], baseline_fractions=[0.25, 1.0])
    deeper = {**KD, "deit_vit": {**KD["deit_vit"], "kwargs": {**KD["deit_vit"]["kwargs"], "depth": 2}}}
    reordered = {**KD, "deit_vit": {**KD["deit_vit"], "kwargs": dict(reversed(KD["deit_vit"]["kwargs"].items()))}}
    for name in ("student", "hdkd", "deit_vit", "logit_kd"):
        assert fingerprint(name, grown) == fingerprint(name, params), name  # more seeds or fractions: runs kept
        # the same settings written in another order are the same inputs
        assert fingerprint(name, quick_params(kd=reordered)) == fingerprint(name, params), name
    # the default run is the params' seed on the whole split
    assert input_fingerprint("hdkd", params, stage_data) == input_fingerprint("hdkd", params, stage_data,
                                                                              (params.seed, 1.0))
    # another kd method's entry edited: only that method's runs start again
    assert fingerprint("logit_kd", quick_params(kd=deeper)) == fingerprint("logit_kd", params)
    assert fingerprint("deit_vit", quick_params(kd=deeper)) != fingerprint("deit_vit", params)
