"""Public data sets as sites: the PhysioNet CT-ICH layout read like a DICOM site (docs/public-data.md).

The fixture writes CT-ICH's exact layout (``ct_scans/NNN.nii``, ``masks/NNN.nii``,
``hemorrhage_diagnosis_raw_ct.csv``, ``Patient_demographics.csv``) from arrays given in our
``[k, r, c]`` order; each file stores them with its own axis flips, so the reader must undo them.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from client.data.cache import build_site_cache
from client.ingest.ctich import DIAGNOSIS_CSV, read_nifti_volume
from client.ingest.layouts import iter_studies, list_site_folders
from client.site_tools.check import check_site, format_table
from common.config import AIR_HU, LABELS, PreprocessConfig
from simulations.sites import discover_sites
from tests.helpers.data import head_phantom, write_series, write_site

K, R, C = 4, 28, 32  # non-square in-plane, so a swapped row/column axis shows
COS, SIN = np.cos(np.radians(12)), np.sin(np.radians(12))
#: RAS affines of the stored (i, j, k) indices, as a converter would write them.
AFFINES = {
    # i towards patient left (negative x spacing), j towards anterior, k towards the head
    "049": np.array([[-0.45, 0, 0, 7.2], [0, 0.5, 0, -60.0], [0, 0, 5.0, -20.0], [0, 0, 0, 1]]),
    # i towards right, j towards posterior, slices stored head to feet, tilted 12 degrees about x
    "050": np.array(
        [[0.45, 0, 0, -7.0], [0, -0.5 * COS, 5.0 * SIN, 60.0], [0, -0.5 * SIN, -5.0 * COS, 40.0], [0, 0, 0, 1]]
    ),
}
AFFINES["051"] = AFFINES["049"]


def to_file_order(pid: str, krc: np.ndarray) -> np.ndarray:
    """Our [k, r, c] array as patient ``pid``'s file stores it (by hand, from the affine's signs)."""
    crk = np.transpose(krc, (2, 1, 0))
    if pid == "050":  # i runs right (our c runs left), k runs down (ours up); j already posterior
        return crk[::-1, :, ::-1]
    return crk[:, ::-1, :]  # j runs anterior (our r runs posterior)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, inter: float = 0.0) -> None:
    """Save with qform/sform 'scanner' and a given scl_inter (patched into the header bytes, because
    nibabel rewrites the scaling of integer arrays when saving)."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    if inter:
        with path.open("r+b") as fh:  # NIfTI-1 header: scl_slope at byte 112, scl_inter at 116
            fh.seek(112)
            fh.write(struct.pack("<ff", 1.0, inter))


def ctich_volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """HU [k, r, c] with a few out-of-field voxels at -3024, and its hematoma mask."""
    hu = head_phantom((K, R, C), seed=seed)
    mask = ((hu > 60) & (hu < 80)).astype(np.uint8)
    hu[:, 0, :3] = -3024.0
    return hu, mask


CSV_ROWS = [  # PatientNumber, SliceNumber, IVH, IPH, SAH, EDH, SDH, No_Hemorrhage, Fracture
    *[(49, s, 0, int(s == 1), 0, 0, int(s == 2), int(s > 2), 0) for s in (1, 2, 3, 4)],
    *[(50, s, 0, int(s < 3), 0, 0, 0, int(s >= 3), int(s == 4)) for s in (1, 2, 3, 3, 4)],  # slice 3 twice
    *[(51, s, 0, 0, 0, 0, 0, 1, 0) for s in (1, 2, 3, 4)],
    (99, 1, 0, 0, 0, 0, 0, 1, 0),  # a patient without a scan
]


def write_ctich_site(root: Path) -> Path:
    """CT-ICH layout: three readable patients (051's mask has another shape), one broken scan."""
    (root / "ct_scans").mkdir(parents=True)
    (root / "masks").mkdir()
    for n, pid in enumerate(("049", "050", "051")):
        hu, mask = ctich_volume(seed=n)
        save_nifti(
            root / "ct_scans" / f"{pid}.nii",
            (to_file_order(pid, hu) + 1024).astype(np.int16),
            AFFINES[pid],
            inter=-1024.0,
        )
        stored_mask = to_file_order(pid, mask) * (255 if pid == "050" else 1)  # 050 stores 0/255
        if pid == "051":
            stored_mask = stored_mask[:, :, :3]
        save_nifti(root / "masks" / f"{pid}.nii", np.ascontiguousarray(stored_mask, dtype=np.uint8), AFFINES[pid])
    (root / "ct_scans" / "052.nii").write_bytes(b"not a nifti file at all")
    header = "PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,Epidural,Subdural,No_Hemorrhage,Fracture_Yes_No"
    (root / DIAGNOSIS_CSV).write_text("\n".join([header] + [",".join(map(str, r)) for r in CSV_ROWS]) + "\n")
    (root / "Patient_demographics.csv").write_text("Patient Number,Age\n(years),Gender\n49,30,Male\n")
    return root


@pytest.fixture
def ctich_site(tmp_path) -> Path:
    return write_ctich_site(tmp_path / "site-ctich")


def _walk(site: Path):
    walk = iter_studies(site)
    return next(walk), {r.ref.patient_id: r for r in walk}


def test_ctich_volumes_read_in_hu_on_our_axes(ctich_site) -> None:
    _, records = _walk(ctich_site)
    assert sorted(records) == ["049", "050", "051", "052"]
    for n, pid in enumerate(("049", "050", "051")):
        rec = records[pid]
        hu, _ = ctich_volume(seed=n)
        assert rec.usable and rec.volume.dtype == np.float32 and rec.volume.shape == (K, R, C)
        np.testing.assert_array_equal(rec.volume, np.maximum(hu, AIR_HU))  # scl_inter applied, out-of-field -> air
        g = rec.geometry
        assert g.shape == (K, R, C)
        np.testing.assert_allclose(g.pixel_spacing, (0.5, 0.45))  # (between rows, between columns)
        assert g.slice_spacing == pytest.approx(5.0)
        # a standard axial DICOM orientation: columns to the left, rows posterior, slices rising
        assert g.row_dir[0] == pytest.approx(1.0) and g.col_dir[1] == pytest.approx(COS if pid == "050" else 1.0)
        assert float(np.dot(g.slice_step, g.normal)) > 0
        # every voxel sits where the file's affine puts it (docs/design.md §8, index -> LPS)
        k, r, c = np.meshgrid(np.arange(K), np.arange(R), np.arange(C), indexing="ij")
        lps = (
            np.asarray(g.origin)
            + c[..., None] * g.pixel_spacing[1] * np.asarray(g.row_dir)
            + r[..., None] * g.pixel_spacing[0] * np.asarray(g.col_dir)
            + k[..., None] * np.asarray(g.slice_step)
        )
        i, j, s = (c, R - 1 - r, k) if pid != "050" else (C - 1 - c, r, K - 1 - k)
        ras = np.einsum("ab,...b->...a", AFFINES[pid][:3, :3], np.stack([i, j, s], -1)) + AFFINES[pid][:3, 3]
        np.testing.assert_allclose(lps * [-1, -1, 1], ras, atol=1e-6)


def test_ctich_masks_aligned_markers_not_annotated_flags_in_extras(ctich_site) -> None:
    _, records = _walk(ctich_site)
    for n, pid in enumerate(("049", "050")):
        _, mask = ctich_volume(seed=n)
        assert records[pid].mask.dtype == np.uint8
        np.testing.assert_array_equal(records[pid].mask, mask)  # 0/255 read as 0/1
    for pid in ("049", "050", "051"):
        labels = records[pid].labels
        assert labels.shape == (len(LABELS),) and np.isnan(labels).all()  # not annotated, never 0
    # SliceNumber counts along the file's third axis; extras follow our slice order
    assert records["049"].extras == {"ich_slices": "1100", "ich_subtypes": "intraparenchymal;subdural", "fracture": "0"}
    assert records["050"].extras == {"ich_slices": "0-11", "ich_subtypes": "intraparenchymal", "fracture": "1"}
    assert records["051"].extras["ich_slices"] == "0000"


def test_ctich_bad_files_reported_per_file_and_the_rest_used(ctich_site) -> None:
    site_problems, records = _walk(ctich_site)
    csv = ctich_site / DIAGNOSIS_CSV
    unknown = [p for p in site_problems if p.path == f"{csv}:15"]
    assert len(unknown) == 1 and "patient 99 has no scan in ct_scans/" in unknown[0].reason
    dupes = [p for p in site_problems if "duplicate row for slice 3 of patient 050" in p.reason]
    assert sorted(p.path for p in dupes) == [f"{csv}:8", f"{csv}:9"]
    broken = records["052"]
    assert not broken.usable
    assert broken.problems[0].path.endswith("052.nii") and "unreadable NIfTI file" in broken.problems[0].reason
    bad_mask = records["051"]
    assert bad_mask.usable and bad_mask.mask is None
    reasons = [p.reason for p in bad_mask.problems if p.path.endswith("masks/051.nii")]
    assert len(reasons) == 1 and "does not fit the scan" in reasons[0] and "used without its mask" in reasons[0]
    assert records["049"].problems == []


def test_check_and_cache_work_on_a_ctich_site(ctich_site, tmp_path) -> None:
    report = check_site(ctich_site)
    assert report.layout == "ct-ich"
    assert [s.patient_id for s in report.usable] == ["049", "050", "051"]
    assert report.stages() == {"segmentation": 2, "markers": 0}
    assert report.label_summary()["hypodensity"] == {"positive": 0, "negative": 0, "missing": 3}
    assert not any("labels.csv" in p.reason for s in report.studies for p in s.problems)
    table = format_table(report)
    assert "layout ct-ich" in table and "trains the U-Net (stage 1) only" in table and "3 of 4 studies usable" in table

    cache, problems = build_site_cache(ctich_site, tmp_path / "cache", PreprocessConfig(size=32))
    assert cache.index["n_studies"] == 3 and cache.n_slices == 3 * K
    assert [s["has_mask"] for s in cache.studies] == [True, True, False]
    assert all(v is None for s in cache.studies for v in s["labels"])
    assert cache.masks[: 2 * K].any()
    assert any("052.nii" in p.path for p in problems) and any(p.path.endswith(f"{DIAGNOSIS_CSV}:15") for p in problems)
    again, _ = build_site_cache(ctich_site, tmp_path / "cache", PreprocessConfig(size=32))
    assert again.hit


def test_ctich_site_can_add_its_own_labels_csv(ctich_site) -> None:
    (ctich_site / "labels.csv").write_text(
        "patient_id,study_id,hypodensity,irregular_margin,blend_sign,fluid_level,expansion\n049,049,1,0,,,\n"
    )
    _, records = _walk(ctich_site)
    np.testing.assert_array_equal(records["049"].labels[:2], [1, 0])
    assert records["050"].labels is None  # no row: reported by check as for a DICOM site
    assert check_site(ctich_site).stages()["markers"] == 1


def test_discover_sites_lists_dicom_and_ctich_folders(tmp_path) -> None:
    write_site(tmp_path / "site-01", n_studies=1, shape=(3, 16, 16))
    write_ctich_site(tmp_path / "site-02")
    (tmp_path / "not-a-site" / "masks").mkdir(parents=True)
    assert discover_sites(tmp_path) == list_site_folders(tmp_path) == [tmp_path / "site-01", tmp_path / "site-02"]


def test_dicom_study_converted_to_nifti_reads_back_identically(tmp_path) -> None:
    from client.ingest.convert import convert_study
    from client.ingest.dicom import read_study

    hu = head_phantom((4, 10, 12))
    write_series(tmp_path / "study", hu, spacing=(3.0, 0.5, 0.6), col_dir=(0.0, COS, SIN), reverse=True)
    study = read_study(tmp_path / "study")
    back = read_nifti_volume(convert_study(tmp_path / "study", tmp_path / "ct.nii.gz"))
    np.testing.assert_array_equal(back.volume, study.volume)
    np.testing.assert_allclose(back.geometry.affine_lps(), study.geometry.affine_lps(), atol=1e-4)
    assert back.geometry.shape == study.geometry.shape


# --- RSNA 2019: flat single-slice DICOMs + one label row per image and subtype -> a DICOM site ---


def write_rsna_download(root: Path) -> Path:
    """``stage_2_train/ID_<hex>.dcm`` (RSNA's non-UID identifiers) and ``stage_2_train.csv``."""
    import shutil
    import warnings

    import pydicom

    from simulations.rsna import RSNA_SUBTYPES

    images = root / "stage_2_train"
    images.mkdir(parents=True)
    rows, n = ["ID,Label"], 0
    for patient, study, series, seed in (("ID_p1", "ID_st1", "ID_se1", 0), ("ID_p2", "ID_st2", "ID_se2", 1)):
        tmp = root / "tmp" / study
        write_series(tmp, head_phantom((3, 16, 16), seed=seed), seed=seed)
        for i, path in enumerate(sorted(tmp.iterdir())):
            ds = pydicom.dcmread(path)
            sop = f"ID_{n:09x}"
            n += 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
                ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient, study, series
                ds.save_as(images / f"{sop}.dcm")
            if patient == "ID_p2" and i == 2:
                continue  # an image without label rows
            positive = patient == "ID_p1" and i == 1
            rows += [f"{sop}_{s},{int(positive and s in ('any', 'intraparenchymal'))}" for s in RSNA_SUBTYPES]
    rows += ["ID_000000000_any,1", "ID_0000000ff_any,0"]  # a contradicting repeat; an image without file
    shutil.rmtree(root / "tmp")
    (images / "ID_bad.dcm").write_text("not DICOM")
    (root / "stage_2_train.csv").write_text("\n".join(rows) + "\n")
    return root


def test_rsna_download_becomes_a_classification_only_dicom_site(tmp_path) -> None:
    import csv

    from simulations.cli import hemexp_main
    from simulations.rsna import convert_rsna

    src = write_rsna_download(tmp_path / "rsna")
    result = convert_rsna(src, tmp_path / "site-rsna")
    site = result.out
    assert (result.n_files, result.n_studies, result.n_patients) == (6, 2, 2)
    for pid, sid in (("ID_p1", "ID_st1"), ("ID_p2", "ID_st2")):
        files = sorted((site / "dicom" / pid / sid).iterdir())
        assert len(files) == 3 and all(f.is_symlink() and f.resolve().parent == src / "stage_2_train" for f in files)
    reasons = {Path(p.path).name: p.reason for p in result.problems}
    assert "not a DICOM file" in reasons["ID_bad.dcm"]
    assert "no row in stage_2_train.csv" in reasons["ID_000000005.dcm"]
    assert "1 labelled image(s) have no file" in reasons["stage_2_train.csv"]
    assert any(p.path.endswith("stage_2_train.csv:32") and "contradicts" in p.reason for p in result.problems)
    rows = {r["patient_id"]: r for r in csv.DictReader((site / "labels.csv").open())}
    assert all(rows[p][c] == "" for p in rows for c in LABELS)  # markers and expansion: not annotated
    assert (rows["ID_p1"]["rsna_any"], rows["ID_p1"]["rsna_intraparenchymal"], rows["ID_p1"]["rsna_epidural"]) == (
        "1",
        "1",
        "0",
    )
    assert rows["ID_p2"]["rsna_any"] == "" and rows["ID_p2"]["rsna_epidural"] == ""  # one image unlabelled
    assert len(list(csv.DictReader((site / "rsna_slice_labels.csv").open()))) == 6

    report = check_site(site)
    assert [s.n_slices for s in report.usable] == [3, 3] and report.problems == ()
    assert report.stages() == {"segmentation": 0, "markers": 0}
    _, records = _walk(site)
    assert records["ID_p1"].extras["rsna_any"] == "1" and np.isnan(records["ID_p1"].labels).all()

    assert hemexp_main(["rsna-site", str(src), str(tmp_path / "site-2"), "--link", "copy"]) == 0
    assert hemexp_main(["rsna-site", str(src), str(tmp_path / "site-2")]) == 2  # never overwrites a site
