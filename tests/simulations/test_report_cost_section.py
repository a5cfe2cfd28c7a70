"""The round-cost section: per stage, rounds, seconds per round and payload bytes per site per round,
from ``history.json`` (numbers here worked out by hand)."""

import json

import pytest

from simulations.report.cost_section import cost_section, main, over_seeds, runs_of, stage_costs, write_costs


def _round(rnd, stage, seconds, sent, received):
    return {
        "round": rnd,
        "stage": stage,
        "seconds": seconds,
        "bytes": {f"site-{i}": {"sent": s, "received": r} for i, (s, r) in enumerate(zip(sent, received))},
    }


HISTORY = {
    "rounds": [
        _round(1, 1, 20.0, [100, 300], [50, 50]),
        _round(2, 1, 10.0, [200, 200], [70, 90]),
        _round(3, "gan", 16.0, [600, 600], [600, 600]),
        _round(4, 2, 40.0, [3000, 1000], [1100, 1100]),
    ]
}


def test_stage_costs_are_means_over_sites_then_rounds():
    rows = stage_costs(HISTORY)
    assert [(r["stage"], r["rounds"]) for r in rows] == [("1", 2), ("gan", 1), ("2", 1)]
    one = rows[0]  # sites' means 200 and 200 sent, 50 and 80 received; seconds 20 and 10
    assert (one["seconds"], one["sent"], one["received"]) == (15.0, 200.0, 65.0)
    assert (rows[2]["sent"], rows[2]["received"]) == (2000.0, 1100.0)


def test_stages_keep_schedule_order_whatever_the_rounds_order():
    shuffled = {"rounds": list(reversed(HISTORY["rounds"]))}
    assert [r["stage"] for r in stage_costs(shuffled)] == ["1", "gan", "2"]


def test_a_round_without_bytes_counts_in_rounds_but_not_in_the_byte_mean():
    history = {"rounds": [_round(1, 1, 2.0, [10], [20]), {"round": 2, "stage": 1, "seconds": 4.0}]}
    (row,) = stage_costs(history)
    assert (row["rounds"], row["seconds"], row["sent"], row["received"]) == (2, 3.0, 10.0, 20.0)


def test_over_seeds_averages_each_method_and_stage():
    rows = [
        {"scenario": "natural", "method": "fedavg", "seed": s, **r}
        for s, history in ((0, HISTORY), (1, {"rounds": [_round(1, 1, 30.0, [400, 400], [0, 0])]}))
        for r in stage_costs(history)
    ]
    merged = over_seeds(rows)
    assert [(r["stage"], r["seeds"]) for r in merged] == [("1", 2), ("gan", 1), ("2", 1)]
    assert merged[0]["seconds"] == pytest.approx((15.0 + 30.0) / 2)
    assert merged[0]["sent"] == pytest.approx((200.0 + 400.0) / 2)


def test_section_and_file(tmp_path):
    assert cost_section([]) is None and write_costs(tmp_path, []) is None
    rows = [{"scenario": "natural", "method": "fedavg", "seed": 0, **r} for r in stage_costs(HISTORY)]
    section = write_costs(tmp_path, rows)
    table = section.blocks[1]
    assert table.rows[1] == ["natural", "fedavg", "gan", "1", "16.0", "0.6", "0.6"]  # kB = 1000 bytes
    doc = json.loads((tmp_path / "round_cost.json").read_text())
    assert len(doc["runs"]) == 3 and doc["mean_over_seeds"][2]["sent"] == 2000.0


def test_cli_reads_a_run_folder(tmp_path, capsys):
    run = tmp_path / "exp-20260101-000000"
    folder = run / "federated" / f"{run.name}-natural-fedavg___sngan-s3"
    folder.mkdir(parents=True)
    (folder / "history.json").write_text(json.dumps(HISTORY))
    (row, *_) = runs_of(run)  # without the experiment: the folder's name
    assert (row["scenario"], row["method"], row["seed"], row["stage"]) == ("", "natural-fedavg___sngan", "3", "1")
    (run / "experiment.toml").write_text(
        'name = "exp"\nseeds = [3]\n[[methods]]\nname = "fedavg + sngan"\nkind = "federated"\n'
    )
    main([str(run)])  # with the run's experiment.toml: scenario and method by name
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| scenario | method | stage")
    assert out[3] == "| natural | fedavg + sngan | gan | 1 | 16.0 | 0.6 | 0.6 |"
    with pytest.raises(SystemExit, match="no federated/\\*/history.json"):
        main([str(tmp_path)])
