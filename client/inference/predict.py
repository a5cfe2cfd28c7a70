"""Clinic prediction: one DICOM study in, marker probabilities, hematoma volume and an overlay out.

The study goes through exactly the training preprocessing (the config stored in the checkpoint).
Slice logits are combined per marker by the one slice-to-study rule of evaluation
(``common.study_metrics.study_scores_from_slices``: the maximum over the slices that hold predicted
hematoma, over all brain slices when none does), then scaled by the checkpoint's per-marker
temperature (``meta["temperature"]``) and called present at its per-marker threshold
(``meta["thresholds"]``), both chosen on validation when the model was trained (``common.validation``);
a checkpoint without them gives temperature 1 and threshold 0.5, and says so.

A FedBN model's normalisation layers never left the sites: its global checkpoint is incomplete,
and predicting with it needs one site's stored layers (``--site-norms``, ``load_site_norms``).
Nothing written here carries a patient identifier: no names, ids, dates or folder names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from client.data.dataset import MIN_BRAIN_FRACTION
from client.ingest.dicom import read_study
from client.preprocessing.pipeline import model_pixel_mm, preprocess_volume
from common.checkpoint import Checkpoint, build_from_checkpoint, load_checkpoint
from common.model import JointModel, build_joint_model, norm_state_keys, to_input
from common.study_metrics import sigmoid, study_scores_from_slices

#: Threshold and temperature of a checkpoint that carries none (trained before validation choices).
DEFAULT_THRESHOLD, DEFAULT_TEMPERATURE = 0.5, 1.0


@dataclass(frozen=True)
class OperatingPoint:
    """Per output: the temperature and the threshold of the checkpoint (defaults where it has none)."""

    temperature: dict[str, float]
    thresholds: dict[str, float]
    source: str  # "validation" | "default"

    @classmethod
    def of(cls, ckpt: Checkpoint) -> OperatingPoint:
        temp, th = ckpt.meta.get("temperature") or {}, ckpt.meta.get("thresholds") or {}
        return cls(
            {n: float(temp.get(n, DEFAULT_TEMPERATURE)) for n in ckpt.labels},
            {n: float(th.get(n, DEFAULT_THRESHOLD)) for n in ckpt.labels},
            "validation" if th and temp else "default",
        )


@dataclass(frozen=True)
class StudyPrediction:
    markers: dict[str, float]  # temperature-scaled study probability per output
    volume_ml: float
    hematoma_slices: list[int]
    brain_slices: list[int]
    key_slice: int | None
    slice_scores: np.ndarray  # [k, n_out] (NaN for slices without brain)
    mask_probability: np.ndarray  # [k, S, S] float32
    slices: np.ndarray  # [k, S, S] uint8 model input
    combine: str
    operating: OperatingPoint

    def calls(self) -> dict[str, dict]:
        """Per output: probability, whether it is present at the checkpoint's threshold, the threshold."""
        th = self.operating.thresholds
        return {
            n: {"probability": p, "present": "yes" if p >= th[n] else "no", "threshold": th[n]}
            for n, p in self.markers.items()
        }

    def to_json(self) -> dict:
        return {
            "markers": self.calls(),
            "operating_point": {"temperature": self.operating.temperature, "chosen_on": self.operating.source},
            "volume_ml": self.volume_ml,
            "combine": self.combine,
            "hematoma_slices": self.hematoma_slices,
            "key_slice": self.key_slice,
            "n_slices": int(self.slices.shape[0]),
            "brain_slices": self.brain_slices,
            "slice_scores": {str(k): [round(float(v), 4) for v in self.slice_scores[k]] for k in self.brain_slices},
        }


@torch.inference_mode()
def _run(model: JointModel, slices: np.ndarray, device: torch.device, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: marker logits and the hematoma mask probability."""
    logits_all, masks = [], []
    for i in range(0, len(slices), batch_size):
        mask_logits, logits = model(to_input(slices[i : i + batch_size], device))
        logits_all.append(logits.float().cpu().numpy())
        masks.append(torch.sigmoid(mask_logits.float())[:, 0].cpu().numpy())
    return np.concatenate(logits_all), np.concatenate(masks)


def predict_study(
    study_dir: Path | str,
    ckpt: Checkpoint,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    model: JointModel | None = None,
    window: tuple[float, float] | None = None,
) -> StudyPrediction:
    """Score one study; raises ``client.ingest.dicom.StudyError`` for a study that cannot be read."""
    device = torch.device(device)
    model = model or build_from_checkpoint(ckpt, device)
    cfg = ckpt.preprocess.with_window(window)
    study = read_study(study_dir)
    pre = preprocess_volume(study.volume, None, cfg)
    k = pre.slices.shape[0]
    brain = [int(i) for i in np.flatnonzero(pre.brain_fraction >= MIN_BRAIN_FRACTION)] or list(range(k))
    logits = np.full((k, len(ckpt.labels)), np.nan, dtype=np.float32)
    mask_prob = np.zeros(pre.slices.shape, dtype=np.float32)
    logits[brain], mask_prob[brain] = _run(model, pre.slices[brain], device, batch_size)
    pixels = (mask_prob > 0.5).reshape(k, -1).sum(axis=1)
    hematoma = [i for i in brain if pixels[i] > cfg.min_mask_pixels]
    operating = OperatingPoint.of(ckpt)
    temperature = np.asarray([operating.temperature[n] for n in ckpt.labels])
    combined = study_scores_from_slices(logits[brain], np.zeros(len(brain)), pixels[brain], cfg.min_mask_pixels)
    probs = sigmoid(combined.values[0] / temperature)
    markers = {name: float(probs[j]) for j, name in enumerate(ckpt.labels)}
    scores = sigmoid(logits / temperature).astype(np.float32)  # per slice, scaled alike (NaN stays NaN)
    g = study.geometry
    dy, dx = model_pixel_mm(g.pixel_spacing, g.shape[1:], cfg.size)
    voxel = dy * dx * g.slice_spacing / 1000.0  # ml
    key = int(max(hematoma, key=lambda i: pixels[i])) if hematoma else None
    return StudyPrediction(
        markers,
        float(pixels[brain].sum() * voxel),
        hematoma,
        brain,
        key,
        scores,
        mask_prob,
        pre.slices,
        "max over slices holding predicted hematoma (all brain slices if none)",
        operating,
    )


def last_conv(module: torch.nn.Module) -> torch.nn.Conv2d:
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    if not convs:
        raise ValueError("the classifier has no 3x3 convolution for Grad-CAM")
    return convs[-1]


def grad_cam(model: JointModel, slice_u8: np.ndarray, output: int, device: torch.device | str = "cpu") -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) of one classifier output on the last 3x3 conv of the
    Wavelet VGG: where the evidence for that marker lies. Returns [S, S] in [0, 1]."""
    device = torch.device(device)
    layer = last_conv(model.classifier)
    store: dict[str, torch.Tensor] = {}
    h1 = layer.register_forward_hook(lambda m, i, o: store.__setitem__("act", o))
    h2 = layer.register_full_backward_hook(lambda m, gi, go: store.__setitem__("grad", go[0]))
    try:
        model.eval()
        with torch.enable_grad():
            x = to_input(slice_u8[None], device).requires_grad_(True)
            _, logits = model(x)
            model.zero_grad(set_to_none=True)
            logits[0, output].backward()
    finally:
        h1.remove()
        h2.remove()
    act, grad = store["act"][0], store["grad"][0]
    cam = torch.relu((grad.mean(dim=(1, 2))[:, None, None] * act).sum(0))[None, None]
    cam = torch.nn.functional.interpolate(cam, size=slice_u8.shape, mode="bilinear", align_corners=False)[0, 0]
    cam = cam.detach().cpu().numpy()
    return cam / cam.max() if cam.max() > 0 else cam


def draw_overlay(pred: StudyPrediction, cam: np.ndarray | None, path: Path, label: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = pred.key_slice if pred.key_slice is not None else pred.brain_slices[len(pred.brain_slices) // 2]
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
    for ax in axes:
        ax.imshow(pred.slices[k], cmap="gray", vmin=0, vmax=255)
        ax.contour(pred.mask_probability[k] > 0.5, levels=[0.5], colors="red", linewidths=1.2)
        ax.axis("off")
    axes[0].set_title(f"slice {k}: hematoma {pred.volume_ml:.1f} ml")
    if cam is not None:
        axes[1].imshow(cam, cmap="jet", alpha=0.4)
    axes[1].set_title(f"Grad-CAM: {label} p={pred.markers[label]:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def is_fedbn(ckpt: Checkpoint) -> bool:
    """A FedBN global model: its normalisation layers are the sites', not in the checkpoint."""
    return ckpt.meta.get("strategy") == "fedbn"


def load_site_norms(path: Path | str) -> dict[str, torch.Tensor]:
    """One site's FedBN normalisation layers: a file, or its run folder of the site store
    (``client.federation.store``: ``norm-unet.pt``, ``norm-classifier.pt``)."""
    path = Path(path)
    files = sorted(path.glob("norm-*.pt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"{path}: no site normalisation layers (norm-*.pt) there")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def with_site_norms(ckpt: Checkpoint, norms: dict[str, torch.Tensor] | None) -> Checkpoint:
    """The checkpoint a prediction can use: a FedBN one completed by one site's norm layers
    (ValueError without them, or when they miss a trained half's layers); others as they are."""
    if not is_fedbn(ckpt):
        if norms:
            raise ValueError("--site-norms is for a FedBN model; this checkpoint's run was not FedBN")
        return ckpt
    if not norms:
        raise ValueError(
            "this is a FedBN global model: its normalisation layers stayed at the sites and are not in it. "
            "Predict with one site's layers: hemexp predict ... --site-norms <cache dir>/federation/<site>/<run>"
        )
    keys = norm_state_keys(build_joint_model(ckpt.model_config))
    halves = ("unet", "classifier") if int(ckpt.meta.get("stage", 2)) == 2 else ("unet",)
    missing = sorted(k for k in keys if k.split(".")[0] in halves and k not in norms)
    unknown = sorted(set(norms) - set(ckpt.state_dict))
    if missing or unknown:
        raise ValueError(
            f"site norms do not fit this model: {len(missing)} layer tensor(s) missing"
            f"{' (e.g. ' + missing[0] + ')' if missing else ''}, {len(unknown)} unknown"
        )
    return replace(ckpt, state_dict={**ckpt.state_dict, **{k: v for k, v in norms.items() if k in keys}})


def run_prediction(
    study_dir: Path | str,
    ckpt_path: Path | str,
    out_dir: Path | str,
    device: str = "cpu",
    window: tuple[float, float] | None = None,
    site_norms: Path | str | None = None,
) -> dict:
    """Write ``prediction.json`` and ``overlay.png`` into ``out_dir``; returns the JSON dict.
    ``site_norms``: one site's stored FedBN normalisation layers (needed for a FedBN model)."""
    ckpt = with_site_norms(load_checkpoint(ckpt_path), load_site_norms(site_norms) if site_norms else None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_from_checkpoint(ckpt, device)
    pred = predict_study(study_dir, ckpt, device, model=model, window=window)
    top = max(pred.markers, key=pred.markers.get)
    k = pred.key_slice if pred.key_slice is not None else pred.brain_slices[len(pred.brain_slices) // 2]
    cam = grad_cam(model, pred.slices[k], list(ckpt.labels).index(top), device)
    draw_overlay(pred, cam, out_dir / "overlay.png", top)
    result = pred.to_json() | {
        "model": {
            "labels": list(ckpt.labels),
            "preset_image_size": ckpt.model_config.image_size,
            "method": ckpt.meta.get("method"),
            "site_norms": bool(site_norms),
        }
    }
    (out_dir / "prediction.json").write_text(json.dumps(result, indent=2))
    return result
