"""Worker processes for the single-edit protocol: the same cases as one process, errors surfaced,
no process left behind."""

from __future__ import annotations

import functools
import math
import multiprocessing
import time

import pytest
import torch

from icelora import ICELoRAEditor
from icelora.errors import IceloraError
from icelora.evaluation.runner import check_workers, read_cases, run_single
from icelora.evaluation.workers import EditorRecipe, map_in_workers, threads_per_worker
from icelora.methods import method_config
from tests.conftest import tiny_llama

CONFIG = dict(max_steps=3, learning_rate=1e-2)


def assert_same_case(one: dict, other: dict) -> None:
    """Equal texts, step counts and indices; numbers equal up to float rounding."""
    assert one.keys() == other.keys()
    for key in one.keys() - {"seconds", "case_seconds", "peak_memory_mb"}:
        a, b = one[key], other[key]
        if isinstance(a, float) and isinstance(b, float):
            assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (one["index"], key, a, b)
        elif isinstance(a, dict):
            assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], abs_tol=1e-6) for k in a), (key, a, b)
        else:
            assert a == b, (one["index"], key, a, b)


def test_workers_give_the_cases_of_one_process(tmp_path, fixture_data):
    edits_at_once = 2  # groups of two edits in their own adapters: the records 0-1 in one worker, 2 in the other
    def run(folder: str, workers: int) -> dict:
        editor = ICELoRAEditor(tiny_llama(), method="ice-lora", **CONFIG)
        return run_single(editor, "ice-lora", fixture_data, tmp_path / folder, seed=0, resume=False,
                          edits_at_once=edits_at_once, workers=workers, load_worker_model=tiny_llama)

    alone, split = run("one", 1), run("two", 2)
    assert split["run"]["workers"] == 2 and "workers" not in alone["run"]
    assert split["n_cases"] == alone["n_cases"] == 3
    cases_alone = {c["index"]: c for c in read_cases(tmp_path / "one" / "cases.jsonl")}
    cases_split = {c["index"]: c for c in read_cases(tmp_path / "two" / "cases.jsonl")}
    assert cases_alone.keys() == cases_split.keys() == {0, 1, 2}
    for index in cases_alone:
        assert_same_case(cases_alone[index], cases_split[index])
    assert all(c["steps"] >= 1 for c in cases_split.values())
    # the number of workers may change when a run is resumed
    editor = ICELoRAEditor(tiny_llama(), method="ice-lora", **CONFIG)
    again = run_single(editor, "ice-lora", fixture_data, tmp_path / "two", seed=0, resume=True,
                       edits_at_once=edits_at_once)
    assert again["n_cases"] == 3
    assert no_worker_left()


def no_worker_left(seconds: float = 30.0) -> bool:
    """Whether every child process has ended (given ``seconds`` to be reaped)."""
    deadline = time.monotonic() + seconds
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.2)
    return not multiprocessing.active_children()


def first_token(editor: ICELoRAEditor, text: str) -> int:
    """A task for the workers: the first token id of ``text``; ``boom`` fails."""
    if text == "boom":
        raise ValueError("task boom failed")
    return editor.tokenizer(text, add_special_tokens=False)["input_ids"][0]


def failing_loader():
    raise OSError("no model here")


RECIPE = EditorRecipe(load=tiny_llama, method="lora", config=method_config("lora", max_steps=1))


def test_map_in_workers_yields_every_result_once_and_stops_with_its_caller():
    texts = ["Paris", "Rome", "Italy"]
    results = dict(map_in_workers(first_token, texts, RECIPE, workers=2))
    tokenizer = tiny_llama().tokenizer
    assert results == {k: tokenizer(t, add_special_tokens=False)["input_ids"][0] for k, t in enumerate(texts)}
    assert no_worker_left()
    results = map_in_workers(first_token, texts * 2, RECIPE, workers=2)
    next(results)
    results.close()  # the caller stops (as on an exception or Ctrl-C): no worker is left running
    assert no_worker_left()


def test_a_failing_task_stops_the_workers_and_reaches_the_caller():
    seen = []
    with pytest.raises(ValueError, match="task boom failed"):
        for k, _ in map_in_workers(first_token, ["Paris", "boom", "Rome", "Italy"], RECIPE, workers=1):
            seen.append(k)
    assert seen == [0]  # one worker: tasks finish in order, the first before the failure
    assert no_worker_left()


def test_a_worker_that_cannot_load_its_model_fails_the_run(tmp_path, fixture_data):
    from concurrent.futures.process import BrokenProcessPool

    editor = ICELoRAEditor(tiny_llama(), method="ice-lora", **CONFIG)
    with pytest.raises(BrokenProcessPool):
        run_single(editor, "ice-lora", fixture_data, tmp_path / "run", seed=0, resume=False, workers=2,
                   load_worker_model=failing_loader)
    assert read_cases(tmp_path / "run" / "cases.jsonl") == []
    assert no_worker_left()


def test_threads_are_split_between_workers():
    assert threads_per_worker(2, threads=2) == 1
    assert threads_per_worker(2, threads=16) == 8
    assert threads_per_worker(4, threads=2) == 1
    with pytest.raises(IceloraError, match="at least 1"):
        threads_per_worker(0)


def test_bad_worker_settings_are_refused():
    cpu = torch.device("cpu")
    check_workers(1, cpu, None)
    check_workers(2, cpu, functools.partial(tiny_llama))
    with pytest.raises(IceloraError, match="at least 1"):
        check_workers(0, cpu, tiny_llama)
    with pytest.raises(IceloraError, match=r"on cuda.*--edits-at-once"):
        check_workers(2, torch.device("cuda"), tiny_llama)
    with pytest.raises(IceloraError, match="load_worker_model"):
        check_workers(2, cpu, None)
