"""Benchmark records from KnowEdit JSON (ZsRE, WikiData_recent), the ICE data set and MEND-style zsRE.

Every format becomes a :class:`BenchmarkRecord`: the edit request (prompt, target, subject,
contexts) plus what is evaluated after the edit (rephrase prompts, portability and locality items
by sub-type). Formats are recognised from the records' fields, not from file names. Answers come in
many shapes (a string, a list of strings, a list of alias lists); KnowEdit evaluation uses the
first alias, and so does this loader.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icelora.errors import IceloraError, InvalidRequestError
from icelora.request import EditRequest

log = logging.getLogger(__name__)

#: Short data set names and their paths under the data folder.
DATASETS = {
    "zsre": "ZsRE/ZsRE-test-all.json",
    "zsre-ice": "ICE_format/zsre.json",
    "recent": "wiki_recent/recent_test_reconstructed.json",
    "recent-train": "wiki_recent/recent_train.json",
    "zsre-mend": "zsre_mend/zsre_mend_eval_portability_gpt4.json",
}


class DatasetError(IceloraError, ValueError):
    """A benchmark file or record is unusable; the message names file, record and field."""


@dataclass(frozen=True)
class EvalItem:
    """A prompt and the answer expected after it; ``kind`` is the sub-type (e.g. ``Reasoning``)."""

    prompt: str
    answer: str
    kind: str


@dataclass(frozen=True)
class BenchmarkRecord:
    """One benchmark case: the request to edit in and what to evaluate afterwards."""

    index: int
    request: EditRequest
    ground_truth: str | None = None
    #: Every alias the file gives for the answer before the edit (``ground_truth`` is the first).
    ground_truth_aliases: tuple[str, ...] = ()
    rephrase: tuple[str, ...] = ()
    portability: tuple[EvalItem, ...] = ()
    locality: tuple[EvalItem, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class LoadedDataset:
    """Records of one file, which indices were asked for, and the records skipped as invalid."""

    path: Path
    format: str
    records: list[BenchmarkRecord]
    indices: list[int]
    total: int
    skipped: list[dict[str, Any]] = field(default_factory=list)


def default_data_dir() -> Path:
    """``../shared/data`` when it exists (next to a checkout), else ``./data``."""
    shared = Path("..") / "shared" / "data"
    return shared if shared.is_dir() else Path("data")


def resolve_dataset(name_or_path: str, data_dir: str | Path | None = None) -> Path:
    """A path to a benchmark file from a path or a short name (see :data:`DATASETS`)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if name_or_path in DATASETS:
        folder = Path(data_dir) if data_dir is not None else default_data_dir()
        resolved = folder / DATASETS[name_or_path]
        if resolved.is_file():
            return resolved
        raise DatasetError(
            f"data set {name_or_path!r} not found at {resolved}: put the KnowEdit/ICE files under {folder} "
            f"as {DATASETS[name_or_path]} (or pass --data-dir, or a path to the JSON file)"
        )
    if path.suffix or "/" in name_or_path:
        raise DatasetError(f"data file {path} does not exist")
    raise DatasetError(f"unknown data set {name_or_path!r}; give a JSON file or one of {sorted(DATASETS)}")


def first_alias(answer: Any) -> str | None:
    """The first alias of an answer: ``"a"``, ``["a", "b"]`` and ``[["a", "a2"], ["b"]]`` all give ``"a"``."""
    while isinstance(answer, list):
        if not answer:
            return None
        answer = answer[0]
    if answer is None:
        return None
    text = str(answer).strip()
    return text or None


def all_aliases(answer: Any) -> tuple[str, ...]:
    """Every non-empty alias of an answer, in order: ``[["a", "a2"], ["b"]]`` gives ``("a", "a2", "b")``."""
    if isinstance(answer, list):
        return tuple(alias for part in answer for alias in all_aliases(part))
    text = "" if answer is None else str(answer).strip()
    return (text,) if text else ()


def detect_format(record: dict[str, Any]) -> str:
    """``mend`` (src/alt), ``ice`` (KnowEdit fields plus ``context``) or ``knowedit``."""
    if "src" in record and "alt" in record:
        return "mend"
    if "context" in record:
        return "ice"
    if "prompt" in record or "target_new" in record:
        return "knowedit"
    return "unknown"


def _items(groups: Any, where: str) -> tuple[EvalItem, ...]:
    """KnowEdit ``{"Sub_Type": [{"prompt", "ground_truth"}, ...]}`` into items (first alias)."""
    if groups in (None, {}, []):
        return ()
    if not isinstance(groups, dict):
        raise DatasetError(f"{where}: expected an object of sub-types, got {type(groups).__name__}")
    items = []
    for kind, entries in groups.items():
        if isinstance(entries, dict):
            entries = [entries]
        for j, entry in enumerate(entries or []):
            spot = f"{where}.{kind}[{j}]"
            if not isinstance(entry, dict):
                raise DatasetError(f"{spot}: expected an object with prompt and ground_truth")
            prompts = entry.get("prompt")
            prompt_list = prompts if isinstance(prompts, list) else [prompts]
            answer = first_alias(entry.get("ground_truth", entry.get("answer")))
            if answer is None:
                raise DatasetError(f"{spot}: field 'ground_truth' is missing or empty")
            for prompt in prompt_list:
                if not isinstance(prompt, str) or not prompt.strip():
                    raise DatasetError(f"{spot}: field 'prompt' is missing or empty")
                items.append(EvalItem(prompt=prompt.strip(), answer=answer, kind=str(kind)))
    return tuple(items)


def _knowedit_record(raw: dict[str, Any], index: int, where: str) -> BenchmarkRecord:
    for key in ("prompt", "target_new"):
        if key not in raw:
            raise DatasetError(f"{where}: field {key!r} is missing")
    target = first_alias(raw["target_new"])
    if target is None:
        raise DatasetError(f"{where}: field 'target_new' is empty")
    contexts = raw.get("context") or ()
    if isinstance(contexts, str):
        contexts = (contexts,)
    try:
        request = EditRequest(prompt=raw["prompt"], target=target, subject=raw.get("subject"),
                              contexts=tuple(contexts))
    except InvalidRequestError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    rephrase = raw.get("rephrase_prompt") or raw.get("rephrase") or ()
    if isinstance(rephrase, str):
        rephrase = (rephrase,)
    return BenchmarkRecord(
        index=index, request=request, ground_truth=first_alias(raw.get("ground_truth")),
        ground_truth_aliases=all_aliases(raw.get("ground_truth")),
        rephrase=tuple(r.strip() for r in rephrase if isinstance(r, str) and r.strip()),
        portability=_items(raw.get("portability"), f"{where}.portability"),
        locality=_items(raw.get("locality"), f"{where}.locality"),
    )


def _mend_record(raw: dict[str, Any], index: int, where: str) -> BenchmarkRecord:
    for key in ("src", "alt"):
        if key not in raw:
            raise DatasetError(f"{where}: field {key!r} is missing")
    try:
        request = EditRequest(prompt=raw["src"], target=first_alias(raw["alt"]) or "", subject=raw.get("subject"))
    except InvalidRequestError as exc:
        raise DatasetError(f"{where}: {exc} (fields 'src'/'alt')") from None
    locality: tuple[EvalItem, ...] = ()
    if raw.get("loc"):
        answer = first_alias(raw.get("loc_ans"))
        if answer is None:
            raise DatasetError(f"{where}: field 'loc_ans' is missing or empty")
        locality = (EvalItem(prompt=raw["loc"].strip(), answer=answer, kind="NQ"),)
    portability: tuple[EvalItem, ...] = ()
    port = raw.get("portability")
    if isinstance(port, dict) and port.get("New Question"):
        answer = first_alias(port.get("New Answer"))
        if answer is None:
            raise DatasetError(f"{where}: field 'portability.New Answer' is missing or empty")
        portability = (EvalItem(prompt=port["New Question"].strip(), answer=answer, kind="One_Hop"),)
    rephrase = (raw["rephrase"].strip(),) if isinstance(raw.get("rephrase"), str) and raw["rephrase"].strip() else ()
    return BenchmarkRecord(index=index, request=request, ground_truth=first_alias(raw.get("answers")),
                           ground_truth_aliases=all_aliases(raw.get("answers")),
                           rephrase=rephrase, portability=portability, locality=locality)


def parse_record(raw: Any, index: int, path: Path) -> BenchmarkRecord:
    """One raw JSON record into a :class:`BenchmarkRecord`, or a :class:`DatasetError` naming it."""
    where = f"{path} record {index}"
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: expected an object, got {type(raw).__name__}")
    kind = detect_format(raw)
    if kind == "mend":
        return _mend_record(raw, index, where)
    if kind in ("knowedit", "ice"):
        return _knowedit_record(raw, index, where)
    raise DatasetError(f"{where}: not a KnowEdit, ICE or MEND record (no 'prompt'/'target_new' or 'src'/'alt')")


def parse_indices(text: str | None, total: int, limit: int | None = None, where: str = "") -> list[int]:
    """Record indices from ``"0:200"`` (a slice), ``"3,7,9"``, or all; then the first ``limit``."""
    if text:
        try:
            if ":" in text:
                start_text, stop_text = text.split(":", 1)
                start = int(start_text) if start_text else 0
                stop = int(stop_text) if stop_text else total
                indices = list(range(start, stop))
            else:
                indices = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise DatasetError(f"--indices {text!r}: give a range like 0:200 or a list like 3,7,9") from None
        outside = [i for i in indices if not 0 <= i < total]
        if outside or not indices:
            raise DatasetError(f"--indices {text!r} is outside {where} (records 0..{total - 1})")
    else:
        indices = list(range(total))
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"--limit must be at least 1, got {limit}")
        indices = indices[:limit]
    return indices


def load_dataset(path: str | Path, indices: str | None = None, limit: int | None = None,
                 skip_invalid: bool = False) -> LoadedDataset:
    """Load the selected records of a benchmark file.

    A bad record is an error naming file, record index and field, unless ``skip_invalid``: then it
    is left out and listed in ``skipped``.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"data file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not a JSON file ({exc})") from None
    if isinstance(raw, dict):
        raw = raw.get("data", raw.get("records", [raw]))
    if not isinstance(raw, list) or not raw:
        raise DatasetError(f"{path}: expected a non-empty JSON list of records")
    selected = parse_indices(indices, len(raw), limit, where=str(path))
    records, skipped = [], []
    for i in selected:
        try:
            records.append(parse_record(raw[i], i, path))
        except DatasetError as exc:
            if not skip_invalid:
                raise
            log.warning("skipping %s", exc)
            skipped.append({"index": i, "error": str(exc)})
    return LoadedDataset(path=path, format=detect_format(raw[selected[0]]) if selected else "unknown",
                         records=records, indices=[r.index for r in records], total=len(raw), skipped=skipped)
