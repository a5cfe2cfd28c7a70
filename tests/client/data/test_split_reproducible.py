"""Patient splits depend on the seed, the site and the data only, never on the pseudonym key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.data.cache import SECRET_FILE, build_site_cache, patient_orders
from client.data.dataset import SPLITS, assign_groups, split_slices, study_split_ids
from common.config import PreprocessConfig
from tests.helpers.data import write_site

PRE = PreprocessConfig(size=32)


@pytest.fixture(scope="module")
def twin_caches(tmp_path_factory):
    """One site cached twice, under two cache roots with different pseudonym keys."""
    root = tmp_path_factory.mktemp("twins")
    site = write_site(root / "site-01", n_studies=10, shape=(3, 32, 32))
    caches = []
    for name, key in (("a", "11" * 32), ("b", "22" * 32)):
        (root / name).mkdir()
        (root / name / SECRET_FILE).write_text(key)
        caches.append(build_site_cache(site, root / name, PRE)[0])
    return caches


def _same(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> bool:
    return all(np.array_equal(x[k], y[k]) for k in SPLITS)


def test_two_pseudonym_keys_give_identical_splits(twin_caches) -> None:
    a, b = twin_caches
    assert [s["patient"] for s in a.studies] != [s["patient"] for s in b.studies]  # the keys differ
    # the study and slice order is the site's own, so equal index arrays mean the same patients
    for seed in (0, 1, 7):
        for by in ("patient", "slice"):
            assert _same(split_slices(a, seed=seed, by=by), split_slices(b, seed=seed, by=by))


def test_the_seed_changes_the_split_and_each_split_stays_patient_wise(twin_caches) -> None:
    a, _ = twin_caches
    splits = [split_slices(a, seed=seed) for seed in range(4)]
    assert any(not _same(splits[0], s) for s in splits[1:])
    ids = np.asarray(study_split_ids(a))[a.slice_study()]
    for s in splits:
        members = [set(ids[s[k]]) for k in SPLITS]
        assert all(members) and not (members[0] & members[1] or members[0] & members[2] or members[1] & members[2])


def test_the_site_id_keys_the_split() -> None:
    groups = [f"site#{i}" for i in range(30)]
    assert assign_groups(groups, (0.6, 0.2, 0.2), 0, site="a") != assign_groups(groups, (0.6, 0.2, 0.2), 0, site="b")
    assert assign_groups(groups, (0.6, 0.2, 0.2), 0, site="a") == assign_groups(groups[::-1], (0.6, 0.2, 0.2), 0, "a")


def test_patient_orders_rank_distinct_patients_whatever_their_listing_order() -> None:
    ids = ["MRN9", "MRN1", "MRN9", "MRN5"]
    orders = patient_orders(ids)
    assert orders[0] == orders[2] and sorted(set(orders)) == [0, 1, 2]
    again = dict(zip(ids[::-1], patient_orders(ids[::-1])))
    assert dict(zip(ids, orders)) == again


def _cache_with_followups(n_patients: int = 20, n_slices: int = 3):
    """An in-memory cache: per patient a baseline study naming its follow-up, then the follow-up."""
    from client.data.cache import SiteCache

    studies, start = [], 0
    for p in range(n_patients):
        for kind in ("base", "fu"):
            studies.append(
                {
                    "study": f"{kind}{p}",
                    "patient": f"P{p}",
                    "patient_order": p,
                    "start": start,
                    "stop": start + n_slices,
                    "brain_fraction": [1.0] * n_slices,
                    "followup": f"fu{p}" if kind == "base" else "",
                }
            )
            start += n_slices
    index = {"site_id": "site-01", "n_slices": start, "studies": studies}
    zeros = np.zeros((start, 4, 4), np.uint8)
    return SiteCache(Path("."), index, zeros, zeros, np.zeros((start, 5), np.float32))


def test_follow_up_studies_train_but_are_never_scored() -> None:
    cache = _cache_with_followups()
    study_of = np.asarray([s["study"] for s in cache.studies])[cache.slice_study()]
    for seed in range(3):
        parts = split_slices(cache, seed=seed)
        train_fu = [s for s in study_of[parts["train"]] if s.startswith("fu")]
        assert len(train_fu) > 0  # follow-ups teach the U-Net
        for name in ("val", "test"):
            assert len(parts[name]) > 0
            assert all(s.startswith("base") for s in study_of[parts[name]]), name
        # every baseline slice is still in exactly one split
        scored = np.concatenate([parts[k] for k in SPLITS])
        base = np.flatnonzero(np.char.startswith(study_of.astype(str), "base"))
        assert sorted(scored[np.isin(scored, base)]) == list(base)
