"""ONNX Runtime back end of the fast scoring path (``client.inference.fast``).

The joint model is exported as two graphs, ``segment`` (U-Net: mask logits and deepest encoder
features) and ``classify`` (Wavelet VGG16 + head), once per set of weights, and kept in a cache folder
named by a fingerprint of the weights. ONNX Runtime runs EfficientNet's depthwise convolutions much
faster than PyTorch's CPU kernels. Optionally a part runs as a static int8 model (QDQ, per-channel
weights), calibrated on slices from the site's own cache, since activation ranges are site-specific.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from client.inference.fast import InferenceOptions, SegmentPart, TorchScorer, classifier_feed, scale_slices
from common.model import JointModel, classifier_inputs

#: Slices used to calibrate an int8 model: enough to see a site's range of activations.
CALIBRATION_SLICES = 16
#: Candidate slices per calibration slice scored by the fp32 U-Net when choosing them.
CANDIDATES = 4
_INPUTS = {"segment": ["x"], "classify": ["x", "features"]}
_OUTPUTS = {"segment": ["mask_logits", "features"], "classify": ["logits"]}


def default_cache_dir() -> Path:
    return Path(os.environ.get("HEMEXP_CACHE", Path.home() / ".cache" / "hemexp")) / "onnx"


def model_fingerprint(model: JointModel) -> str:
    """sha256 of the architecture and every weight: a cached export is reused only for the same model."""
    h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def export_parts(model: JointModel, folder: Path) -> dict[str, Path]:
    """Write ``segment.onnx`` and ``classify.onnx`` (batch axis dynamic) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    s = model.cfg.image_size
    x = torch.zeros(2, model.cfg.in_channels, s, s)
    seg = SegmentPart(model)
    with torch.no_grad():
        mask_logits, features = seg(x)
        image, vector = classifier_inputs(model.cfg, x, mask_logits, features, torch.ones(2))
    modules = {"segment": (seg, (x,)), "classify": (model.classifier, (image, vector))}
    paths = {}
    for part, (module, args) in modules.items():
        paths[part] = folder / f"{part}.onnx"
        names = _INPUTS[part] + _OUTPUTS[part]
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes
            torch.onnx.export(
                module,
                args,
                str(paths[part]),
                input_names=_INPUTS[part],
                output_names=_OUTPUTS[part],
                dynamic_axes={n: {0: "batch"} for n in names},
                opset_version=17,
                dynamo=False,
            )
    return paths


def calibration_slices(
    cache_dir: Path | str, model: JointModel | None = None, n: int = CALIBRATION_SLICES
) -> np.ndarray:
    """``n`` brain slices of a site cache to calibrate on; uint8 [n, S, S].

    Half are those where ``model`` (fp32) predicts the most hematoma, half those with the most
    reference hematoma: min/max calibration must see the positive mask logits and the classifier's
    inputs of hematoma slices, or int8 clips them away (measured: a trained U-Net calibrated on
    slices where it predicted no hematoma found none in int8). Candidates: the ``CANDIDATES`` x
    ``n`` slices with the most reference hematoma, then evenly spread brain slices."""
    from client.data.cache import open_cache
    from client.data.dataset import brain_slices

    cache = open_cache(cache_dir)
    idx = brain_slices(cache)
    if idx.size == 0:
        raise ValueError(f"site cache {cache_dir} has no brain slices to calibrate on")
    reference = np.asarray(cache.masks[idx]).reshape(len(idx), -1).sum(axis=1)
    by_reference = idx[np.lexsort((idx, -reference))]
    if model is None:
        return np.asarray(cache.images[np.sort(by_reference[:n])])
    spread = idx[np.linspace(0, len(idx) - 1, min(len(idx), CANDIDATES * n)).astype(int)]
    candidates = np.unique(np.concatenate([by_reference[: CANDIDATES * n], spread]))
    images = np.asarray(cache.images[candidates])
    scorer = TorchScorer(model, "cpu", channels_last=False)
    x = scale_slices(images)
    logits = np.concatenate([scorer.segment(x[i : i + 8])[0] for i in range(0, len(x), 8)])
    predicted = (logits[:, 0] > 0).reshape(len(x), -1).sum(axis=1)  # mask probability > 0.5
    by_prediction = np.argsort(-predicted, kind="stable").tolist()
    position = {int(c): i for i, c in enumerate(candidates)}
    references = [position[int(c)] for c in by_reference if int(c) in position]
    chosen = list(dict.fromkeys([*by_prediction[: n // 2], *references, *by_prediction]))[:n]
    return images[np.sort(chosen)]


class _Feeds:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over prepared input dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_part(fp32: Path, out: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    """Static int8 (QDQ; per-channel int8 weights, uint8 activations) calibrated by min/max on ``feeds``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(prepared))
    quantize_static(
        str(prepared),
        str(out),
        _Feeds(feeds),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    prepared.unlink()
    return out


def calibration_feeds(model: JointModel, slices: np.ndarray, pixel_mm: float) -> dict[str, list[dict[str, np.ndarray]]]:
    """Inputs of each part on the calibration slices, one slice per feed (the classifier's as in the
    clinic, ``classifier_feed``; ``pixel_mm``: the calibration site's typical model-pixel size)."""
    scorer = TorchScorer(model, "cpu", channels_last=False)
    x = scale_slices(slices)
    feeds: dict[str, list[dict[str, np.ndarray]]] = {"segment": [], "classify": []}
    for i in range(len(x)):
        mask_logits, features = scorer.segment(x[i : i + 1])
        image, vector = classifier_feed(model.cfg, x[i : i + 1], mask_logits, features, pixel_mm)
        feeds["segment"].append({"x": x[i : i + 1]})
        feeds["classify"].append({"x": image, "features": vector})
    return feeds


def typical_pixel_mm(cache_dir: Path | str) -> float:
    """The median model-pixel size (mm) of a site cache's studies: what its calibration slices are scored at."""
    from client.data.cache import open_cache
    from client.data.dataset import study_pixel_mm

    sizes = study_pixel_mm(open_cache(cache_dir))
    if not sizes.size:
        raise ValueError(f"site cache {cache_dir} has no study to calibrate on")
    return float(np.median(sizes))


def prepare_models(model: JointModel, options: InferenceOptions) -> dict[str, Path]:
    """The ONNX file of each part (exported, and quantised where ``options.int8`` says), cached."""
    folder = (options.cache_dir or default_cache_dir()) / model_fingerprint(model)
    paths = {p: folder / f"{p}.onnx" for p in _INPUTS}
    if not all(p.exists() for p in paths.values()):
        export_parts(model, folder)
    if not options.int8:
        return paths
    slices = calibration_slices(options.calibration, model)
    tag = hashlib.sha256(slices.tobytes()).hexdigest()[:12]
    feeds = None
    for part in options.int8:
        out = folder / f"{part}.int8-{tag}.onnx"
        if not out.exists():
            feeds = feeds or calibration_feeds(model, slices, typical_pixel_mm(options.calibration))
            quantize_part(paths[part], out, feeds[part])
        paths[part] = out
    return paths


class OnnxScorer:
    """``SliceScorer`` on ONNX Runtime's CPU execution provider."""

    def __init__(self, paths: dict[str, Path], threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.sessions = {
            part: ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            for part, path in paths.items()
        }

    @classmethod
    def for_model(cls, model: JointModel, options: InferenceOptions) -> OnnxScorer:
        return cls(prepare_models(model, options), options.threads)

    def segment(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask_logits, features = self.sessions["segment"].run(None, {"x": x})
        return mask_logits, features

    def classify(self, x: np.ndarray, features: np.ndarray) -> np.ndarray:
        return self.sessions["classify"].run(None, {"x": x, "features": features})[0]
