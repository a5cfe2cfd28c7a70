"""Site layouts behind one registry: how a site folder is recognised and walked.

A layout is a name, the folder that marks it, and a walk that yields the site-level problems
(one list) and then a :class:`~client.ingest.study.StudyRecord` per study. ``check``, the cache
builder and the public-data adapters all go through :func:`iter_studies`; adding a layout means
adding one :class:`SiteLayout` to :data:`LAYOUTS` (first match wins, so DICOM comes first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from client.ingest import ctich, dicom_layout
from client.ingest.dicom import Problem
from client.ingest.study import StudyRecord

StudyWalk = Callable[[Path], Iterator[StudyRecord | list[Problem]]]


@dataclass(frozen=True)
class SiteLayout:
    name: str
    marker_dir: str  # a site folder holding this sub-folder has this layout
    walk: StudyWalk


LAYOUTS: tuple[SiteLayout, ...] = (
    SiteLayout("dicom", dicom_layout.MARKER_DIR, dicom_layout.iter_dicom_studies),
    SiteLayout("ct-ich", ctich.SCANS_DIR, ctich.iter_ctich_studies),
)


def find_layout(site_dir: Path) -> SiteLayout | None:
    """The first registered layout whose marker folder the site holds, else None."""
    return next((lay for lay in LAYOUTS if (site_dir / lay.marker_dir).is_dir()), None)


def site_layout(site_dir: Path) -> str | None:
    """The layout's name (``"dicom"``, ``"ct-ich"``) or None for a folder that is no site."""
    layout = find_layout(site_dir)
    return layout.name if layout else None


def list_site_folders(data_root: Path) -> list[Path]:
    """Site folders of a dataset: subfolders with a known layout (hidden ones skipped), sorted.

    The one rule both the simulation's sites and the ClientApp's partitions follow.
    """
    return sorted(
        p for p in data_root.iterdir() if p.is_dir() and not p.name.startswith(".") and find_layout(p) is not None
    )


def iter_studies(site_dir: Path | str) -> Iterator[StudyRecord | list[Problem]]:
    """Yield first the site-level problems (a list), then one :class:`StudyRecord` per study.

    A site folder that also holds another layout's marker folder gets a problem saying it is ignored.
    """
    site_dir = Path(site_dir)
    layout = find_layout(site_dir) or LAYOUTS[0]  # no layout: the DICOM walk reports "no dicom/ folder"
    ignored = [
        Problem(
            str(site_dir / other.marker_dir), f"ignored: the site has {layout.marker_dir}/ (one layout per site folder)"
        )
        for other in LAYOUTS
        if other is not layout and (site_dir / other.marker_dir).is_dir()
    ]
    walk = layout.walk(site_dir)
    yield ignored + next(walk)
    yield from walk
