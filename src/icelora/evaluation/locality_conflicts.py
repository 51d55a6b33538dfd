"""Locality prompts that ask the edited fact itself, and locality measured with and without them.

Some records' locality prompts ask the very relation of the subject that the edit changes, and
expect the answer from before the edit. Record 81 of ZsRE in the ICE format edits "Which was the
constellation for HD 180902?" to "Ophiuchus" and measures locality on "The constellation of HD
180902 is" with "Sagittarius", the old answer. An edit that carries over to other wordings must
change that prompt's answer, so locality there measures how little the edit generalised, not how
little unrelated knowledge moved. These functions find such records from the data file a run
names, so a report can show locality on them and on the other records side by side. The locality
metric itself is unchanged: a run's ``locality`` is still the mean over all its records.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from icelora.data_utils.dataset import BenchmarkRecord, DatasetError, load_dataset, resolve_dataset
from icelora.evaluation.report_data import RunSummary
from icelora.evaluation.runner import sha256_of

log = logging.getLogger(__name__)


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def asks_edited_fact(record: BenchmarkRecord) -> bool:
    """True when one of the record's locality answers is one of the edit prompt's answers from before
    the edit (any alias; compared without case and with white space collapsed)."""
    old = {_normalised(a) for a in (*record.ground_truth_aliases, record.ground_truth or "") if a}
    return any(_normalised(item.answer) in old for item in record.locality)


@lru_cache(maxsize=8)
def _asking_in_file(path: Path, sha256: str) -> frozenset[int]:
    del sha256  # part of the cache key: a changed file is read again
    return frozenset(r.index for r in load_dataset(path).records if asks_edited_fact(r))


def records_asking_edited_fact(run: RunSummary) -> frozenset[int] | None:
    """Indices of the records of the run's data file whose locality prompts ask the edited fact.

    The file is the one ``run.json`` names (``data_file``), or else the data set the run folder is
    named after (``runs/zsre-ice/...``) in the default data folder; either must have the sha256 the
    run recorded. ``None`` (with a warning) where no such file is found or it cannot be read.
    """
    recorded = run.run.get("data_sha256")
    candidates = [Path(run.run["data_file"])] if run.run.get("data_file") else []
    with contextlib.suppress(DatasetError):
        candidates.append(resolve_dataset(run.dataset))
    for path in candidates:
        if path.is_file() and (recorded is None or sha256_of(path) == recorded):
            try:
                return _asking_in_file(path.resolve(), recorded or "")
            except DatasetError as exc:
                log.warning("%s: cannot split locality by records asking the edited fact: %s", run.folder, exc)
                return None
    log.warning("%s: its data file (%s, sha256 %s) was not found; locality is not split by records "
                "asking the edited fact", run.folder, run.run.get("data_file"), recorded)
    return None


@dataclass(frozen=True)
class LocalitySplit:
    """A run's mean locality on records whose locality prompts ask the edited fact, and on the others."""

    n_asking: int
    locality_asking: float | None
    n_other: int
    locality_other: float | None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def locality_split(cases: list[dict], asking: frozenset[int]) -> LocalitySplit:
    """Mean locality of the cases (those with a locality score) split by whether their record is in ``asking``."""
    scored = [c for c in cases if c.get("locality") is not None]
    inside = [float(c["locality"]) for c in scored if c["index"] in asking]
    outside = [float(c["locality"]) for c in scored if c["index"] not in asking]
    return LocalitySplit(len(inside), _mean(inside), len(outside), _mean(outside))
