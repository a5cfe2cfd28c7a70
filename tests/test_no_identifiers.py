"""No patient identifier leaves a site: studies full of identifying DICOM header values go through
the site's preparation (``flwr-client prepare``), a real federated run on Flower's simulation engine
(ServerApp, ClientApps, their logs), the local and pooled baselines and the report; none of the
identifying strings appears in any file written or any line printed.

Identifiers: every PHI header value of the studies (names, patient ID, birth date, accession
number, institution, physicians, study date and time, study ID) and the patient / study folder
names (the site's own MRNs in the data contract). The only place a folder name may appear is the
site's own ``check`` report for its IT staff, which names bad files by path; it is not tested here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulations.simulate import main
from tests.helpers.data import head_phantom, write_series
from tests.helpers.experiments import BASELINES, TINY

REPO = Path(__file__).resolve().parents[1]

PHI = {
    "PatientName": "QZWYX^ROSALIND^T",
    "PatientID": "HDR-QZ-44817",
    "PatientBirthDate": "19310825",
    "AccessionNumber": "QZACC7719035",
    "InstitutionName": "Qzwyx Memorial Infirmary",
    "ReferringPhysicianName": "QZDOC^WALTER",
    "PerformingPhysicianName": "QZRAD^MIRIAM",
    "StudyDate": "19970314",
    "StudyTime": "235917",
    "StudyID": "QZSTUDY551",
    "OtherPatientIDs": "QZ-OTHER-3391",
    "PatientAddress": "12 Qzwyx Lane",
}
EXPERIMENT = TINY.format(
    seeds="[0]",
    extra_scenarios='[[scenarios]]\nname = "virtual"\nsplit = "iid"\nn_sites = 2\nshift = 0.5\n',
    methods=BASELINES + '[[methods]]\nname = "fedavg"\nkind = "federated"\n',
)


def write_identified_site(root: Path, site: int, n_studies: int = 4) -> list[str]:
    """A site whose DICOM headers carry ``PHI`` (made unique per patient) and whose folders are MRNs."""
    import nibabel as nib

    from client.ingest.dicom import read_study

    identifiers = []
    rows = ["patient_id,study_id,hypodensity,irregular_margin,blend_sign,fluid_level,expansion,location"]
    for i in range(n_studies):
        mrn, accession_folder = f"MRN{site}{i}88213", f"ACCF{site}{i}5521"
        phi = {
            k: (f"{v}{site}{i}" if k not in ("PatientBirthDate", "StudyDate", "StudyTime") else v)
            for k, v in PHI.items()
        }
        hu = head_phantom((3, 40, 40), seed=10 * site + i)
        study_dir = root / "dicom" / mrn / accession_folder
        write_series(study_dir, hu, seed=i, phi=phi)
        mask = ((hu > 60) & (hu < 80)).astype(np.uint8)
        (root / "masks" / mrn).mkdir(parents=True, exist_ok=True)
        nib.save(
            nib.Nifti1Image(mask, read_study(study_dir).geometry.affine_ras()),
            str(root / "masks" / mrn / f"{accession_folder}.nii.gz"),
        )
        rows.append(f"{mrn},{accession_folder},{i % 2},{(i + 1) % 2},0,{i % 2},,putamen")
        identifiers += [mrn, accession_folder] + [str(v) for v in phi.values()]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return identifiers


def scan(paths: list[Path], texts: list[str], identifiers: list[str]) -> list[str]:
    """Every (place, identifier) where an identifier occurs, in files (bytes) or printed text."""
    needles = [(ident, ident.encode()) for ident in set(identifiers)]
    found = []
    for path in paths:
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            data = file.read_bytes()
            found += [f"{file}: {ident}" for ident, raw in needles if raw in data]
    for k, text in enumerate(texts):
        found += [f"printed text {k}: {ident}" for ident, _ in needles if ident in text]
    return found


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_no_identifier_in_anything_written_or_printed(tmp_path, capfd):
    data = tmp_path / "data"
    identifiers = []
    for s in (1, 2, 3):
        identifiers += write_identified_site(data / f"site-0{s}", s)
    # the dates are identifying too, but short digit strings can occur by chance in binary files:
    # they are checked in text files and printed output only (below)
    dates = {PHI["PatientBirthDate"], PHI["StudyDate"]}
    strings = [i for i in identifiers if i not in dates and i != PHI["StudyTime"]]

    site_cache = tmp_path / "site-cache"
    prep = subprocess.run(
        [
            sys.executable,
            "-m",
            "client.site_tools.cli",
            "prepare",
            str(data / "site-01"),
            "--cache-dir",
            str(site_cache),
            "--size",
            "32",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert prep.returncode == 0, prep.stdout + prep.stderr

    exp = tmp_path / "phi.toml"
    exp.write_text(EXPERIMENT)
    assert main(["--experiment", str(exp), "--data", str(data), "--out", str(tmp_path / "runs")]) == 0
    printed = capfd.readouterr()

    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "report.html").is_file() and list((run / "federated").glob("*/global.pt"))
    assert list((run / "federated").glob("*.log")) and (run / "engine" / "superlink.log").is_file()
    written = [run, data / ".cache", site_cache]
    leaks = scan(written, [prep.stdout, prep.stderr, printed.out, printed.err], strings)
    assert not leaks, "\n".join(leaks[:20])
    text_files = [
        p for d in written for p in d.rglob("*") if p.suffix in (".json", ".csv", ".html", ".log", ".toml", ".txt")
    ]
    assert text_files
    date_leaks = scan(text_files, [printed.out, printed.err], sorted(dates))
    assert not date_leaks, "\n".join(date_leaks[:20])
