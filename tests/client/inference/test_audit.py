"""What the clinic tools say about a study that was not scored keeps the kind of problem and drops
paths, UIDs and file names; audit lines are one parseable line."""

from __future__ import annotations

import re

from client.inference.audit import Pseudonymiser, audit_line, public_reason
from client.ingest.dicom import Problem, StudyError

FOLDER = "/data/MRN-PID-77441/ACC99182736"
UID = "1.2.826.0.1.3680043.8.498.123456789"


def test_public_reason_drops_paths_uids_and_file_names():
    many = StudyError(FOLDER, f"more than one axial CT series in the study folder: {UID} (3 files, e.g. IM-0001.dcm)")
    assert public_reason(many) == "more than one axial CT series in the study folder"
    uneven = StudyError(
        FOLDER,
        "uneven slice spacing (missing or extra slice?): median 5.000 mm",
        [Problem(f"{FOLDER}/IM-0007.dcm", "gap of 10.000 mm from IM-0006.dcm where the series has 5.000 mm")],
    )
    assert public_reason(uneven) == "uneven slice spacing (missing or extra slice?) (gap of 10.000 mm x1)"
    not_ct = StudyError(
        FOLDER,
        "no usable axial CT image in the folder",
        [
            Problem(f"{FOLDER}/a.dcm", "not a CT image (Modality=MR)"),
            Problem(f"{FOLDER}/b.dcm", "not a CT image (Modality=MR)"),
        ],
    )
    assert public_reason(not_ct) == "no usable axial CT image in the folder (not a CT image x2)"
    crash = ValueError(f"{FOLDER}/x.pt: not a loadable checkpoint (EOFError: {UID})")
    assert public_reason(crash) == "ValueError: not a loadable checkpoint"
    assert public_reason(MemoryError()) == "MemoryError"
    for reason in map(public_reason, (many, uneven, not_ct)):
        assert "MRN" not in reason and UID not in reason and ".dcm" not in reason


def test_audit_line_quotes_values_with_spaces_and_pseudonyms_are_keyed(tmp_path):
    line = audit_line(outcome="rejected", study="S-1", reason="too few slices (2)", seconds=0.123)
    assert re.fullmatch(r'time=\S+Z outcome=rejected study=S-1 reason="too few slices \(2\)" seconds=0\.12', line)
    a, b = Pseudonymiser(tmp_path / "a"), Pseudonymiser(tmp_path / "b")
    assert a("study", UID) == a("study", UID) != b("study", UID)
    assert UID not in a("study", UID)
