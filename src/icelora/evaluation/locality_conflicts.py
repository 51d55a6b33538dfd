"""Locality prompts that ask about the edited subject and expect the answer the edit replaces.

Some records' locality prompts ask about the edited subject and expect the answer from before the
edit, mostly by asking the edited relation again. Record 81 of ZsRE in the ICE format edits "Which
was the constellation for HD 180902?" to "Ophiuchus" and measures locality on "The constellation of
HD 180902 is" with "Sagittarius", the old answer. An edit that carries over to other wordings must
change that prompt's answer, so locality there measures how little the edit generalised, not how
little unrelated knowledge moved. A few such prompts ask another relation whose answer happens to
be the same (ZsRE record 106 edits a player's team and asks who drafted him; both were the
Philadelphia 76ers). These functions find such records from the data file a run names, so a
report can show locality on them and on the other records side by side. The locality metric itself
is unchanged: a run's ``locality`` is still the mean over all its records.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from icelora.data_utils.dataset import BenchmarkRecord, DatasetError, load_dataset, resolve_dataset
from icelora.evaluation.report_data import RunSummary
from icelora.evaluation.runner import sha256_of

log = logging.getLogger(__name__)


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def asks_edited_fact(record: BenchmarkRecord) -> bool:
    """True when one of the record's locality prompts names the edited subject and expects one of the
    edit prompt's answers from before the edit, which the edit's target is not.

    Old answers are compared with every alias the file gives, a locality answer by its first alias;
    case is ignored and white space collapsed. Without a subject, any locality prompt counts.
    """
    old = {_normalised(a) for a in record.ground_truth_aliases or (record.ground_truth or "",) if a}
    old.discard(_normalised(record.request.target))
    subject = _normalised(record.request.subject or "")
    return any(_normalised(item.answer) in old and subject in _normalised(item.prompt) for item in record.locality)


@lru_cache(maxsize=8)
def _asking_in_file(path: Path, sha256: str) -> frozenset[int]:
    del sha256  # part of the cache key: a changed file is read again
    return frozenset(r.index for r in load_dataset(path).records if asks_edited_fact(r))


def records_asking_edited_fact(run: RunSummary) -> frozenset[int] | None:
    """Indices of the records of the run's data file whose locality prompts ask the edited fact.

    The file is the one ``run.json`` names (``data_file``; a relative path is taken from the run
    folder), or else the data set the run folder is named after (``runs/zsre-ice/...``) in the
    default data folder; either must have the sha256 the run recorded. ``None`` (with a warning)
    where no such file is found, it cannot be read, or the run recorded no sha256 to check it by.
    """
    recorded = run.run.get("data_sha256")
    if not recorded:
        log.warning("%s: run.json records no data_sha256, so its data file cannot be checked; locality is "
                    "not split by records asking the edited fact", run.folder)
        return None
    candidates = []
    if run.run.get("data_file"):
        named = Path(run.run["data_file"]).expanduser()
        candidates.append(named if named.is_absolute() else run.folder / named)
    with contextlib.suppress(DatasetError):
        candidates.append(resolve_dataset(run.dataset))
    for path in candidates:
        if path.is_file() and sha256_of(path) == recorded:
            try:
                return _asking_in_file(path.resolve(), recorded)
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


def locality_split(cases: list[dict[str, Any]], asking: frozenset[int]) -> LocalitySplit:
    """Mean locality of the cases (those with a locality score) split by whether their record is in ``asking``."""
    scored = [c for c in cases if c.get("locality") is not None]
    inside = [float(c["locality"]) for c in scored if c["index"] in asking]
    outside = [float(c["locality"]) for c in scored if c["index"] not in asking]
    return LocalitySplit(len(inside), _mean(inside), len(outside), _mean(outside))
