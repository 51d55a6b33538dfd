"""What the evaluation report shows, read from run folders: one :class:`RunSummary` per run."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icelora.errors import IceloraError
from icelora.evaluation.runner import CASES_FILE, CURVE_FILE, METRICS_FILE, RUN_FILE, aggregate, read_cases

log = logging.getLogger(__name__)

#: Methods in the order the report lists them.
METHOD_ORDER = ("none", "ft-l", "ft-m", "lora", "ice", "ice-lora")
#: (key in metrics.json, column title, decimals) of the main table.
MAIN_COLUMNS = (
    ("n_cases", "n", 0), ("edit_success", "edit succ.", 3), ("rephrase", "rephrase", 3),
    ("portability", "portability", 3), ("locality", "locality", 3), ("fluency", "fluency", 2),
    ("fluency_ratio", "fluency ratio", 3), ("ppl_r", "PPL_r", 3), ("ppl_r_median", "PPL_r median", 3),
    ("exact_match", "exact match", 3),
)
COST_COLUMNS = (
    ("seconds_per_edit", "s / edit", 2), ("seconds_per_case", "s / case", 2), ("median_steps", "median steps", 1),
    ("peak_memory_mb", "peak MB", 0), ("trainable_params", "trainable params", 0),
)


@dataclass
class RunSummary:
    """One run folder: what was asked (``run``), the aggregates, the cases, the sequential curve."""

    folder: Path
    run: dict[str, Any]
    metrics: dict[str, Any]
    cases: list[dict[str, Any]]
    curve: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = True

    @property
    def method(self) -> str:
        return self.run.get("method", "?")

    @property
    def protocol(self) -> str:
        return self.run.get("protocol", "?")

    @property
    def dataset(self) -> str:
        """The data set's short name: the run folder's parent (``runs/zsre-ice/ice-lora``)."""
        name = self.folder.parent.name
        return name.removeprefix("sequential-")

    @property
    def label(self) -> str:
        """The method, or the folder's name when it differs (two runs of one method side by side)."""
        if self.method == "none":
            return "unedited"
        return self.folder.name if self.folder.name != self.method else self.method


def find_run_folders(paths: list[Path]) -> list[Path]:
    """Run folders (holding ``run.json``) given directly or anywhere below the given folders."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise IceloraError(f"run folder {path} does not exist")
        if (path / RUN_FILE).exists():
            found.append(path)
        else:
            found += sorted(p.parent for p in path.rglob(RUN_FILE) if "state" not in p.relative_to(path).parts)
    if not found:
        raise IceloraError(f"no run folder (with {RUN_FILE}) under {', '.join(map(str, paths))}")
    return sorted(dict.fromkeys(found))


def read_run_file(folder: Path) -> dict[str, Any]:
    """The ``run`` object of a run folder's ``run.json``."""
    try:
        return json.loads((folder / RUN_FILE).read_text())
    except FileNotFoundError:
        raise IceloraError(f"{folder}: no {RUN_FILE} (not an icelora eval output folder)") from None
    except json.JSONDecodeError as exc:
        raise IceloraError(f"{folder / RUN_FILE}: not valid JSON ({exc})") from None


def read_run(folder: Path) -> RunSummary:
    """Read one run folder; a run without ``metrics.json`` is summarised from its finished cases."""
    run = read_run_file(folder)
    cases = read_cases(folder / CASES_FILE)
    metrics_path = folder / METRICS_FILE
    complete = metrics_path.exists()
    try:
        metrics = json.loads(metrics_path.read_text()) if complete else aggregate(cases) if cases else {}
    except json.JSONDecodeError as exc:
        raise IceloraError(f"{metrics_path}: not valid JSON ({exc})") from None
    expected = len(run.get("indices") or [])
    if complete and expected and metrics.get("n_cases", 0) < expected:
        complete = False
    curve = read_cases(folder / CURVE_FILE)
    return RunSummary(folder=folder, run=run, metrics=metrics, cases=cases, curve=curve, complete=complete)


def method_rank(summary: RunSummary) -> tuple[int, str]:
    """Sort key: the methods in :data:`METHOD_ORDER`, then any other by name."""
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return order.get(summary.method, len(order)), summary.method


def group_runs(runs: list[RunSummary]) -> dict[tuple[str, str], list[RunSummary]]:
    """Runs by (protocol, data set), methods in report order."""
    groups: dict[tuple[str, str], list[RunSummary]] = {}
    for run in runs:
        groups.setdefault((run.protocol, run.dataset), []).append(run)
    return {k: sorted(v, key=method_rank) for k, v in sorted(groups.items())}


def on_shared_records(runs: list[RunSummary]) -> list[RunSummary]:
    """The runs re-aggregated over the records every one of them has finished (by record index),
    so that a partial run is compared with the others on the same records."""
    shared = set.intersection(*({c["index"] for c in run.cases} for run in runs)) if runs else set()
    restricted = []
    for run in runs:
        cases = [c for c in run.cases if c["index"] in shared]
        restricted.append(RunSummary(folder=run.folder, run=run.run, metrics=aggregate(cases) if cases else {},
                                     cases=cases, complete=run.complete))
    return restricted


def format_value(value: Any, decimals: int) -> str:
    """A table cell: ``-`` for a missing value, integers with thousands separators."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and decimals == 0:
        return f"{round(value):,}"
    if isinstance(value, (int, float)):
        return f"{value:.{decimals}f}"
    return str(value)


def table_rows(runs: list[RunSummary], columns: tuple[tuple[str, str, int], ...]) -> list[list[str]]:
    """One row per run: its label (partial runs marked with their case count) and the columns."""
    return [[row_label(run)] + [format_value(run.metrics.get(key), d) for key, _, d in columns] for run in runs]


def row_label(run: RunSummary) -> str:
    """The run's label in a table, ``(partial)`` added where the run is unfinished."""
    return run.label if run.complete else f"{run.label} (partial)"


def by_type_columns(runs: list[RunSummary], key: str) -> list[str]:
    """The sub-types (of ``portability_by_type`` or ``locality_by_type``) any of the runs has."""
    kinds: set[str] = set()
    for run in runs:
        kinds |= set(run.metrics.get(key) or {})
    return sorted(kinds)


def by_type_rows(runs: list[RunSummary], key: str, kinds: list[str]) -> list[list[str]]:
    """One row per run: its label and its score on each sub-type."""
    return [[row_label(run)] + [format_value((run.metrics.get(key) or {}).get(k), 3) for k in kinds] for run in runs]


def commands(runs: list[RunSummary]) -> list[str]:
    """The distinct commands that produced these runs (as recorded in their ``run.json``)."""
    seen = [r.run.get("command", "").strip() for r in runs]
    return [c for c in dict.fromkeys(seen) if c]


def example_cases(runs: list[RunSummary], count: int = 3) -> list[dict[str, Any]]:
    """The first ``count`` record indices every run of a group holds, with each method's output."""
    edited = [r for r in runs if r.method != "none"]
    if not edited:
        return []
    shared = set.intersection(*({c["index"] for c in r.cases} for r in edited))
    examples = []
    for index in sorted(shared)[:count]:
        first = next(c for c in edited[0].cases if c["index"] == index)
        outputs = {r.label: next(c for c in r.cases if c["index"] == index).get("after") for r in edited}
        examples.append({"index": index, "prompt": first["prompt"], "target": first["target"],
                         "ground_truth": first.get("ground_truth"), "before": first.get("before"),
                         "after": outputs})
    return examples
