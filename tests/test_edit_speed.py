"""The speed benchmark on a tiny model folder: its table, JSON keys, edits-at-once rows, bad input."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import edit_speed


def test_table_and_json(tiny_llama_folder, tmp_path, capsys):
    out = tmp_path / "speed.json"
    code = edit_speed.main(["--model", str(tiny_llama_folder), "--methods", "ice,ice-lora", "--edits", "2",
                            "--edits-at-once", "2", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert {"methods", "model", "device", "dtype", "edits", "matmul_gflops"} <= set(report)
    rows = {r["method"]: r for r in report["methods"]}
    assert set(rows) == {"ice", "ice-lora", "ice-lora x2"}  # ice trains full matrices: no x2 row
    for row in rows.values():
        for key in ("median_seconds_per_edit", "min_seconds_per_edit", "max_seconds_per_edit", "median_steps",
                    "peak_memory_mb", "trainable_params", "ratio_to_ice", "flops_per_step", "x_floor"):
            assert key in row, key
        assert row["flops_per_step"] > 0 and row["x_floor"] > 0 and len(row["seconds_per_edit"]) == 2
    assert rows["ice"]["ratio_to_ice"] == 1.0
    assert rows["ice-lora x2"]["steps"] == rows["ice-lora"]["steps"]
    assert "ice-lora x2" in capsys.readouterr().out


def test_only_the_rows_of_edits_trained_together(tiny_llama_folder, tmp_path):
    out = tmp_path / "speed.json"
    assert edit_speed.main(["--model", str(tiny_llama_folder), "--methods", "ice-lora", "--edits", "2",
                            "--edits-at-once", "2", "--only-at-once", "--json", str(out)]) == 0
    assert [r["method"] for r in json.loads(out.read_text())["methods"]] == ["ice-lora x2"]


def test_ice_lora_can_run_with_a_configuration_file(tiny_llama_folder, tmp_path, capsys):
    """``--ice-lora-config`` gives ice-lora the file's keys (here the preset before the null-space
    constraint); without it ice-lora runs its preset. A file of another method is refused."""
    v14 = Path(__file__).parents[1] / "configs" / "ice-lora-v14.yaml"
    for extra, energy in (([], 0.98), (["--ice-lora-config", str(v14)], None)):
        out = tmp_path / f"speed{len(extra)}.json"
        assert edit_speed.main(["--model", str(tiny_llama_folder), "--methods", "ice-lora", "--edits", "1",
                                "--json", str(out), *extra]) == 0
        (row,) = json.loads(out.read_text())["methods"]
        assert row["config"]["lora_projection_energy"] == energy
    ft_m = Path(__file__).parents[1] / "configs" / "tuned" / "ft-m.yaml"
    assert edit_speed.main(["--model", str(tiny_llama_folder), "--ice-lora-config", str(ft_m)]) == 2
    assert "a configuration of 'ft-m', not of ice-lora" in capsys.readouterr().err


def test_ice_lora_in_its_own_dtype_beside_the_others(tiny_llama_folder, tmp_path, capsys):
    """``--ice-lora-dtype bfloat16``: ice keeps float32 weights, ice-lora's model is loaded in
    bfloat16 (its adapters in float32), each row's floor uses its own dtype's rate."""
    out = tmp_path / "speed.json"
    assert edit_speed.main(["--model", str(tiny_llama_folder), "--methods", "ice,ice-lora", "--edits", "1",
                            "--ice-lora-dtype", "bfloat16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["methods"]}
    assert report["dtype"] == "float32" and report["ice_lora_dtype"] == "bfloat16"
    assert rows["ice"]["dtype"] == "float32" and rows["ice-lora"]["dtype"] == "bfloat16"
    assert set(report["matmul_gflops_by_dtype"]) == {"float32", "bfloat16"}
    assert rows["ice-lora"]["ratio_to_ice"] > 0
    assert "bfloat16" in capsys.readouterr().out


def test_ice_lora_editing_on_frozen_bfloat16_weights_is_named_and_floored_in_bfloat16(tiny_llama_folder, tmp_path,
                                                                                     capsys):
    config = tmp_path / "frozen.yaml"
    config.write_text("method: ice-lora\nfrozen_dtype: bfloat16\n")
    out = tmp_path / "speed.json"
    assert edit_speed.main(["--model", str(tiny_llama_folder), "--methods", "ice-lora", "--edits", "1",
                            "--ice-lora-config", str(config), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["methods"]
    assert row["dtype"] == "float32" and row["config"]["frozen_dtype"] == "bfloat16"
    assert set(report["matmul_gflops_by_dtype"]) == {"float32", "bfloat16"}
    rate = report["matmul_gflops_by_dtype"]["bfloat16"] * 1e9
    floors = [row["flops_per_step"] * n / rate for n in row["steps"]]
    assert row["x_floor"] == pytest.approx(row["seconds_per_edit"][0] / floors[0], rel=0.01)
    assert "float32/bfloat16" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["--methods", "ice,rome"], "unknown method(s) ['rome']"),
    (["--shape", "gpt5"], "unknown shape 'gpt5'"),
    (["--edits", "0"], "--edits must be between 1"),
    (["--only-at-once"], "--only-at-once needs --edits-at-once K"),
    (["--methods", "ice", "--ice-lora-dtype", "bfloat16"], "--ice-lora-dtype needs ice-lora among --methods"),
    (["--methods", "ice-lora", "--ice-lora-dtype", "float8"], "unknown dtype 'float8'"),
])
def test_bad_input(capsys, argv, message):
    assert edit_speed.main(argv) == 2
    assert message in capsys.readouterr().err


def test_out_of_memory_is_reported_in_its_row_and_the_run_goes_on(tiny_llama_folder, tmp_path, monkeypatch, capsys):
    """A configuration that runs out of memory gets a row naming the error (first line only); the
    methods after it are still timed and written, with no ratio to an ``ice`` that has no time."""
    measure = edit_speed.time_method

    def ice_runs_out(make, method, *args, **kwargs):
        if method == "ice":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return measure(make, method, *args, **kwargs)

    monkeypatch.setattr(edit_speed, "time_method", ice_runs_out)
    out = tmp_path / "speed.json"
    assert edit_speed.main(["--model", str(tiny_llama_folder), "--methods", "ice,ice-lora", "--edits", "1",
                            "--json", str(out)]) == 0
    ice, lora = json.loads(out.read_text())["methods"]
    assert ice == {"method": "ice", "error": "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert lora["method"] == "ice-lora" and lora["median_seconds_per_edit"] > 0 and "ratio_to_ice" not in lora
    table = capsys.readouterr().out
    assert "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB" in table and "more detail" not in table


def test_random_shape_with_autocast(tiny_llama_folder, tmp_path, monkeypatch):
    """A shape built from a config with random weights, its tokenizer from a folder, the passes
    under bfloat16 autocast: the rows say so, and the model built is the shape asked for."""
    from transformers import LlamaConfig

    monkeypatch.setitem(edit_speed.SHAPES, "tiny", lambda: LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=128))
    tokenizer = edit_speed.load_tokenizer(str(tiny_llama_folder))
    built = edit_speed.random_model("tiny", "cpu", None, tokenizer).model
    assert built.config.num_hidden_layers == 4 and not any(p.requires_grad for p in built.parameters())
    again = edit_speed.random_model("tiny", "cpu", None, tokenizer).model
    assert all(torch.equal(a, b) for a, b in zip(built.parameters(), again.parameters()))  # seeded
    out = tmp_path / "speed.json"
    assert edit_speed.main(["--shape", "tiny", "--tokenizer", str(tiny_llama_folder), "--methods", "ice-lora",
                            "--edits", "1", "--autocast", "bfloat16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == "random tiny" and report["autocast"] == "bfloat16"
    assert report["methods"][0]["autocast_dtype"] == "bfloat16"


def test_a_missing_tokenizer_folder_is_named(tmp_path, capsys):
    assert edit_speed.main(["--shape", "gpt2-medium", "--tokenizer", str(tmp_path / "nowhere")]) == 2
    assert "no tokenizer in" in capsys.readouterr().err


def test_profile_of_one_edit_names_its_phases(tiny_llama_folder, tmp_path, capsys):
    import profile_edit

    trace = tmp_path / "trace.json"
    assert profile_edit.main(["--model", str(tiny_llama_folder), "--method", "ice-lora", "--steps", "2", "--rows", "5",
                              "--trace", str(trace), "--shapes"]) == 0
    out = capsys.readouterr().out
    assert "ms per step" in out
    products = out.split("matrix products by shape (host time; ")[1].splitlines()
    listed = products[2:7]
    assert len(listed) == 5 and all(float(line.split()[-1]) > 0 for line in listed)  # GFLOP/s of each shape
    assert [float(line.split()[-3]) for line in listed] == sorted((float(line.split()[-3]) for line in listed),
                                                                   reverse=True)  # most time first
    shares = [line for line in products if line.startswith("products with at most")]
    assert [line.split()[4] for line in shares] == ["16", "128"]
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("phase"))
    phases = {line.split()[0]: float(line.split()[1]) for line in lines[header + 1: header + 5]}
    assert set(phases) == {"objective", "sampling", "backward", "optimizer"}
    assert all(ms > 0 for ms in phases.values()) and phases["sampling"] <= phases["objective"]
    assert json.loads(trace.read_text())["traceEvents"]
    import icelora.losses
    assert not hasattr(icelora.losses.Objective.__call__, "__wrapped__")  # the ranges are taken out again
    assert profile_edit.main(["--model", str(tiny_llama_folder), "--method", "nope"]) == 2


def test_product_shapes_are_read_from_each_operator():
    import profile_edit

    assert profile_edit.product_shape("aten::mm", [[5, 576], [576, 1536]]) == (1, 5, 576, 1536)
    assert profile_edit.product_shape("aten::addmm", [[1536], [5, 576], [576, 1536], [], []]) == (1, 5, 576, 1536)
    assert profile_edit.product_shape("aten::bmm", [[3, 5, 64], [3, 64, 7]]) == (3, 5, 64, 7)
    assert profile_edit.product_shape("aten::mm", [[5, 576]]) is None


def test_profile_of_edits_trained_together_names_the_once_per_call_work(tiny_llama_folder, capsys):
    import profile_edit

    assert profile_edit.main(["--model", str(tiny_llama_folder), "--method", "ice-lora", "--steps", "2", "--rows", "5",
                              "--edits-at-once", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 edits trained together" in out and "2 steps" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("once per edit call"))
    once = {line.rsplit(None, 2)[0]: float(line.split()[-2]) for line in lines[header + 1: header + 4]}
    assert set(once) == {"anchors", "protection inputs", "protection directions"}
    assert all(ms > 0 for ms in once.values())
    assert profile_edit.main(["--model", str(tiny_llama_folder), "--method", "ice", "--edits-at-once", "2"]) == 2
    assert "needs a LoRA method" in capsys.readouterr().err


def test_pass_cost_adds_up_the_passes_a_step_runs(tiny_llama_folder, capsys):
    """``benchmarks/pass_cost.py``: a line per pass, the step's fixed cost as the sum it prints,
    and the bound as that cost times the edit's steps over ``ice``'s seconds."""
    import pass_cost

    argv = ["--model", str(tiny_llama_folder), "--edit", "0", "--steps", "2", "--repeats", "1", "--compile"]
    assert pass_cost.main(argv) == 0
    out = capsys.readouterr().out
    for rows, tokens in pass_cost.FORWARD_SHAPES:
        assert re.search(rf"^forward, no gradient, {rows} x {tokens} tokens: [\d.]+ ms", out, re.M)
        assert re.search(rf"^compiled forward, {rows} x {tokens} tokens: [\d.]+ ms", out, re.M)
    decode = float(re.search(r"^forward, no gradient, 5 x 1 tokens: ([\d.]+)", out, re.M)[1])
    both = float(re.search(r"^forward and backward, 5 x 2 tokens, the gradient from block \d+ on: ([\d.]+)", out,
                           re.M)[1])
    head = float(re.search(r"^output layer, 5 rows: ([\d.]+)", out, re.M)[1])
    fixed = re.search(r"fixed cost, 3 x ([\d.]+) \+ 2 x ([\d.]+) \+ 3 x ([\d.]+) ms = (\d+) ms", out)
    assert [float(x) for x in fixed.groups()[:3]] == [decode, both, head]
    # the sum is printed to the millisecond, each of its 8 terms to a tenth
    assert abs(int(fixed[4]) - (3 * decode + 2 * both + 3 * head)) <= 0.5 + 8 * 0.05
    last = re.search(r"its stopping rule: (\d+) steps, ([\d.]+) s; ice: 25 steps, ([\d.]+) s; ice-lora / ice = "
                     r"([\d.]+), and no less than ([\d.]+) / ([\d.]+) = ([\d.]+)", out)
    steps, seconds, ice, bound = int(last[1]), float(last[2]), float(last[3]), float(last[5])
    slack = 0.005 + 0.005 / ice * (1 + seconds / ice)  # the printed seconds are rounded to 0.01
    assert 0 < steps <= 25 and abs(float(last[4]) - seconds / ice) <= slack
    assert abs(bound - int(fixed[4]) / 1000 * steps) <= 0.005 + steps * 0.0005
    assert float(last[6]) == ice and abs(float(last[7]) - bound / ice) <= 0.005 + 0.005 / ice * (1 + bound / ice)


def test_the_pass_cost_backward_starts_at_the_first_edited_block(tiny):
    """The timed backward runs through block ``first`` and the blocks after it, never below it."""
    import pass_cost

    from icelora.architecture import inspect_architecture

    arch = inspect_architecture(tiny.model)
    layers = tiny.model.get_submodule(arch.layers_path)
    reached = []
    hooks = [block.register_full_backward_hook(lambda m, gi, go, k=k: reached.append(k))
             for k, block in enumerate(layers)]
    try:
        pass_cost.forward_backward_ms(tiny.model.base_model, layers[1], 5, 2, repeats=1)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(layers) > 2 and sorted(set(reached)) == list(range(1, len(layers)))


def test_continuation_cost_leaves_out_only_the_continuation_pass(tiny_llama_folder, monkeypatch, capsys):
    """``benchmarks/continuation_cost.py``: "as it is" runs the continuation pass at every step,
    "left out" never does, the whole-row ways run no prefix pass; the printed cost is the
    difference of the medians, and nothing patched outlives the run."""
    import continuation_cost

    import icelora.shared_prefix
    from icelora.losses import Objective

    real_pass, prefix_once, anchors_riding = (icelora.shared_prefix.continue_from_prefix,
                                              Objective.encodes_prefix_once, Objective.anchors_in_main_pass)
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return real_pass(*args, **kwargs)

    monkeypatch.setattr(icelora.shared_prefix, "continue_from_prefix", counted)
    assert continuation_cost.main(["--model", str(tiny_llama_folder), "--edit", "0", "--steps", "2",
                                   "--rounds", "1"]) == 0
    assert len(calls) == 2  # the two steps of "as it is" only
    assert icelora.shared_prefix.continue_from_prefix is counted
    assert (Objective.encodes_prefix_once, Objective.anchors_in_main_pass) == (prefix_once, anchors_riding)
    out = capsys.readouterr().out
    medians = re.search(r"median over 1 rounds: as it is (\d+), left out (\d+), whole rows (\d+), "
                        r"whole rows, anchors riding (\d+) ms per step; the continuation pass costs (-?\d+) ms", out)
    assert medians and abs(int(medians[1]) - int(medians[2]) - int(medians[5])) <= 1


def test_evaluation_speed_times_the_baselines_and_each_part_and_puts_them_back(tiny_llama_folder, tmp_path, capsys):
    """``benchmarks/evaluation_speed.py``: the baselines of the asked records and the evaluation of
    the group edited together are timed, the parts within the evaluation's time, and every
    function it timed is the same object again after the run."""
    import evaluation_speed

    from tests.test_dataset import KNOWEDIT_ZSRE

    data = tmp_path / "zsre.json"
    targets = ("Noctuidae", "Rome", "Paris")
    data.write_text(json.dumps([{**KNOWEDIT_ZSRE[0], "target_new": target} for target in targets]))
    before = [getattr(owner, attribute) for owner, attribute, _ in evaluation_speed.PARTS]
    out = tmp_path / "timings.json"
    assert evaluation_speed.main(["--model", str(tiny_llama_folder), "--dataset", str(data), "--baselines", "0:3",
                                  "--group", "1:3", "--steps", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["baseline_records"], result["group_cases"]) == (3, 2)
    parts = result["evaluation_parts_seconds"]
    assert set(parts) == {name for *_, name in evaluation_speed.PARTS}
    assert 0 < sum(parts.values()) <= result["evaluation_seconds"]
    assert result["evaluation_seconds_per_case"] == pytest.approx(result["evaluation_seconds"] / 2)
    assert [getattr(owner, attribute) for owner, attribute, _ in evaluation_speed.PARTS] == before
    assert "s per record" in capsys.readouterr().out
