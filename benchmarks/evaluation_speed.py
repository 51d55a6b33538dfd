"""Where the single-edit benchmark's evaluation time goes.

    python benchmarks/evaluation_speed.py --config configs/ice-lora-frozen-bf16.yaml --baselines 0:128 --group 0:16

Two timings, on the embedded model unless ``--model``, of the work ``icelora eval --protocol
single`` does besides editing:

- the unedited baselines (greedy answer, locality predictions, fluency sample) of the
  ``--baselines`` records, made as a run makes them (:class:`BaselineStore` with its default
  batch), in seconds per record;
- the evaluation of the ``--group`` records edited together, each in its own adapter, as a run
  with ``--edits-at-once`` measures them (:func:`measure_edited_many`): seconds per case in all
  and by part (the teacher-forced metrics, the greedy answers, the fluency samples, and those
  samples' and the targets' perplexities under the unedited model). The edits train ``--steps``
  steps only: the evaluation's work does not depend on how far they got.

Printed, and written as JSON with ``--json``. Run it with another checkout's ``src`` first on
``PYTHONPATH`` to time that code the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import icelora
from icelora import ICELoRAEditor, load_model
from icelora.data_utils.dataset import BenchmarkRecord, load_dataset, resolve_dataset
from icelora.evaluation import runner
from icelora.methods import config_from_file

#: The parts of an edited group's evaluation: (where the function is looked up, its name, printed name).
PARTS: tuple[tuple[Any, str, str], ...] = (
    (runner, "teacher_forced_scores", "teacher-forced metrics"), (ICELoRAEditor, "generate_many", "greedy answers"),
    (runner, "sample_texts", "fluency samples"), (runner, "continuation_nlls", "perplexities"))


def timed(function: Callable[..., Any], name: str, seconds: dict[str, float]) -> Callable[..., Any]:
    """``function``, adding its wall time to ``seconds[name]`` at each call."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    return wrapper


def baseline_seconds(editor: ICELoRAEditor, records: list[BenchmarkRecord], seed: int) -> float:
    """Wall seconds to make and store the unedited baselines of ``records`` as a run does."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        runner.BaselineStore(Path(folder) / "baselines.jsonl").fill(editor, records, seed, progress=False)
        return time.perf_counter() - start


def evaluation_seconds(editor: ICELoRAEditor, records: list[BenchmarkRecord],
                       seed: int) -> tuple[float, dict[str, float]]:
    """Wall seconds of :func:`measure_edited_many` on ``records`` edited together, and by part."""
    baselines = runner.measure_baselines(editor, records, seed)
    parts: dict[str, float] = {}
    with editor.edit_each([r.request for r in records], progress=False, together=True) as edits, ExitStack() as stack:
        for owner, attribute, name in PARTS:
            stack.enter_context(mock.patch.object(owner, attribute, timed(getattr(owner, attribute), name, parts)))
        start = time.perf_counter()
        runner.measure_edited_many(editor, records, baselines, seed, adapters=edits.adapters)
        total = time.perf_counter() - start
    return total, parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a model name or folder")
    parser.add_argument("--config", default=None, help="an icelora configuration file (a LoRA method)")
    parser.add_argument("--dataset", default="zsre-ice", help="a benchmark file or short name")
    parser.add_argument("--baselines", default="0:128", help="records whose unedited baselines are timed")
    parser.add_argument("--group", default="0:16", help="records edited together whose evaluation is timed")
    parser.add_argument("--steps", type=int, default=2, help="steps each edit of the group trains")
    parser.add_argument("--json", default=None, help="also write the timings here")
    args = parser.parse_args(argv)

    method, config = config_from_file(args.config, max_steps=args.steps)
    editor = ICELoRAEditor(load_model(args.model), method=method, config=config)
    path = resolve_dataset(args.dataset, None)
    for_baselines = load_dataset(path, indices=args.baselines).records
    group = load_dataset(path, indices=args.group).records
    made = baseline_seconds(editor, for_baselines, config.seed)
    total, parts = evaluation_seconds(editor, group, config.seed)
    result = {"code": str(Path(icelora.__file__).resolve().parents[1]), "model": args.model, "config": args.config,
              "baseline_records": len(for_baselines), "baseline_seconds": made,
              "baseline_seconds_per_record": made / len(for_baselines),
              "group_cases": len(group), "evaluation_seconds": total,
              "evaluation_seconds_per_case": total / len(group), "evaluation_parts_seconds": parts}
    print(f"code in {result['code']}")
    print(f"unedited baselines: {made:.1f} s for {len(for_baselines)} records, "
          f"{made / len(for_baselines):.3f} s per record")
    print(f"evaluation of {len(group)} edits together: {total:.1f} s, {total / len(group):.3f} s per case; "
          + ", ".join(f"{name} {parts.get(name, 0.0):.1f} s" for *_, name in PARTS))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
