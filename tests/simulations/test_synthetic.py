"""The synthetic multi-site generator: files in the data contract, exact round trips, markers
built to their definitions, sites that really differ."""

from __future__ import annotations

import csv
import json
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage
from scipy.spatial import ConvexHull

from common.config import AIR_HU, LABELS, MARKERS
from simulations.synthetic import default_profiles, generate_dataset
from simulations.synthetic.anatomy import HeadPose, ScanGrid, make_head, sample_anatomy
from simulations.synthetic.cohort import plan_site
from simulations.synthetic.hematoma import make_hematoma, sample_hematoma_spec
from simulations.synthetic.profiles import DEFAULT_STUDIES_SCALE, scale_studies
from simulations.synthetic.study import render_study

SEED = 7
N_SITES = 3
MATRIX = 64
SCALE = 0.5
HEADER = ["patient_id", "study_id", *LABELS, "location", "followup_study_id"]


# ---------------------------------------------------------------- fixtures and readers


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "data"
    summary = generate_dataset(out, n_sites=N_SITES, seed=SEED, matrix=MATRIX, studies_scale=SCALE, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def profiles():
    return [scale_studies(p, SCALE) for p in default_profiles(N_SITES, SEED, MATRIX)]


def read_labels(site_dir: Path) -> list[dict[str, str]]:
    with (site_dir / "labels.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def read_study(study_dir: Path):
    """Axial series only (localizers dropped), sorted by position along the normal."""
    axial, scouts = [], []
    for f in study_dir.iterdir():
        ds = pydicom.dcmread(f)
        (scouts if "LOCALIZER" in ds.ImageType else axial).append(ds)
    axial.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return axial, scouts


def to_hu(series) -> np.ndarray:
    vols = []
    for ds in series:
        raw = ds.pixel_array.astype(np.float64)
        hu = raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        if "PixelPaddingValue" in ds:
            hu[raw == ds.PixelPaddingValue] = AIR_HU
        vols.append(hu)
    return np.stack(vols)


def mask_on_dicom_grid(nii_path: Path, series) -> np.ndarray:
    """Map a NIfTI mask onto the DICOM [k, r, c] grid through its affine (any axis order)."""
    img = nib.load(nii_path)
    data = np.asarray(img.dataobj)
    ijk = np.argwhere(data > 0)
    ras = img.affine @ np.c_[ijk, np.ones(len(ijk))].T
    lps = np.diag([-1.0, -1.0, 1.0]) @ ras[:3]
    ds0 = series[0]
    origin = np.array([float(v) for v in ds0.ImagePositionPatient])
    ps = [float(v) for v in ds0.PixelSpacing]
    dz = float(series[1].ImagePositionPatient[2]) - origin[2]
    c = (lps[0] - origin[0]) / ps[1]
    r = (lps[1] - origin[1]) / ps[0]
    k = (lps[2] - origin[2]) / dz
    idx = np.stack([k, r, c])
    assert np.allclose(idx, np.round(idx), atol=1e-3), "mask voxels fall between DICOM voxels"
    out = np.zeros((len(series), int(ds0.Rows), int(ds0.Columns)), dtype=bool)
    out[tuple(np.round(idx).astype(int))] = True
    assert out.sum() == len(ijk)
    return out


def nifti_volume_ml(path: Path) -> float:
    img = nib.load(path)
    voxel_ml = abs(np.linalg.det(img.affine[:3, :3])) / 1000
    return float((np.asarray(img.dataobj) > 0).sum()) * voxel_ml


# ---------------------------------------------------------------- layout and labels


def test_layout_matches_the_data_contract(dataset, profiles):
    out, summary = dataset
    assert (out / "montage.png").stat().st_size > 10_000
    assert "site-01" in (out / "README.txt").read_text()
    doc = json.loads((out / "dataset.json").read_text())
    assert [s["profile"]["site_id"] for s in doc["sites"]] == [p.site_id for p in profiles]
    for prof, ssum in zip(profiles, summary.sites):
        site = out / prof.site_id
        toml = tomllib.loads((site / "site.toml").read_text())
        assert toml == {"site_id": prof.site_id, "name": prof.name, "window": list(prof.window)}
        rows = read_labels(site)
        with (site / "labels.csv").open() as f:
            assert next(csv.reader(f)) == HEADER
        assert len(rows) == ssum.studies == ssum.patients + ssum.followups
        for row in rows:
            assert row["patient_id"].startswith("MRN") and row["study_id"].startswith("ST")
            assert (site / "dicom" / row["patient_id"] / row["study_id"]).is_dir()
            assert (site / "masks" / row["patient_id"] / f"{row['study_id']}.nii.gz").is_file()
            assert all(row[lab] in ("", "0", "1") for lab in LABELS)
        for lab in LABELS:
            assert ssum.positives[lab] == sum(r[lab] == "1" for r in rows)


def test_followup_rows_and_expansion_rule(dataset):
    out, _ = dataset
    n_fu = 0
    for site in sorted(out.glob("site-*")):
        rows = {r["study_id"]: r for r in read_labels(site)}
        for row in rows.values():
            if not row["followup_study_id"]:
                continue
            fu = rows[row["followup_study_id"]]
            n_fu += 1
            assert fu["patient_id"] == row["patient_id"]
            assert all(fu[lab] == "" for lab in LABELS) and fu["followup_study_id"] == ""
            masks = site / "masks" / row["patient_id"]
            v0 = nifti_volume_ml(masks / f"{row['study_id']}.nii.gz")
            v1 = nifti_volume_ml(masks / f"{fu['study_id']}.nii.gz")
            if row["expansion"] != "":
                assert row["expansion"] == str(int(v1 >= 1.3 * v0))
        for row in rows.values():
            if not row["followup_study_id"] and row["expansion"] != "":
                assert any(r["followup_study_id"] == row["study_id"] for r in rows.values())
    assert n_fu >= 2


def test_site_sizes_differ_several_fold(dataset):
    _, summary = dataset
    sizes = [s.studies for s in summary.sites]
    assert max(sizes) >= 3 * min(sizes)
    full = [scale_studies(p, DEFAULT_STUDIES_SCALE).n_patients for p in default_profiles(12)]
    assert max(full) >= 5 * min(full) and 800 <= sum(full) <= 1200


# ---------------------------------------------------------------- DICOM


def test_dicom_tags_phi_and_file_names(dataset, profiles):
    out, summary = dataset
    name_of: dict[str, set[str]] = {}
    for prof in profiles:
        site = out / prof.site_id
        for row in read_labels(site):
            sdir = site / "dicom" / row["patient_id"] / row["study_id"]
            axial, scouts = read_study(sdir)
            ds = axial[0]
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT"
            assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
            assert ds.PatientID == row["patient_id"] and ds.StudyID == row["study_id"]
            assert "^" in str(ds.PatientName) and len(ds.PatientBirthDate) == 8
            assert ds.AccessionNumber and ds.OtherPatientIDs and ds.ReferringPhysicianName
            assert ds.InstitutionName == prof.name and ds.Manufacturer == prof.manufacturer
            assert len(ds.StudyDate) == 8 and ds.StudyTime and ds.ContentDate and ds.SeriesDate
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert ds.Rows == ds.Columns == prof.matrix
            assert float(ds.PixelSpacing[0]) == pytest.approx(prof.fov_mm / prof.matrix, abs=1e-5)
            assert float(ds.SliceThickness) == prof.slice_thickness_mm
            assert ds.PixelRepresentation == prof.pixel_representation
            assert float(ds.RescaleSlope) == prof.rescale_slope
            assert float(ds.RescaleIntercept) == prof.rescale_intercept
            assert ds.ConvolutionKernel == prof.kernel_name and ds.RescaleType == "HU"
            assert ("PixelPaddingValue" in ds) == (prof.pixel_padding_value is not None)
            assert len({d.SeriesInstanceUID for d in axial}) == 1
            assert len({d.SOPInstanceUID for d in axial}) == len(axial)
            zs = [float(d.ImagePositionPatient[2]) for d in axial]
            assert np.allclose(np.diff(zs), prof.slice_spacing_mm)
            for s in scouts:
                assert "LOCALIZER" in s.ImageType
                assert s.SeriesInstanceUID != ds.SeriesInstanceUID
                assert s.StudyInstanceUID == ds.StudyInstanceUID
                assert [float(v) for v in s.ImageOrientationPatient] != [1, 0, 0, 0, 1, 0]
            files = [p.name for p in sdir.iterdir()]
            assert all(f.endswith(".dcm") for f in files) == (prof.file_extension == ".dcm")
            name_of.setdefault(ds.PatientID, set()).add(str(ds.PatientName))
    # One name per patient (baseline and follow-up agree), different patients, different PHI.
    assert len(name_of) == sum(s.patients for s in summary.sites)
    assert all(len(v) == 1 for v in name_of.values())
    assert len({next(iter(v)) for v in name_of.values()}) >= 0.8 * len(name_of)


def test_slice_order_is_not_in_file_names_or_instance_numbers(dataset):
    out, _ = dataset
    site = out / "site-03"  # scrambled instance numbers
    row = read_labels(site)[0]
    sdir = site / "dicom" / row["patient_id"] / row["study_id"]
    by_name = [pydicom.dcmread(f) for f in sorted(sdir.iterdir())]
    by_name = [d for d in by_name if "LOCALIZER" not in d.ImageType]
    z_by_name = [float(d.ImagePositionPatient[2]) for d in by_name]
    assert z_by_name != sorted(z_by_name)
    axial, _ = read_study(sdir)
    inst = [int(d.InstanceNumber) for d in axial]
    assert inst != sorted(inst) and inst != sorted(inst, reverse=True)
    scouts = sum(
        len(read_study(out / "site-02" / "dicom" / r["patient_id"] / r["study_id"])[1])
        for r in read_labels(out / "site-02")
    )
    assert scouts == len(read_labels(out / "site-02"))  # site-02 always adds a localizer


def test_hu_and_mask_round_trip(dataset, profiles):
    out, _ = dataset
    for i, prof in enumerate(profiles, start=1):
        plan = plan_site(prof, i, SEED)
        for st in plan.studies[:3]:
            r = render_study(prof, st)
            sdir = out / prof.site_id / "dicom" / st.patient.patient_id / st.study_id
            axial, _ = read_study(sdir)
            hu = to_hu(axial)
            assert hu.shape == r.hu.shape
            assert np.abs(hu - r.hu).max() <= prof.rescale_slope / 2 + 1e-3
            assert np.all(hu[:, r.outside_fov] == AIR_HU)
            nii = out / prof.site_id / "masks" / st.patient.patient_id / f"{st.study_id}.nii.gz"
            m = mask_on_dicom_grid(nii, axial)
            assert np.array_equal(m, r.mask)
            # The mask lands on the hematoma: bright clot inside, and it overlaps the truth.
            dice = 2 * (m & r.true_mask).sum() / (m.sum() + r.true_mask.sum())
            assert dice > 0.6
            assert np.median(hu[r.true_mask]) > 45


def test_the_site_reader_reads_every_study_back(dataset, profiles):
    """client.ingest.layouts (the code a hospital runs) finds no problem but the planned localizers
    (named, left out) and gets our arrays back: HU within rounding (it turns everything below air
    into air), masks voxel for voxel."""
    from client.ingest.layouts import iter_studies

    out, summary = dataset
    for i, (prof, ssum) in enumerate(zip(profiles, summary.sites), start=1):
        scouts = {st.study_id: int(st.has_scout) for st in plan_site(prof, i, SEED).studies}
        records = {}
        for rec in iter_studies(out / prof.site_id):
            if isinstance(rec, list):
                assert rec == [], rec
            else:
                named = [p for p in rec.problems if p.reason.startswith("localizer (ImageType LOCALIZER)")]
                assert len(named) == len(rec.problems) == scouts[rec.ref.study_id], rec.problems
                records[rec.ref.study_id] = rec
        assert len(records) == ssum.studies
        for st in plan_site(prof, i, SEED).studies[:2]:
            r = render_study(prof, st)
            rec = records[st.study_id]
            hu = np.asarray(rec.volume)
            assert np.abs(hu - np.maximum(r.hu, AIR_HU)).max() <= prof.rescale_slope / 2 + 1e-3
            assert np.array_equal(np.asarray(rec.mask) > 0, r.mask)


def test_masks_use_the_site_axis_order(dataset, profiles):
    out, _ = dataset
    codes = set()
    for prof in profiles:
        row = read_labels(out / prof.site_id)[0]
        site = out / prof.site_id
        img = nib.load(site / "masks" / row["patient_id"] / f"{row['study_id']}.nii.gz")
        assert img.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1}
        codes.add(nib.aff2axcodes(img.affine))
    assert len(codes) == len(profiles)  # three sites, three layouts


# ---------------------------------------------------------------- determinism


def _snapshot(root: Path) -> dict[str, bytes]:
    snap = {}
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.suffix != ".png" and f.name != "dataset.json":
            rel = str(f.relative_to(root))
            if "dicom" in f.parts:
                ds = pydicom.dcmread(f)
                snap[rel] = ds.PixelData + f"{ds.SOPInstanceUID}{ds.PatientName}".encode()
            else:
                snap[rel] = f.read_bytes()
    return snap


def test_same_seed_same_bytes_other_seed_other_data(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    generate_dataset(again, n_sites=N_SITES, seed=SEED, matrix=MATRIX, studies_scale=SCALE, progress=False, workers=1)
    a, b = _snapshot(out), _snapshot(again)  # also: one worker or several, the same bytes
    assert ".truth/truth.csv" in a
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)
    other = tmp_path / "other"
    generate_dataset(other, n_sites=1, seed=SEED + 1, matrix=MATRIX, studies_scale=0.1, progress=False)
    labels = [(d / "site-01" / "labels.csv").read_bytes() for d in (other, out)]
    assert labels[0] != labels[1]
    with pytest.raises(FileExistsError):
        generate_dataset(other, n_sites=1, seed=SEED, matrix=MATRIX, studies_scale=0.1, progress=False)


# ---------------------------------------------------------------- site shift


def test_profiles_differ_and_noise_is_measurable(dataset, profiles):
    allp = default_profiles(12, 0, 128)
    assert {p.kernel for p in allp} == {"smooth", "standard", "sharp"}
    assert len({p.matrix for p in allp}) == 3 and len({p.mask_layout for p in allp}) >= 5
    assert {p.pixel_representation for p in allp} == {0, 1}
    assert {p.rescale_slope for p in allp} == {0.5, 1.0}
    assert any(p.pixel_padding_value is not None for p in allp)
    assert len({p.noise_sigma_hu for p in allp}) == 12
    assert len({p.prevalence for p in allp}) == 12 and len({p.location_mix for p in allp}) == 12
    assert len({p.matrix for p in profiles}) >= 2
    out, _ = dataset
    measured = {}
    for prof in profiles:
        row = read_labels(out / prof.site_id)[0]
        axial, _ = read_study(out / prof.site_id / "dicom" / row["patient_id"] / row["study_id"])
        hu = to_hu(axial)
        mid = hu[len(hu) // 2]
        air = (mid > -1100) & (mid < -900) & (mid != AIR_HU)
        air = ndimage.binary_erosion(air, iterations=2)  # away from skin blur and FOV edge
        measured[prof.site_id] = mid[air].std() / 0.5  # air carries half the head's noise
    for prof in profiles:
        assert measured[prof.site_id] == pytest.approx(prof.noise_sigma_hu, rel=0.3)


# ---------------------------------------------------------------- markers, noise-free


def _render_case(
    seed: int,
    location: str,
    markers: dict[str, bool],
    tilt: float = 0.0,
    n: int = 96,
    severity: dict[str, float] | None = None,
    mimics: dict[str, float] | None = None,
    volume_ml: float | None = None,
):
    """A noise-free study (obvious markers unless ``severity`` says otherwise)."""
    rng = np.random.default_rng(seed)
    anat = sample_anatomy(rng)
    ps = 230.0 / n
    grid = ScanGrid((28, n, n), ps, 5.0, (-(n - 1) / 2 * ps, -(n - 1) / 2 * ps, -45.0))
    pose = HeadPose((2.0, -3.0, 0.0), tilt)
    head = make_head(anat, grid, pose)
    spec = sample_hematoma_spec(rng, location, markers, anat, severity, volume_ml, mimics)
    delta, mask, info = make_hematoma(spec, grid, pose, head, rng)
    return head.hu + delta, mask, info


def _inplane_erode(m: np.ndarray, it: int = 1) -> np.ndarray:
    st = np.zeros((1, 3, 3), bool)
    st[0] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_erosion(m, st, iterations=it)


LOCS = ("putamen", "subcortical", "thalamus", "cerebellum")


def test_hypodensity_is_an_enclosed_black_hole():
    for s in range(8):
        hu, m, info = _render_case(100 + s, LOCS[s % 4], {"hypodensity": True})
        dark = m & (hu <= np.median(hu[m]) - 28)
        assert info["markers"]["hypodensity"]
        # A dark in-plane component of >= 3 pixels that stays off the border (border pixels
        # may be dark from partial volume with CSF; that is not the marker).
        inner = _inplane_erode(m)
        enclosed = []
        for k in range(len(m)):
            lab, n = ndimage.label(dark[k])
            enclosed += [(lab == i).sum() for i in range(1, n + 1) if not ((lab == i) & ~inner[k]).any()]
        assert max(enclosed, default=0) >= 3
        hu0, m0, _ = _render_case(100 + s, LOCS[s % 4], {})
        assert not (m0 & _inplane_erode(m0) & (hu0 <= np.median(hu0[m0]) - 28)).any()


def _solidity(m2: np.ndarray) -> float:
    """Area over convex-hull area (pixel corners, so a filled ellipse scores about 0.95)."""
    pts = np.argwhere(m2).astype(float)
    corners = np.concatenate([pts + d for d in ([0.5, 0.5], [0.5, -0.5], [-0.5, 0.5], [-0.5, -0.5])])
    return len(pts) / ConvexHull(corners).volume


def test_irregular_margin_is_lobulated():
    pos, neg = [], []
    for s in range(8):
        for markers, acc in (({"irregular_margin": True}, pos), ({}, neg)):
            _, m, info = _render_case(200 + s, LOCS[s % 2], markers)
            acc.append(_solidity(m[info["slices"]["largest"]]))
    assert min(neg) > 0.88 and max(pos) < min(neg) and np.mean(pos) < np.mean(neg) - 0.06


def test_blend_sign_has_a_darker_part_reaching_the_border():
    for s in range(8):
        hu, m, info = _render_case(300 + s, LOCS[s % 4], {"blend_sign": True}, tilt=10.0)
        k = info["slices"]["blend_sign"]
        core = _inplane_erode(m)[k]
        bright = np.percentile(hu[k][core], 90)
        dark = core & (hu[k] <= bright - 18)
        assert dark.sum() >= 0.1 * core.sum()
        ring = core & ~_inplane_erode(core[None])[0]
        assert (dark & ring).any()  # the darker part reaches the edge
        hu0, m0, info0 = _render_case(300 + s, LOCS[s % 4], {})
        k0 = info0["slices"]["largest"]
        core0 = _inplane_erode(m0)[k0]
        assert (core0 & (hu0[k0] <= np.percentile(hu0[k0][core0], 90) - 18)).sum() == 0


def test_fluid_level_is_horizontal_with_dense_layer_posterior():
    for s in range(8):
        tilt = (-15.0, 0.0, 12.0, 20.0)[s % 4]  # gravity ignores the head's tilt
        hu, m, info = _render_case(400 + s, LOCS[s % 4], {"fluid_level": True}, tilt=tilt)
        k = info["slices"]["largest"]
        core = _inplane_erode(m)[k]
        rows = np.nonzero(core)[0]
        vals = hu[k][core]
        mid = 0.5 * (vals.min() + vals.max())
        light_rows = rows[vals < mid]
        dense_rows = rows[vals >= mid]
        assert vals.max() - vals.min() >= 25
        assert light_rows.max() <= dense_rows.min() + 1  # one straight, row-aligned level
        half = np.median(rows)
        assert vals[rows > half].mean() - vals[rows <= half].mean() > 10
        hu0, m0, info0 = _render_case(400 + s, LOCS[s % 4], {}, tilt=tilt)
        k0 = info0["slices"]["largest"]
        c0 = _inplane_erode(m0)[k0]
        r0, v0 = np.nonzero(c0)[0], hu0[k0][c0]
        assert abs(v0[r0 > np.median(r0)].mean() - v0[r0 <= np.median(r0)].mean()) < 5


# ---------------------------------------------------------------- markers, as written


def test_written_markers_are_measurable_against_negatives(dataset, profiles):
    """On the noisy files: fluid-level positives are denser posteriorly, hypodensity positives
    hold darker pixels inside the mask, compared with marker-free studies."""
    out, _ = dataset
    stats = {"fluid_level": ([], []), "hypodensity": ([], [])}
    for i, prof in enumerate(profiles, start=1):
        for st in plan_site(prof, i, SEED).studies:
            if st.is_followup:
                continue
            r = render_study(prof, st)
            on = r.info["markers"]
            if not (on["fluid_level"] or on["hypodensity"] or not any(on.values())):
                continue
            sdir = out / prof.site_id / "dicom" / st.patient.patient_id / st.study_id
            axial, _ = read_study(sdir)
            hu = ndimage.median_filter(to_hu(axial), size=(1, 3, 3))
            m = r.true_mask
            k = r.info["slices"]["largest"]
            core = _inplane_erode(m)[k]
            rows, vals = np.nonzero(core)[0], hu[k][core]
            post = vals[rows > np.median(rows)].mean() - vals[rows <= np.median(rows)].mean()
            kh = r.info["slices"]["hypodensity"]
            inner = _inplane_erode(m)[kh]
            depth = np.median(hu[m]) - np.percentile(hu[kh][inner], 2) if inner.any() else 0.0
            for mk, value in (("fluid_level", post), ("hypodensity", depth)):
                if on[mk]:
                    stats[mk][0].append(value)
                elif not any(on.values()):
                    stats[mk][1].append(value)
    for mk, (pos, neg) in stats.items():
        assert pos and neg, f"no {mk} positives or negatives to compare"
        assert np.mean(pos) > np.mean(neg) + 10, (mk, pos, neg)


def test_labels_are_the_readers_calls_and_the_truth_is_kept_apart(dataset):
    """labels.csv holds reader 1's call (one reader per study), as recorded in the truth file,
    which also holds the true state; with reader noise on, the two disagree somewhere."""
    from simulations.synthetic.truth import read_truth

    out, _ = dataset
    truth = read_truth(out)
    disagree = 0
    for site in sorted(out.glob("site-*")):
        for row in read_labels(site):
            t = truth[(site.name, row["patient_id"], row["study_id"])]
            if t["kind"] != "baseline":
                continue
            for m in MARKERS:
                assert t[f"{m}_label"] == t[f"{m}_reader1"] and t[f"{m}_reader2"] == ""
                if row[m] != "":
                    assert row[m] == t[f"{m}_label"]
                    disagree += row[m] != t[f"{m}_true"]
    assert disagree > 0
