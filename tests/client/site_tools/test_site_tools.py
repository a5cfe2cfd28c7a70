"""``flwr-client`` without surprises: ``prepare`` builds the cache the run opens (round 1 never
rebuilds it), ``start`` accepts every layout ``check`` accepts, ``status`` shows what the site holds,
and ``policy show|check`` prints the policy and tests a run config against it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.federation.node import SiteNode
from client.federation.site_data import open_site
from client.federation.site_run import SiteRunConfig
from client.site_tools.cli import flwr_client_main
from client.site_tools.run_setup import app_run_config, run_preprocess
from client.site_tools.supernode import StartError, StartOptions, validate
from client.training.privacy import PRIVACY_FILE
from tests.helpers.data import write_site

OVERRIDES = "model.image-size=32 preprocess.centre=false"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return write_site(tmp_path_factory.mktemp("tools") / "site-09", n_studies=3, shape=(3, 40, 40), seed=9)


def test_run_preprocess_follows_the_run_config():
    default = run_preprocess()
    assert default.size == 64  # the tiny preset the default run trains, not PreprocessConfig's 256
    cfg = run_preprocess(OVERRIDES)
    assert (cfg.size, cfg.centre, cfg.denoise) == (32, False, True)
    assert run_preprocess(OVERRIDES, size=48, denoise=False).size == 48
    with pytest.raises(FileNotFoundError, match="no pyproject.toml"):
        app_run_config(None, Path("/nonexistent"))


def test_prepare_builds_the_cache_round_one_opens(site, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert flwr_client_main(["prepare", str(site), "--cache-dir", str(cache), "--run-config", OVERRIDES]) == 0
    assert "cache built" in capsys.readouterr().out
    (built,) = cache.glob("site-09-*/index.json")
    stamp = built.stat().st_mtime_ns
    # what the ClientApp does at its first message of that run
    run = SiteRunConfig.from_run_config(app_run_config(OVERRIDES))
    node = SiteNode(site, "site-09", cache)
    data = open_site(node, run)
    assert data.train.cache.hit and data.train.cache.path == built.parent
    assert list(cache.glob("site-09-*/index.json")) == [built] and built.stat().st_mtime_ns == stamp


def prepared_site(root: Path, prepare: str) -> Path:
    """A small site whose ``site.toml`` has the ``[prepare]`` table ``prepare``."""
    site = write_site(root / "site-11", n_studies=2, shape=(3, 40, 40), seed=11)
    (site / "site.toml").write_text(f'site_id = "site-11"\n[prepare]\n{prepare}')
    return site


def built_sizes(cache: Path) -> set[int]:
    return {json.loads(p.read_text())["preprocess"]["size"] for p in cache.glob("site-11-*/index.json")}


def test_prepare_takes_the_run_from_site_toml(tmp_path, capsys):
    site = prepared_site(tmp_path, 'model.image-size = 32\n"preprocess.centre" = false\n')
    own = run_preprocess(site_dir=site)
    assert (own.size, own.centre) == (32, False)
    cache = tmp_path / "cache"
    assert flwr_client_main(["prepare", str(site), "--cache-dir", str(cache)]) == 0
    assert "32x32" in capsys.readouterr().out and built_sizes(cache) == {32}
    # the cache a run with the same keys opens at its first message, not another one
    data = open_site(SiteNode(site, "site-11", cache), SiteRunConfig.from_run_config(app_run_config(OVERRIDES)))
    assert data.train.cache.hit and built_sizes(cache) == {32}
    # the command line wins over site.toml, key by key (the centre step stays site.toml's)
    cfg = run_preprocess("model.image-size=64", site_dir=site)
    assert (cfg.size, cfg.centre) == (64, False)
    assert run_preprocess("model.image-size=64", size=40, site_dir=site).size == 40
    wider = ["prepare", str(site), "--cache-dir", str(cache), "--run-config", "model.image-size=64"]
    assert flwr_client_main(wider) == 0
    assert "64x64" in capsys.readouterr().out and built_sizes(cache) == {32, 64}


@pytest.mark.parametrize(
    ("prepare", "named"),
    [
        ("model.imagesize = 32\n", "[prepare] has no run-config key 'model.imagesize'"),
        ('"model.image-size" = "32"\n', "[prepare] model.image-size must be int, got '32'"),
        ("model = [1]\n", "[prepare] model must be a string, number or boolean"),
    ],
)
def test_bad_prepare_table_is_an_error_naming_file_and_key(tmp_path, capsys, prepare, named):
    site = prepared_site(tmp_path, prepare)
    cache = tmp_path / "cache"
    assert flwr_client_main(["prepare", str(site), "--cache-dir", str(cache)]) == 2
    assert f"error: {site / 'site.toml'}: {named}" in capsys.readouterr().err
    start = ["start", "--superlink", "127.0.0.1:9", "--data", str(site), "--cache-dir", str(cache), "--insecure"]
    assert flwr_client_main(start) == 2  # refused before it looks for the SuperLink
    assert f"{site / 'site.toml'}: {named}" in capsys.readouterr().err
    assert not cache.exists()


def test_start_accepts_every_layout_check_accepts(tmp_path):
    ctich = tmp_path / "ctich"
    (ctich / "ct_scans").mkdir(parents=True)
    opts = StartOptions(superlink="127.0.0.1:9092", data=ctich, cache_dir=tmp_path, insecure=True)
    assert validate(opts) == ("127.0.0.1", 9092)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(StartError, match=r"not a site folder \(none of dicom/, ct_scans/ inside\)"):
        validate(StartOptions(superlink="127.0.0.1:9092", data=tmp_path / "nothing", cache_dir=tmp_path, insecure=True))


def test_status_shows_caches_runs_budget_and_policy(site, tmp_path, capsys):
    cache = tmp_path / "cache"
    flwr_client_main(["prepare", str(site), "--cache-dir", str(cache), "--run-config", OVERRIDES])
    run = cache / "federation" / "site-09" / "deploy"
    run.mkdir(parents=True)
    (run / PRIVACY_FILE).write_text(
        json.dumps({"rounds": [{"round": 1, "epsilon": 0.5}, {"round": 2, "epsilon": 1.25}]})
    )
    (cache / "federation" / "site-09" / "plain").mkdir()
    capsys.readouterr()
    assert flwr_client_main(["status", str(site), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "site site-09" in out and "layout dicom" in out
    assert "3 studies" in out and "32x32" in out and "steps: denoise, strip_skull" in out
    assert "deploy: 1 file(s) kept, epsilon 1.250 spent over 2 DP round(s)" in out
    assert "plain: 0 file(s) kept, no DP-SGD" in out
    assert "require-dp               False  (default)" in out and "code:" in out


def test_policy_show_and_check(site, capsys):
    toml = site / "site.toml"
    before = toml.read_text() if toml.is_file() else 'site_id = "site-09"\n'
    toml.write_text(before + "[policy]\nrequire-dp = true\nmax-epsilon = 4.0\n")
    try:
        assert flwr_client_main(["policy", "show", str(site)]) == 0
        out = capsys.readouterr().out
        assert "require-dp               True\n" in out and "max-epsilon              4.0\n" in out
        assert flwr_client_main(["policy", "check", str(site)]) == 1
        out = capsys.readouterr().out
        assert "refused: require-dp: " in out and "refused: max-epsilon: " in out and "refuses the run" in out
        ok = "privacy.dp=true privacy.target-epsilon=3.0"
        assert flwr_client_main(["policy", "check", str(site), "--run-config", ok]) == 0
        assert "this site takes part in the run" in capsys.readouterr().out
        assert flwr_client_main(["policy", "check", str(site), "--run-config", "privacy.dp=3"]) == 2
        assert "privacy.dp" in capsys.readouterr().err
    finally:
        toml.write_text(before)
