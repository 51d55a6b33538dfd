"""Records whose locality prompts ask the edited fact, and the report's locality split by them."""

from __future__ import annotations

import json
import logging

from icelora.cli import main
from icelora.data_utils.dataset import load_dataset
from icelora.evaluation.locality_conflicts import asks_edited_fact, locality_split, records_asking_edited_fact
from icelora.evaluation.report import ReportWriter, locality_split_section
from icelora.evaluation.report_data import read_run
from tests.test_dataset import KNOWEDIT_ZSRE

#: The edit prompt's relation asked again, expecting the old answer's second alias (another case).
ASKING = {**KNOWEDIT_ZSRE[0], "ground_truth": ["Aspidoceratidae", "Aspidoceratid family"],
          "locality": {"Relation_Specificity": [{"prompt": "The family of Epaspidoceras is",
                                                 "ground_truth": ["aspidoceratid  Family"]}]}}


def write_data(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps([ASKING, KNOWEDIT_ZSRE[0], {**ASKING, "target_new": "Geometridae"}]))
    return path


def test_a_locality_answer_equal_to_an_old_alias_asks_the_edited_fact(tmp_path):
    records = load_dataset(write_data(tmp_path)).records
    # the second alias, compared without case and with white space collapsed
    assert [asks_edited_fact(r) for r in records] == [True, False, True]
    # "Aspido" (a locality answer of the second record) is a prefix of the old answer, not the answer
    assert [i.answer for i in records[1].locality] == ["genus", "Aspido"]


def test_an_edit_to_its_old_answer_or_a_prompt_about_another_subject_asks_nothing(tmp_path):
    path = tmp_path / "other.json"
    unchanged = {**ASKING, "target_new": "Aspidoceratid Family"}  # the target is an old alias
    elsewhere = {**ASKING, "locality": {"Relation_Specificity": [  # about another subject, same answer
        {"prompt": "The family of Aspidoceras is", "ground_truth": ["Aspidoceratidae"]}]}}
    no_subject = {key: value for key, value in elsewhere.items() if key != "subject"}
    path.write_text(json.dumps([unchanged, elsewhere, no_subject]))
    assert [asks_edited_fact(r) for r in load_dataset(path).records] == [False, False, True]


def test_locality_split_means_each_side():
    cases = [{"index": 0, "locality": 0.5}, {"index": 1, "locality": 1.0}, {"index": 2, "locality": 0.25},
             {"index": 3, "locality": None}]
    split = locality_split(cases, frozenset({0, 2}))
    assert (split.n_asking, split.locality_asking, split.n_other, split.locality_other) == (2, 0.375, 1, 1.0)
    assert locality_split(cases, frozenset()).locality_asking is None


def test_report_splits_locality_by_records_asking_the_edited_fact(tmp_path, capsys, tiny_llama_folder, caplog):
    data = write_data(tmp_path)
    out = tmp_path / "runs" / "split" / "lora"
    assert main(["eval", "--model", str(tiny_llama_folder), "--method", "lora", "--dataset", str(data),
                 "--steps", "2", "--output", str(out), "-q"]) == 0
    capsys.readouterr()
    cases = {c["index"]: c["locality"] for c in map(json.loads, (out / "cases.jsonl").read_text().splitlines())}
    assert records_asking_edited_fact(read_run(out)) == {0, 2}

    assert main(["report", str(tmp_path / "runs"), "--output", str(tmp_path / "rep"), "-q"]) == 0
    md = (tmp_path / "rep" / "evaluation_report.md").read_text()
    table = md.split("locality on records whose locality prompts ask the edited fact, and on the others**")[1]
    row = next(line for line in table.splitlines() if line.startswith("| lora |"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert row == (f"| lora | 2 | {(cases[0] + cases[2]) / 2:.3f} | 1 | {cases[1]:.3f} | "
                   f"{metrics['locality']:.3f} |")

    # the sequential protocol's table after the last edit is split the same way
    seq = tmp_path / "runs" / "sequential-split" / "lora"
    assert main(["eval", "--protocol", "sequential", "--model", str(tiny_llama_folder), "--method", "lora",
                 "--dataset", str(data), "--steps", "1", "--output", str(seq), "-q"]) == 0
    capsys.readouterr()
    seq_cases = {c["index"]: c["locality"] for c in map(json.loads, (seq / "cases.jsonl").read_text().splitlines())}
    assert main(["report", str(seq), "--output", str(tmp_path / "rep-seq"), "-q"]) == 0
    table = (tmp_path / "rep-seq" / "evaluation_report.md").read_text().split(
        "sequential split: locality on records whose locality prompts ask the edited fact, and on the others**")[1]
    row = next(line for line in table.splitlines() if line.startswith("| lora |"))
    assert row.startswith(f"| lora | 2 | {(seq_cases[0] + seq_cases[2]) / 2:.3f} | 1 | {seq_cases[1]:.3f} |")

    # a data file changed since the run (another sha256) is not used: no split, and a warning says why
    data.write_text(json.dumps([KNOWEDIT_ZSRE[0]] * 3))
    with caplog.at_level(logging.WARNING):
        assert records_asking_edited_fact(read_run(out)) is None
    assert "was not found" in caplog.text
    writer = ReportWriter(tmp_path / "rep2")
    locality_split_section(writer, "split", [read_run(out)])
    assert writer.lines == [] and writer.pages == []


def test_no_split_where_no_record_asks_the_edited_fact(tmp_path):
    from icelora.evaluation.report_data import RunSummary
    from icelora.evaluation.runner import sha256_of

    data = tmp_path / "plain.json"
    data.write_text(json.dumps([KNOWEDIT_ZSRE[0]] * 2))
    run = RunSummary(folder=tmp_path / "runs" / "plain" / "none",
                     run={"method": "none", "data_file": str(data), "data_sha256": sha256_of(data)},
                     metrics={"locality": 1.0}, cases=[{"index": 0, "locality": 1.0}, {"index": 1, "locality": 1.0}])
    assert records_asking_edited_fact(run) == frozenset()
    writer = ReportWriter(tmp_path / "rep")
    locality_split_section(writer, "plain", [run])
    assert writer.lines == [] and writer.pages == []


def test_paired_differences_on_records_asking_the_edited_fact_or_on_the_others(tmp_path, capsys):
    import sys
    from pathlib import Path

    import pytest

    from icelora.evaluation.runner import sha256_of

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import paired_differences

    data = write_data(tmp_path)  # records 0 and 2 ask the edited fact, 1 does not
    run = {"method": "x", "protocol": "single", "data_file": str(data), "data_sha256": sha256_of(data)}
    for name, locality in (("base", [1.0, 1.0, 1.0]), ("other", [0.5, 0.9, 0.7])):
        folder = tmp_path / "runs" / "split" / name
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps(run))
        (folder / "cases.jsonl").write_text("".join(json.dumps({"index": i, "locality": v}) + "\n"
                                                    for i, v in enumerate(locality)))
    base, other = (str(tmp_path / "runs" / "split" / n) for n in ("base", "other"))
    paired_differences.main([base, other, "--records", "asking"])
    assert "| locality | 2 | -0.400 ± 0.100 |" in capsys.readouterr().out
    paired_differences.main([base, other, "--records", "other"])
    assert "| locality | 1 | -0.100 ± 0.000 |" in capsys.readouterr().out
    paired_differences.main([base, other])
    assert "| locality | 3 | -0.300 ± 0.115 |" in capsys.readouterr().out
    changed = json.loads((tmp_path / "runs" / "split" / "other" / "run.json").read_text())
    (tmp_path / "runs" / "split" / "other" / "run.json").write_text(json.dumps({**changed, "data_sha256": "0"}))
    with pytest.raises(SystemExit, match="different data files"):
        paired_differences.main([base, other, "--records", "asking"])
    (tmp_path / "runs" / "split" / "other" / "run.json").write_text(json.dumps(changed))
    data.unlink()
    with pytest.raises(SystemExit, match="data file was not found"):
        paired_differences.main([base, other, "--records", "asking"])


def test_the_data_file_is_found_by_the_run_folders_data_set_name_and_checked_by_its_sha256(
        tmp_path, monkeypatch, caplog):
    from icelora.data_utils.dataset import DATASETS
    from icelora.evaluation.report_data import RunSummary
    from icelora.evaluation.runner import sha256_of

    data = write_data(tmp_path)
    monkeypatch.chdir(tmp_path)  # the default data folder is ./data when ../shared/data is absent
    shared = tmp_path / "data" / DATASETS["zsre-ice"]
    shared.parent.mkdir(parents=True, exist_ok=True)
    shared.write_bytes(data.read_bytes())
    moved = {"data_file": str(tmp_path / "gone.json"), "data_sha256": sha256_of(data)}
    run = RunSummary(folder=tmp_path / "runs" / "zsre-ice" / "x", run=moved, metrics={}, cases=[])
    assert (tmp_path / ".." / "shared" / "data").resolve().is_dir() is False
    assert records_asking_edited_fact(run) == {0, 2}
    with caplog.at_level(logging.WARNING):  # no sha256 recorded: nothing to check the file by
        assert records_asking_edited_fact(RunSummary(folder=run.folder, run={"data_file": str(data)},
                                                     metrics={}, cases=[])) is None
    assert "records no data_sha256" in caplog.text
