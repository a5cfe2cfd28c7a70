"""What ``simulate.py --results`` publishes is written by the command: the headline markdown, the README
block, and the report's numbers, figures and console output beside them (nothing copied by hand)."""

from __future__ import annotations

import pytest

from simulations.report.files import README_END, README_START, publish_artifacts, publish_results


def test_publish_results_writes_the_file_and_the_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold table\n{README_END}\nrest\n")
    written = publish_results("| new |\n", tmp_path / "results" / "headline.md", readme)
    assert written == [tmp_path / "results" / "headline.md", readme]
    assert (tmp_path / "results" / "headline.md").read_text() == "| new |\n"
    assert readme.read_text() == f"intro\n{README_START}\n| new |\n{README_END}\nrest\n"
    (tmp_path / "bare.md").write_text("no block\n")
    with pytest.raises(ValueError, match="bare.md: no results block"):
        publish_results("x", tmp_path / "h.md", tmp_path / "bare.md")


def test_publish_artifacts_copies_the_runs_numbers_figures_and_console(tmp_path):
    run = tmp_path / "run"
    (run / "figures").mkdir(parents=True)
    for name in ("study_metrics.json", "ceiling.json", "metrics.json"):
        (run / name).write_text(name)
    for name in ("natural_ceiling.png", "natural_overlays.png", "natural_shift.png"):
        (run / "figures" / name).write_bytes(name.encode())
    stale = tmp_path / "results" / "headline"
    stale.mkdir(parents=True)
    (stale / "old.png").write_text("from an older run")
    folder = publish_artifacts(run, tmp_path / "results" / "headline.md", "line 1\nline 2\n")
    assert folder == stale
    assert sorted(p.name for p in folder.iterdir()) == [
        "ceiling.json",
        "console.txt",
        "natural_ceiling.png",
        "natural_overlays.png",
        "study_metrics.json",
    ]
    assert (folder / "console.txt").read_text() == "line 1\nline 2\n"
    assert (folder / "natural_ceiling.png").read_bytes() == b"natural_ceiling.png"
