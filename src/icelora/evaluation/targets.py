"""Targets of a study (the ``targets`` list of ``configs/compare.yaml``), checked against the runs.

Each target names a run by protocol, data set and method, a metric, and one test::

    - {dataset: zsre-ice, method: ice-lora, metric: locality, at_least: 0.90}
    - {dataset: zsre-ice, method: ice-lora, metric: locality, better_than: [ft-m, ft-m-tuned]}
    - {dataset: zsre-ice, method: ice-lora, metric: portability, not_below: [ft-l, ft-m, lora, ice]}
    - {dataset: zsre-ice, method: ice-lora, metric: rephrase, not_below: [ice], margin: 0.02}

``method`` and the runs compared against are run labels: a method's name for the study's run of
it, a folder's name for a side run (``ft-m-tuned``). ``protocol`` defaults to ``single``.
``better_than``: above the best of those runs; ``not_below``: at least their best minus ``margin``.
A target whose runs are missing or unfinished is reported as not met, with the reason; where the
runs compared against are unfinished, the result adds how the methods compare on the records all
of them have finished, as an indication only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icelora.config import read_yaml_mapping
from icelora.errors import InvalidConfigError
from icelora.evaluation.compare import PROTOCOLS
from icelora.evaluation.report_data import RunSummary, on_shared_records
from icelora.evaluation.runner import aggregate

TESTS = ("at_least", "at_most", "better_than", "not_below")
KEYS = {"protocol", "dataset", "method", "metric", "margin", *TESTS}
#: Whole-run numbers a ``metrics.json`` holds beside the aggregates of its cases.
RUN_METRICS = ("peak_memory_mb", "trainable_params")


def metric_names() -> tuple[str, ...]:
    """The numbers a target may test: every scalar aggregate of a run's cases, and
    :data:`RUN_METRICS` (``better_than`` and ``not_below`` take higher as better)."""
    scalars = [k for k in aggregate([]) if k != "n_cases" and not k.endswith("_by_type")]
    return (*scalars, *RUN_METRICS)


@dataclass(frozen=True)
class Target:
    """One checkable claim about a run's metric."""

    dataset: str
    method: str
    metric: str
    test: str
    value: Any
    protocol: str = "single"
    margin: float = 0.0

    @property
    def description(self) -> str:
        """The target in words, as the report's targets table shows it."""
        where = f"{self.method} {self.metric} ({self.protocol}, {self.dataset})"
        if self.test == "at_least":
            return f"{where} >= {self.value}"
        if self.test == "at_most":
            return f"{where} <= {self.value}"
        if self.test == "better_than":
            if len(self.value) > 1:
                return f"{where} > best of {', '.join(self.value)}"
            return f"{where} > {self.value[0]}'s"
        margin = f" - {self.margin}" if self.margin else ""
        return f"{where} >= best of {', '.join(self.value)}{margin}"


@dataclass(frozen=True)
class TargetResult:
    """A target checked: its description, the measured number (with the runs compared) and the verdict."""

    description: str
    measured: str
    met: bool


def read_targets(path: str | Path) -> list[Target]:
    """The ``targets`` list of a YAML file; errors name the file, the entry and the key."""
    path = Path(path)
    entries = read_yaml_mapping(path).get("targets")
    if not isinstance(entries, list) or not entries:
        raise InvalidConfigError(f"{path}: 'targets' must be a non-empty list")
    targets = []
    for i, entry in enumerate(entries):
        where = f"{path}: targets[{i}]"
        if not isinstance(entry, dict):
            raise InvalidConfigError(f"{where}: must be a mapping")
        unknown = sorted(set(entry) - KEYS)
        missing = [k for k in ("dataset", "method", "metric") if k not in entry]
        tests = [t for t in TESTS if t in entry]
        if unknown or missing or len(tests) != 1:
            raise InvalidConfigError(f"{where}: needs dataset, method, metric and exactly one of {list(TESTS)}"
                                     f"{f'; unknown key(s) {unknown}' if unknown else ''}")
        test, value = tests[0], entry[tests[0]]
        if entry["metric"] not in metric_names():
            raise InvalidConfigError(f"{where}: metric {entry['metric']!r} is not one of {list(metric_names())}")
        if entry.get("protocol", "single") not in PROTOCOLS:
            raise InvalidConfigError(f"{where}: protocol {entry['protocol']!r} is not one of {list(PROTOCOLS)}")
        margin = entry.get("margin", 0.0)
        if "margin" in entry and test != "not_below":
            raise InvalidConfigError(f"{where}: margin applies to not_below only, not to {test}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
            raise InvalidConfigError(f"{where}: margin must be a number >= 0, got {margin!r}")
        if test in ("at_least", "at_most") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InvalidConfigError(f"{where}: {test} must be a number, got {value!r}")
        if test in ("better_than", "not_below"):
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise InvalidConfigError(f"{where}: {test} must be a run or a non-empty list of runs")
            value = tuple(value)
        targets.append(Target(dataset=entry["dataset"], method=entry["method"], metric=entry["metric"],
                              test=test, value=value, protocol=entry.get("protocol", "single"),
                              margin=float(margin)))
    return targets


def _find(runs: list[RunSummary], protocol: str, dataset: str, name: str) -> RunSummary | None:
    """The run named ``name`` by its label: the study's run of a method has its folder named after the
    method (``runs/zsre-ice/ice-lora``), so a side run of the same method (``ice-lora-before-tuning``)
    is not taken for it, and is named by its folder's name instead (``ft-m-tuned``)."""
    for run in runs:
        if run.protocol == protocol and run.dataset == dataset and run.method != "none" and run.label == name:
            return run
    return None


def _metric(runs: list[RunSummary], protocol: str, dataset: str, method: str, metric: str) -> float | None:
    run = _find(runs, protocol, dataset, method)
    if run is None or not run.complete:
        return None
    value = run.metrics.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def _unfinished(runs: list[RunSummary], t: Target) -> str:
    run = _find(runs, t.protocol, t.dataset, t.method)
    value = None if run is None else run.metrics.get(t.metric)
    if run is None or not isinstance(value, (int, float)):
        return "no finished run"
    return f"{value:.3f} so far (partial run, {run.metrics.get('n_cases')} cases); no finished run"


def _on_finished_records(runs: list[RunSummary], t: Target, others: list[str]) -> str:
    """How ``t.method`` compares with ``others`` on the records all their runs have finished, or ""."""
    found = [_find(runs, t.protocol, t.dataset, m) for m in (t.method, *others)]
    if any(r is None for r in found):
        return ""
    shared = on_shared_records([r for r in found if r is not None])
    values = [s.metrics.get(t.metric) for s in shared]
    if not shared[0].cases or not all(isinstance(v, (int, float)) for v in values):
        return ""
    value, rest = values[0], values[1:]
    holds = value > max(rest) if t.test == "better_than" else value >= max(rest) - t.margin
    compared = ", ".join(f"{m} {v:.3f}" for m, v in zip(others, rest))
    return (f"; on the {len(shared[0].cases)} records all have finished: {t.method} {value:.3f} vs {compared}"
            f" ({'would hold' if holds else 'would not hold'} there)")


def check_targets(targets: list[Target], runs: list[RunSummary]) -> list[TargetResult]:
    """Each target against the finished runs (a partial run does not count)."""
    results = []
    for t in targets:
        value = _metric(runs, t.protocol, t.dataset, t.method, t.metric)
        if value is None:
            results.append(TargetResult(t.description, _unfinished(runs, t), False))
            continue
        if t.test == "at_least":
            results.append(TargetResult(t.description, f"{value:.3f}", value >= t.value))
            continue
        if t.test == "at_most":
            results.append(TargetResult(t.description, f"{value:.3f}", value <= t.value))
            continue
        others = {m: _metric(runs, t.protocol, t.dataset, m, t.metric) for m in t.value}
        known = {m: v for m, v in others.items() if v is not None}
        shown = f"{value:.3f} vs " + (", ".join(f"{m} {v:.3f}" for m, v in known.items()) or "nothing")
        missing = sorted(set(others) - set(known))
        if missing:
            indication = _on_finished_records(runs, t, list(others))
            results.append(TargetResult(t.description,
                                        f"{shown}; no finished run of {', '.join(missing)}{indication}", False))
        elif t.test == "better_than":
            results.append(TargetResult(t.description, shown, value > max(known.values())))
        else:
            results.append(TargetResult(t.description, shown, value >= max(known.values()) - t.margin))
    return results
