"""``icelora edit`` refuses bad input with one error line and exit status 2, writing nothing."""

from __future__ import annotations

import pytest

from icelora.cli import main, parse_layers, starts_with_target
from icelora.text import answer_kept, leading_answer, unrelated_verdict


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("icelora: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("argv", "message"), [
    (["--prompt", "  ", "--target", "Rome"], "prompt is empty"),
    (["--prompt", "The city of", "--target", ""], "target is empty"),
    (["--prompt", "The city of", "--target", "Rome", "--method", "rome"], "unknown method 'rome'"),
    (["--prompt", "The city of", "--target", "Rome", "--rank", "0"], "lora_rank must be a positive integer"),
    (["--prompt", "The city of", "--target", "Rome", "--model", "no-such-org/no-such-model"],
     "unknown model 'no-such-org/no-such-model'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, "edit", *argv)
    assert code == 2
    assert message in error_line(err)
    assert out == ""


def test_save_over_a_foreign_folder_is_refused_before_any_work(capsys, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "paper.tex").write_text("draft")
    code, _out, err = run_cli(capsys, "edit", "--prompt", "The city of", "--target", "Rome", "--save", str(folder))
    assert code == 2 and "not an icelora edit folder" in error_line(err)
    assert [p.name for p in folder.iterdir()] == ["paper.tex"]


def test_unencodable_target_on_a_local_model_folder(capsys, tmp_path, tiny_llama_folder):
    save = tmp_path / "edit"
    code, _out, err = run_cli(capsys, "edit", "--model", str(tiny_llama_folder), "--prompt", "The city of",
                             "--target", "漢字", "--save", str(save), "-q")
    assert code == 2 and "cannot encode" in error_line(err)
    assert not save.exists()


def test_a_local_model_folder_edits_and_saves(capsys, tmp_path, tiny_llama_folder):
    import json

    save = tmp_path / "edit"
    code, out, err = run_cli(capsys, "edit", "--model", str(tiny_llama_folder), "--prompt", "The city of",
                             "--target", "Rome", "--steps", "2", "--layers", "0-1", "--save", str(save),
                             "--check", "Q:", "--json", "-q")
    assert code == 0, err
    report = json.loads(out)
    assert report["steps"] == 2 and report["checks"][0]["prompt"] == "Q:"
    check = report["checks"][0]
    assert check["unchanged"] is (check["before"] == check["after"])
    assert check["answer_kept"] is answer_kept(check["before"], check["after"])
    assert (save / "adapter_model.safetensors").exists() and (save / "icelora_ledger.json").exists()


def test_helpers():
    assert starts_with_target("  rome, Italy", "Rome")
    assert starts_with_target("New  York City", "new york")
    assert not starts_with_target("Paris", "Rome")
    # exact_match keeps the plain prefix test; the whole-word one is asked for
    assert starts_with_target("Parisian food", "Paris")
    assert not starts_with_target("Parisian food", "Paris", whole_words=True)
    assert starts_with_target("Paris, France", "paris", whole_words=True)
    assert parse_layers("4-6") == [4, 5, 6]
    assert parse_layers("1,3") == [1, 3]


@pytest.mark.parametrize(("before", "after", "answer", "kept", "verdict"), [
    ("Leonardo da Vinci.\n\nThe Mona Lisa is", "Leonardo da Vinci in 1502.", "Leonardo da Vinci", True,
     "answer kept, text changed"),
    ("New York City, and it's a symbol", "New York City, and the Statue", "New York City", True,
     "answer kept, text changed"),
    ("Tokyo.\n\nThe Japanese Alps", "Tokyo.\n\nThe Japanese Alps", "Tokyo", True, "unchanged"),
    ("Paris, France.", "Rome.\n\nThe Eiffel Tower", "Paris", False, "answer CHANGED"),
    ("Paris.", "Parisian food.", "Paris", False, "answer CHANGED"),
    ("Paris.", "paris", "Paris", True, "answer kept, text changed"),
    ("3.5 million people.", "3.6 million people.", "3.5 million people", False, "answer CHANGED"),
    ("1,000 metres, the", "1,000 metres high", "1,000 metres", True, "answer kept, text changed"),
    ("\n\nParis", "\n\nRome", "", False, "answer CHANGED"),
    ("\n\nParis", "\n\nParis ", "", True, "answer kept, text changed"),
])
def test_unrelated_answer_kept(before, after, answer, kept, verdict):
    """The answer an unrelated continuation starts with is its text up to the first break; it is
    kept when the edited continuation starts with it, whatever follows."""
    assert leading_answer(before) == answer
    assert answer_kept(before, after) is kept
    assert unrelated_verdict(before, after) == verdict


def test_eval_of_the_unedited_model_refuses_the_sequential_protocol(capsys, tmp_path):
    code, out, err = run_cli(capsys, "eval", "--method", "none", "--protocol", "sequential", "--dataset", "zsre-ice",
                             "--output", str(tmp_path / "run"))
    assert code == 2 and "--method none" in error_line(err) and out == ""
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--workers", "2", "--protocol", "sequential"], "--workers applies to the single-edit protocol only"),
])
def test_eval_refuses_bad_workers_before_any_work(capsys, tmp_path, extra, message):
    code, out, err = run_cli(capsys, "eval", "--dataset", "zsre-ice", "--output", str(tmp_path / "run"), *extra)
    assert code == 2 and message in error_line(err) and out == ""
    assert not (tmp_path / "run").exists()
