"""`hdkd predict` by its module's contract, on a stand-in classifier (no network): which files the inputs name, in
what order and how often; the output's records, columns and formats; the exit status; and argument errors."""

from __future__ import annotations

import argparse
import csv
import io
import json

import numpy as np
import pytest

from hdkd.use import predict as p
from hdkd.use.inference import Classifier
from tests.helpers.data import write_image


class FixedClassifier(Classifier):
    """The same probabilities for every image, whatever it shows; counts the images it was given."""

    def __init__(self, probs, classes=("a", "b", "c"), image_size=16):
        self.probs, self.classes, self.image_size, self.source, self.seen = probs, tuple(classes), image_size, "m", []

    def predict_proba(self, images):
        self.seen.append(len(images))
        return np.tile(np.asarray(self.probs, dtype=np.float64), (len(images), 1))


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """d/x.png, d/sub/y.png, d/.hid.png, d/.dot/z.png, d/bad.png (not an image), e/ (empty); cwd = tmp_path."""
    monkeypatch.chdir(tmp_path)
    for name in ("d/x.png", "d/sub/y.png", "d/.hid.png", "d/.dot/z.png"):
        write_image(tmp_path / name, size=(8, 8))
    (tmp_path / "d" / "bad.png").write_text("not an image\n")
    (tmp_path / "e").mkdir()
    return tmp_path


def names(files):
    return [f.as_posix() for f in files]


def test_a_folder_gives_its_files_at_any_depth_in_order_without_hidden_ones(tree):
    files, errors = p.expand_inputs(["d"])
    assert names(files) == ["d/bad.png", "d/sub/y.png", "d/x.png"] and errors == []


def test_each_file_is_predicted_once_where_first_named(tree):
    files, errors = p.expand_inputs(["d/x.png", "d", "d/./x.png", "d/*.png"])
    assert names(files) == ["d/x.png", "d/bad.png", "d/sub/y.png"] and errors == []


def test_inputs_that_name_nothing_each_get_their_reason(tree):
    files, errors = p.expand_inputs(["e", "missing.png", "d/*.jpg", "nowhere/*.png", "d/x.png"])
    assert names(files) == ["d/x.png"]
    assert errors == [{"path": "e", "error": "folder holds no files"},
                      {"path": "missing.png", "error": "no such file or folder"},
                      {"path": "d/*.jpg", "error": "no file matches this pattern"},
                      {"path": "nowhere/*.png", "error": "no file matches this pattern"}]


def test_a_glob_leaves_hidden_files_out_unless_it_names_them(tree):
    assert names(p.expand_inputs(["d/**/*.png"])[0]) == ["d/bad.png", "d/sub/y.png", "d/x.png"]
    assert names(p.expand_inputs(["d/.*.png"])[0]) == ["d/.hid.png"]
    assert names(p.expand_inputs(["d/.dot/*"])[0]) == ["d/.dot/z.png"]
    assert names(p.expand_inputs(["d/**"])[0]) == ["d/bad.png", "d/sub/y.png", "d/x.png"]  # ** alone: every file
    assert names(p.expand_inputs(["d/s?b/[xy].png"])[0]) == ["d/sub/y.png"]
    assert names(p.expand_inputs([str(tree / "d" / "*.png")])[0]) == [(tree / "d" / "bad.png").as_posix(),
                                                                      (tree / "d" / "x.png").as_posix()]


def test_a_prediction_lists_the_k_most_probable_ties_to_the_lower_label():
    record = p.prediction("img.png", np.array([0.25, 0.5, 0.25]), ("a", "b", "c"), 2)
    assert record == {"path": "img.png", "predicted": "b", "probability": 0.5,
                      "top_k": [{"class": "b", "probability": 0.5}, {"class": "a", "probability": 0.25}]}
    assert type(record["probability"]) is float
    assert [c["class"] for c in p.prediction("i", np.array([0.1, 0.2, 0.7]), ("a", "b", "c"), 9)["top_k"]] == [
        "c", "b", "a"]
    # many classes, many ties (numpy's default sort is not stable beyond 16 values): still the lower label first
    probs = np.tile([0.0, 0.01, 0.02], 34)[:100] / np.tile([0.0, 0.01, 0.02], 34)[:100].sum()
    top = p.prediction("i", probs, tuple(f"c{i:03d}" for i in range(100)), 5)["top_k"]
    assert [c["class"] for c in top] == ["c002", "c005", "c008", "c011", "c014"]


def test_unreadable_files_are_reported_with_their_reason_and_readable_ones_predicted_in_batches(tree):
    classifier = FixedClassifier([0.2, 0.7, 0.1])
    files = [tree / "d" / n for n in ("x.png", "bad.png", "sub/y.png", ".hid.png")]
    predictions, errors = p.predict_files(classifier, files, batch_size=2, top_k=1)
    assert [r["path"] for r in predictions] == [str(files[0]), str(files[2]), str(files[3])]
    assert {r["predicted"] for r in predictions} == {"b"} and classifier.seen == [1, 2]
    assert [e["path"] for e in errors] == [str(files[1])] and errors[0]["error"]


def test_csv_puts_errors_after_predictions_with_top_k_as_json():
    record = p.prediction("x.png", np.array([0.25, 0.75]), ("a", "b"), 2)
    text = p.render("csv", FixedClassifier([0.25, 0.75], ("a", "b")), [record], [{"path": "y.png", "error": "why"}])
    assert text.splitlines()[0] == "path,predicted,probability,top_k,error"
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[0]["path"] == "x.png" and rows[0]["predicted"] == "b" and float(rows[0]["probability"]) == 0.75
    assert json.loads(rows[0]["top_k"]) == record["top_k"] and rows[0]["error"] == ""
    assert rows[1] == {"path": "y.png", "predicted": "", "probability": "", "top_k": "", "error": "why"}
    assert "\r" not in text


def test_json_holds_the_model_its_classes_the_predictions_and_the_errors():
    record = p.prediction("x.png", np.array([0.25, 0.75]), ("a", "b"), 1)
    text = p.render("json", FixedClassifier([0.25, 0.75], ("a", "b")), [record], [{"path": "y", "error": "why"}])
    assert json.loads(text) == {"model": "m", "classes": ["a", "b"], "predictions": [record],
                                "errors": [{"path": "y", "error": "why"}]}
    assert text.endswith("}\n")
    # one value per line, two spaces a level: the file reads and diffs line by line
    assert text.splitlines()[:4] == ['{', '  "model": "m",', '  "classes": [', '    "a",']


def run_args(tree, out=None, fmt=None, inputs=("d",)):
    return argparse.Namespace(model="m.pt", out=out, format=fmt, top_k=3, batch_size=4, device="cpu", label_file=None,
                              inputs=list(inputs))


@pytest.mark.parametrize("out, fmt, is_json", [("o.JSON", None, True), ("o.csv", None, False), ("o.json", "csv", False),
                                               ("o.txt", "json", True)])
def test_the_format_follows_the_out_files_suffix_unless_given(tree, monkeypatch, out, fmt, is_json):
    monkeypatch.setattr(p, "load_classifier", lambda ref, device: FixedClassifier([0.2, 0.7, 0.1]))
    assert p.run(run_args(tree, tree / out, fmt)) == 0
    text = (tree / out).read_text()
    assert text.startswith("{") == is_json


def test_exit_status_is_2_when_no_image_got_a_prediction_and_each_skip_is_said(tree, monkeypatch, capsys):
    monkeypatch.setattr(p, "load_classifier", lambda ref, device: FixedClassifier([0.2, 0.7, 0.1]))
    assert p.run(run_args(tree, inputs=["d/bad.png", "missing.png"])) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "hdkd predict: skipped missing.png: no such file or folder"
    assert err[1].startswith("hdkd predict: skipped d/bad.png: ")
    assert p.run(run_args(tree, inputs=["d/x.png", "missing.png"])) == 0
    assert capsys.readouterr().out.startswith("path,predicted,probability,top_k,error\nd/x.png,b,0.7,")


def test_counts_must_be_positive():
    assert p._positive("1") == 1
    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 1, got 0"):
        p._positive("0")


def test_the_command_line_needs_a_model_and_says_what_each_option_takes(capsys):
    parser = argparse.ArgumentParser(prog="hdkd predict")
    p.add_arguments(parser)
    for argv, message in ((["x.png"], "the following arguments are required: --model"),
                          (["--model", "m.pt", "--format", "xml", "x.png"], "--format: invalid choice: 'xml'"),
                          (["--model", "m.pt", "--format", "CSV", "x.png"], "--format: invalid choice: 'CSV'")):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    for device in ("auto", "cpu", "cuda"):
        assert parser.parse_args(["--model", "m.pt", "--device", device, "x.png"]).device == device
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m.pt", "--device", "gpu", "x.png"])
    assert parser.parse_args(["--model", "m.pt", "--format", "csv", "x.png"]).format == "csv"
    # the defaults docs/using.md gives
    assert vars(parser.parse_args(["--model", "m.pt", "x.png", "y/"])) == {
        "model": "m.pt", "out": None, "format": None, "top_k": 3, "batch_size": 32, "device": "auto",
        "label_file": None, "inputs": ["x.png", "y/"]}
    text = " ".join(parser.format_help().split())
    for phrase in ("[--label-file LABEL_FILE] INPUT [INPUT ...]",
                   "INPUT image files, folders or glob patterns",
                   "--model MODEL models/<role>/model.pt, an exported model.onnx, or an MLflow model URI "
                   "(models:/..., runs:/...)", "--out OUT output file (default: stdout)",
                   "--format {csv,json} default: json if --out ends in .json, else csv",
                   "--top-k TOP_K classes listed per image (default 3)",
                   "--batch-size BATCH_SIZE images per batch (default 32)",
                   "--device {auto,cpu,cuda} default auto: the GPU when there is one",
                   "--label-file LABEL_FILE class names, one a line, in label order: fail unless the model's "
                   "classes are these"):
        assert phrase in text, phrase


@pytest.mark.parametrize(("count", "shown"), [(9, True), (8, False)])
def test_a_progress_bar_counts_the_images_when_there_are_more_than_four_batches(tmp_path, capsys, count, shown):
    files = [write_image(tmp_path / f"{i}.png", size=(8, 8)) or tmp_path / f"{i}.png" for i in range(count)]
    p.predict_files(FixedClassifier([0.2, 0.7, 0.1]), files, batch_size=2, top_k=1)
    err = capsys.readouterr().err
    if shown:
        assert "predict: 100%" in err and f"{count}/{count}" in err and "img/s" in err, err
    else:
        assert err == ""  # a few batches: no bar


def test_no_files_give_no_predictions():
    classifier = FixedClassifier([0.2, 0.7, 0.1])
    assert p.predict_files(classifier, [], batch_size=4, top_k=1) == ([], []) and classifier.seen == []


@pytest.mark.parametrize(("device", "cuda", "loaded_on"), [("auto", True, "cuda"), ("auto", False, "cpu"),
                                                           ("cpu", True, "cpu"), ("cuda", True, "cuda")])
def test_the_model_runs_on_the_device_asked_for_auto_the_gpu_when_there_is_one(tree, monkeypatch, device, cuda,
                                                                               loaded_on):
    import torch

    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(p, "load_classifier", lambda ref, dev: seen.append(dev) or FixedClassifier([0.2, 0.7, 0.1]))
    args = run_args(tree, inputs=["d/x.png"])
    args.device = device
    assert p.run(args) == 0 and seen == [loaded_on]


def test_cuda_asked_for_where_there_is_none_is_refused_before_loading(tree, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(p, "load_classifier", lambda ref, dev: pytest.fail("the model was loaded"))
    args = run_args(tree, inputs=["d/x.png"])
    args.device = "cuda"
    with pytest.raises(RuntimeError) as error:
        p.run(args)
    assert str(error.value) == "--device cuda, but no CUDA device is available; use --device auto or cpu"
