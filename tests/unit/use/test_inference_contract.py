"""The one interface of every trained classifier, by its contract: what a network must return, what each file kind
is opened as (and what a file of the wrong kind is told), the batch evaluation feeds, and the label-file check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hdkd.data.augment import eval_transform
from hdkd.use.inference import (
    TorchClassifier,
    check_classes,
    is_mlflow_uri,
    load_classifier,
    read_image,
    to_batch,
)
from tests.helpers.data import write_image


class Logits(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out(x)


def test_probabilities_are_float64_softmax_of_the_logits_one_row_an_image():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 3.0, 3.0]])
    classifier = TorchClassifier(Logits(lambda x: logits), ["a", "b", "c"], 8, "net")
    probs = classifier.predict_proba(torch.zeros(2, 3, 8, 8))
    assert probs.dtype == np.float64 and probs.shape == (2, 3)
    np.testing.assert_allclose(probs, torch.softmax(logits.double(), 1).numpy(), rtol=0, atol=1e-15)
    assert classifier.classes == ("a", "b", "c") and classifier.image_size == 8


@pytest.mark.parametrize("out, got", [(lambda x: torch.zeros(len(x), 2), "(2, 2)"),
                                      (lambda x: (torch.zeros(len(x), 3),), "tuple")])
def test_a_network_that_does_not_return_logits_per_class_is_named_with_what_it_returned(out, got):
    classifier = TorchClassifier(Logits(out), ["a", "b", "c"], 8, "net.pt")
    with pytest.raises(ValueError) as e:
        classifier.predict_proba(torch.zeros(2, 3, 8, 8))
    assert str(e.value) == f"net.pt must return logits (B=2, C=3) in eval mode, got {got}"


def test_a_model_file_is_put_on_the_device_asked_for(tmp_path, monkeypatch):
    import hdkd.use.inference as inference
    from hdkd.models import create_model
    from hdkd.models.checkpoint import load_model, save_model

    save_model(tmp_path / "model.pt", create_model("hdkd_tiny", 2, 32), "hdkd_tiny", ["a", "b"], 32, {})
    mapped_to = []  # the weights are mapped to the device as they load (a GPU's file opens on a CPU machine)
    monkeypatch.setattr(inference, "load_model", lambda path, device: mapped_to.append(device) or load_model(path))
    classifier = load_classifier(tmp_path / "model.pt", device="meta")  # a device that is not the CPU, everywhere
    assert mapped_to == ["meta"]
    assert classifier.device == torch.device("meta") and classifier.source == str(tmp_path / "model.pt")
    assert {p.device.type for p in classifier.model.parameters()} == {"meta"} and not classifier.model.training
    assert classifier.classes == ("a", "b") and classifier.image_size == 32


def test_mlflow_uris_are_told_from_paths_by_their_scheme():
    assert all(map(is_mlflow_uri, ["models:/hdkd/1", "runs:/abc/model", "mlflow-artifacts:/x/y"]))
    assert not any(map(is_mlflow_uri, ["models/hdkd/model.pt", "runs/abc", "model.onnx"]))


def test_a_file_named_onnx_in_any_case_is_opened_as_onnx(tmp_path):
    for name in ("model.ONNX", "model.onnx"):
        with pytest.raises(FileNotFoundError, match=f"ONNX model not found: .*{name}"):
            load_classifier(tmp_path / name)
    bad = tmp_path / "bad.Onnx"
    bad.write_bytes(b"\x00not onnx")
    with pytest.raises(ValueError, match=rf"^{bad} is not a loadable ONNX model: "):
        load_classifier(bad)


def test_a_batch_is_each_image_as_evaluation_normalises_it():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    batch = to_batch(images)
    assert batch.dtype == torch.float32 and batch.shape == (3, 3, 8, 8)
    for got, image in zip(batch, images):
        torch.testing.assert_close(got, eval_transform()(torch.from_numpy(image).permute(2, 0, 1)), rtol=0, atol=0)


def test_an_image_file_is_read_as_rgb_at_the_models_size(tmp_path):
    path = write_image(tmp_path / "x.png", (10, 20, 30), (40, 30))
    image = read_image(path, 16)
    assert image.dtype == np.uint8 and image.shape == (16, 16, 3)
    assert (image == [10, 20, 30]).all()


def test_a_file_that_is_not_an_image_is_named_in_the_error(tmp_path):
    from hdkd.data.errors import UnreadableImage

    bad = tmp_path / "scan.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UnreadableImage) as e:
        read_image(bad, 16)
    assert e.value.name == str(bad) and str(e.value).startswith(f"{bad}: UnidentifiedImageError: ")


def test_the_label_file_must_list_the_models_classes_in_order(tmp_path):
    classifier = TorchClassifier(Logits(lambda x: x), ["a", "b"], 8, "net.pt")
    ok = tmp_path / "ok.txt"
    ok.write_text("  a \n\nb\n\n")  # blank lines and surrounding spaces do not count
    check_classes(classifier, ok)
    swapped = tmp_path / "swapped.txt"
    swapped.write_text("b\na\n")
    with pytest.raises(ValueError) as e:
        check_classes(classifier, swapped)
    assert str(e.value) == (f"net.pt was trained on classes ['a', 'b'], but the label file {swapped} lists "
                            "['b', 'a']")


def test_the_label_file_is_read_as_utf8_whatever_the_locale(tmp_path):
    """Class names beyond ASCII (Ödem, 腫瘍) in a UTF-8 label file match on a machine whose locale is not UTF-8
    (Windows' cp1252, a C locale): checked in a Python started under the ASCII C locale."""
    import os
    import subprocess
    import sys

    labels = tmp_path / "labels.txt"
    labels.write_text("Ödem\n腫瘍\n", encoding="utf-8")
    check_classes(TorchClassifier(nn.Identity(), ["Ödem", "腫瘍"], 8, "net"), labels)  # here, and under C:
    code = ("import sys, torch; from hdkd.use.inference import TorchClassifier, check_classes; "
            "import locale; assert locale.getpreferredencoding(False) != 'UTF-8', locale.getpreferredencoding(False); "
            "check_classes(TorchClassifier(torch.nn.Identity(), ['\\u00d6dem', '\\u816b\\u760d'], 8, 'net'), "
            "sys.argv[1])")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, "-c", code, str(labels)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def linear_onnx(path, classes=("a", "b", "c"), size=4, metadata=True, features_first=False):
    """An ONNX file of the export's interface ('images' N x 3 x S x S -> 'logits' N x C): a linear map on the
    flattened image, its weights returned; with the export's metadata_props unless ``metadata`` is False, and with
    the flattened image as a first output ('flat') if ``features_first``."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from hdkd.use.inference import ONNX_METADATA

    weights = np.random.default_rng(0).standard_normal((3 * size * size, len(classes))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "linear", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, size, size])],
        [helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["n", 3 * size * size])] * features_first
        + [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", len(classes)])],
        [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        values = {"model_name": "linear", "classes": list(classes), "image_size": size}
        helper.set_model_props(model, {name: json.dumps(values[key]) for key, name in ONNX_METADATA.items()})
    onnx.save(model, path)
    return weights


def test_an_onnx_export_gives_the_softmax_of_its_logits_with_the_classes_and_size_it_carries(tmp_path):
    weights = linear_onnx(tmp_path / "m.onnx")
    classifier = load_classifier(tmp_path / "m.onnx")
    assert classifier.classes == ("a", "b", "c") and classifier.image_size == 4
    assert classifier.source == str(tmp_path / "m.onnx")
    images = torch.randn(5, 3, 4, 4)
    probs = classifier.predict_proba(images)
    logits = images.reshape(5, -1).double() @ torch.from_numpy(weights).double()
    assert probs.dtype == np.float64 and probs.shape == (5, 3)
    np.testing.assert_allclose(probs, torch.softmax(logits, 1).numpy(), rtol=1e-5)


def test_an_onnx_export_with_more_outputs_is_read_by_its_logits_output(tmp_path):
    weights = linear_onnx(tmp_path / "m.onnx", features_first=True)
    images = torch.randn(2, 3, 4, 4)
    logits = images.reshape(2, -1).double() @ torch.from_numpy(weights).double()
    probs = load_classifier(tmp_path / "m.onnx").predict_proba(images)
    np.testing.assert_allclose(probs, torch.softmax(logits, 1).numpy(), rtol=1e-5)


def test_an_onnx_file_that_is_not_an_export_of_this_project_names_what_it_lacks(tmp_path):
    linear_onnx(tmp_path / "plain.onnx", metadata=False)
    with pytest.raises(ValueError) as e:
        load_classifier(tmp_path / "plain.onnx")
    assert str(e.value) == (f"{tmp_path / 'plain.onnx'} is not an hdkd ONNX export: its metadata_props lack "
                            "['hdkd.model_name', 'hdkd.classes', 'hdkd.image_size'] (export it with "
                            "`python -m pipeline.export`)")


def test_onnx_runtime_runs_on_the_threads_and_device_asked_for(tmp_path, monkeypatch):
    import onnxruntime as ort

    from hdkd.use.inference import OnnxClassifier

    linear_onnx(tmp_path / "m.onnx")
    assert OnnxClassifier(tmp_path / "m.onnx", threads=1).session.get_session_options().intra_op_num_threads == 1
    assert OnnxClassifier(tmp_path / "m.onnx").session.get_session_options().intra_op_num_threads == 0  # ORT's own
    seen = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda path, options, providers: seen.append(providers) or real(
        path, options, providers=["CPUExecutionProvider"]))
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    load_classifier(tmp_path / "m.onnx", device="cuda")
    load_classifier(tmp_path / "m.onnx", device="cpu")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])  # CPU-only onnxruntime
    OnnxClassifier(tmp_path / "m.onnx", device="cuda")
    assert seen == [["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"],
                    ["CPUExecutionProvider"]]


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite tracking store (also the registry), its artifacts under ``tmp_path``."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("x", artifact_location=(tmp_path / "a").as_uri()))
    yield mlflow
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def log_linear(mlflow, metadata):
    """A pickled linear classifier of 8 x 8 images into 2 classes, logged with ``metadata``; its runs:/ URI."""
    import mlflow.pytorch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)).eval()
    with mlflow.start_run() as run:
        mlflow.pytorch.log_model(model, name="m", metadata=metadata, serialization_format="pickle",
                                 pip_requirements=[])
    return f"runs:/{run.info.run_id}/m", model


def test_an_mlflow_model_gives_the_probabilities_of_the_network_it_logged_with_its_classes(mlflow_store, monkeypatch):
    import mlflow.pytorch

    uri, model = log_linear(mlflow_store, {"model_name": "linear", "classes": ["a", "b"], "image_size": 8})
    loaded_to = []
    real = mlflow.pytorch.load_model
    monkeypatch.setattr(mlflow.pytorch, "load_model",
                        lambda uri, **kw: loaded_to.append(kw.get("map_location")) or real(uri, **kw))
    classifier = load_classifier(uri)
    # the weights are mapped to the device asked for as they load: a model logged on a GPU opens on a CPU machine
    assert loaded_to == [torch.device("cpu")]
    assert classifier.classes == ("a", "b") and classifier.image_size == 8 and classifier.source == uri
    assert not classifier.model.training
    images = torch.randn(3, 3, 8, 8)
    np.testing.assert_allclose(classifier.predict_proba(images), torch.softmax(model(images).double(), 1).detach().numpy(),
                               rtol=1e-6)


def test_an_mlflow_model_is_put_on_the_device_asked_for(mlflow_store):
    uri, _ = log_linear(mlflow_store, {"model_name": "linear", "classes": ["a", "b"], "image_size": 8})
    classifier = load_classifier(uri, device="meta")  # a device that is not the CPU, on every machine
    assert classifier.device == torch.device("meta")
    assert {p.device.type for p in classifier.model.parameters()} == {"meta"}


def test_an_mlflow_model_without_the_checkpoint_metadata_says_how_to_log_it(mlflow_store):
    uri, _ = log_linear(mlflow_store, {"classes": ["a", "b"]})
    with pytest.raises(ValueError) as e:
        load_classifier(uri)
    assert str(e.value) == (f"MLflow model {uri} lacks metadata ['model_name', 'image_size']: log it with "
                            "mlflow.pytorch.log_model(..., metadata={k: meta[k] for k in "
                            "hdkd.models.checkpoint.CHECKPOINT_KEYS})")


def test_an_mlflow_model_of_another_flavour_is_named_with_its_flavours(mlflow_store):
    import mlflow.pyfunc

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[float]) -> list[float]:
            return model_input

    with mlflow_store.start_run() as run:
        mlflow.pyfunc.log_model(name="m", python_model=Constant(), pip_requirements=[])
    uri = f"runs:/{run.info.run_id}/m"
    with pytest.raises(ValueError) as e:
        load_classifier(uri)
    assert str(e.value) == f"MLflow model {uri} has flavours ['python_function'], not 'pytorch'"


@pytest.mark.parametrize("store", ["MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"])
def test_a_tracking_or_registry_server_that_is_down_is_named_with_what_to_do(mlflow_store, monkeypatch, store):
    from tests.helpers.net import free_port

    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv(store, down)
    (mlflow_store.set_tracking_uri if store == "MLFLOW_TRACKING_URI" else mlflow_store.set_registry_uri)(down)
    with pytest.raises(ValueError) as e:
        load_classifier("models:/hdkd/1")
    assert str(e.value).startswith(f"cannot open MLflow model models:/hdkd/1: MLflow tracking server {down} is "
                                   "unreachable (")
    assert str(e.value).endswith("); start it, or point MLFLOW_TRACKING_URI (and MLFLOW_REGISTRY_URI) at the server "
                                 "that holds the model")
