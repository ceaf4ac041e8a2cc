"""Hand-made results bundles: chosen numbers (not computed), so that the report and the evidence are checked
against what they must print, and MLflow runs that hold them."""

from __future__ import annotations

from hdkd.evidence.bundle import BUNDLE_ARTIFACT, make_bundle
from hdkd.infra.io import write_json
from tests.helpers.params import make_params

CLASSES = ["akiec", "bcc", "nv"]


def hand_evaluation(acc: float, p: float, r: float, f1: float, acc_ci, f1_ci, per_class_f1, cm) -> dict:
    """An evaluation record with chosen numbers (not computed: the report must only format them)."""
    return {
        "n": sum(map(sum, cm)), "accuracy": acc, "balanced_accuracy": r, "precision_macro": p,
        "recall_macro": r, "f1_macro": f1, "precision_weighted": p, "recall_weighted": acc,
        "f1_weighted": f1 + 0.05, "roc_auc_macro": 0.9, "ece": 0.0625, "ece_bins": 15,
        "confusion_matrix": cm,
        "per_class": [
            {"class": c, "precision": 0.5, "recall": 0.25, "f1": f, "support": sum(row), "roc_auc": 0.9}
            for c, f, row in zip(CLASSES, per_class_f1, cm)
        ],
        "classes_absent": [],
        "ci": {"level": 0.95, "resamples": 1000, "seed": 0, "method": "percentile",
               "accuracy": acc_ci, "f1_macro": f1_ci},
        "predictions": {"true_counts": [sum(row) for row in cm], "predicted_counts": [sum(c) for c in zip(*cm)],
                        "mean_confidence": 0.75},
    }


def hand_efficiency(params: int, macs: int, ms: float) -> dict:
    return {"params": {"total": params, "trainable": params}, "macs": macs, "input_shape": [3, 224, 224],
            "timing": [{"device": "cpu", "batch_size": 1, "amp": False, "ms_per_batch": ms, "ms_per_image": ms,
                        "images_per_s": 1000 / ms, "device_name": "x86_64", "threads": 2}]}


TEST_LABELS = [0] * 10 + [1] * 10 + [2] * 20  # the hand confusion matrices' rows


def hand_runs(accuracy: float, spread: int, seeds=(0, 1, 2), fractions=(0.1, 0.25, 0.5, 1.0)) -> list[dict]:
    """A model's runs: seed s at fraction f errs on the first k test images (k grows as f shrinks, and
    by ``spread`` per seed), so accuracy and per-image correctness agree, and pairs of models with
    different spreads differ by seed."""
    runs = []
    for f in fractions:
        for s in seeds:
            k = min(len(TEST_LABELS), max(0, round(len(TEST_LABELS) * (1 - accuracy * (0.7 + 0.3 * f))) + spread * s))
            predictions = [(y + 1) % 3 if i < k else y for i, y in enumerate(TEST_LABELS)]
            acc = 1 - k / len(TEST_LABELS)
            runs.append({"seed": s, "fraction": f, "predictions": predictions, "evaluation": {
                "accuracy": acc, "f1_macro": acc - 0.1, "balanced_accuracy": acc - 0.05, "f1_weighted": acc - 0.02,
                "roc_auc_macro": 0.9, "ece": 0.0625}})
    return runs


def hand_models(shift: float = 0.0) -> dict:
    """Teacher / student / HDKD results; ``shift`` moves every accuracy and its CI (ablation runs)."""
    cm = [[8, 2, 0], [1, 8, 1], [0, 0, 20]]
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.25 / e, "val_accuracy": 0.5 + 0.125 * e,
                "lr": 0.001} for e in (1, 2, 3)]
    return {
        "teacher": {"evaluation": hand_evaluation(0.9 + shift, 0.8, 0.7, 0.75, [0.85 + shift, 0.95 + shift], [0.7, 0.8],
                                                  [0.5, 0.75, 1.0], cm),
                    "efficiency": hand_efficiency(3948677, 5_812_345_678, 40.0), "history": history,
                    "runs": hand_runs(0.9 + shift, 1)},
        "student": {"evaluation": hand_evaluation(0.8 + shift, 0.7, 0.6, 0.65, [0.75 + shift, 0.85 + shift], [0.6, 0.7],
                                                  [0.25, 0.5, 0.875], cm),
                    "efficiency": hand_efficiency(3724977, 2_050_000_000, 20.0), "history": history,
                    "runs": hand_runs(0.8 + shift, 2)},
        "hdkd": {"evaluation": hand_evaluation(0.85 + shift, 0.75, 0.65, 0.7, [0.8 + shift, 0.9 + shift], [0.65, 0.75],
                                               [0.375, 0.625, 0.9375], cm),
                 "efficiency": hand_efficiency(3727288, 2_060_000_000, 21.0), "history": history,
                 "runs": hand_runs(0.85 + shift, 1)},
    }


def bundle_with(overrides: dict | None = None, shift: float = 0.0, **provenance) -> dict:
    """A results bundle of params.yaml with ``overrides`` ({"distill": {"lambda": 1.0}})."""
    provenance = {"git_commit": "0123456789abcdef0123456789abcdef01234567", "git_dirty": False} | provenance
    return make_bundle(hand_models(shift), make_params(overrides), CLASSES, dataset="toy", test_labels=TEST_LABELS,
                       provenance=provenance)


def log_run(client, experiment_id, tags, start_time, bundle=None, tmp=None, artifact_dir=None) -> str:
    """An MLflow run with ``tags``, holding ``bundle`` as the evaluate stage logs it (if given)."""
    run = client.create_run(experiment_id, start_time=start_time, tags=tags)
    if bundle is not None:
        path = tmp / run.info.run_id / BUNDLE_ARTIFACT
        write_json(path, bundle)
        client.log_artifact(run.info.run_id, str(path), artifact_dir)
    client.set_terminated(run.info.run_id)
    return run.info.run_id
