"""Site profiles: one frozen dataclass per hospital, one field per covariate-shift parameter.

Sites in the real study differ in scanner, protocol, population and annotator (docs/design.md §1);
a profile makes each of those differences an explicit, documented number so an experiment can
say which shift it studies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from common.config import MARKERS

#: Hematoma locations, as in the paper's fine-tuning groups plus the infratentorial ones.
LOCATIONS: tuple[str, ...] = ("putamen", "thalamus", "subcortical", "cerebellum", "brainstem")

#: Reconstruction kernel classes; each maps to a blur (smooth) or an unsharp mask (sharp).
KERNELS: tuple[str, ...] = ("smooth", "standard", "sharp")

#: Pooled (patient-weighted) true prevalence of each marker over the default sites
#: (docs/synthetic-data.md, sources): hypodensity 34.5 % and blend sign 20.3 % as in single-centre
#: cohorts; irregular shape inside the 9-82 % range of the NCCT-marker meta-analysis; fluid level
#: has no pooled figure in our sources and is set so that a 20 % test split holds >= 30 of each.
MARKER_PREVALENCE: dict[str, float] = {
    "hypodensity": 0.345,
    "irregular_margin": 0.40,
    "blend_sign": 0.203,
    "fluid_level": 0.20,
}
#: Default ``generate_dataset(studies_scale=...)``: the archetypes' patient counts times this, so
#: that the pooled 20 % test split holds >= 30 reader-positive studies of every marker.
DEFAULT_STUDIES_SCALE = 6.5
#: Share of a site's patients with a follow-up CT (drawn per site in this range).
FOLLOWUP_RATE_RANGE: tuple[float, float] = (0.45, 0.8)
#: Per-site reader tendency (threshold shift in evidence units; + strict, - lenient) is drawn
#: with this SD, the per-site mimic rate multiplier in this range.
READER_TENDENCY_SD = 0.05
MIMIC_SCALE_RANGE: tuple[float, float] = (0.5, 1.5)


@dataclass(frozen=True)
class SiteProfile:
    """Everything that makes one synthetic hospital differ from another.

    Attributes
    ----------
    site_id: folder name, ``site-01`` .. ``site-NN``.
    name: hospital name (written as InstitutionName, site.toml ``name``).
    manufacturer, model_name: DICOM Manufacturer / ManufacturerModelName.
    station_name: DICOM StationName.
    kvp: tube voltage (KVP); cosmetic.
    noise_sigma_hu: standard deviation of the quantum noise inside the head after the
        reconstruction kernel (HU); air outside the head gets half of it.
    kernel: reconstruction sharpness class, one of ``KERNELS``: smooth = Gaussian blur
        (soft noise texture), standard = slight blur, sharp = unsharp mask (edge overshoot).
    kernel_name: DICOM ConvolutionKernel as that vendor spells it.
    hu_offset: calibration error added to every reconstructed value (HU).
    slice_thickness_mm: SliceThickness.
    slice_spacing_mm: distance between slice centres (SpacingBetweenSlices).
    matrix: Rows = Columns of the axial images.
    fov_mm: reconstruction field of view (ReconstructionDiameter); pixel spacing = fov / matrix.
    fov_circle: values outside the inscribed reconstruction circle are air or padding.
    head_shift_mm: mean in-plane offset (x, y) of the head centre from the image centre.
    head_shift_sd_mm: per-study spread of that offset.
    tilt_deg, tilt_sd_deg: mean and spread of the in-plane head rotation (degrees).
    cupping_hu: beam-hardening strength: brighter cortex near the skull, darker centre (HU).
    streak_hu: amplitude of the streaks across the posterior fossa (HU).
    window: HU window [a, b] written to site.toml and WindowCenter/WindowWidth.
    prevalence: probability of each marker in ``MARKERS`` order (independent draws).
    location_mix: probability of each location in ``LOCATIONS`` order.
    annotator_bias_px: the site's annotator draws masks dilated (+n) or eroded (-n) in-plane.
    missing_label_rate: share of label cells left empty ("not annotated").
    n_patients: number of patients; studies = patients + follow-ups.
    followup_rate: share of patients with a follow-up study.
    pixel_representation: 0 = unsigned, 1 = signed stored values (PixelRepresentation).
    rescale_intercept, rescale_slope: HU = stored * slope + intercept.
    bits_stored: BitsStored (HighBit = bits_stored - 1).
    pixel_padding_value: PixelPaddingValue written for out-of-field pixels, or None (air).
    instance_order: InstanceNumber order: ``ascending`` (inferior first), ``descending``, or
        ``scrambled`` (readers must sort by ImagePositionPatient, not by instance number).
    file_extension: ``.dcm`` or ``""`` (extension-less files, as some PACS exports).
    mask_layout: how the mask array is stored in the NIfTI, e.g. ``c,-r,k`` (dcm2niix-like:
        columns, flipped rows, slices); the affine always says which voxel is which.
    scout_rate: share of studies whose folder also holds one localizer image.
    severity_range: range of the uniform draw of a present marker's severity, 0 (barely there)
        to 1 (obvious); ``hematoma`` maps severity to HU difference, size, lobules, sharpness.
    mimic_scale: multiplies every mimic's base rate (``mimics.MIMIC_RATES``); 0 = no mimics.
    reader_noise: 1 = readers calibrated to the published inter-rater agreement per marker
        (``readers.READER_AC1``); 0 = every label is the truth; in between scales the noise.
    reader_tendency: the site's readers' threshold shift (evidence units): + strict, - lenient.
    readers: 1 = one reader's call per label; 2 = two readers, a third adjudicates disagreements.
    """

    site_id: str
    name: str
    manufacturer: str
    model_name: str
    station_name: str
    kvp: float
    noise_sigma_hu: float
    kernel: str
    kernel_name: str
    hu_offset: float
    slice_thickness_mm: float
    slice_spacing_mm: float
    matrix: int
    fov_mm: float
    fov_circle: bool
    head_shift_mm: tuple[float, float]
    head_shift_sd_mm: float
    tilt_deg: float
    tilt_sd_deg: float
    cupping_hu: float
    streak_hu: float
    window: tuple[float, float]
    prevalence: tuple[float, float, float, float]
    location_mix: tuple[float, float, float, float, float]
    annotator_bias_px: int
    missing_label_rate: float
    n_patients: int
    followup_rate: float
    pixel_representation: int
    rescale_intercept: float
    rescale_slope: float
    bits_stored: int
    pixel_padding_value: int | None
    instance_order: str
    file_extension: str
    mask_layout: str
    scout_rate: float
    severity_range: tuple[float, float] = (0.05, 1.0)
    mimic_scale: float = 1.0
    reader_noise: float = 1.0
    reader_tendency: float = 0.0
    readers: int = 1

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if len(self.prevalence) != len(MARKERS):
            raise ValueError(f"prevalence needs one value per marker {MARKERS}")
        if len(self.location_mix) != len(LOCATIONS) or abs(sum(self.location_mix) - 1) > 1e-6:
            raise ValueError(f"location_mix needs {len(LOCATIONS)} probabilities summing to 1")
        if self.instance_order not in ("ascending", "descending", "scrambled"):
            raise ValueError(f"unknown instance_order {self.instance_order!r}")
        if not self.window[1] > self.window[0]:
            raise ValueError(f"window must satisfy a < b, got {self.window}")
        parse_mask_layout(self.mask_layout)
        if not 0.0 <= self.severity_range[0] <= self.severity_range[1] <= 1.0:
            raise ValueError(f"severity_range must satisfy 0 <= lo <= hi <= 1, got {self.severity_range}")
        if self.readers not in (1, 2):
            raise ValueError(f"readers must be 1 or 2, got {self.readers}")
        if self.mimic_scale < 0 or self.reader_noise < 0:
            raise ValueError("mimic_scale and reader_noise must be >= 0")

    @property
    def pixel_spacing_mm(self) -> float:
        """In-plane pixel size (PixelSpacing, same for rows and columns)."""
        return self.fov_mm / self.matrix

    @property
    def stored_range(self) -> tuple[int, int]:
        """Smallest and largest stored value that BitsStored and PixelRepresentation allow."""
        if self.pixel_representation:
            return -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1
        return 0, 2**self.bits_stored - 1

    def marker_prevalence(self) -> dict[str, float]:
        return dict(zip(MARKERS, self.prevalence))


def parse_mask_layout(layout: str) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """``"c,-r,k"`` -> axes of the [k, r, c] volume in stored order, and which are flipped."""
    names = {"k": 0, "r": 1, "c": 2}
    parts = [p.strip() for p in layout.split(",")]
    axes = tuple(names[p.lstrip("-")] for p in parts if p.lstrip("-") in names)
    if len(parts) != 3 or sorted(axes) != [0, 1, 2]:
        raise ValueError(f"mask_layout must name k, r and c once each (e.g. 'c,-r,k'), got {layout!r}")
    return axes, tuple(p.startswith("-") for p in parts)


# The twelve archetypes. Hand-set so that every kind of shift is present and the first three
# sites (used by small tests) already differ in noise, kernel, matrix, DICOM encoding and size.
# Columns: name, manufacturer, model, kernel, kernel_name, kvp, noise, matrix factor, fov,
# thickness, spacing, hu_offset, cupping, streak, pixrep, intercept, slope, bits, padding,
# instance order, extension, mask layout, annotator bias, missing rate, patients, window,
# tilt (mean, sd), shift mean, shift sd, prevalence, location mix, scout rate.
_ARCHETYPES: tuple[tuple, ...] = (
    (
        "Riverside University Hospital",
        "SIEMENS",
        "SOMATOM Definition AS+",
        "standard",
        "H31s",
        120,
        4.5,
        1.0,
        230,
        5.0,
        5.0,
        0.0,
        3.0,
        12.0,
        0,
        -1024.0,
        1.0,
        12,
        None,
        "ascending",
        ".dcm",
        "c,-r,k",
        0,
        0.05,
        30,
        (0.0, 80.0),
        (0.0, 4.0),
        (0.0, 0.0),
        4.0,
        (0.25, 0.30, 0.20, 0.12),
        (0.42, 0.20, 0.26, 0.07, 0.05),
        0.5,
    ),
    (
        "St. Aldric Medical Center",
        "GE MEDICAL SYSTEMS",
        "LightSpeed VCT",
        "standard",
        "STANDARD",
        120,
        8.0,
        0.75,
        250,
        5.0,
        5.0,
        4.0,
        6.0,
        25.0,
        1,
        -1024.0,
        1.0,
        16,
        -2000,
        "descending",
        "",
        "k,r,c",
        1,
        0.10,
        8,
        (0.0, 90.0),
        (-5.0, 6.0),
        (6.0, -4.0),
        7.0,
        (0.15, 0.35, 0.12, 0.08),
        (0.35, 0.25, 0.28, 0.07, 0.05),
        1.0,
    ),
    (
        "Harbour View General Hospital",
        "TOSHIBA",
        "Aquilion ONE",
        "smooth",
        "FC21",
        120,
        3.0,
        1.25,
        220,
        4.0,
        4.0,
        -3.0,
        2.0,
        6.0,
        1,
        0.0,
        1.0,
        16,
        None,
        "scrambled",
        ".dcm",
        "c,r,k",
        -1,
        0.0,
        17,
        (5.0, 75.0),
        (6.0, 5.0),
        (-5.0, 6.0),
        6.0,
        (0.32, 0.22, 0.30, 0.15),
        (0.30, 0.15, 0.40, 0.10, 0.05),
        0.0,
    ),
    (
        "Eastbrook Community Hospital",
        "Philips",
        "Brilliance 64",
        "sharp",
        "UB",
        120,
        10.0,
        1.0,
        240,
        6.0,
        6.0,
        2.0,
        8.0,
        18.0,
        0,
        -1024.0,
        0.5,
        16,
        None,
        "ascending",
        ".dcm",
        "-k,r,c",
        0,
        0.15,
        5,
        (0.0, 80.0),
        (2.0, 8.0),
        (0.0, 8.0),
        9.0,
        (0.10, 0.20, 0.10, 0.05),
        (0.45, 0.25, 0.20, 0.05, 0.05),
        0.3,
    ),
    (
        "Northern Lakes Stroke Centre",
        "SIEMENS",
        "SOMATOM Force",
        "smooth",
        "Hr36",
        100,
        3.5,
        1.0,
        235,
        5.0,
        5.0,
        1.0,
        1.5,
        5.0,
        0,
        -1024.0,
        1.0,
        12,
        None,
        "descending",
        ".dcm",
        "c,-r,k",
        0,
        0.02,
        24,
        (0.0, 80.0),
        (-2.0, 3.0),
        (0.0, -3.0),
        3.0,
        (0.30, 0.28, 0.25, 0.10),
        (0.40, 0.18, 0.30, 0.07, 0.05),
        0.2,
    ),
    (
        "Valley Regional Medical Centre",
        "GE MEDICAL SYSTEMS",
        "Revolution CT",
        "sharp",
        "BONEPLUS",
        120,
        7.0,
        0.75,
        240,
        5.0,
        5.0,
        -5.0,
        4.0,
        30.0,
        1,
        -1024.0,
        1.0,
        16,
        -2000,
        "ascending",
        ".dcm",
        "k,-r,-c",
        1,
        0.08,
        12,
        (-10.0, 90.0),
        (8.0, 7.0),
        (8.0, 0.0),
        8.0,
        (0.20, 0.25, 0.15, 0.20),
        (0.30, 0.30, 0.25, 0.10, 0.05),
        0.6,
    ),
    (
        "Meadowbank Hospital",
        "Canon Medical Systems",
        "Aquilion Prime SP",
        "standard",
        "FC26",
        120,
        6.0,
        1.25,
        230,
        5.0,
        5.0,
        3.0,
        5.0,
        14.0,
        1,
        0.0,
        1.0,
        16,
        None,
        "scrambled",
        "",
        "r,c,k",
        0,
        0.12,
        20,
        (0.0, 85.0),
        (0.0, 10.0),
        (0.0, 5.0),
        6.0,
        (0.22, 0.32, 0.18, 0.14),
        (0.38, 0.22, 0.30, 0.05, 0.05),
        0.0,
    ),
    (
        "Coastal Teaching Hospital",
        "Philips",
        "Ingenuity CT",
        "smooth",
        "A",
        120,
        5.0,
        1.0,
        250,
        4.0,
        4.0,
        -2.0,
        7.0,
        10.0,
        0,
        -1024.0,
        1.0,
        12,
        None,
        "ascending",
        ".dcm",
        "c,-r,k",
        -1,
        0.05,
        6,
        (10.0, 70.0),
        (-6.0, 4.0),
        (-8.0, 4.0),
        5.0,
        (0.35, 0.15, 0.28, 0.22),
        (0.48, 0.20, 0.20, 0.07, 0.05),
        0.4,
    ),
    (
        "Summit Neuroscience Institute",
        "SIEMENS",
        "SOMATOM go.Top",
        "sharp",
        "Hr49",
        120,
        9.0,
        0.75,
        225,
        5.0,
        5.0,
        5.0,
        3.0,
        20.0,
        0,
        -1024.0,
        1.0,
        12,
        None,
        "descending",
        ".dcm",
        "-c,r,k",
        0,
        0.20,
        14,
        (0.0, 80.0),
        (3.0, 5.0),
        (3.0, 3.0),
        5.0,
        (0.18, 0.22, 0.22, 0.10),
        (0.32, 0.20, 0.35, 0.08, 0.05),
        0.5,
    ),
    (
        "Lakeshore District Hospital",
        "GE MEDICAL SYSTEMS",
        "Optima CT660",
        "standard",
        "SOFT",
        120,
        5.5,
        1.0,
        245,
        5.0,
        5.0,
        0.0,
        9.0,
        22.0,
        1,
        -1024.0,
        1.0,
        16,
        -2000,
        "ascending",
        "",
        "k,r,c",
        1,
        0.10,
        10,
        (0.0, 80.0),
        (0.0, 6.0),
        (0.0, 10.0),
        6.0,
        (0.28, 0.20, 0.24, 0.30),
        (0.36, 0.24, 0.28, 0.07, 0.05),
        0.8,
    ),
    (
        "Pinecrest Memorial Hospital",
        "TOSHIBA",
        "Aquilion 64",
        "standard",
        "FC23",
        120,
        6.5,
        1.0,
        240,
        6.0,
        6.0,
        -4.0,
        5.0,
        16.0,
        1,
        0.0,
        1.0,
        16,
        None,
        "scrambled",
        ".dcm",
        "c,-r,-k",
        0,
        0.25,
        9,
        (0.0, 80.0),
        (-10.0, 6.0),
        (5.0, 5.0),
        7.0,
        (0.12, 0.18, 0.30, 0.12),
        (0.44, 0.22, 0.22, 0.07, 0.05),
        0.0,
    ),
    (
        "Old Mill Cottage Hospital",
        "Philips",
        "Incisive CT",
        "sharp",
        "YB",
        120,
        11.0,
        0.75,
        250,
        5.0,
        5.0,
        6.0,
        10.0,
        28.0,
        0,
        -1024.0,
        1.0,
        12,
        None,
        "ascending",
        ".dcm",
        "c,r,-k",
        2,
        0.30,
        7,
        (-5.0, 85.0),
        (5.0, 9.0),
        (-6.0, 8.0),
        10.0,
        (0.20, 0.35, 0.12, 0.25),
        (0.30, 0.30, 0.30, 0.05, 0.05),
        0.3,
    ),
)


def _site_matrix(matrix: int, factor: float) -> int:
    """Scale the dataset matrix for one site, rounded to a multiple of 8.

    Never below 64 (or ``matrix`` if smaller): a coarser grid cannot show the markers.
    """
    return max(min(64, matrix), int(round(matrix * factor / 8.0)) * 8)


def _prevalence_scale() -> np.ndarray:
    """Per marker, the factor that brings the archetypes' patient-weighted prevalence to
    ``MARKER_PREVALENCE`` (the archetypes keep their between-site pattern)."""
    mean = np.average([a[29] for a in _ARCHETYPES], axis=0, weights=[a[24] for a in _ARCHETYPES])
    return np.array([MARKER_PREVALENCE[m] for m in MARKERS]) / mean


def default_profiles(n_sites: int = 12, seed: int = 0, matrix: int = 128) -> list[SiteProfile]:
    """The standard sites: hand-set archetypes, continuous knobs jittered by ``seed``.

    More than twelve sites reuse the archetypes in turn with fresh jitter, so every site stays
    distinct. Matrix sizes are ``matrix`` x 0.75, 1 or 1.25 (multiples of 8). Follow-up rate,
    reader tendency and mimic scale come from their own stream, so the other knobs keep the
    values they had before those existed.
    """
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    rng = np.random.default_rng([seed, 0x5173])
    rng_labels = np.random.default_rng([seed, 0x5174])
    prev_scale = _prevalence_scale()
    out: list[SiteProfile] = []
    for i in range(n_sites):
        a = _ARCHETYPES[i % len(_ARCHETYPES)]
        (
            name,
            manu,
            model,
            kernel,
            kname,
            kvp,
            noise,
            mfac,
            fov,
            thick,
            spacing,
            off,
            cup,
            streak,
            pixrep,
            icpt,
            slope,
            bits,
            pad,
            order,
            ext,
            layout,
            bias,
            missing,
            npat,
            window,
            tilt,
            shift,
            shift_sd,
            prev,
            locmix,
            scout,
        ) = a
        j = rng.uniform(0.9, 1.1, size=4)
        fu_rate, tendency, mimic_scale = (
            rng_labels.uniform(*FOLLOWUP_RATE_RANGE),
            rng_labels.normal(0.0, READER_TENDENCY_SD),
            rng_labels.uniform(*MIMIC_SCALE_RANGE),
        )
        if i >= len(_ARCHETYPES):
            name = f"{name} (campus {i // len(_ARCHETYPES) + 1})"
        out.append(
            SiteProfile(
                site_id=f"site-{i + 1:02d}",
                name=name,
                manufacturer=manu,
                model_name=model,
                station_name=f"CT{i + 1:02d}{manu.split()[0][:3].upper()}",
                kvp=float(kvp),
                noise_sigma_hu=round(float(noise * j[0]), 2),
                kernel=kernel,
                kernel_name=kname,
                hu_offset=round(float(off + rng.normal(0.0, 0.5)), 2),
                slice_thickness_mm=float(thick),
                slice_spacing_mm=float(spacing),
                matrix=_site_matrix(matrix, mfac),
                fov_mm=float(fov),
                fov_circle=True,
                head_shift_mm=(float(shift[0]), float(shift[1])),
                head_shift_sd_mm=float(shift_sd),
                tilt_deg=float(tilt[0]),
                tilt_sd_deg=float(tilt[1]),
                cupping_hu=round(float(cup * j[1]), 2),
                streak_hu=round(float(streak * j[2]), 2),
                window=(float(window[0]), float(window[1])),
                prevalence=tuple(float(np.clip(p * f, 0.02, 0.8)) for p, f in zip(prev, prev_scale)),
                location_mix=tuple(float(p) for p in locmix),
                annotator_bias_px=int(bias),
                missing_label_rate=float(missing),
                n_patients=int(npat),
                followup_rate=round(float(fu_rate), 3),
                pixel_representation=int(pixrep),
                rescale_intercept=float(icpt),
                rescale_slope=float(slope),
                bits_stored=int(bits),
                pixel_padding_value=pad,
                instance_order=order,
                file_extension=ext,
                mask_layout=layout,
                scout_rate=float(scout),
                mimic_scale=round(float(mimic_scale), 3),
                reader_tendency=round(float(tendency), 3),
            )
        )
    return out


def scale_studies(profile: SiteProfile, studies_scale: float) -> SiteProfile:
    """The same site with ``n_patients`` scaled (at least two patients, for a train/test split)."""
    return replace(profile, n_patients=max(2, int(round(profile.n_patients * studies_scale))))
