"""Early-stopping rules measured on whole edit trajectories, without one run per rule.

    python benchmarks/stopping_trajectories.py record --dataset zsre-ice --indices 1000:1064 \\
        --output reports/validation/trajectories/zsre-ice-1000-1063 [--config C.yaml] [--resume]
    python benchmarks/stopping_trajectories.py simulate reports/validation/trajectories/zsre-ice-1000-1063 \\
        [--rule patience=2,tolerance=0.05 ...] [--base 25 | --versus OTHER_FOLDER] [--per-step]

``record`` edits every selected record for the full ``max_steps`` (early stopping off) and, after
every step, scores the edit as it stands with the benchmark's teacher-forced metrics
(``edit_success``, ``rephrase``, ``portability``, ``locality`` against the unedited model's
predictions), beside the step's own numbers (loss, target cross-entropy, ICE term, whether the
target is learned) and its seconds. An edit stopped after step k holds exactly what the full edit
holds after step k (each step's draws depend on seed and step only), so a stopping rule can be
scored on these trajectories by reading each record's scores at the step the rule stops it. The
output folder is an ``icelora eval`` run folder (``run.json``, ``baselines.jsonl``, ``cases.jsonl``
with one trajectory per record, resumable with ``--resume``; each case and ``metrics.json`` hold
every metric after the last step, as ``icelora eval`` with early stopping off would give them).

``simulate`` applies each ``--rule`` (``EditConfig`` early-stopping keys, as ``key=value`` pairs
separated by commas; ``steps=N`` caps the steps) through the editing loop's own
:func:`icelora.editing_loop.should_stop`, and prints per rule the mean steps, the estimated
seconds per edit (the recorded seconds of the steps it runs, the
edit's preparation included and the probes left out), each metric's mean at the stop, and
each metric's paired difference from stopping after ``--base`` steps (mean ± standard error over
the records); with ``--versus OTHER_FOLDER`` (trajectories of another configuration on the same
records) the differences are from the same rule on that folder's trajectories instead.
``--per-step`` adds each score's mean over the records after every step.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icelora.config import EditConfig
from icelora.data_utils.dataset import BenchmarkRecord, load_dataset, resolve_dataset
from icelora.editing_loop import StepRecord, should_stop
from icelora.errors import IceloraError
from icelora.evaluation.runner import (
    Baseline,
    BaselineStore,
    BenchmarkRun,
    case_header,
    measure_edited_many,
    read_cases,
    run_description,
    teacher_forced_scores,
)
from icelora.icelora_editor import ICELoRAEditor
from icelora.methods import config_from_file
from icelora.models import EMBEDDED_MODEL, load_model

#: Teacher-forced metrics scored after every step.
SCORES = ("edit_success", "rephrase", "portability", "locality")
#: Early-stopping keys a rule may set (``steps`` caps the steps).
RULE_KEYS = ("early_stop_patience", "early_stop_tolerance", "early_stop_target_loss")
RULE_ALIASES = {"patience": "early_stop_patience", "tolerance": "early_stop_tolerance",
                "target_loss": "early_stop_target_loss"}


def trajectory_case(editor: ICELoRAEditor, record_: BenchmarkRecord, baseline: Baseline, seed: int) -> dict[str, Any]:
    """Edit ``record_`` from the unedited model for the editor's full ``max_steps`` and score it
    after every step; the case line ``record`` writes: every metric of ``icelora eval`` after the
    last step at its top level (against the unedited ``baseline``), the per-step entries under
    ``trajectory``. Call it on the unedited model; it is unedited again afterwards."""
    unedited_locality = baseline.locality
    steps: list[dict[str, Any]] = []
    clock = [time.perf_counter()]

    def probe(step: StepRecord) -> None:
        # the step's seconds run from the end of the previous probe (the first step's from the
        # edit's call, so they hold its preparation: tokenizing, the anchors and their directions)
        seconds = time.perf_counter() - clock[0]
        scores = teacher_forced_scores(editor, [record_], [unedited_locality])[0]
        steps.append({**step.to_dict(), "seconds": seconds, **{k: scores[k] for k in SCORES}})
        clock[0] = time.perf_counter()

    start = clock[0]
    result = editor.edit(record_.request, progress=False, on_step=probe)
    final = measure_edited_many(editor, [record_], [baseline], seed)[0]
    editor.revert()
    return {**case_header(record_), **final, "steps": result.steps, "seconds": sum(s["seconds"] for s in steps),
            "case_seconds": time.perf_counter() - start, "trajectory": steps}


def record(args: argparse.Namespace) -> None:
    """Edit each record for the full ``max_steps`` and write its per-step scores."""
    method, config = config_from_file(args.config, early_stopping=False)
    data_path = resolve_dataset(args.dataset, args.data_dir)
    dataset = load_dataset(data_path, indices=args.indices, limit=args.limit)
    if not dataset.records:
        raise IceloraError(f"{data_path}: no record selected")
    editor = ICELoRAEditor(load_model(args.model), method=method, config=config)
    command = shlex.join(["python", "benchmarks/stopping_trajectories.py", *sys.argv[1:]])
    bench = BenchmarkRun(args.output, run_description(editor, method, "trajectory", dataset, config.seed,
                                                      command=command), args.resume)
    editor.revert()
    baselines = BaselineStore(args.output / "baselines.jsonl")
    baselines.fill(editor, dataset.records, config.seed)
    for record_ in dataset.records:
        if record_.index in bench.done:
            continue
        case = trajectory_case(editor, record_, baselines.get(record_.index), config.seed)
        bench.add(case)
        print(f"record {record_.index}: {case['steps']} steps, {case['seconds']:.1f} s", file=sys.stderr)
    bench.finish({"skipped": dataset.skipped})


# -- simulation -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """An early-stopping setting: ``EditConfig`` keys, and ``steps`` (at most this many steps)."""

    label: str
    keys: dict[str, Any]
    steps: int | None

    @classmethod
    def parse(cls, text: str) -> Rule:
        """``patience=2,tolerance=0.05,target_loss=0.1,steps=20``; ``steps=N`` alone: no early stop."""
        keys: dict[str, Any] = {}
        steps = None
        for part in filter(None, text.split(",")):
            name, _, value = part.partition("=")
            name = RULE_ALIASES.get(name.strip(), name.strip())
            if name == "steps":
                steps = int(value)
            elif name in RULE_KEYS:
                keys[name] = None if value.strip() in ("none", "null") else float(value)
            else:
                raise SystemExit(f"rule {text!r}: unknown key {name!r}; known: steps, {', '.join(RULE_ALIASES)}")
        if "early_stop_patience" in keys:
            keys["early_stop_patience"] = int(keys["early_stop_patience"])
        return cls(label=text, keys=keys, steps=steps)

    def stop_step(self, trajectory: list[dict[str, Any]], config: EditConfig) -> int:
        """How many steps the editing loop runs under this rule (1-based count)."""
        cap = min(self.steps or len(trajectory), len(trajectory))
        if not self.keys:
            return cap
        rule_config = config.replace(early_stopping=True, **self.keys)
        history: list[StepRecord] = []
        for entry in trajectory[:cap]:
            history.append(StepRecord(entry["step"], entry["loss"], entry["ft"], entry["ice"],
                                      entry["target_learned"]))
            if should_stop(history, rule_config):
                break
        return len(history)


def at_stop(case: dict[str, Any], steps: int) -> dict[str, Any]:
    """A record's scores and seconds had its edit stopped after ``steps`` steps."""
    entry = case["trajectory"][steps - 1]
    seconds = sum(s["seconds"] for s in case["trajectory"][:steps])
    return {**{k: entry[k] for k in SCORES}, "steps": steps, "seconds": seconds}


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def read_trajectories(folder: Path) -> tuple[list[dict[str, Any]], EditConfig]:
    """A ``record`` folder's cases (one trajectory each) and the configuration they were edited with."""
    cases = read_cases(folder / "cases.jsonl")
    if not cases:
        raise SystemExit(f"{folder}: no recorded trajectory")
    run = json.loads((folder / "run.json").read_text())
    return cases, EditConfig.from_dict(run["config"], source=str(folder / "run.json"))


def simulate(folder: Path, rules: list[Rule], base_steps: int | None,
             versus: Path | None = None) -> list[dict[str, Any]]:
    """Per rule: its mean scores, steps and seconds at the stop, and the paired differences of its
    scores from stopping after ``base_steps`` (default: the recorded steps, i.e. no early stop).

    With ``versus`` (another ``record`` folder), the differences are instead from the same rule
    applied to that folder's trajectories, paired on the records both folders hold."""
    cases, config = read_trajectories(folder)
    other: dict[int, dict[str, Any]] = {}
    other_config = config
    if versus is not None:
        versus_cases, other_config = read_trajectories(versus)
        other = {c["index"]: c for c in versus_cases}
        cases = [c for c in cases if c["index"] in other]
        if not cases:
            raise SystemExit(f"{folder} and {versus}: no record in common")
    rows = []
    for rule in rules:
        stopped = [at_stop(c, rule.stop_step(c["trajectory"], config)) for c in cases]
        if versus is not None:
            base = [at_stop(o, rule.stop_step(o["trajectory"], other_config))
                    for o in (other[c["index"]] for c in cases)]
        else:
            base = [at_stop(c, min(base_steps or len(c["trajectory"]), len(c["trajectory"]))) for c in cases]
        row: dict[str, Any] = {"rule": rule.label, "n": len(cases)}
        for key in (*SCORES, "steps", "seconds"):
            pairs = [(s[key], b[key]) for s, b in zip(stopped, base) if s[key] is not None]
            if not pairs:
                continue
            row[key] = mean_and_error([s for s, _ in pairs])[0]
            row[f"{key}_difference"] = mean_and_error([s - b for s, b in pairs])
        rows.append(row)
    return rows


def per_step_means(folder: Path) -> list[dict[str, Any]]:
    """Per step (1-based count), the mean over the records of every score and of the step's own
    numbers: target cross-entropy, ICE term, the share of edits whose target is learned."""
    cases, _ = read_trajectories(folder)
    steps = min(len(c["trajectory"]) for c in cases)
    rows = []
    for k in range(steps):
        entries = [c["trajectory"][k] for c in cases]
        row: dict[str, Any] = {"steps": k + 1}
        for key in (*SCORES, "ft", "ice", "target_learned"):
            values = [float(e[key]) for e in entries if e.get(key) is not None]
            if values:
                row[key] = sum(values) / len(values)
        rows.append(row)
    return rows


def print_per_step(rows: list[dict[str, Any]]) -> None:
    keys = [k for k in rows[0] if k != "steps"]
    print("Means over the records after each step:")
    print("| steps | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for row in rows:
        print(f"| {row['steps']} | " + " | ".join(f"{row[k]:.3f}" if k in row else "-" for k in keys) + " |")


def print_table(rows: list[dict[str, Any]], base_label: str) -> None:
    keys = [k for k in (*SCORES, "steps", "seconds") if any(k in r for r in rows)]
    print(f"Means at the stop; in brackets the paired difference from {base_label} (± standard error):")
    print("| rule | n | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for row in rows:
        cells = []
        for key in keys:
            if key not in row:
                cells.append("-")
                continue
            mean, error = row[f"{key}_difference"]
            digits = 1 if key in ("steps", "seconds") else 3
            cells.append(f"{row[key]:.{digits}f} ({mean:+.{digits}f} ± {error:.{digits}f})")
        print(f"| {row['rule']} | {row['n']} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="edit each record for the full steps, scoring it after every step")
    rec.add_argument("--dataset", required=True, help="a short name (zsre-ice, recent-train, ...) or a file")
    rec.add_argument("--data-dir", default=None)
    rec.add_argument("--indices", default=None, help="records to use, e.g. 1000:1064")
    rec.add_argument("--limit", type=int, default=None)
    rec.add_argument("--config", default=None, help="a YAML of configuration keys (default: the ice-lora preset)")
    rec.add_argument("--model", default=EMBEDDED_MODEL)
    rec.add_argument("--output", type=Path, required=True)
    rec.add_argument("--resume", action="store_true")
    sim = sub.add_parser("simulate", help="score early-stopping rules on recorded trajectories")
    sim.add_argument("folder", type=Path)
    sim.add_argument("--rule", action="append", default=[],
                     help="e.g. patience=2,tolerance=0.05 (repeatable; default: the recorded configuration's rule)")
    sim.add_argument("--base", type=int, default=None, help="steps of the comparison (default: all recorded)")
    sim.add_argument("--versus", type=Path, default=None,
                     help="another record folder: compare each rule with the same rule on its trajectories")
    sim.add_argument("--per-step", action="store_true", help="also print every score's mean after each step")
    args = parser.parse_args(argv)
    if args.command == "record":
        try:
            record(args)
        except IceloraError as error:
            raise SystemExit(f"error: {error}") from None
        return
    if not (args.folder / "cases.jsonl").is_file():
        raise SystemExit(f"{args.folder}: no cases.jsonl (not a folder written by 'record')")
    run = json.loads((args.folder / "run.json").read_text())
    recorded = run["config"]
    default = (f"patience={recorded['early_stop_patience']},tolerance={recorded['early_stop_tolerance']}"
               + (f",target_loss={recorded['early_stop_target_loss']}" if recorded.get("early_stop_target_loss")
                  else ""))
    rules = [Rule.parse(text) for text in (args.rule or [default])]
    if args.versus is not None:
        base_label = f"the same rule on {args.versus}"
    else:
        base_label = f"{args.base} steps" if args.base else "all recorded steps"
    print_table(simulate(args.folder, rules, args.base, args.versus), base_label)
    if args.per_step:
        print()
        print_per_step(per_step_means(args.folder))


if __name__ == "__main__":
    main()
