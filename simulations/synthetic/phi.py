"""Fake but realistic protected health information for the DICOM headers.

Every patient gets a plausible name, medical record number, birth date and so on, different per
patient and reproducible from the seed, so that the PHI handling of the reader can be tested
(nothing of this may reach a cache, a message or a report; docs/design.md §8).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

import numpy as np

_FEMALE = (
    "JANE",
    "MARY",
    "ANNA",
    "LINDA",
    "SUSAN",
    "KAREN",
    "HELEN",
    "RUTH",
    "EMMA",
    "GRACE",
    "CLARA",
    "ALICE",
    "JUDITH",
    "NORA",
    "MARTHA",
    "SOFIA",
    "HANNA",
    "IRENE",
    "LUCY",
    "YUKI",
    "KEIKO",
    "MEI",
    "AMARA",
    "FATIMA",
    "ELENA",
    "ROSA",
    "INGRID",
    "AGNES",
)
_MALE = (
    "JOHN",
    "JAMES",
    "ROBERT",
    "MICHAEL",
    "WILLIAM",
    "DAVID",
    "RICHARD",
    "THOMAS",
    "CHARLES",
    "GEORGE",
    "EDWARD",
    "HENRY",
    "PETER",
    "PAUL",
    "FRANK",
    "HIROSHI",
    "TAKESHI",
    "WEI",
    "OMAR",
    "KOFI",
    "LARS",
    "PEDRO",
    "IVAN",
    "ARTHUR",
    "WALTER",
    "SAMUEL",
)
_LAST = (
    "DOE",
    "SMITH",
    "JOHNSON",
    "WILLIAMS",
    "BROWN",
    "JONES",
    "MILLER",
    "DAVIS",
    "WILSON",
    "ANDERSON",
    "TAYLOR",
    "MOORE",
    "JACKSON",
    "MARTIN",
    "LEE",
    "THOMPSON",
    "WHITE",
    "HARRIS",
    "CLARK",
    "LEWIS",
    "ROBINSON",
    "WALKER",
    "YOUNG",
    "ALLEN",
    "KING",
    "WRIGHT",
    "SCOTT",
    "GREEN",
    "BAKER",
    "ADAMS",
    "NELSON",
    "HILL",
    "CAMPBELL",
    "MITCHELL",
    "ROBERTS",
    "CARTER",
    "PHILLIPS",
    "EVANS",
    "TURNER",
    "TORRES",
    "PARKER",
    "COLLINS",
    "EDWARDS",
    "STEWART",
    "MORRIS",
    "MURPHY",
    "COOK",
    "ROGERS",
    "TANAKA",
    "SATO",
    "SUZUKI",
    "NAKAMURA",
    "CHEN",
    "WANG",
    "NOVAK",
    "KOWALSKI",
    "MULLER",
    "SCHMIDT",
    "ROSSI",
    "GARCIA",
    "OKAFOR",
    "HANSEN",
)


@dataclass(frozen=True)
class PatientIdentity:
    """A fake patient as a hospital information system would know them."""

    patient_id: str  # PatientID, also the site's folder name and labels.csv id
    name: str  # PatientName, DICOM PN ("LAST^FIRST^MIDDLE")
    sex: str  # PatientSex, M / F
    birth_date: date  # PatientBirthDate
    other_id: str  # OtherPatientIDs (e.g. a national insurance number)

    def age_at(self, when: datetime) -> str:
        """PatientAge as DICOM writes it (``067Y``)."""
        d = when.date()
        years = d.year - self.birth_date.year - ((d.month, d.day) < (self.birth_date.month, self.birth_date.day))
        return f"{years:03d}Y"


def make_identity(rng: np.random.Generator, taken: set[str]) -> PatientIdentity:
    """Draw one patient; ``taken`` holds the site's medical record numbers already used."""
    while True:
        pid = f"MRN{int(rng.integers(0, 10_000_000)):07d}"
        if pid not in taken:
            taken.add(pid)
            break
    female = bool(rng.random() < 0.45)
    first = str(rng.choice(_FEMALE if female else _MALE))
    last = str(rng.choice(_LAST))
    middle = f"^{chr(65 + int(rng.integers(0, 26)))}" if rng.random() < 0.3 else ""
    age = int(np.clip(rng.normal(68, 12), 30, 96))
    birth = date(2022 - age, 1, 1) + timedelta(days=int(rng.integers(0, 365)))
    return PatientIdentity(
        patient_id=pid,
        name=f"{last}^{first}{middle}",
        sex="F" if female else "M",
        birth_date=birth,
        other_id=f"NI{int(rng.integers(0, 1_000_000_000)):09d}",
    )


def make_physician(rng: np.random.Generator) -> str:
    """ReferringPhysicianName."""
    return f"{rng.choice(_LAST)}^{rng.choice(_FEMALE + _MALE)}^^DR"


def make_study_time(rng: np.random.Generator) -> datetime:
    """When a baseline scan was acquired: 2018-2024, any hour (strokes do not keep office hours)."""
    day = date(2018, 1, 1) + timedelta(days=int(rng.integers(0, 7 * 365)))
    return datetime(day.year, day.month, day.day) + timedelta(seconds=int(rng.integers(0, 86400)))


def make_accession(rng: np.random.Generator, site_number: int, when: datetime) -> str:
    """AccessionNumber in a RIS-like format: site, year, running number (<= 16 characters)."""
    return f"A{site_number:02d}{when.year % 100:02d}{int(rng.integers(0, 10**7)):07d}"
