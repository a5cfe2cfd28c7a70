"""Configuration types and label names shared by the site, the server and the simulation.

Everything that crosses a boundary is a frozen dataclass, parsed once at the edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

#: The four hematoma-expansion markers (Boulouis et al. 2016), in model output order.
MARKERS: tuple[str, ...] = ("hypodensity", "irregular_margin", "blend_sign", "fluid_level")
#: Every study-level label column of labels.csv (docs/design.md §4), markers first.
LABELS: tuple[str, ...] = MARKERS + ("expansion",)
#: How the DICOM SR (``client.inference.dicom_results``) names each label: (code value, meaning) in the
#: project's private coding scheme. Code values stay within 16 characters (a short CodeValue): highdicom
#: writes longer ones as LongCodeValue, which some readers (highdicom's own) do not expect. A new marker
#: is one entry in ``MARKERS`` and one here (docs/design.md, "Where things go").
LABEL_CODES: dict[str, tuple[str, str]] = {
    "hypodensity": ("HYPODENSITY", "Hypodensity within hematoma"),
    "irregular_margin": ("IRREG-MARGIN", "Irregular hematoma margin"),
    "blend_sign": ("BLEND-SIGN", "Blend sign"),
    "fluid_level": ("FLUID-LEVEL", "Fluid level within hematoma"),
    "expansion": ("EXPANSION", "Hematoma expansion"),
}
if set(LABEL_CODES) != set(LABELS):
    raise ImportError(f"common.config: LABEL_CODES names {sorted(LABEL_CODES)}, LABELS {sorted(LABELS)}")
#: Identifier columns of labels.csv.
ID_COLUMNS: tuple[str, str] = ("patient_id", "study_id")


def check_known_keys(cls: type, d: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Copy of ``d`` after checking every key is a field of dataclass ``cls``.

    Unknown keys are an error naming the valid ones, never silently dropped: a typo in a config
    file must not fall back to a default unnoticed.
    """
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise KeyError(f"unknown {what} keys {sorted(unknown)}; valid: {sorted(known)}")
    return dict(d)


#: Hounsfield value used for air, padding and everything outside the field of view.
AIR_HU: float = -1000.0


@dataclass(frozen=True)
class PreprocessConfig:
    """The paper's preprocessing (docs/design.md §1), each step switchable for its ablation (§5.1.1).

    Attributes
    ----------
    window: HU window [a, b] mapped linearly onto [0, 255]; a site's ``site.toml`` may override it.
    denoise: apply the noise filter (``denoise_size`` is the filter's window in pixels).
    strip_skull: remove bone and everything outside the brain.
    centre: translate the brain's centroid to the image centre.
    size: side of the square model input in pixels (slices are resized to size x size).
    min_mask_pixels: a slice "holds hematoma" when its mask has more pixels than this
        (at model size); its marker labels are then the study's labels, else all zero.
    """

    window: tuple[float, float] = (0.0, 80.0)
    denoise: bool = True
    denoise_size: int = 3
    strip_skull: bool = True
    centre: bool = True
    size: int = 256
    min_mask_pixels: int = 10

    def __post_init__(self) -> None:
        a, b = self.window
        if not b > a:
            raise ValueError(f"window must satisfy a < b, got {self.window}")
        if self.size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {self.size}")
        object.__setattr__(self, "window", (float(a), float(b)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["window"] = list(self.window)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessConfig:
        kw = check_known_keys(cls, d, "preprocessing")
        if "window" in kw:
            kw["window"] = tuple(kw["window"])
        return cls(**kw)

    def with_window(self, window: tuple[float, float] | None) -> PreprocessConfig:
        return self if window is None else replace(self, window=tuple(window))
