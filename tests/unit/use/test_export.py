"""The export stage on a small prepared split with random-init tiny models: ONNX files that ONNX Runtime
runs like PyTorch, the report, the parity failure; and `hdkd predict` on the test split's own image files
(through model.pt: evaluate's probabilities; through model.onnx: the same classes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

import hdkd
from hdkd.data.augment import eval_transform
from hdkd.data.loader import PackedDataset
from hdkd.data.packed import load_split
from hdkd.data.prepare import prepare_dataset
from hdkd.data.sources import fetch_dataset
from hdkd.evaluation.evaluate import predict_proba
from hdkd.models import create_model
from hdkd.models.checkpoint import load_model, save_model
from hdkd.report.check import Tolerance, compare_json
from hdkd.roster import MODEL_NAMES
from hdkd.use.cli import main as cli
from hdkd.use.export import ParityError, export_models, export_onnx
from hdkd.use.inference import ONNX_METADATA, OnnxClassifier, read_image
from pipeline.export import main as export_stage
from tests.helpers.params import make_params, params_dict, section

SIZE = 32


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A prepared synthetic split at 32 px, a random-init tiny model per role, and the export stage run on them."""
    root = tmp_path_factory.mktemp("export")
    raw = {"data": {"root": str(root / "raw"), "image_size": SIZE, "synthetic": {"num_images": 120, "native_size": 40}},
           "evaluate": {"latency_batch_sizes": [1, 2], "latency_iters": 1, "latency_warmup": 0}}
    (root / "params.yaml").write_text(json.dumps(params_dict(raw)))  # JSON is YAML
    params = make_params(raw)
    fetch_dataset(params.data, root / "raw")
    prepare_dataset(params.data, params.seed, root / "prepared", root / "raw" / "source.json")
    classes = list(load_split(root / "prepared", "test").classes)
    torch.manual_seed(0)
    for role in MODEL_NAMES:
        save_model(root / "models" / role / "model.pt", create_model(f"{role}_tiny", len(classes), SIZE),
                   f"{role}_tiny", classes, SIZE, {})
    report = export_stage(["--params", str(root / "params.yaml"), "--data", str(root / "prepared"),
                           "--models", str(root / "models"), "--exports", str(root / "exports"),
                           "--out", str(root / "reports" / "export.json")])
    return root, report


def test_stage_report(workspace):
    root, report = workspace
    assert json.loads((root / "reports" / "export.json").read_text()) == report
    n_test = len(load_split(root / "prepared", "test"))
    assert sorted(report["models"]) == sorted(MODEL_NAMES)
    for name, entry in report["models"].items():
        assert entry["onnx"] == str(root / "exports" / name / "model.onnx")
        assert entry["opset"] >= 18
        assert entry["parity"]["n_images"] == n_test
        assert entry["parity"]["max_abs_diff_probability"] <= 1e-4
        assert entry["parity"]["top1_agreement"] == 1.0 and entry["parity"]["top1_mismatches"] == 0
        assert sorted(entry["timing_cpu"]) == ["bs1", "bs2"]
        for key, t in entry["timing_cpu"].items():
            assert t["batch_size"] == int(key[2:])
            assert t["onnxruntime_over_pytorch"] == pytest.approx(t["onnxruntime_ms_per_image"] / t["pytorch_ms_per_image"])
            assert t["pytorch_images_per_s"] == pytest.approx(1e3 / t["pytorch_ms_per_image"])
    assert report["timing_environment"]["threads"] == torch.get_num_threads() and report["tolerance"] == 1e-4


def test_the_reports_check_skips_only_the_timings(workspace):
    # A rerun on another machine differs in timings only: the committed export.json must still pass.
    _, report = workspace
    rerun = json.loads(json.dumps(report))
    rerun["timing_environment"] |= {"threads": 64, "onnxruntime": "9.9"}
    for entry in rerun["models"].values():
        for t in entry["timing_cpu"].values():
            t["pytorch_ms_per_image"] *= 3
    assert compare_json("export.json", report, rerun, Tolerance()) == []
    rerun["models"]["hdkd"]["parity"]["top1_agreement"] = 0.99
    assert compare_json("export.json", report, rerun, Tolerance())


@pytest.mark.parametrize("role", MODEL_NAMES)
def test_onnx_runs_like_pytorch_at_any_batch_size(workspace, role):
    # Independent of hdkd.use.inference: onnxruntime and the network, straight.
    root, _ = workspace
    model, meta = load_model(root / "models" / role / "model.pt")
    model.eval()
    proto = onnx.load(root / "exports" / role / "model.onnx")
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert props == {ONNX_METADATA[k]: meta[k] for k in ("model_name", "classes", "image_size")}
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    session = ort.InferenceSession(str(root / "exports" / role / "model.onnx"), providers=["CPUExecutionProvider"])
    test = PackedDataset(load_split(root / "prepared", "test"), eval_transform())
    for batch_size in (1, 7, len(test)):
        images, _ = next(iter(DataLoader(test, batch_size=batch_size)))
        with torch.inference_mode():
            expected = torch.softmax(model(images).double(), 1).numpy()
        got = torch.softmax(torch.from_numpy(session.run(None, {"images": images.numpy()})[0]).double(), 1).numpy()
        assert np.abs(got - expected).max() <= 1e-4
        assert (got.argmax(1) == expected.argmax(1)).all()


def test_a_parity_failure_fails_the_stage(workspace, tmp_path, monkeypatch):
    # The student's "export" is the teacher's network: parity must catch it.
    root, _ = workspace
    shutil.copy(root / "models" / "student" / "model.pt", tmp_path / "model.pt")
    monkeypatch.setattr("hdkd.use.export.export_onnx",
                        lambda model, meta, path: shutil.copy(root / "exports" / "teacher" / "model.onnx", path) and 18)
    test = load_split(root / "prepared", "test")
    (tmp_path / "student").mkdir()  # export_onnx (replaced here) writes through io, which makes the folder
    with pytest.raises(ParityError, match=rf"{tmp_path / 'student' / 'model.onnx'}: max \|Δ probability\| .* top-1 differs on"):
        export_models({"student": tmp_path / "model.pt"}, PackedDataset(test, eval_transform()), list(test.classes),
                      tmp_path, image_size=SIZE, batch_size=64,
                      latency=section("evaluate", latency_batch_sizes=[1], latency_warmup=0, latency_iters=1))


def test_an_onnx_file_without_hdkd_metadata_is_a_clear_error(workspace, tmp_path):
    root, _ = workspace
    proto = onnx.load(root / "exports" / "hdkd" / "model.onnx")
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "bare.onnx")
    with pytest.raises(ValueError, match="bare.onnx is not an hdkd ONNX export: its metadata_props lack"):
        OnnxClassifier(tmp_path / "bare.onnx")


def predict_json(capsys, *argv) -> dict:
    assert cli(["predict", "--format", "json", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out)


def test_predict_on_test_files_equals_evaluate_and_onnx_agrees(workspace, capsys):
    root, _ = workspace
    test = load_split(root / "prepared", "test")
    sources = pd.read_csv(root / "prepared" / "test" / "index.csv", dtype=str)["source"].tolist()
    # The same pixels as prepare packed: predict resizes as prepare does.
    assert all((read_image(s, SIZE) == test.images[i]).all() for i, s in enumerate(sources))
    model, _ = load_model(root / "models" / "hdkd" / "model.pt")
    _, expected = predict_proba(model, DataLoader(PackedDataset(test, eval_transform()), batch_size=64))
    k = len(test.classes)
    through_pt = predict_json(capsys, "--model", root / "models" / "hdkd" / "model.pt", "--batch-size", 64,
                              "--top-k", k, *sources)["predictions"]
    through_onnx = predict_json(capsys, "--model", root / "exports" / "hdkd" / "model.onnx", "--top-k", k,
                                *sources)["predictions"]
    assert [p["path"] for p in through_pt] == [p["path"] for p in through_onnx] == sources

    def probabilities(p: dict) -> list[float]:
        by_class = {t["class"]: t["probability"] for t in p["top_k"]}
        return [by_class[c] for c in test.classes]

    # Same batches as evaluate's loader: the same numbers, up to float rounding.
    assert np.array([probabilities(p) for p in through_pt]) == pytest.approx(expected, abs=1e-12)
    assert [p["predicted"] for p in through_pt] == [test.classes[i] for i in expected.argmax(1)]
    assert [p["predicted"] for p in through_onnx] == [p["predicted"] for p in through_pt]
    assert np.array([probabilities(p) for p in through_onnx]) == pytest.approx(expected, abs=1e-4)


def test_an_export_holds_no_path_of_the_machine_that_made_it(tmp_path):
    # The exporter records each node's Python stack trace, absolute source paths included: the same
    # network exported from two clones gave two files (and DVC hashes).
    model = create_model("hdkd_tiny", 3, 32).eval()
    meta = {"model_name": "hdkd_tiny", "classes": ["a", "b", "c"], "image_size": 32}
    export_onnx(model, meta, tmp_path / "a.onnx")
    data = (tmp_path / "a.onnx").read_bytes()
    assert str(Path(hdkd.__file__).parent).encode() not in data and b"site-packages" not in data
    proto = onnx.load_from_string(data)
    assert proto.graph.node and not [p.key for n in proto.graph.node for p in n.metadata_props
                                     if p.key.endswith("stack_trace")]
    assert {p.key for p in proto.metadata_props} == set(ONNX_METADATA.values())
