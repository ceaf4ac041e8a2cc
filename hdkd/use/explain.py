"""Where the networks look: Grad-CAM, attention rollout, their sanity check, and overlay figures.

- :func:`grad_cam`: captum's ``LayerGradCam`` on the last convolutional stage (teacher and
  student share its shape), upsampled to the image. The HDKD student is explained through its
  inference output, the average of the class and distillation heads.
- :func:`attention_rollout`: Abnar & Zuidema (2020) over the DFLT blocks, from the class or the
  distillation token to the patch tokens, mapped back to the token grid and upsampled.
- :func:`rank_correlations`: Spearman correlation of two maps per image; the sanity check of
  Adebayo et al. (2018) compares a trained model's maps with those of a randomly initialised copy
  (:func:`random_init`), which must differ clearly (mean below :data:`SANITY_LIMIT`).
- :func:`input_dependence`: the mean Spearman correlation between the maps of different images,
  which must stay below :data:`INPUT_DEPENDENCE_LIMIT`: a map that lights the same pixels whatever
  the image shows says nothing about the image.

A map that fails either check (:func:`map_checks`) is not drawn as an explanation: its figure cells
show the image alone, marked *withheld* with the reason.

Every map is ``(N, H, W)`` at the input's size, scaled per image to [0, 1].

``hdkd explain --model models/hdkd/model.pt [--method gradcam|rollout] [--out DIR] IMAGE...``
writes one overlay PNG per image (:func:`add_arguments`, :func:`run`); the DVC stage ``explain``
(:func:`explain_test_split`) writes the test-split figure and the sanity check's numbers.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import nn

from hdkd.data.packed import load_split
from hdkd.evaluation.efficiency import eval_mode
from hdkd.evidence.plots import figure_png, model_label
from hdkd.infra import numerics
from hdkd.infra.io import output_set, write_bytes, write_json
from hdkd.models import create_model
from hdkd.models.checkpoint import load_model, load_trained
from hdkd.models.networks import HybridStudent, StagedNetwork
from hdkd.use.inference import read_image, to_batch

log = logging.getLogger(__name__)

Token = Literal["cls", "dist"]
METHODS = ("gradcam", "rollout")
CMAP = "jet"


# Above this mean rank correlation with a randomly re-initialised network's map, a map barely depends on the
# learned weights (Adebayo et al., 2018; hdkd.report.build prints the same verdict).
SANITY_LIMIT = 0.5
# Above this mean rank correlation between the maps of different images, a map is nearly the same whatever the
# image: it shows the architecture's habit (a corner, a token's position), not evidence. Maps that follow the
# content stay far below (the Grad-CAMs: 0.06-0.15 on the synthetic test split, where the rollouts reach 0.96);
# the limit is set high, so that the maps of centred lesions, which share a region, are not withheld.
INPUT_DEPENDENCE_LIMIT = 0.8


# ----------------------------------------------------------------------------------------- maps
def unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map of ``(N, H, W)`` to [0, 1] (min-max); a constant map becomes zeros."""
    flat = maps.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    span = torch.where(high > low, high - low, torch.ones_like(high))
    return ((flat - low[:, None]) / span[:, None]).reshape(maps.shape)


def upsample(maps: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``(N, h, w)`` maps -> ``(N, H, W)`` at the images' size (bilinear), in [0, 1]."""
    from captum.attr import LayerAttribution  # captum and scipy load in seconds: only where they are used

    up = LayerAttribution.interpolate(maps[:, None], tuple(images.shape[-2:]), interpolate_mode="bilinear")
    return unit_range(up[:, 0].detach())


def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities ``(N, C)`` of the model's inference output (eval mode)."""
    with eval_mode(model), torch.no_grad():
        return torch.softmax(model(images).float(), dim=1)


def grad_cam(model: StagedNetwork, images: torch.Tensor, target: torch.Tensor | None = None,
             signed: bool = False) -> torch.Tensor:
    """Grad-CAM of ``target`` (default: the predicted class) on the last convolutional stage.

    ``signed=True`` keeps the negative evidence that Grad-CAM's ReLU sets to 0: rank comparisons
    use it, since a ReLU map ties every negative pixel (a randomly initialised network's map is
    often all negative, hence constant).
    """
    if not isinstance(model, StagedNetwork):
        raise TypeError(f"grad_cam needs a teacher or student network, got {type(model).__name__}")
    if target is None:
        target = predict(model, images).argmax(1)
    with eval_mode(model):  # the HDKD student's eval output is its inference rule: the heads' average
        from captum.attr import LayerGradCam

        cam = LayerGradCam(model, model.stages[-1]).attribute(images, target=target, relu_attributions=not signed)
    return upsample(cam[:, 0], images)


def rollout_matrix(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout ``(B, T, T)`` from per-layer ``(B, heads, T, T)`` attentions, first layer first:
    heads averaged, the residual added as identity, rows renormalised, layers multiplied."""
    rollout = None
    for attn in attentions:
        a = attn.mean(1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    if rollout is None:
        raise ValueError("attention rollout needs at least one layer's attention")
    return rollout


def attention_rollout(model: HybridStudent, images: torch.Tensor, token: Token = "cls") -> torch.Tensor:
    """Rollout from the class (``cls``) or distillation (``dist``) token to the patch tokens."""
    if not isinstance(model, HybridStudent):
        raise TypeError(f"attention rollout needs a hybrid student (a DFLT), got {type(model).__name__}")
    dflt = model.transformer
    prefix = 1 if dflt.dist_token is None else 2
    if token not in ("cls", "dist") or (token == "dist" and prefix == 1):
        raise ValueError(f"token must be 'cls' or, for a model with a distillation token, 'dist'; got {token!r}")
    attentions: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        # Recomputed from the layer's input: the fused kernel of the forward pass never forms it.
        attentions.append(module.attention_weights(args[0]))

    hooks = [layer.attn.register_forward_pre_hook(record) for layer in dflt.layers]
    try:
        with eval_mode(model), torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    flow = rollout_matrix(attentions)[:, 0 if token == "cls" else 1, prefix:]
    side = math.isqrt(flow.shape[1])
    return upsample(flow.reshape(-1, side, side), images)


def explain(model: StagedNetwork, images: torch.Tensor, method: str, target: torch.Tensor | None = None,
            token: Token = "cls") -> torch.Tensor:
    """The maps of ``method`` (``gradcam`` for ``target``, or ``rollout`` from ``token``)."""
    if method == "gradcam":
        return grad_cam(model, images, target)
    if method == "rollout":
        return attention_rollout(model, images, token)
    raise ValueError(f"unknown explanation method {method!r}; known: {', '.join(METHODS)}")


# ----------------------------------------------------------------------------------- sanity check
def random_init(meta: Mapping[str, Any], seed: int) -> nn.Module:
    """A freshly initialised network of the architecture a model file describes (``load_model``'s meta)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(meta["model_name"], len(meta["classes"]), meta["image_size"], **meta["overrides"])


def rank_correlations(a: torch.Tensor, b: torch.Tensor) -> list[float | None]:
    """Spearman correlation of ``a[i]`` and ``b[i]`` over pixels; ``None`` where a map is constant."""
    from scipy.stats import spearmanr

    out = []
    for x, y in zip(a.flatten(1).numpy(), b.flatten(1).numpy()):
        rho = spearmanr(x, y).statistic if np.ptp(x) > 0 and np.ptp(y) > 0 else float("nan")
        out.append(None if np.isnan(rho) else float(rho))
    return out


def correlation_summary(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean over the images where the correlation is defined, and the per-image values."""
    defined = [v for v in values if v is not None]
    return {"mean_spearman": float(np.mean(defined)) if defined else None, "defined": len(defined),
            "per_image": list(values)}


def input_dependence(maps: torch.Tensor) -> dict[str, Any]:
    """Spearman correlation between the maps of every pair of images, averaged over the pairs where it is
    defined (``None`` if none is: constant maps, or a single image); ``pairs`` counts the pairs."""
    n = len(maps)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    values = rank_correlations(maps[[i for i, _ in pairs]], maps[[j for _, j in pairs]]) if pairs else []
    defined = [v for v in values if v is not None]
    return {"mean_spearman": float(np.mean(defined)) if defined else None, "defined": len(defined),
            "pairs": len(pairs)}


def map_checks(sanity: Mapping[str, Any], dependence: Mapping[str, Any]) -> dict[str, Any]:
    """Whether a map explains anything: it must differ from a randomly initialised network's
    (``sanity``: :func:`correlation_summary` of :func:`rank_correlations`) and from image to image
    (``dependence``: :func:`input_dependence`). ``shown`` is false, with the reasons, when either fails.

    Undefined correlations: with a random network whose maps are constant, the trained one's cannot be
    that network's (passes); trained maps constant on every image show nothing (fails); a single image
    cannot tell (passes)."""
    reasons = []
    rho = sanity.get("mean_spearman")
    if rho is not None and rho > SANITY_LIMIT:
        reasons.append(f"fails the randomisation check: correlates {rho:.2f} with a randomly initialised "
                       f"network's map (limit {SANITY_LIMIT:g})")
    across = dependence.get("mean_spearman")
    if across is None and dependence.get("pairs"):
        reasons.append("the same map on every image: constant")
    elif across is not None and across > INPUT_DEPENDENCE_LIMIT:
        reasons.append(f"the same map on every image: mean rank correlation {across:.2f} between images "
                       f"(limit {INPUT_DEPENDENCE_LIMIT:g})")
    return {"passes_randomisation_check": not (rho is not None and rho > SANITY_LIMIT),
            "input_dependent": not any(r.startswith("the same map") for r in reasons),
            "shown": not reasons, "withheld_because": reasons}


def _short(reasons: Sequence[str]) -> str:
    """A withheld cell's label: the checks failed, in a few words a line."""
    return "withheld:\n" + "\n".join(r.split(":")[0].replace("fails the randomisation check",
                                                               "fails the\nrandomisation check")
                                      .replace("the same map on every image", "same map on\nevery image")
                                      for r in reasons)


# --------------------------------------------------------------------------------------- figures
def show_map(ax, image: np.ndarray, cam: np.ndarray | None, withheld: str | None = None) -> None:
    """``image`` (H, W, 3 uint8), with ``cam`` over it, half transparent, in the colour map; or, ``withheld``
    (why), the image dimmed and that label over it instead of the map."""
    ax.imshow(image, interpolation="nearest", alpha=0.35 if withheld else None)
    ax.set_xticks([])
    ax.set_yticks([])
    if withheld:
        ax.text(0.5, 0.5, withheld, transform=ax.transAxes, ha="center", va="center", fontsize=7,
                bbox={"facecolor": "white", "edgecolor": "0.4", "boxstyle": "round", "alpha": 0.9})
    elif cam is not None:
        ax.imshow(cam, cmap=CMAP, vmin=0.0, vmax=1.0, alpha=0.5, interpolation="bilinear")


def add_colour_bar(fig: Figure, axes, **kwargs) -> None:
    """The maps' colour bar, opaque (an overlay's own artist would draw it half transparent)."""
    mappable = ScalarMappable(Normalize(0.0, 1.0), CMAP)
    fig.colorbar(mappable, ax=axes, label="Relevance (scaled per image)", **kwargs)


def overlay_figure(image: np.ndarray, cam: np.ndarray, title: str, withheld: Sequence[str] = ()) -> Figure:
    """One image with its map, a colour bar and a title (the command line's output); a map that fails its
    checks (``withheld``: the reasons) is not drawn, and the figure says why."""
    fig = Figure(figsize=(4.6, 4), layout="constrained")
    ax = fig.subplots()
    show_map(ax, image, cam, _short(withheld) if withheld else None)
    add_colour_bar(fig, ax)
    ax.set_title(title, fontsize=10)
    if withheld:
        fig.supxlabel("Not an explanation: " + "; ".join(withheld), fontsize=7, wrap=True)
    return fig


def explanations_figure(images: np.ndarray, columns: Mapping[str, np.ndarray], row_labels: Sequence[str],
                        cell_labels: Mapping[str, Sequence[str]], title: str,
                        withheld: Mapping[str, Sequence[str]] | None = None) -> Figure:
    """A grid: one row per image (its label on the left), the image then one column per map
    (``columns``: header -> ``(N, H, W)`` maps; ``cell_labels``: header -> a caption per row), and
    one shared colour bar. A column in ``withheld`` (header -> why: :func:`map_checks`) shows its images
    without the map, marked withheld in its header and cells, the reasons under the grid."""
    withheld = {h: list(r) for h, r in (withheld or {}).items() if r}
    n, ncols = len(images), len(columns) + 1
    fig = Figure(figsize=(2.0 * ncols + 1.0, 2.0 * n + 0.8 + 0.3 * len(withheld)), layout="constrained")
    axes = np.asarray(fig.subplots(n, ncols, squeeze=False))
    for i in range(n):
        show_map(axes[i, 0], images[i], None)
        axes[i, 0].set_ylabel(row_labels[i], fontsize=9)
        for j, (header, maps) in enumerate(columns.items(), start=1):
            show_map(axes[i, j], images[i], maps[i], _short(withheld[header]) if header in withheld else None)
            axes[i, j].set_xlabel(cell_labels[header][i], fontsize=8)
    for j, header in enumerate(["Test\nimage", *columns]):
        axes[0, j].set_title(header + ("\n(withheld)" if header in withheld else ""), fontsize=10)
    add_colour_bar(fig, axes, location="right", shrink=min(1.0, 4 / n))
    fig.suptitle(title, fontsize=11)
    if withheld:
        notes = [f"{header.replace(chr(10), ' ')}: {'; '.join(reasons)}" for header, reasons in withheld.items()]
        fig.supxlabel("Withheld, not explanations: " + " | ".join(notes), fontsize=8, wrap=True)
    return fig


# ------------------------------------------------------------------------------- the DVC stage
def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` images of each class (in split order), class by class."""
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]).astype(np.int64)


def explain_test_split(teacher_path: str | Path, hdkd_path: str | Path, data_dir: str | Path,
                       out_dir: str | Path, image_size: int, per_class: int = 2, seed: int = 0,
                       dpi: int = 120) -> dict[str, Any]:
    """The ``explain`` stage: maps of the teacher and HDKD student for the first ``per_class`` test images
    of each class -> ``out_dir/explanations.png`` and ``out_dir/explain.json`` (sanity check, input dependence,
    agreement; maps that fail a check are withheld from the figure).

    Under the reproducible numerics environment (set for the stage when ``train.reproducible``) the maps are
    computed in its runtime mode too, so that the figure's pixels, which the report check compares exactly,
    are the same on any x86-64 CPU with AVX2 (oneDNN's convolutions pick kernels by instruction set)."""
    numerics.apply_runtime(numerics.env_in_place() and torch.backends.cpu.get_cpu_capability() == "AVX2")
    split = load_split(data_dir, "test", image_size=image_size)
    teacher, t_meta = load_trained(teacher_path, split.classes, image_size)
    student, s_meta = load_trained(hdkd_path, split.classes, image_size)
    index = first_per_class(split.labels, per_class)
    if not len(index):
        raise ValueError(f"the test split in {data_dir} is empty")
    raw = np.ascontiguousarray(split.images[index])
    images = to_batch(raw)
    labels = torch.from_numpy(split.labels[index])
    classes = list(split.classes)

    def gradcams(teacher_net: nn.Module, student_net: nn.Module, signed: bool) -> dict[str, torch.Tensor]:
        # Grad-CAM explains the true class for both networks, so that their maps answer the same question.
        return {"teacher_gradcam": grad_cam(teacher_net, images, labels, signed),
                "hdkd_gradcam": grad_cam(student_net, images, labels, signed)}

    def rollouts(student_net: nn.Module) -> dict[str, torch.Tensor]:  # unsigned by nature
        return {"hdkd_rollout_cls": attention_rollout(student_net, images, "cls"),
                "hdkd_rollout_dist": attention_rollout(student_net, images, "dist")}

    rolled = rollouts(student)
    trained = gradcams(teacher, student, signed=False) | rolled
    ranked = gradcams(teacher, student, signed=True) | rolled
    random_teacher, random_student = random_init(t_meta, seed), random_init(s_meta, seed)
    randomised = gradcams(random_teacher, random_student, signed=True) | rollouts(random_student)
    preds = {"teacher": predict(teacher, images), "hdkd": predict(student, images)}

    def caption(model: str) -> list[str]:
        return [f"pred {classes[int(p.argmax())]} ({p.max():.0%})" for p in preds[model]]

    hdkd = model_label("hdkd")
    headers = {"teacher_gradcam": f"{model_label('teacher')}\nGrad-CAM", "hdkd_gradcam": f"{hdkd}\nGrad-CAM",
               "hdkd_rollout_cls": f"{hdkd} rollout\n(class token)",
               "hdkd_rollout_dist": f"{hdkd} rollout\n(dist. token)"}
    captions = {"teacher_gradcam": caption("teacher"), **dict.fromkeys(list(headers)[1:], caption("hdkd"))}
    sanity = {k: correlation_summary(rank_correlations(ranked[k], randomised[k])) for k in ranked}
    dependence = {k: input_dependence(ranked[k]) for k in ranked}
    checks = {k: map_checks(sanity[k], dependence[k]) for k in ranked}
    for key, check in checks.items():
        if not check["shown"]:
            log.warning("explain: %s is not drawn as an explanation: %s", key, "; ".join(check["withheld_because"]))
    fig = explanations_figure(raw, {headers[k]: trained[k].numpy() for k in headers},
                              [f"true: {classes[int(y)]}" for y in labels], {headers[k]: captions[k] for k in headers},
                              "Where the teacher and the HDKD student look (Grad-CAM of the true class)",
                              {headers[k]: checks[k]["withheld_because"] for k in headers})
    result = {
        "images": [{"image_id": str(split.ids[i]), "label": classes[int(split.labels[i])],
                    "teacher_prediction": classes[int(t.argmax())], "hdkd_prediction": classes[int(s.argmax())]}
                   for i, t, s in zip(index, preds["teacher"], preds["hdkd"])],
        "gradcam_target": "true class",
        "gradcam_correlations_on": "signed maps (before Grad-CAM's ReLU)",
        "random_init_seed": seed,
        "sanity_trained_vs_random": sanity,
        "agreement_teacher_vs_hdkd_gradcam": correlation_summary(
            rank_correlations(ranked["teacher_gradcam"], ranked["hdkd_gradcam"])),
        "input_dependence": dependence,  # mean Spearman between the maps of different images (signed Grad-CAM)
        "checks": checks,  # per map: the two checks' verdicts; "shown": drawn in the figure as an explanation
        "check_limits": {"sanity_trained_vs_random": SANITY_LIMIT, "input_dependence": INPUT_DEPENDENCE_LIMIT},
    }
    with output_set() as outputs:  # the figure and its numbers together, or neither
        out = outputs.dir(out_dir)
        write_bytes(out / "explanations.png", figure_png(fig, dpi))
        write_json(out / "explain.json", result)
    return result


# ---------------------------------------------------------------------------------- command line
HELP = "Where a model looks: overlay PNGs of Grad-CAM or attention rollout, one per image."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of ``hdkd explain``."""
    parser.add_argument("--model", type=Path, default=Path("models/hdkd/model.pt"), help="an hdkd model file")
    parser.add_argument("--method", choices=METHODS, default="gradcam",
                        help="gradcam (the teacher or a student), or rollout (a hybrid student's DFLT)")
    parser.add_argument("--token", choices=("cls", "dist"), default="cls", help="rollout from this token")
    parser.add_argument("--out", type=Path, default=Path("explanations"), help="directory for the overlay PNGs")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files")


def load_image(path: Path, size: int) -> np.ndarray:
    """An image file as the network sees it (:func:`hdkd.use.inference.read_image`); a missing file is named."""
    if not path.is_file():
        raise FileNotFoundError(f"no image file {path}")
    return read_image(path, size)


def run(args: argparse.Namespace) -> int:
    """``hdkd explain``: one overlay PNG per input, ``<out>/<stem>_<method>.png``; exit status 0."""
    stems = [p.stem for p in args.inputs]
    if len(set(stems)) != len(stems):
        raise ValueError(f"inputs share a file name stem, their PNGs would overwrite each other: {stems}")
    if Path(args.model).suffix.lower() == ".onnx":
        raise ValueError(f"{args.model} is an ONNX export: hdkd explain reads a network's gradients and attention, "
                         "which an export does not keep; give the PyTorch model file it was exported from "
                         "(models/<role>/model.pt)")
    model, meta = load_model(args.model)
    if not isinstance(model, StagedNetwork):
        raise ValueError(f"{args.model} is a {meta['model_name']} network: explain reads the teacher's and the "
                         "students' convolutional stages (Grad-CAM) and DFLT (rollout), which baselines lack")
    if args.method == "rollout" and not isinstance(model, HybridStudent):
        raise ValueError(f"{args.model} is a {meta['model_name']} network without a transformer: "
                         "use --method gradcam")
    raw = np.stack([load_image(p, meta["image_size"]) for p in args.inputs])
    images = to_batch(raw)
    probs = predict(model, images)
    target = probs.argmax(1)
    maps = explain(model, images, args.method, target, args.token)
    what = "Grad-CAM" if args.method == "gradcam" else f"attention rollout ({args.token} token)"
    withheld = cli_checks(model, meta, images, args.method, target, args.token)["withheld_because"]
    if withheld:
        print(f"hdkd explain: warning: the {what} maps of {args.model} are not drawn as explanations: "
              f"{'; '.join(withheld)}", file=sys.stderr)
    written = []
    for path, image, cam, p in zip(args.inputs, raw, maps.numpy(), probs):
        title = f"{path.name}: predicted {meta['classes'][int(p.argmax())]} ({p.max():.0%})\n{what}"
        written.append(Path(args.out) / f"{path.stem}_{args.method}.png")
        write_bytes(written[-1], figure_png(overlay_figure(image, cam, title, withheld)))
        print(written[-1])
    return 0


def cli_checks(model: StagedNetwork, meta: Mapping[str, Any], images: torch.Tensor, method: str,
               target: torch.Tensor, token: Token, seed: int = 0) -> dict[str, Any]:
    """:func:`map_checks` of the command line's maps: against a randomly initialised network of the model's
    architecture, and (two inputs or more) between the inputs; Grad-CAM compared before its ReLU, as the stage."""
    def ranked(net: nn.Module) -> torch.Tensor:
        return grad_cam(net, images, target, signed=True) if method == "gradcam" else explain(net, images, method,
                                                                                              target, token)

    trained = ranked(model)
    sanity = correlation_summary(rank_correlations(trained, ranked(random_init(meta, seed))))
    return map_checks(sanity, input_dependence(trained))
