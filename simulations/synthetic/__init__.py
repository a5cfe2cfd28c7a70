"""Realistic synthetic multi-site head CT with hematoma-expansion markers.

Writes datasets in the site data contract (docs/design.md §4) with per-site covariate shift
(scanner, protocol, population, annotator, DICOM encoding); see ``generate_dataset``.
Modules, in data-flow order: ``profiles`` (sites) -> ``cohort`` (patients, labels) ->
``anatomy`` / ``hematoma`` / ``scanner`` (pixels) -> ``study`` (one study) -> ``writers``
(files) -> ``montage``; ``generate`` ties them together.
"""

from simulations.synthetic.generate import GenerationSummary, SiteSummary, generate_dataset, generate_site
from simulations.synthetic.profiles import LOCATIONS, SiteProfile, default_profiles

__all__ = [
    "GenerationSummary",
    "SiteSummary",
    "SiteProfile",
    "LOCATIONS",
    "default_profiles",
    "generate_dataset",
    "generate_site",
]
