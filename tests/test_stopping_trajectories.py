"""Stopping rules scored on recorded trajectories give what an edit stopped by the rule gives."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from icelora import ICELoRAEditor
from icelora.data_utils.dataset import load_dataset
from icelora.evaluation.runner import read_cases, run_single
from icelora.methods import method_config
from icelora.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import stopping_trajectories

#: Quick steps on the tiny model, so that the rules below stop edits at different steps.
SETTINGS = {"method": "ice-lora", "learning_rate": 0.05, "max_steps": 6, "num_contexts": 2}


def test_a_rule_scored_on_trajectories_matches_the_edit_it_stops(tiny_llama_folder, fixture_data, tmp_path, capsys):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("".join(f"{k}: {v}\n" for k, v in SETTINGS.items()))
    folder = tmp_path / "trajectories"
    stopping_trajectories.main(["record", "--dataset", str(fixture_data.path), "--model", str(tiny_llama_folder),
                                "--config", str(config_file), "--output", str(folder)])
    cases = read_cases(folder / "cases.jsonl")
    assert [c["index"] for c in cases] == [0, 1, 2]
    for case in cases:
        assert case["steps"] == 6 and [s["step"] for s in case["trajectory"]] == list(range(6))
        last = case["trajectory"][-1]
        for key in stopping_trajectories.SCORES:
            assert case[key] == last[key], key  # the last probe is the final evaluation's score
        assert case["fluency"] is not None  # every metric of icelora eval after the last step
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["n_cases"] == 3 and metrics["run"]["protocol"] == "trajectory"
    assert metrics["run"]["config"]["early_stopping"] is False

    for patience, tolerance in ((0, 0.05), (1, 10.0)):
        rule = stopping_trajectories.Rule.parse(f"patience={patience},tolerance={tolerance}")
        loaded = load_model(str(tiny_llama_folder))
        editor = ICELoRAEditor(loaded, method="ice-lora", learning_rate=0.05, max_steps=6, num_contexts=2,
                               early_stopping=True, early_stop_patience=patience, early_stop_tolerance=tolerance)
        run = tmp_path / f"run-{patience}"
        run_single(editor, "ice-lora", load_dataset(fixture_data.path), run, seed=0, resume=False)
        stopped = {c["index"]: c for c in read_cases(run / "cases.jsonl")}
        run_config = editor.config
        for case in cases:
            steps = rule.stop_step(case["trajectory"], run_config)
            assert steps == stopped[case["index"]]["steps"]
            simulated = stopping_trajectories.at_stop(case, steps)
            for key in stopping_trajectories.SCORES:
                assert simulated[key] == stopped[case["index"]][key], (patience, case["index"], key)
        assert any(c["steps"] < 6 for c in stopped.values())  # the rule did stop edits early

    capsys.readouterr()
    stopping_trajectories.main(["simulate", str(folder), "--rule", "patience=0", "--rule", "steps=3"])
    table = capsys.readouterr().out
    assert "| patience=0 | 3 |" in table and "| steps=3 | 3 |" in table

    # the same rule on the same trajectories: every paired difference is zero
    rows = stopping_trajectories.simulate(folder, [stopping_trajectories.Rule.parse("patience=0")], None, folder)
    assert rows[0]["n"] == 3
    assert all(rows[0][f"{k}_difference"] == (0.0, 0.0) for k in (*stopping_trajectories.SCORES, "steps"))
    base = stopping_trajectories.simulate(folder, [stopping_trajectories.Rule.parse("patience=0")], None)
    assert base[0]["steps_difference"][0] < 0  # without --versus: against all recorded steps

    per_step = stopping_trajectories.per_step_means(folder)
    assert [row["steps"] for row in per_step] == list(range(1, 7))
    for key in stopping_trajectories.SCORES:
        scored = [c[key] for c in cases if c[key] is not None]  # a record may have no portability
        assert per_step[-1][key] == pytest.approx(sum(scored) / len(scored))


def test_bad_rules_are_refused():
    with pytest.raises(SystemExit, match="unknown key 'speed'"):
        stopping_trajectories.Rule.parse("speed=3")
    rule = stopping_trajectories.Rule.parse("steps=4")
    trajectory = [{"step": s, "loss": 1.0, "ft": 1.0, "ice": 0.0, "target_learned": True} for s in range(6)]
    assert rule.stop_step(trajectory, method_config("ice-lora")) == 4  # a step cap alone: no early stop
