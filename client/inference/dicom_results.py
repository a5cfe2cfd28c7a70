"""A prediction as DICOM objects every viewer and PACS shows (IHE AI Results): a Segmentation (SEG)
of the hematoma on the source series' frame of reference, and a TID 1500 Measurement Report (SR)
with the volume, each marker's probability and present/absent call, and the expansion risk.

Both are written with highdicom, which copies the patient and study modules from the source
instances, so the PACS files them with the study they came from; they stay in the hospital. Every
value in the SR is the value of ``prediction.json``, and the SEG's mask is
``StudyPrediction.source_mask()``, voxel for voxel.

The markers have no standard codes: they use the private coding scheme ``99HEMEXP`` (PS3.16 allows
any designator starting with "99" for local codes); everything else is SNOMED CT, DCM or UCUM.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from common.config import LABEL_CODES, MARKERS

#: Private coding scheme of the markers and their probabilities.
SCHEME = "99HEMEXP"
MILLILITER = hd.sr.CodedConcept("mL", "UCUM", "milliliter")
SEG_SERIES_NUMBER, SR_SERIES_NUMBER = 9901, 9902
SEGMENT_LABEL = "Hematoma"
TRACKING_ID = "hemexp hematoma"
MANUFACTURER = "hemexp project"


def finding_code(label: str) -> hd.sr.CodedConcept:
    value, meaning = LABEL_CODES[label]
    return hd.sr.CodedConcept(value, SCHEME, meaning)


def probability_code(label: str) -> hd.sr.CodedConcept:
    value, meaning = LABEL_CODES[label]
    return hd.sr.CodedConcept(f"{value}-P", SCHEME, f"Probability of {meaning[0].lower()}{meaning[1:]}")


#: Type 2 attributes of the Patient and General Study modules that highdicom copies: they must be
#: present but may be empty, and anonymised or hand-made series often lack them.
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def with_type2(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` with every missing ``TYPE2_COPIED`` attribute added empty (never changing a value)."""
    for keyword in TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def read_headers(paths: tuple[Path, ...]) -> list[pydicom.Dataset]:
    """The source instances' attributes (no pixel data: SEG and SR reference, they do not copy)."""
    return [with_type2(pydicom.dcmread(p, stop_before_pixels=True)) for p in paths]


def algorithm_text(algorithm: dict[str, str]) -> tuple[str, str]:
    """(name, version) as both objects state them: the checkpoint digest is part of the version,
    so two checkpoints of one software release are told apart."""
    return algorithm["name"], f"{algorithm['version']} sha256:{algorithm['checkpoint_sha256'][:16]}"


def build_seg(mask: np.ndarray, sources: list[pydicom.Dataset], algorithm: dict[str, str]) -> hd.seg.Segmentation:
    """One binary segment (Morphologically abnormal structure / Hemorrhage); ``mask`` is ``[K, R, C]``
    on the source grid, frame k on ``sources[k]``."""
    name, version = algorithm_text(algorithm)
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Hemorrhage,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=name,
            family=codes.DCM.ArtificialIntelligence,
            version=version,
            parameters={"checkpoint_sha256": algorithm["checkpoint_sha256"]},
        ),
        tracking_uid=generate_uid(),
        tracking_id=TRACKING_ID,
        anatomic_regions=[codes.SCT.Brain],
    )
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.asarray(mask).astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=name,
        software_versions=version,
        device_serial_number=algorithm["checkpoint_sha256"][:16],
        content_label="HEMATOMA",
        content_description="hemexp predicted hematoma",
        series_description="hemexp hematoma SEG (AI result)",
        omit_empty_frames=False,
    )


def _probability(label: str, value: float, key_image: hd.sr.SourceImageForMeasurement) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=probability_code(label),
        value=value,
        unit=codes.UCUM.NoUnits,
        referenced_images=[key_image],
    )


def _call(label: str, present: bool) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(finding_code(label), codes.SCT.Present if present else codes.SCT.Absent)


def sr_outputs(result: dict) -> list[str]:
    """The outputs the SR reports: the four markers, and the expansion risk when the model has it."""
    return [m for m in MARKERS if m in result["markers"]] + (
        ["expansion"] if result["expansion_risk"] is not None else []
    )


def build_sr(
    result: dict, seg: hd.seg.Segmentation, sources: list[pydicom.Dataset], key_slice: int
) -> hd.sr.Comprehensive3DSR:
    """TID 1500: one volumetric ROI group on the SEG's segment, holding the hematoma volume and, per
    output, its probability (referencing ``sources[key_slice]``) and the present/absent call at its
    threshold. ``result`` is the study's prediction.json."""
    name, version = algorithm_text(result["algorithm"])
    thresholds = ", ".join(f"{k}={v:g}" for k, v in result["thresholds"].items())
    algorithm_id = hd.sr.AlgorithmIdentification(name, version, parameters=[f"thresholds {thresholds}"])
    key = sources[key_slice]
    key_image = hd.sr.SourceImageForMeasurement(key.SOPClassUID, key.SOPInstanceUID)
    outputs = sr_outputs(result)
    volume = hd.sr.Measurement(name=codes.SCT.Volume, value=result["volume_ml"], unit=MILLILITER)
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=TRACKING_ID),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=1,
            source_series=hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID),
        ),
        finding_type=codes.SCT.Hemorrhage,
        algorithm_id=algorithm_id,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Brain)],
        measurements=[volume] + [_probability(o, result["markers"][o], key_image) for o in outputs],
        qualitative_evaluations=[_call(o, result["present"][o]) for o in outputs],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=name, manufacturer_name=MANUFACTURER, model_name=version
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.HeadCT,
        imaging_measurements=[group],
        referenced_images=[key],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*sources, seg],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="hemexp hematoma report (AI result)",
    )


def write_results(
    mask: np.ndarray, source_paths: tuple[Path, ...], key_slice: int, result: dict, seg_path: Path, sr_path: Path
) -> tuple[Path, Path]:
    """Write the SEG and the SR of one prediction: ``mask`` on the source grid, ``source_paths`` the
    file of each slice, ``result`` its prediction.json."""
    sources = read_headers(source_paths)
    seg = build_seg(mask, sources, result["algorithm"])
    seg.save_as(seg_path, enforce_file_format=True)
    build_sr(result, seg, sources, key_slice).save_as(sr_path, enforce_file_format=True)
    return seg_path, sr_path


__all__ = ["build_seg", "build_sr", "write_results", "finding_code", "probability_code", "SCHEME"]
