"""The data census: the site's guard (bins under the minimum count suppressed, with complementary bins
so that no sum the server knows gives them back, attacked here; noise), and a census-only
run through a FakeGrid to the real ClientApp whose pooled totals equal the statistics computed
directly from the sites' caches and DICOM headers, with its HTML report written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.client_app import app as client_app
from client.data.cache import build_site_cache, open_cache
from client.data.expansion import study_volume_ml
from client.federation.census import Acquisition, census_counts, census_record, guard_census, site_acquisitions
from client.federation.node import SiteNode
from client.federation.policy import SitePolicy
from common.census import (
    BINNED,
    HU,
    HU_EDGES,
    LABEL_MISSING,
    LABEL_NEG,
    LABEL_POS,
    MASKS,
    SCANNER,
    SCANNER_NAMES,
    SLICES,
    STUDIES,
    SUPPRESSED,
    THICKNESS,
    VOLUME,
    VOLUME_EDGES_ML,
)
from common.config import LABELS, PreprocessConfig
from common.run_config import model_from_run_config
from server.census import site_census
from server.federation import run_federation
from simulations.sites import prepare_caches
from tests.helpers.cache import memory_cache, study_entry
from tests.helpers.data import write_site
from tests.helpers.flower import FakeGrid, make_context, run_config, set_task_identity, write_prepared_sites

SCANNERS = {"site-01": ("ACME", "CT-1", 5.0), "site-02": ("ACME", "CT-1", 5.0), "site-03": ("Other", "X9", 2.5)}


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def config(root: Path, out: Path) -> dict:
    return run_config(
        **{"data.root": str(root), "output.dir": str(out), "output.name": "census", "model.image-size": 32}
        | {"rounds.census": "only", "rounds.timeout": 30.0}
    )


def stamp_headers(site: Path, manufacturer: str, model: str, thickness: float) -> None:
    for path in sorted((site / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.Manufacturer, ds.ManufacturerModelName, ds.SliceThickness = manufacturer, model, thickness
        ds.save_as(path)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("census") / "data"
    write_prepared_sites(root, 3, config(root, root.parent / "runs"), seed_offset=1)
    for site, (maker, model, thickness) in SCANNERS.items():
        stamp_headers(root / site, maker, model, thickness)
    # the caches were keyed on the files before the headers changed: build them again, as `prepare` would
    for cache in (root / ".cache").glob("site-*"):
        shutil.rmtree(cache)
    prepare_caches(root, model_from_run_config(config(root, root.parent / "runs"))[1], progress=False)
    return root


def census_run(root: Path, out: Path, min_count: int | None) -> dict:
    for site in SCANNERS:
        policy = "" if min_count is None else f"[policy]\ncensus-min-count = {min_count}\n"
        (root / site / "site.toml").write_text(f'site_id = "{site}"\n{policy}')
    rc = config(root, out)
    grid = FakeGrid({100 + i: (client_app, make_context({"partition-id": i}, rc, node_id=100 + i)) for i in range(3)})
    history = run_federation(grid, rc)
    assert history.rounds == []  # census only: no training round
    assert not any(s.message.metadata.message_type == "train" for s in grid.log)
    return json.loads((out / "census" / "census.json").read_text())


def direct_statistics(root: Path) -> dict:
    """The pooled statistics computed straight from the caches and the DICOM headers."""
    caches = [open_cache(p) for p in sorted((root / ".cache").glob("site-*"))]
    pixels = np.concatenate([c.images[c.images > 0].astype(float) for c in caches])
    lo, hi = caches[0].index["preprocess"]["window"]
    studies = [s for c in caches for s in c.index["studies"]]
    labels = np.array([[np.nan if v is None else v for v in s["labels"]] for s in studies])
    n_files = {site: len(list((root / site / "dicom").glob("*/*"))) for site in SCANNERS}
    return {
        HU: np.histogram(lo + pixels * (hi - lo) / 255, bins=HU_EDGES)[0].tolist(),
        STUDIES: [len(studies)],
        SLICES: [sum(c.n_slices for c in caches)],
        LABEL_POS: (labels == 1).sum(axis=0).tolist(),
        LABEL_NEG: (labels == 0).sum(axis=0).tolist(),
        LABEL_MISSING: np.isnan(labels).sum(axis=0).tolist(),
        MASKS: [sum(s["has_mask"] for s in studies), sum(not s["has_mask"] for s in studies)],
        SCANNER: {"ACME CT-1": n_files["site-01"] + n_files["site-02"], "Other X9": n_files["site-03"]},
    }


def test_census_totals_equal_the_pooled_statistics(data_root, tmp_path):
    census = census_run(data_root, tmp_path, min_count=0)
    pooled, direct = census["pooled"], direct_statistics(data_root)
    for key, value in direct.items():
        assert pooled[key] == value, key
    assert sorted(census["sites"]) == list(SCANNERS) and pooled[SUPPRESSED] == []
    # thickness: 5 mm sites in the 4-5.5 bin, the 2.5 mm one in 2-3; every masked study has a volume
    assert pooled[THICKNESS][4] == direct[SCANNER]["ACME CT-1"] and pooled[THICKNESS][2] == direct[SCANNER]["Other X9"]
    assert sum(pooled[VOLUME]) == direct[MASKS][0]
    page = (tmp_path / "census" / "census.html").read_text()
    assert page.count("<img src='data:image/png;base64,") == 6 and "site-03" in page


def test_bins_under_the_minimum_count_never_leave(data_root, tmp_path):
    open_counts = census_run(data_root, tmp_path / "a", min_count=0)
    guarded = census_run(data_root, tmp_path / "b", min_count=3)
    for site, counts in guarded["sites"].items():
        raw = open_counts["sites"][site]
        hidden = set(counts[SUPPRESSED])
        for key in (HU, LABEL_POS, LABEL_NEG, LABEL_MISSING, MASKS, VOLUME, THICKNESS):
            for label, v, sent in zip(BINNED[key], raw[key], counts[key]):
                if 0 < v < 3:
                    assert sent == 0 and f"{key}/{label}" in hidden, (site, key, label)
                else:  # sent as counted, or suppressed with a small bin (complementary)
                    assert sent == v or (sent == 0 and f"{key}/{label}" in hidden), (site, key, label)
        assert any(0 < v < 3 for k in (LABEL_POS, MASKS) for v in raw[k])  # something was suppressed
        assert counts[SUPPRESSED] and not recovered(counts), site


def test_guard_noise_and_suppression():
    counts = {HU: [0, 1, 4, 50] + [0] * 12, SCANNER: [2, 9], SCANNER_NAMES: ["a", "b"], STUDIES: [11], SLICES: [40]}
    out = guard_census(counts, SitePolicy(census_min_count=5))
    # HU bins add up to no sent total: the small ones alone; scanner a (2) = 11 studies - b (9): b goes too
    assert out[HU][:4] == [0, 0, 0, 50] and out[SCANNER] == [0, 0]
    assert out[SUPPRESSED] == ["hu-brain/5-10", "hu-brain/10-15", "scanner/a", "scanner/b"]
    assert out[STUDIES] == [11] and out[SCANNER_NAMES] == ["a", "b"]
    noisy = guard_census(counts, SitePolicy(census_min_count=0, census_noise=2.0), np.random.default_rng(1))
    assert noisy[HU] != counts[HU] and all(isinstance(v, int) and v >= 0 for v in noisy[HU])


# --- issue 27 item 3: suppression that survives subtraction ------------------------------------------

#: One site's raw census with small cells in every sum: 3 hypodensity positives (31 negatives, 6
#: missing), 1 expansion positive, 2-4 missing labels, 3 studies without a mask, volume bins of 4 and 2,
#: 3 studies at 2-3 mm, a scanner with 4 studies, HU bins of 3 and 2 pixels.
SMALL_SITE = {
    HU: [0, 3, 40, 900, 2000, 1500, 700, 90, 2, 0, 0, 0, 0, 0, 0, 0],
    VOLUME: [10, 8, 7, 6, 4, 2],
    THICKNESS: [0, 0, 3, 0, 37, 0, 0],
    LABEL_POS: [3, 12, 9, 30, 1],
    LABEL_NEG: [31, 26, 27, 8, 36],
    LABEL_MISSING: [6, 2, 4, 2, 3],
    MASKS: [37, 3],
    SCANNER: [36, 4],
    SCANNER_NAMES: ["ACME CT-1", "Other X9"],
    STUDIES: [40],
    SLICES: [400],
}


def relations_known_to_the_server(census: dict) -> list[tuple[list[tuple[str, str]], tuple[str, str]]]:
    """Every sum the server knows between one site's numbers, written out here (not taken from the
    code under test): (cells, total), a cell being (statistic, bin label)."""
    studies = (STUDIES, "0")
    sums = [([(k, label) for k in (LABEL_POS, LABEL_NEG, LABEL_MISSING)], studies) for label in LABELS]
    sums += [([(MASKS, b) for b in BINNED[MASKS]], studies), ([(THICKNESS, b) for b in BINNED[THICKNESS]], studies)]
    sums += [([(SCANNER, name) for name in census[SCANNER]], studies)]
    sums += [([(VOLUME, b) for b in BINNED[VOLUME]], (MASKS, BINNED[MASKS][0]))]  # every masked study has a volume
    return sums


def recovered(census: dict) -> dict[str, float]:
    """Every suppressed bin the server can pin down from one site's census (as the server holds it:
    ``server.census.site_census``): ``{"key/label": value}``.

    The unknowns are the suppressed bins; each known sum is a linear equation in them. (1) Every linear
    combination of the sent numbers at once: a bin is given by one iff its unit vector lies in the row
    space of the equations restricted to the unknowns (a rank test; then the least-squares solution
    is its value). (2) Integer counts, non-negative (a listed scanner at least 1): a bin is pinned iff
    its integer minimum and maximum under the equations coincide (a MILP each way)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    value = {(STUDIES, "0"): census[STUDIES][0]}
    for key in BINNED:
        value.update({(key, b): v for b, v in zip(BINNED[key], census[key])})
    value.update({(SCANNER, name): v for name, v in census[SCANNER].items()})
    hidden = sorted(tuple(name.split("/", 1)) for name in census[SUPPRESSED])
    assert all(value[c] == 0 for c in hidden)  # sent as 0
    col = {c: i for i, c in enumerate(hidden)}
    rows, rhs = [], []
    for cells, total in relations_known_to_the_server(census):
        row, known = np.zeros(len(hidden)), 0.0
        for cell, a in [(c, 1.0) for c in cells] + [(total, -1.0)]:
            if cell in col:
                row[col[cell]] += a
            else:
                known += a * value[cell]
        rows.append(row)
        rhs.append(-known)
    a, b = np.array(rows), np.array(rhs)
    out = {}
    rank = np.linalg.matrix_rank(a)
    solution = np.linalg.lstsq(a, b, rcond=None)[0]
    lower = [1.0 if c[0] == SCANNER else 0.0 for c in hidden]
    for cell, i in col.items():
        if np.linalg.matrix_rank(np.vstack([a, np.eye(len(hidden))[i]])) == rank:
            out["/".join(cell)] = round(float(solution[i]), 6)
            continue
        ends = []
        for sign in (1.0, -1.0):
            goal = np.zeros(len(hidden))
            goal[i] = sign
            res = milp(
                goal, constraints=LinearConstraint(a, b, b), integrality=np.ones(len(hidden)), bounds=Bounds(lower)
            )
            ends.append(sign * res.fun if res.status == 0 else None)
        if None not in ends and ends[0] == ends[1]:
            out["/".join(cell)] = float(ends[0])
    return out


def as_received(counts: dict) -> dict:
    """A guarded census as the server keeps it (the record it receives, through ``site_census``)."""
    return site_census(census_record(counts))


def test_no_combination_of_a_sites_census_recovers_a_suppressed_bin():
    """Issue 27 item 3: 3 hypodensity positives sent as 0 beside exact negatives, missing and studies
    came back by subtraction (40 - 31 - 6). Now every sum that holds a suppressed bin holds another, and
    no linear combination of the sent numbers, nor the sums with non-negative integer counts, pins down
    any suppressed bin; over 30 draws of the random complementary bins, and with noise."""
    policy = SitePolicy(census_min_count=5)
    small = {f"{k}/{b}" for k in BINNED for b, v in zip(BINNED[k], SMALL_SITE[k]) if 0 < v < 5}
    small |= {f"{SCANNER}/{n}" for n, v in zip(SMALL_SITE[SCANNER_NAMES], SMALL_SITE[SCANNER]) if 0 < v < 5}
    # the attack works: suppressing only the small bins gives most of them back
    naive = {**SMALL_SITE, **{k: [0 if 0 < v < 5 else v for v in SMALL_SITE[k]] for k in (*BINNED, SCANNER)}}
    naive_back = recovered(as_received({**naive, SUPPRESSED: sorted(small)}))
    assert naive_back["studies-positive/hypodensity"] == 3 and naive_back["studies-with-mask/without"] == 3
    assert naive_back["scanner/Other X9"] == 4 and naive_back["slice-thickness-mm/2-3"] == 3
    for seed in range(30):
        sent = as_received(guard_census(SMALL_SITE, policy, np.random.default_rng(seed)))
        assert small <= set(sent[SUPPRESSED]) and not recovered(sent), seed
    noisy = as_received(guard_census(SMALL_SITE, SitePolicy(census_min_count=5, census_noise=1.0)))
    assert not recovered(noisy)
    # at a site the draw is keyed by its secret: asked twice, it hides the same bins (two different
    # draws, one hiding positives + missing and one positives + negatives, would give the positives)
    keyed = [guard_census(SMALL_SITE, policy, np.random.default_rng(s), secret=b"k" * 32)[SUPPRESSED] for s in (1, 2)]
    assert keyed[0] == keyed[1] and not recovered(as_received(guard_census(SMALL_SITE, policy, secret=b"k" * 32)))


def test_census_volume_is_the_expansion_volume_from_slice_positions_not_the_header_thickness(tmp_path):
    """One study, 4 slices of 1000 mask pixels (1 x 1 mm) 4 mm apart by their positions, reconstructed as
    overlapping 6 mm slabs (header SliceThickness 6): 4000 x 1 mm^2 x 4 mm = 16 ml, in the census's 10-20 ml
    bin, the volume its derived expansion label grows from; the header's thickness would say 24 ml (20-30)."""
    masks = np.zeros((4, 32, 32), np.uint8)
    masks.reshape(4, -1)[:, :1000] = 1
    entry = study_entry("S-1", 0, masks, [None] * len(LABELS), pixel_mm=(1.0, 1.0), slice_mm=4.0)
    cache = memory_cache(np.zeros_like(masks), masks, np.zeros((4, len(LABELS)), np.float32), [entry])
    cache.index["preprocess"]["window"] = [0.0, 80.0]
    counts = census_counts(cache, {"S-1": Acquisition("ACME CT-1", 6.0)})
    assert study_volume_ml(entry) == pytest.approx(4000 * 1.0 * 4.0 / 1000) == 16.0
    assert counts[VOLUME] == np.histogram([16.0], bins=VOLUME_EDGES_ML)[0].tolist() == [0, 0, 1, 0, 0, 0]
    assert counts[THICKNESS][5] == 1  # the thickness statistic still reports the header's 6 mm (5.5+ bin)

    # a DICOM site whose headers say SliceThickness = 1.5 x the spacing of the slice positions
    site = write_site(tmp_path / "site-01", n_studies=2)
    cache = build_site_cache(site, tmp_path / ".cache", PreprocessConfig(size=32))[0]
    acquisitions = site_acquisitions(SiteNode(site, "site-01", tmp_path / ".cache"))
    studies = cache.index["studies"]
    hand = [sum(s["mask_pixels"]) * s["pixel_mm"][0] * s["pixel_mm"][1] * 5.0 / 1000 for s in studies]
    assert all(s["slice_mm"] == pytest.approx(5.0) for s in studies)  # write_series: slices 5 mm apart
    assert [acquisitions[s["study"]].thickness_mm for s in studies] == [7.5, 7.5]  # the header's thickness
    assert min(hand) > 0 and [study_volume_ml(s) for s in studies] == pytest.approx(hand)
    assert census_counts(cache, acquisitions)[VOLUME] == np.histogram(hand, bins=VOLUME_EDGES_ML)[0].tolist()
