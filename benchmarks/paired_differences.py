"""Paired differences between two runs on the records both finished: mean and standard error.

    python benchmarks/paired_differences.py BASE_RUN OTHER_RUN [--criterion] [--records asking|other]

Each run is an ``icelora eval`` output folder (its ``cases.jsonl``). For every per-case metric,
the difference OTHER - BASE is taken record by record (records matched by their index; a record
where either run has no value, like ``rephrase`` on WikiData_recent, is left out of that metric)
and reported as its mean ± the standard error of the mean. Two settings run on the same records
differ far less per record than the records differ from each other, so this is the comparison
``reports/tuning.md`` quotes. ``fluency`` is in bits (the n-gram entropy of the generated text).
``--criterion`` adds the tuning criterion of ``reports/tuning.md`` per record: the mean of the
record's rephrase, portability and locality (those it has). A second table gives each run's mean
on the same records, and its fluency_ratio there (mean fluency over mean unedited fluency), so
that runs still in progress can be compared on the records they share. ``--records asking`` keeps
only the records whose locality prompts ask the edited fact (``icelora.evaluation.locality_conflicts``;
found in the data file both runs name), ``--records other`` only the rest. ``--indices`` keeps only
the records given as ``icelora eval`` takes them (``0:64``, ``3,7,9``).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from icelora.data_utils.dataset import parse_indices
from icelora.errors import IceloraError
from icelora.evaluation.locality_conflicts import records_asking_edited_fact
from icelora.evaluation.report_data import RunSummary, read_run_file
from icelora.evaluation.runner import CASES_FILE, read_cases

METRICS = ("edit_success", "rephrase", "portability", "locality", "fluency", "exact_match", "steps")
CRITERION_PARTS = ("rephrase", "portability", "locality")


@dataclass(frozen=True)
class PairedDifference:
    """Mean of OTHER - BASE over ``n`` shared records, and its standard error."""

    metric: str
    n: int
    mean: float
    standard_error: float


def load_cases(folder: Path) -> dict[int, dict]:
    """The run's finished cases by record index."""
    path = folder / CASES_FILE
    if not path.is_file():
        raise SystemExit(f"{folder}: no {CASES_FILE} (not an icelora eval output folder)")
    return {case["index"]: case for case in read_cases(path)}


def with_criterion(cases: dict[int, dict]) -> dict[int, dict]:
    """The cases with ``criterion``: the mean of each one's :data:`CRITERION_PARTS` that it has."""
    out = {}
    for index, case in cases.items():
        parts = [float(case[k]) for k in CRITERION_PARTS if case.get(k) is not None]
        out[index] = {**case, "criterion": sum(parts) / len(parts) if parts else None}
    return out


def paired_differences(base: dict[int, dict], other: dict[int, dict],
                       metrics: tuple[str, ...] = METRICS) -> list[PairedDifference]:
    """Per metric, OTHER - BASE over the records both have a value for (metrics with none left out)."""
    shared = sorted(set(base) & set(other))
    out = []
    for metric in metrics:
        diffs = [float(other[i][metric]) - float(base[i][metric]) for i in shared
                 if base[i].get(metric) is not None and other[i].get(metric) is not None]
        if not diffs:
            continue
        mean = sum(diffs) / len(diffs)
        variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) if len(diffs) > 1 else 0.0
        out.append(PairedDifference(metric, len(diffs), mean, math.sqrt(variance / len(diffs))))
    return out


def shared_means(base: dict[int, dict], other: dict[int, dict],
                 metrics: tuple[str, ...] = METRICS) -> list[tuple[str, int, float, float]]:
    """Per metric, (metric, n, BASE mean, OTHER mean) over the records both have a value for, then
    ``fluency_ratio`` (mean ``fluency`` / mean ``fluency_unedited``) on the records both have those for."""
    shared = sorted(set(base) & set(other))
    out = []
    for metric in metrics:
        both = [i for i in shared if base[i].get(metric) is not None and other[i].get(metric) is not None]
        if both:
            out.append((metric, len(both), sum(float(base[i][metric]) for i in both) / len(both),
                        sum(float(other[i][metric]) for i in both) / len(both)))
    fields = ("fluency", "fluency_unedited")
    both = [i for i in shared if all(run[i].get(f) is not None for run in (base, other) for f in fields)]
    if both:
        ratio = [sum(run[i]["fluency"] for i in both) / sum(run[i]["fluency_unedited"] for i in both)
                 for run in (base, other)]
        out.append(("fluency_ratio", len(both), ratio[0], ratio[1]))
    return out


def select_records(folders: list[Path], which: str, *runs: dict[int, dict]) -> list[dict[int, dict]]:
    """The runs' cases restricted to the records of their data file whose locality prompts ask the
    edited fact (``which="asking"``) or to the others (``"other"``); unchanged for ``"all"``. The runs'
    folders must name the same data file (by sha256)."""
    if which == "all":
        return list(runs)
    try:
        recorded = [read_run_file(f) for f in folders]
    except IceloraError as exc:
        raise SystemExit(f"{exc}, so its data file is unknown and its records cannot be split") from None
    if len({r.get("data_sha256") for r in recorded}) > 1:
        raise SystemExit(f"{' and '.join(map(str, folders))} ran on different data files (data_sha256), so one "
                         "split of record indices does not fit both")
    asking = records_asking_edited_fact(RunSummary(folder=folders[0], run=recorded[0], metrics={}, cases=[]))
    if asking is None:
        raise SystemExit(f"{folders[0]}: its data file was not found, so its records cannot be split")
    keep = (lambda i: i in asking) if which == "asking" else (lambda i: i not in asking)
    return [{i: c for i, c in run.items() if keep(i)} for run in runs]


def only_indices(text: str, runs: list[dict[int, dict]]) -> list[dict[int, dict]]:
    """The runs' cases of the records ``text`` names (a range like ``0:64`` or a list like ``3,7``)."""
    total = max((i for run in runs for i in run), default=-1) + 1
    try:
        wanted = set(parse_indices(text, total, where="the runs' records"))
    except IceloraError as exc:
        raise SystemExit(str(exc)) from None
    return [{i: c for i, c in run.items() if i in wanted} for run in runs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("other", type=Path)
    parser.add_argument("--criterion", action="store_true", help="add the tuning criterion per record")
    parser.add_argument("--records", choices=("all", "asking", "other"), default="all",
                        help="only the records whose locality prompts ask the edited fact, or only the others")
    parser.add_argument("--indices", default=None, help="only these records: a range like 0:64 or a list like 3,7")
    args = parser.parse_args(argv)
    base, other = select_records([args.base, args.other], args.records, load_cases(args.base),
                                 load_cases(args.other))
    if args.indices:
        base, other = only_indices(args.indices, [base, other])
    if args.criterion:
        base, other = with_criterion(base), with_criterion(other)
    rows = paired_differences(base, other, (*METRICS, "criterion") if args.criterion else METRICS)
    if not rows:
        raise SystemExit(f"{args.base} and {args.other} share no finished record")
    chosen = {"all": "", "asking": ", records asking the edited fact", "other": ", records not asking the edited fact"}
    print(f"{args.other.name} - {args.base.name}, paired on shared records{chosen[args.records]} "
          "(mean ± standard error):")
    print("| metric | n | difference |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row.metric} | {row.n} | {row.mean:+.3f} ± {row.standard_error:.3f} |")
    print(f"\nMeans on the same records:\n| metric | n | {args.base.name} | {args.other.name} |\n|---|---|---|---|")
    for metric, n, base_mean, other_mean in shared_means(base, other, METRICS):
        print(f"| {metric} | {n} | {base_mean:.3f} | {other_mean:.3f} |")


if __name__ == "__main__":
    main()
