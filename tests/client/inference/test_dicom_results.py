"""The DICOM SEG and SR of ``hemexp predict --dicom``, read back with highdicom and pydicom and
checked by dicom3tools' ``dciodvfy``: the SEG's mask is the prediction on the source grid voxel for
voxel, the SR's values are those of prediction.json, both belong to the source study."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from client.inference.dicom_results import SCHEME, finding_code, probability_code
from client.inference.predict import (
    SEG_FILE,
    SR_FILE,
    load_scoring_model,
    predict_study,
    run_prediction,
)
from common.config import MARKERS
from common.validation import DEFAULT_THRESHOLD, OperatingPoint
from tests.helpers.clinic import leaks, tiny_checkpoint


@pytest.fixture(scope="module")
def scored(tmp_path_factory, clinic_study, clinic_checkpoint, one_torch_thread):
    model = load_scoring_model(clinic_checkpoint)
    out = tmp_path_factory.mktemp("out")
    result = run_prediction(clinic_study, model, out, dicom=True)
    pred = predict_study(clinic_study, model.ckpt, model=model.model)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in pred.sources]
    return {"out": out, "result": result, "pred": pred, "sources": sources, "model": model}


def seg_volume(seg: pydicom.Dataset, source_uids: list[str]) -> np.ndarray:
    """The SEG's frames placed on the source slices they reference (from the per-frame groups)."""
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    out = np.zeros((len(source_uids), int(seg.Rows), int(seg.Columns)), dtype=np.uint8)
    shared = seg.SharedFunctionalGroupsSequence[0]
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        ref = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        segment = (group if "SegmentIdentificationSequence" in group else shared).SegmentIdentificationSequence[0]
        assert segment.ReferencedSegmentNumber == 1
        out[source_uids.index(ref)] = frame
    return out


def test_seg_mask_equals_the_prediction_on_the_source_grid_voxel_for_voxel(scored):
    pred, sources = scored["pred"], scored["sources"]
    seg = pydicom.dcmread(scored["out"] / SEG_FILE)
    expected = pred.source_mask()
    assert expected.shape == pred.geometry.shape
    assert 0 < expected.sum() < expected.size // 4  # a mask worth comparing
    got = seg_volume(seg, [s.SOPInstanceUID for s in sources])
    np.testing.assert_array_equal(got, expected)
    # every frame sits where its source slice is, on the source's frame of reference
    for group in seg.PerFrameFunctionalGroupsSequence:
        ref = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        (src,) = [s for s in sources if s.SOPInstanceUID == ref]
        position = group.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position], [float(v) for v in src.ImagePositionPatient])
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [0.8, 0.9]
    # the volume in prediction.json is the volume of this very mask
    assert scored["result"]["volume_ml"] == pytest.approx(expected.sum() * 5.0 * 0.8 * 0.9 / 1000, abs=1e-4)


def test_seg_names_the_hematoma_and_the_algorithm_and_files_with_the_source_study(scored):
    seg = hd.seg.segread(scored["out"] / SEG_FILE)
    src = scored["sources"][0]
    (segment,) = seg.SegmentSequence
    assert hd.sr.CodedConcept.from_dataset(segment.SegmentedPropertyCategoryCodeSequence[0]) == (
        codes.SCT.MorphologicallyAbnormalStructure
    )
    assert hd.sr.CodedConcept.from_dataset(segment.SegmentedPropertyTypeCodeSequence[0]) == codes.SCT.Hemorrhage
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "hemexp"
    assert scored["model"].digest[:16] in algorithm.AlgorithmVersion
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber"):
        assert seg.get(keyword) == src.get(keyword), keyword
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID


def sr_group(sr_path: Path) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(sr_path))
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    return group


def test_sr_values_equal_prediction_json(scored):
    result = json.loads((scored["out"] / "prediction.json").read_text())
    group = sr_group(scored["out"] / SR_FILE)
    (volume,) = group.get_measurements(name=codes.SCT.Volume)
    assert volume.value == result["volume_ml"] and volume.unit.value == "mL"
    outputs = [*MARKERS, "expansion"]  # the checkpoint has the expansion head
    assert result["expansion_risk"] == result["markers"]["expansion"]
    for name in outputs:
        (p,) = group.get_measurements(name=probability_code(name))
        assert p.value == result["markers"][name], name
        (call,) = group.get_qualitative_evaluations(name=finding_code(name))
        assert call.value == (codes.SCT.Present if result["present"][name] else codes.SCT.Absent), name
    assert finding_code("blend_sign").scheme_designator == SCHEME


def test_sr_references_the_seg_the_key_slice_and_the_algorithm(scored):
    pred, sources = scored["pred"], scored["sources"]
    seg = pydicom.dcmread(scored["out"] / SEG_FILE)
    group = sr_group(scored["out"] / SR_FILE)
    assert group.roi is None and group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    (p,) = group.get_measurements(name=probability_code("hypodensity"))
    (image,) = p.referenced_images
    assert image.referenced_sop_instance_uid == sources[pred.shown_slice].SOPInstanceUID
    text = {
        hd.sr.CodedConcept.from_dataset(item.ConceptNameCodeSequence[0]): item.TextValue
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT"
    }
    assert text[codes.DCM.AlgorithmName] == "hemexp"
    assert scored["model"].digest[:16] in text[codes.DCM.AlgorithmVersion]
    sr = pydicom.dcmread(scored["out"] / SR_FILE)
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID and sr.PatientID == sources[0].PatientID
    assert sr.CompletionFlag == "COMPLETE"


def test_thresholds_come_from_the_checkpoint_per_marker_else_the_default(scored):
    result = scored["result"]
    assert result["thresholds"]["blend_sign"] == 0.25 and result["thresholds"]["fluid_level"] == 0.75
    assert result["thresholds"]["hypodensity"] == DEFAULT_THRESHOLD
    assert result["present"] == {k: v >= result["thresholds"][k] for k, v in result["markers"].items()}
    labels = ("hypodensity", "blend_sign")
    assert OperatingPoint.of(labels, {}).thresholds == {"hypodensity": 0.5, "blend_sign": 0.5}
    point = OperatingPoint.of(labels, {"thresholds": {"blend_sign": 0.9}, "temperature": {"hypodensity": 2.0}})
    assert point.thresholds == {"hypodensity": 0.5, "blend_sign": 0.9}
    assert point.temperature == {"hypodensity": 2.0, "blend_sign": 1.0} and point.source == "validation"
    assert result["operating_point"]["chosen_on"] == "default"  # thresholds but no temperature: not from validation


def test_prediction_json_and_overlay_carry_no_identifier_the_dicom_objects_do(scored):
    out = scored["out"]
    assert not leaks([out / "prediction.json", out / "overlay.png"])
    assert leaks([out / SEG_FILE]) and leaks([out / SR_FILE])  # the PACS files them with the patient


def dciodvfy(path: Path) -> str:
    """dicom3tools' validator; its report goes to stderr, one ``Error - ...`` line per error."""
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy not found: apt-get install -y dicom3tools (README, 'Fresh machine')")
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("name", [SEG_FILE, SR_FILE])
def test_dciodvfy_finds_no_error(scored, name):
    report = dciodvfy(scored["out"] / name)
    assert ("Segmentation" if name == SEG_FILE else "Comprehensive3DSR") in report
    assert not [line for line in report.splitlines() if line.startswith("Error")], report


def test_dciodvfy_does_report_a_broken_object(scored, tmp_path):
    """The validator really checks: the SEG without its Type 1 SegmentSequence is an error."""
    seg = pydicom.dcmread(scored["out"] / SEG_FILE)
    del seg.SegmentSequence
    seg.save_as(tmp_path / "broken.dcm")
    assert [line for line in dciodvfy(tmp_path / "broken.dcm").splitlines() if line.startswith("Error")]


def test_no_hematoma_gives_an_empty_segment_and_zero_volume(tmp_path, clinic_study, one_torch_thread):
    ckpt = tiny_checkpoint(tmp_path / "prior.pt", clinic_study, {}, marked_share=None)
    result = run_prediction(clinic_study, ckpt, tmp_path / "out", dicom=True)
    assert result["volume_ml"] == 0.0 and result["key_slice"] is None and result["hematoma_slices"] == []
    seg = pydicom.dcmread(tmp_path / "out" / SEG_FILE)
    assert not seg.pixel_array.any()
    (volume,) = sr_group(tmp_path / "out" / SR_FILE).get_measurements(name=codes.SCT.Volume)
    assert volume.value == 0.0
    for name in (SEG_FILE, SR_FILE):
        report = dciodvfy(tmp_path / "out" / name)
        assert not [line for line in report.splitlines() if line.startswith("Error")], report
