"""Clinic prediction: one DICOM study in, marker probabilities, hematoma volume and an overlay out.

The study goes through exactly the training preprocessing (the config stored in the checkpoint).
Slice logits are combined per marker by the one slice-to-study rule of evaluation
(``common.study_metrics.study_scores_from_slices``: the maximum over the three slices that hold the
most predicted hematoma, over all brain slices when none holds any), then scaled by the checkpoint's per-marker
temperature (``meta["temperature"]``) and called present at its per-marker threshold
(``meta["thresholds"]``), both chosen on validation when the model was trained (``common.validation``);
a checkpoint without them gives temperature 1 and threshold 0.5, and says so (``operating_point``).
A FedBN model needs one site's normalisation layers (``client.inference.site_norms``). The hematoma mask is mapped back onto the DICOM grid (``to_input_grid``, the inverse of the
preprocessing's centring and resize): the volume is measured there, and the DICOM SEG carries that
same mask. Nothing written here carries a patient identifier: no names, ids, dates or folder names
(the DICOM SEG and SR, written only on request, copy the source's patient and study modules: they go
back into the hospital's PACS).

The classifier runs only on the slices that rule uses (``client.inference.fast``); the other brain
slices have no slice score. ``run_prediction`` is the one scoring path of ``hemexp predict``, ``hemexp predict --batch`` and
``hemexp serve``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from client.data.dataset import MIN_BRAIN_FRACTION
from client.inference.backends import make_scorer
from client.inference.fast import InferenceOptions, SliceScorer, hematoma_pixels, score_slices
from client.inference.site_norms import is_fedbn, load_site_norms, with_site_norms
from client.ingest.dicom import Geometry, StudyError, read_study
from client.preprocessing.pipeline import model_pixel_mm, preprocess_volume, to_input_grid
from common import roi
from common.checkpoint import Checkpoint, build_from_checkpoint, load_checkpoint
from common.metrics import hematoma_volume_ml
from common.model import JointModel, to_input
from common.study_metrics import sigmoid, study_scores_from_slices
from common.validation import OperatingPoint

#: Mask probability above which a pixel is hematoma.
MASK_THRESHOLD = 0.5
ALGORITHM_NAME = "hemexp"
#: Fewer slices than this are no head CT series (a localizer, a single reformat, a screen capture).
MIN_SLICES = 3
#: File names of the DICOM results in the output folder.
SEG_FILE, SR_FILE = "seg.dcm", "sr.dcm"


def slice_probabilities(logits: np.ndarray, temperature: np.ndarray) -> np.ndarray:
    """Temperature-scaled probabilities of the slices the classifier scored; NaN stays NaN."""
    out = np.full(logits.shape, np.nan, dtype=np.float32)
    scored = ~np.isnan(logits)
    out[scored] = sigmoid((logits / temperature)[scored])
    return out


def software_version() -> str:
    try:
        return metadata.version("hemexp")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ScoringModel:
    """A checkpoint loaded once (a node scores many studies with it) and the digest that names it."""

    ckpt: Checkpoint
    model: JointModel
    digest: str
    device: str
    options: InferenceOptions
    scorer: SliceScorer  # e.g. an ONNX Runtime session, kept open between studies

    @property
    def algorithm(self) -> dict[str, str]:
        return {"name": ALGORITHM_NAME, "version": software_version(), "checkpoint_sha256": self.digest}


def load_scoring_model(
    path: Path | str,
    device: str = "cpu",
    options: InferenceOptions | None = None,
    site_norms: Path | str | None = None,
) -> ScoringModel:
    """``site_norms``: one site's stored FedBN normalisation layers (needed for, and only for, a FedBN model)."""
    ckpt = with_site_norms(load_checkpoint(path), load_site_norms(site_norms) if site_norms else None)
    model = build_from_checkpoint(ckpt, device)
    options = options or InferenceOptions()
    return ScoringModel(ckpt, model, file_sha256(path), device, options, make_scorer(model, device, options))


@dataclass(frozen=True)
class StudyPrediction:
    markers: dict[str, float]  # temperature-scaled study probability per output
    volume_ml: float
    hematoma_slices: list[int]
    brain_slices: list[int]
    key_slice: int | None
    slice_scores: np.ndarray  # [k, n_out] temperature-scaled (NaN for slices the classifier did not score)
    mask_probability: np.ndarray  # [k, S, S] float32
    slices: np.ndarray  # [k, S, S] uint8 model input
    combine: str
    geometry: Geometry
    shift: tuple[int, int]  # the preprocessing's centring shift
    sources: tuple[Path, ...]  # the DICOM file of each slice
    operating: OperatingPoint

    @property
    def shown_slice(self) -> int:
        """The key slice, or the middle brain slice when no hematoma was found (the overlay's slice)."""
        return self.key_slice if self.key_slice is not None else self.brain_slices[len(self.brain_slices) // 2]

    def source_mask(self) -> np.ndarray:
        """The predicted hematoma (0/1 uint8) on the DICOM grid ``[K, R, C]``."""
        model_mask = (self.mask_probability > MASK_THRESHOLD).astype(np.uint8)
        return to_input_grid(model_mask, self.geometry.shape[1:], self.shift, order=0)

    def to_json(self) -> dict:
        return {
            "markers": self.markers,
            "operating_point": {"temperature": self.operating.temperature, "chosen_on": self.operating.source},
            "volume_ml": self.volume_ml,
            "combine": self.combine,
            "hematoma_slices": self.hematoma_slices,
            "key_slice": self.key_slice,
            "n_slices": int(self.slices.shape[0]),
            "brain_slices": self.brain_slices,
            "slice_scores": {
                str(k): [round(float(v), 4) for v in self.slice_scores[k]]
                for k in self.brain_slices
                if not np.isnan(self.slice_scores[k]).any()
            },
        }


def predict_study(
    study_dir: Path | str,
    ckpt: Checkpoint,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    model: JointModel | None = None,
    window: tuple[float, float] | None = None,
    options: InferenceOptions | None = None,
    scorer: SliceScorer | None = None,
) -> StudyPrediction:
    """Score one study; raises ``client.ingest.dicom.StudyError`` for a study that cannot be read.

    ``options`` picks the scoring path (default: PyTorch, classifier on hematoma slices only);
    ``scorer``, a ready one (e.g. an ONNX Runtime session kept open between studies)."""
    device = torch.device(device)
    options = options or InferenceOptions(batch_size=batch_size)
    model = model or build_from_checkpoint(ckpt, device)
    scorer = scorer or make_scorer(model, device, options)
    cfg = ckpt.preprocess.with_window(window)
    series = read_study(study_dir)
    if series.volume.shape[0] < MIN_SLICES:
        raise StudyError(
            study_dir, f"too few slices ({series.volume.shape[0]}): a head CT series has at least {MIN_SLICES}"
        )
    pre = preprocess_volume(series.volume, None, cfg)
    k = pre.slices.shape[0]
    brain = [int(i) for i in np.flatnonzero(pre.brain_fraction >= MIN_BRAIN_FRACTION)] or list(range(k))
    logits = np.full((k, len(ckpt.labels)), np.nan, dtype=np.float32)
    mask_prob = np.zeros(pre.slices.shape, dtype=np.float32)
    scored = score_slices(
        scorer,
        pre.slices[brain],
        cfg.min_mask_pixels,
        model.cfg,
        study_pixel_mm(series.geometry, cfg.size),
        options.classify,
        options.batch_size,
    )
    logits[brain], mask_prob[brain] = scored.logits, scored.mask_probability
    pixels = hematoma_pixels(mask_prob)
    hematoma = [i for i in brain if pixels[i] > cfg.min_mask_pixels]
    operating = OperatingPoint.of(ckpt.labels, ckpt.meta)
    temperature, _ = operating.arrays(ckpt.labels)
    combined = study_scores_from_slices(logits[brain], np.zeros(len(brain)), pixels[brain], cfg.min_mask_pixels)
    probs = sigmoid(combined.values[0] / temperature)
    # Rounded once here, so prediction.json and the DICOM SR hold the very same numbers.
    markers = {name: round(float(probs[j]), 6) for j, name in enumerate(ckpt.labels)}
    key = int(max(hematoma, key=lambda i: pixels[i])) if hematoma else None
    pred = StudyPrediction(
        markers,
        0.0,
        hematoma,
        brain,
        key,
        slice_probabilities(logits, temperature),
        mask_prob,
        pre.slices,
        "max over the 3 slices with most predicted hematoma (all brain slices if none)",
        series.geometry,
        pre.shift,
        series.sources,
        operating,
    )
    g = series.geometry
    volume = hematoma_volume_ml(pred.source_mask().sum(dtype=np.int64), g.pixel_spacing, g.slice_spacing)
    return replace(pred, volume_ml=round(volume, 4))


def last_conv(module: torch.nn.Module) -> torch.nn.Conv2d:
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    if not convs:
        raise ValueError("the classifier has no 3x3 convolution for Grad-CAM")
    return convs[-1]


def study_pixel_mm(geometry: Geometry, size: int) -> float:
    """The side of one preprocessed pixel in mm (the ROI's physical size needs it; pixels are square)."""
    return float(model_pixel_mm(geometry.pixel_spacing, geometry.shape[1:], size)[1])


def grad_cam(
    model: JointModel, slice_u8: np.ndarray, output: int, pixel_mm: float, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) of one classifier output on the last 3x3 conv of the
    Wavelet VGG: where the evidence for that marker lies. Returns [S, S] in [0, 1] on the slice: the
    ROI classifier's map is laid back where its ROI was cut (``common.roi.roi_to_slice``)."""
    device = torch.device(device)
    layer = last_conv(model.classifier)
    store: dict[str, torch.Tensor] = {}

    def cut(m: torch.nn.Module, i: tuple, o: torch.Tensor) -> torch.Tensor:
        # the backward pass stops at this layer: the gradient is wanted here, not in the 20 layers before
        store["act"] = o.detach().requires_grad_(True)
        return store["act"]

    x = to_input(slice_u8[None], device)
    size = torch.full((1,), float(pixel_mm), device=device)
    hook = layer.register_forward_hook(cut)
    try:
        model.eval()
        with torch.enable_grad():
            mask_logits, logits = model(x, pixel_mm=size)
            (grad,) = torch.autograd.grad(logits[0, output], store["act"])
    finally:
        hook.remove()
    act, grad = store["act"][0].detach(), grad[0]
    cam = torch.relu((grad.mean(dim=(1, 2))[:, None, None] * act).sum(0))[None, None]
    if model.cfg.classifier_input == "roi":
        seen = model.cfg.roi_size
        cam = torch.nn.functional.interpolate(cam, size=(seen, seen), mode="bilinear", align_corners=False)
        centres = roi.roi_centres((mask_logits.detach() > 0).float(), mask_logits.detach())
        half = roi.roi_half_extent(size, model.cfg.roi_mm, x.shape[-1])
        cam = roi.roi_to_slice(cam, centres, half, slice_u8.shape[-1])[0, 0]
    else:
        cam = torch.nn.functional.interpolate(cam, size=slice_u8.shape, mode="bilinear", align_corners=False)[0, 0]
    cam = cam.detach().cpu().numpy()
    return cam / cam.max() if cam.max() > 0 else cam


def draw_overlay(pred: StudyPrediction, cam: np.ndarray | None, path: Path, label: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = pred.shown_slice
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
    for ax in axes:
        ax.imshow(pred.slices[k], cmap="gray", vmin=0, vmax=255)
        ax.contour(pred.mask_probability[k] > MASK_THRESHOLD, levels=[0.5], colors="red", linewidths=1.2)
        ax.axis("off")
    axes[0].set_title(f"slice {k}: hematoma {pred.volume_ml:.1f} ml")
    if cam is not None:
        axes[1].imshow(cam, cmap="jet", alpha=0.4)
    axes[1].set_title(f"Grad-CAM: {label} p={pred.markers[label]:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def findings(pred: StudyPrediction, ckpt: Checkpoint) -> dict:
    """Each output at its operating threshold, and the expansion risk when the model has that head."""
    thresholds = OperatingPoint.of(ckpt.labels, ckpt.meta).thresholds
    return {
        "thresholds": thresholds,
        "present": {name: bool(p >= thresholds[name]) for name, p in pred.markers.items()},
        "expansion_risk": pred.markers.get("expansion") if ckpt.model_config.predict_expansion else None,
    }


def run_prediction(
    study_dir: Path | str,
    model: ScoringModel | Path | str,
    out_dir: Path | str,
    device: str = "cpu",
    window: tuple[float, float] | None = None,
    options: InferenceOptions | None = None,
    dicom: bool = False,
    site_norms: Path | str | None = None,
) -> dict:
    """Write ``prediction.json`` and ``overlay.png`` into ``out_dir`` (and with ``dicom`` the DICOM
    SEG ``seg.dcm`` and SR ``sr.dcm``); returns the JSON dict. ``model``: a loaded model or a
    checkpoint path; ``options``: the scoring path (``client.inference.fast``) and ``site_norms``: a
    FedBN site's normalisation layers, both for a path only."""
    scoring = model if isinstance(model, ScoringModel) else load_scoring_model(model, device, options, site_norms)
    ckpt = scoring.ckpt
    pred = predict_study(
        study_dir,
        ckpt,
        scoring.device,
        model=scoring.model,
        window=window,
        options=scoring.options,
        scorer=scoring.scorer,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a study that cannot be read leaves no folder
    top = max(pred.markers, key=pred.markers.get)
    cam = grad_cam(
        scoring.model,
        pred.slices[pred.shown_slice],
        list(ckpt.labels).index(top),
        study_pixel_mm(pred.geometry, pred.slices.shape[-1]),
        scoring.device,
    )
    draw_overlay(pred, cam, out_dir / "overlay.png", top)
    result = (
        pred.to_json()
        | findings(pred, ckpt)
        | {
            "model": {
                "labels": list(ckpt.labels),
                "preset_image_size": ckpt.model_config.image_size,
                "method": ckpt.meta.get("method"),
                "site_norms": is_fedbn(ckpt),
            },
            "algorithm": scoring.algorithm,
        }
    )
    (out_dir / "prediction.json").write_text(json.dumps(result, indent=2))
    if dicom:
        from client.inference.dicom_results import write_results

        write_results(pred.source_mask(), pred.sources, pred.shown_slice, result, out_dir / SEG_FILE, out_dir / SR_FILE)
    return result
