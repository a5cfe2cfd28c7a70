"""An optional report section as data: a title and its blocks in order, rendered by
``simulations.report.html.section_parts``. A section module (``gan_section``, ``expansion_section``)
builds one from its numbers without importing the page's HTML code, so no module imports back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Paragraph:
    text: str
    note: bool = False  # shown as a highlighted note (what a reader must not miss)


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[Any]]


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str


@dataclass(frozen=True)
class Section:
    title: str
    blocks: list[Paragraph | Table | Figure] = field(default_factory=list)
