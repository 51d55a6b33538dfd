"""``icelora compare`` (a study of several methods, resumable) and ``icelora report`` (md + pdf)."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from icelora.cli import main
from icelora.errors import InvalidConfigError
from icelora.evaluation.compare import plan_jobs, read_compare_config
from icelora.evaluation.report_data import read_run
from icelora.evaluation.targets import check_targets, read_targets

FAST = "max_steps: 2\nlearning_rate: 0.01\nnum_contexts: 2\n"


def write_study(tmp_path, model_folder, data_path, extra: str = "") -> str:
    for method in ("lora", "ft-m"):
        (tmp_path / f"{method}.yaml").write_text(f"method: {method}\n{FAST}")
    study = tmp_path / "study.yaml"
    study.write_text(f"""
model: {model_folder}
seed: 0
single:
  datasets: {{{data_path}: "0:3"}}
  methods: [none, ft-m, lora]
  edits_at_once: 2
sequential:
  datasets: {{{data_path}: "0:2"}}
  methods: [lora]
  eval_every: 1
method_configs:
  lora: {tmp_path / 'lora.yaml'}
  ft-m: {tmp_path / 'ft-m.yaml'}
targets:
  - {{dataset: mixed, method: lora, metric: edit_success, at_least: 0.0}}
  - {{dataset: mixed, method: lora, metric: locality, better_than: ft-m}}
  - {{dataset: mixed, method: lora, metric: fluency_ratio, not_below: [ft-m, none], margin: 2.0}}
  - {{dataset: mixed, method: ice, metric: locality, at_least: 0.5}}
{extra}""")
    return str(study)


def test_compare_runs_every_method_then_resumes_and_reports(tmp_path, capsys, tiny_llama_folder, fixture_data):
    study = write_study(tmp_path, tiny_llama_folder, fixture_data.path)
    out = tmp_path / "runs"
    assert main(["compare", "--config", study, "--output", str(out), "--list", "-q"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 4 and all("mixed" in line for line in listing)

    assert main(["compare", "--config", study, "--output", str(out), "-q"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["protocol"], r["method"]) for r in rows] == [
        ("single", "none"), ("single", "ft-m"), ("single", "lora"), ("sequential", "lora")]
    for method in ("none", "ft-m", "lora"):
        metrics = json.loads((out / "mixed" / method / "metrics.json").read_text())
        assert metrics["n_cases"] == 3 and metrics["run"]["method"] == method
        assert (metrics["trainable_params"] == 0) == (method == "none")
    lora = json.loads((out / "mixed" / "lora" / "metrics.json").read_text())
    assert lora["run"]["config"]["max_steps"] == 2 and lora["run"]["edits_at_once"] == 2
    assert lora["trainable_params"] > 0
    ft_m = json.loads((out / "mixed" / "ft-m" / "metrics.json").read_text())
    assert "edits_at_once" not in ft_m["run"]  # full matrices: one edit at a time
    assert (out / "sequential-mixed" / "lora" / "curve.jsonl").read_text().count("\n") == 2

    # a second call re-reads finished runs: nothing is edited or appended again
    before = {p: p.read_text() for p in out.rglob("cases.jsonl")}
    assert main(["compare", "--config", study, "--output", str(out), "--only", "lora", "-q"]) == 0
    assert [r["method"] for r in json.loads(capsys.readouterr().out)] == ["lora", "lora"]
    assert {p: p.read_text() for p in out.rglob("cases.jsonl")} == before

    report = tmp_path / "report"
    assert main(["report", str(out), "--targets", study, "--output", str(report), "-q"]) == 0
    md = (report / "evaluation_report.md").read_text()
    assert (report / "evaluation_report.pdf").read_bytes().startswith(b"%PDF")
    assert {p.name for p in (report / "figures").iterdir()} >= {"mixed-metrics.png", "mixed-cost.png",
                                                                "sequential-mixed-curves.png"}
    for method in ("unedited", "ft-m", "lora"):
        assert f"| {method} | 3 |" in md
    # the markdown holds the same numbers as metrics.json
    lora_row = next(line for line in md.splitlines() if line.startswith(f"| lora | 3 | {lora['edit_success']:.3f} |"))
    assert f"| {lora['locality']:.3f} |" in lora_row and f"| {lora['portability']:.3f} |" in lora_row
    assert "icelora compare --config" in md  # the command that reproduces each table
    assert "ice locality (single, mixed) >= 0.5 | no finished run | NOT MET" in md
    assert "Llama-2-7b-chat" in md


def test_report_marks_partial_runs_and_reads_cases(tmp_path, capsys, tiny_llama_folder, fixture_data):
    root = tmp_path / "state" / "runs"  # a folder named like a run's saved state above the root is no matter
    out = root / "mixed" / "lora"
    assert main(["eval", "--model", str(tiny_llama_folder), "--method", "lora", "--dataset", str(fixture_data.path),
                 "--steps", "1", "--output", str(out), "-q"]) == 0
    capsys.readouterr()
    (out / "metrics.json").unlink()
    lines = (out / "cases.jsonl").read_text().splitlines()
    (out / "cases.jsonl").write_text("\n".join(lines[:2]) + "\n")
    summary = read_run(out)
    assert not summary.complete and summary.metrics["n_cases"] == 2
    assert main(["report", str(root), "--output", str(tmp_path / "rep"), "-q"]) == 0
    md = (tmp_path / "rep" / "evaluation_report.md").read_text()
    assert "| lora (partial) | 2 |" in md
    by_type = md.split("portability by type**")[1].split("**")[0]  # the by-type tables mark it too
    assert "| lora (partial) |" in by_type and "| lora |" not in by_type


def test_report_compares_a_partial_run_on_the_records_every_run_finished(tmp_path, capsys, tiny_llama_folder,
                                                                         fixture_data):
    full = tmp_path / "runs" / "mixed" / "lora"
    assert main(["eval", "--model", str(tiny_llama_folder), "--method", "lora", "--dataset", str(fixture_data.path),
                 "--steps", "1", "--output", str(full), "-q"]) == 0
    capsys.readouterr()
    cut = tmp_path / "runs" / "mixed" / "lora-cut"
    shutil.copytree(full, cut)
    (cut / "metrics.json").unlink()
    (cut / "cases.jsonl").write_text("\n".join((full / "cases.jsonl").read_text().splitlines()[:2]) + "\n")
    n_full = len((full / "cases.jsonl").read_text().splitlines())
    assert n_full > 2
    assert main(["report", str(tmp_path / "runs"), "--output", str(tmp_path / "rep"), "-q"]) == 0
    text = (tmp_path / "rep" / "evaluation_report.md").read_text()
    main_table, shared_table = text.split("metrics on the 2 records every run has finished")[:2]
    assert f"| lora | {n_full} |" in main_table
    assert "| lora | 2 |" in shared_table.split("Reproduce")[0]
    assert "| lora-cut (partial) | 2 |" in shared_table.split("Reproduce")[0]


def test_targets_compare_against_other_methods(tmp_path):
    from icelora.evaluation.report_data import RunSummary

    def run(method, **metrics):
        return RunSummary(folder=tmp_path / "zsre" / method, run={"method": method, "protocol": "single",
                                                                 "indices": [0]},
                          metrics={"n_cases": 1, **metrics}, cases=[])

    runs = [run("ice-lora", locality=0.8, portability=0.30), run("ft-m", locality=0.7, portability=0.31),
            run("ice", locality=0.85, portability=0.2)]
    path = tmp_path / "t.yaml"
    path.write_text("""targets:
  - {dataset: zsre, method: ice-lora, metric: locality, better_than: ft-m}
  - {dataset: zsre, method: ice-lora, metric: locality, not_below: ice, margin: 0.02}
  - {dataset: zsre, method: ice-lora, metric: locality, not_below: ice, margin: 0.1}
  - {dataset: zsre, method: ice-lora, metric: portability, not_below: [ft-m, ice]}
  - {dataset: zsre, method: ice-lora, metric: locality, at_most: 0.5}
""")
    assert [r.met for r in check_targets(read_targets(path), runs)] == [True, False, True, False, False]

    # a side run of the same method is not the study's run; an unfinished run is shown, never met
    side = run("ice-lora", locality=0.99)
    side.folder = tmp_path / "zsre" / "ice-lora-old"
    partial = run("ice-lora", locality=0.6)
    partial.complete = False
    result = check_targets(read_targets(path), [side, partial, *runs[1:]])[0]
    assert not result.met and result.measured.startswith("0.600 so far (partial run, 1 cases)")
    only_side = check_targets(read_targets(path), [side])[0]
    assert only_side.measured == "no finished run" and not only_side.met

    # a side run is named by its folder's name; better_than takes the best of several runs
    tuned = run("ft-m", locality=0.82)
    tuned.folder = tmp_path / "zsre" / "ft-m-tuned"
    path.write_text("targets:\n"
                    "  - {dataset: zsre, method: ice-lora, metric: locality, better_than: [ft-m, ft-m-tuned]}\n"
                    "  - {dataset: zsre, method: ft-m-tuned, metric: locality, at_least: 0.8}\n")
    against_both, tuned_alone = check_targets(read_targets(path), [*runs, tuned])
    assert not against_both.met and against_both.measured == "0.800 vs ft-m 0.700, ft-m-tuned 0.820"
    assert against_both.description == "ice-lora locality (single, zsre) > best of ft-m, ft-m-tuned"
    assert tuned_alone.met


def test_targets_against_an_unfinished_run_compare_on_its_finished_records(tmp_path):
    from icelora.evaluation.report_data import RunSummary

    def run(method, localities, complete=True):
        metrics = {"edit_success": 1.0, "rephrase": None, "portability": 0.5, "portability_by_type": {},
                   "locality_by_type": {}, "fluency": 5.0, "fluency_unedited": 5.0, "ppl_r": 0.1,
                   "exact_match": 1.0}
        cases = [{"index": i, **metrics, "locality": v} for i, v in enumerate(localities)]
        return RunSummary(folder=tmp_path / "zsre" / method, run={"method": method, "protocol": "single",
                                                                 "indices": [0, 1, 2, 3]},
                          metrics={"n_cases": len(cases), "locality": sum(localities) / len(localities)},
                          cases=cases, complete=complete)

    path = tmp_path / "t.yaml"
    path.write_text("targets:\n  - {dataset: zsre, method: ice-lora, metric: locality, not_below: ice, margin: 0.02}\n"
                    "  - {dataset: zsre, method: ice-lora, metric: locality, better_than: ice}\n")
    # ice-lora 0.5 over all four records, but 0.9 on the two records ice has finished (ice: 0.8 there)
    runs = [run("ice-lora", [0.9, 0.9, 0.1, 0.1]), run("ice", [0.8, 0.8], complete=False)]
    near, better = check_targets(read_targets(path), runs)
    assert not near.met and not better.met
    assert near.measured.endswith("on the 2 records all have finished: ice-lora 0.900 vs ice 0.800 (would hold there)")
    runs = [run("ice-lora", [0.7, 0.7, 1.0, 1.0]), run("ice", [0.8, 0.8], complete=False)]
    near, _ = check_targets(read_targets(path), runs)
    assert near.measured.endswith("ice-lora 0.700 vs ice 0.800 (would not hold there)") and not near.met


@pytest.mark.parametrize("text, message", [
    ("single: {datasets: {zsre: '0:2'}, methods: [magic]}", "unknown method(s) ['magic']"),
    ("single: {datasets: {zsre: 5}, methods: [lora]}", "single.datasets.zsre"),
    ("single: {datasets: {zsre: '0:2'}, methods: [lora], edits_at_once: 0}", "single.edits_at_once"),
    ("sequential: {datasets: {zsre: '0:2'}, methods: [none]}", "sequential.methods"),
    ("single: {datasets: {zsre: '0:2'}, methods: [lora], colour: red}", "unknown key(s) ['colour']"),
    ("seed: 1", "give 'single' and/or 'sequential'"),
    ("single: {datasets: {zsre: '0:2'}, methods: [lora]}\ntargets: [{dataset: zsre, metric: x, at_least: 1}]",
     "targets[0]"),
    ("single: {datasets: {zsre: '0:2'}, methods: [lora]}\n"
     "targets: [{dataset: zsre, method: lora, metric: locallity, at_least: 1}]", "metric 'locallity'"),
    ("single: {datasets: {zsre: '0:2'}, methods: [lora]}\n"
     "targets: [{dataset: zsre, method: lora, metric: locality, at_least: 1, protocol: seq}]", "protocol 'seq'"),
    ("single: {datasets: {zsre: '0:2'}, methods: [lora]}\n"
     "targets: [{dataset: zsre, method: lora, metric: locality, at_least: 0.9, margin: 0.1}]",
     "margin applies to not_below only"),
    ("single: {datasets: {zsre: '0:2'}, methods: [lora]}\n"
     "targets: [{dataset: zsre, method: lora, metric: locality, not_below: ft-m, margin: a}]",
     "margin must be a number"),
])
def test_bad_study_files_name_the_key(tmp_path, text, message):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(InvalidConfigError) as info:
        read_compare_config(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_project_study_plans_the_issue_runs(tmp_path):
    from pathlib import Path

    study = read_compare_config(Path(__file__).resolve().parents[1] / "configs" / "compare.yaml")
    jobs = plan_jobs(study, tmp_path)
    single = {(j.dataset, j.method) for j in jobs if j.protocol == "single"}
    assert single == {(d, m) for d in ("zsre-ice", "recent") for m in ("none", "ft-l", "ft-m", "lora", "ice",
                                                                       "ice-lora")}
    assert all(j.indices == "0:200" for j in jobs if j.protocol == "single")
    sequential = [j for j in jobs if j.protocol == "sequential"]
    assert {j.method for j in sequential} == {"ft-m", "lora", "ice-lora"}
    assert all(j.indices == "0:100" and j.eval_every == 10 for j in sequential)


def test_tuning_table_lists_what_changed_and_the_differences(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tuning_table

    from icelora.methods import method_config

    runs = (("base", {}, 0.5, "single"), ("anchored", {"lambda_locality": 1.0}, 0.75, "single"),
            ("older", {}, 0.6, "single"), ("no-replay", {"replay_edits": 0}, 0.7, "single"),
            ("no-replay-seq", {"replay_edits": 0}, 0.7, "sequential"))
    for name, changes, locality, protocol in runs:
        folder = tmp_path / name
        folder.mkdir()
        config = method_config("ice-lora", **changes).to_dict()
        if name == "older":  # a run from before locality_anchor_kind existed: it ran the general anchors
            del config["locality_anchor_kind"]
        (folder / "metrics.json").write_text(json.dumps({
            "n_cases": 4, "edit_success": 1.0, "locality": locality, "seconds_per_edit": 3.0,
            "run": {"method": "ice-lora", "protocol": protocol, "config": config}}))
    folders = [str(tmp_path / r[0]) for r in runs]
    tuning_table.main([*folders, "--baseline", str(tmp_path / "base")])
    lines = capsys.readouterr().out.splitlines()
    assert "| base | ice-lora | (preset) | 4 | 1.000 |" in lines[2]
    assert "lambda_locality=1.0" in lines[3] and "0.750 (+0.250)" in lines[3]
    assert "| older | ice-lora | locality_anchor_kind=general |" in lines[4]
    assert "| no-replay | ice-lora | (preset) |" in lines[5]                # inert in single-edit runs
    assert "| no-replay-seq | ice-lora | replay_edits=0 |" in lines[6]


def test_compare_runs_only_the_chosen_dataset_and_protocol(tmp_path, capsys, tiny_llama_folder, fixture_data):
    study = write_study(tmp_path, tiny_llama_folder, fixture_data.path)
    out = tmp_path / "runs"
    assert main(["compare", "--config", study, "--output", str(out), "--only", "lora", "--dataset", "mixed",
                 "--protocol", "sequential", "-q"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["protocol"], r["method"]) for r in rows] == [("sequential", "lora")]
    assert not (out / "mixed").exists() and (out / "sequential-mixed" / "lora" / "metrics.json").exists()
    assert main(["compare", "--config", study, "--output", str(out), "--dataset", "zsre-ice", "-q"]) == 2
    assert "the study has no dataset ['zsre-ice']; it has ['mixed']" in capsys.readouterr().err


def test_paired_differences_pair_records_by_index(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import paired_differences

    def write(name, rows):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder

    base = write("base", [{"index": i, "locality": 0.5, "rephrase": None} for i in range(4)])
    # records in another order, one extra record the base lacks, one rephrase value with no partner
    other = write("other", [{"index": 3, "locality": 0.9, "rephrase": 1.0},
                            {"index": 0, "locality": 0.7, "rephrase": None},
                            {"index": 1, "locality": 0.5}, {"index": 2, "locality": 0.5},
                            {"index": 9, "locality": 0.0}])
    rows = paired_differences.paired_differences(paired_differences.load_cases(base),
                                                 paired_differences.load_cases(other))
    assert [r.metric for r in rows] == ["locality"]                     # no rephrase pair anywhere
    (locality,) = rows
    assert locality.n == 4 and locality.mean == pytest.approx(0.15)
    # differences 0.2, 0, 0, 0.4 (deviations 0.05, -0.15, -0.15, 0.25): sample variance over n, square root
    assert locality.standard_error == pytest.approx(math.sqrt((0.05 ** 2 + 2 * 0.15 ** 2 + 0.25 ** 2) / 3 / 4))
    paired_differences.main([str(base), str(other)])
    assert "| locality | 4 | +0.150 ± 0.096 |" in capsys.readouterr().out
    paired_differences.main([str(base), str(other), "--indices", "0:2"])  # records 0 and 1: 0.2 and 0
    assert "| locality | 2 | +0.100 ± 0.100 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="outside"):
        paired_differences.main([str(base), str(other), "--indices", "5:20"])
    with pytest.raises(SystemExit, match=r"no cases\.jsonl"):
        paired_differences.load_cases(tmp_path)


def test_paired_differences_add_the_tuning_criterion_on_request(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import paired_differences

    for name, rows in (("base", [{"index": 0, "rephrase": 0.5, "portability": 0.2, "locality": 0.8},
                                 {"index": 1, "portability": 0.4, "locality": 0.6}]),
                       ("other", [{"index": 0, "rephrase": 0.8, "portability": 0.2, "locality": 0.8},
                                  {"index": 1, "portability": 0.4, "locality": 1.0}])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paired_differences.main([str(tmp_path / "base"), str(tmp_path / "other")])
    assert "criterion" not in capsys.readouterr().out
    paired_differences.main([str(tmp_path / "base"), str(tmp_path / "other"), "--criterion"])
    # record 0: (0.8+0.2+0.8)/3 - (0.5+0.2+0.8)/3 = 0.1; record 1 (no rephrase): 0.7 - 0.5 = 0.2
    assert "| criterion | 2 | +0.150 ± 0.050 |" in capsys.readouterr().out


def test_paired_differences_print_each_runs_means_on_the_shared_records(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import paired_differences

    def case(index, locality, steps, fluency=None):
        return {"index": index, "locality": locality, "steps": steps, "fluency": fluency,
                "fluency_unedited": None if fluency is None else 5.0}

    for name, rows in (("base", [case(0, 0.5, 10, 4.0), case(1, 1.0, 12, 6.0), case(2, 0.0, 99)]),
                       ("other", [case(0, 1.0, 14, 3.0), case(1, 1.0, 16, 5.0)])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    means = paired_differences.shared_means(paired_differences.load_cases(tmp_path / "base"),
                                            paired_differences.load_cases(tmp_path / "other"))
    # record 2 is the base's alone: left out of every mean
    assert means == [("locality", 2, 0.75, 1.0), ("fluency", 2, 5.0, 4.0), ("steps", 2, 11.0, 15.0),
                     ("fluency_ratio", 2, 1.0, 0.8)]
    paired_differences.main([str(tmp_path / "base"), str(tmp_path / "other")])
    out = capsys.readouterr().out
    assert "| steps | 2 | +4.000 ± 0.000 |" in out and "| fluency_ratio | 2 | 1.000 | 0.800 |" in out

