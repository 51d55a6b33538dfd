"""Benchmark runs: evaluate each record after editing, write cases as they finish, aggregate.

Protocols:
- ``single``: per record, edit the unedited model, evaluate, revert (KnowEdit / ICE paper tables).
- ``sequential``: edit the records one after another on the same model, evaluate all of them at
  the end and every ``eval_every`` edits.
- ``checkpoint``: evaluate a saved edit (from ``icelora train``) on every record.
Locality and PPL_r always use the original model (``ICELoRAEditor.unedited``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from icelora import __version__
from icelora.config import EditConfig
from icelora.data_utils.dataset import BenchmarkRecord, LoadedDataset
from icelora.errors import IceloraError
from icelora.evaluation.metrics import (
    AnswerPrediction,
    agreement,
    continuation_nlls,
    ngram_entropy,
    perplexity_ratio,
    predict_answers,
    sample_texts,
)
from icelora.evaluation.workers import EditorRecipe, map_in_workers
from icelora.icelora_editor import EditResult, ICELoRAEditor
from icelora.models import LoadedModel
from icelora.replay import SEQUENTIAL_ONLY_KEYS
from icelora.text import starts_with_target
from icelora.tokenization import encode_prompt_target

log = logging.getLogger(__name__)

CASES_FILE = "cases.jsonl"
METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"
CURVE_FILE = "curve.jsonl"
#: run.json keys that may differ between a run and its resumption (the data is identified by its sha256).
#: ``command_as_run``: the command a run was made with, kept where that command no longer
#: reproduces it (the folder renamed, or the method's preset changed since); ``command`` is then the
#: one that does. ``train_together``: whether a group's edits were trained in one
#: batched loop or one after another, which gives each case the same result up to float rounding
#: (as a change of ``device`` does), so a run made one way may be resumed the other; so does
#: ``workers``, the number of processes the cores were split between.
VOLATILE_RUN_KEYS = ("command", "command_as_run", "versions", "device", "data_file", "train_together", "workers")


class RunFolderError(IceloraError):
    """An output folder holds another run, or a run that cannot be resumed."""


@dataclass
class Baseline:
    """What the unedited model does on a record: greedy answer, locality predictions, fluency."""

    before: str
    locality: list[AnswerPrediction]
    fluency: float


def sha256_of(path: Path) -> str:
    """The file's sha256, hex (recorded in ``run.json`` to identify the data)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of icelora and the libraries that decide its numbers (recorded in ``run.json``)."""
    import peft
    import transformers

    return {"icelora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA allocation on GPU; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def greedy_length(editor: ICELoRAEditor, target: str) -> int:
    """Tokens to generate for the before/after text: the target's length plus 4, at least 16."""
    return max(16, len(editor.tokenizer(" " + target, add_special_tokens=False)["input_ids"]) + 4)


def measure_baselines(editor: ICELoRAEditor, records: list[BenchmarkRecord], seed: int) -> list[Baseline]:
    """Evaluate the model as it is now (call on the unedited model) on several records at once."""
    prompts = [r.request.prompt for r in records]
    befores = editor.generate_many(prompts, [greedy_length(editor, r.request.target) for r in records])
    pairs = [(i.prompt, i.answer) for r in records for i in r.locality]
    predictions = iter(predict_answers(editor.model, editor.tokenizer, pairs))
    texts = sample_texts(editor.model, editor.tokenizer, prompts, [seed + r.index for r in records])
    return [Baseline(before=before, locality=[next(predictions) for _ in r.locality], fluency=ngram_entropy(text))
            for r, before, (text, _, _) in zip(records, befores, texts)]


class BaselineStore:
    """Baselines of the unedited model, computed in batches before editing and kept in
    ``baselines.jsonl`` so that a resumed run uses exactly the same ones."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items = {c["index"]: c for c in read_cases(path, repair=True)}

    def fill(self, editor: ICELoRAEditor, records: list[BenchmarkRecord], seed: int, batch_size: int = 64,
             progress: bool = True) -> None:
        """Measure (with the editor's model as it is: call on the unedited one) and store the
        records that have no baseline yet, ``batch_size`` at a time. 64 at a time take half the
        time of 16 on 2 CPU cores, and give all 1301 ZsRE records of the embedded model the same
        baselines byte for byte (``benchmarks/evaluation_speed.py``, README "Speed (measured)")."""
        missing = [r for r in records if r.index not in self.items]
        for start in progress_bar(range(0, len(missing), batch_size), progress, desc="unedited baselines"):
            chunk = missing[start: start + batch_size]
            for record, base in zip(chunk, measure_baselines(editor, chunk, seed)):
                entry = {"index": record.index, "before": base.before, "fluency": base.fluency,
                         "locality": [[list(p.answer_ids), list(p.predicted_ids)] for p in base.locality]}
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(entry) + "\n")
                self.items[record.index] = entry

    def get(self, index: int) -> Baseline:
        """The stored baseline of record ``index``."""
        entry = self.items[index]
        locality = [AnswerPrediction(tuple(a), tuple(p)) for a, p in entry["locality"]]
        return Baseline(before=entry["before"], locality=locality, fluency=entry["fluency"])


def progress_bar(iterable: Sequence[Any] | None, progress: bool, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr over ``iterable`` (or ``total=``), also when stderr is a log file (a
    long run's progress stays readable there); hidden without ``progress`` (``-q``) and when there
    is nothing to count."""
    count = kwargs.get("total") if iterable is None else len(iterable)
    return tqdm(iterable, file=sys.stderr, disable=not progress or count == 0, **kwargs)


def by_kind(values: list[float], kinds: list[str]) -> dict[str, float]:
    """Mean of the values per sub-type (``Reasoning``, ``Relation_Specificity``, ...)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for value, kind in zip(values, kinds):
        groups[kind].append(value)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def teacher_forced_scores(editor: ICELoRAEditor, records: list[BenchmarkRecord],
                          unedited_locality: list[list[AnswerPrediction]],
                          adapters: list[str] | None = None) -> list[dict[str, Any]]:
    """The teacher-forced metrics of several records on the model as it is now: ``edit_success``,
    ``rephrase``, ``portability`` and ``locality`` (each with its by-type means where it has
    types), in one batched prediction over all their prompts. ``unedited_locality[k]`` holds the
    unedited model's predictions on record k's locality items; ``adapters[k]`` routes record k to
    its own adapter (:meth:`ICELoRAEditor.edit_each`)."""
    pairs: list[tuple[str, str]] = []
    owners: list[int] = []
    for k, record in enumerate(records):
        request = record.request
        mine = [(request.prompt, request.target)] + [(p, request.target) for p in record.rephrase]
        mine += [(i.prompt, i.answer) for i in record.portability] + [(i.prompt, i.answer) for i in record.locality]
        pairs += mine
        owners += [k] * len(mine)
    route = None if adapters is None else [adapters[k] for k in owners]
    predictions = predict_answers(editor.model, editor.tokenizer, pairs, adapters=route)
    scores = []
    position = 0
    for k, record in enumerate(records):
        n_reph, n_port, n_loc = len(record.rephrase), len(record.portability), len(record.locality)
        mine = predictions[position: position + 1 + n_reph + n_port + n_loc]
        position += len(mine)
        rephrase = mine[1: 1 + n_reph]
        portability = mine[1 + n_reph: 1 + n_reph + n_port]
        locality = mine[1 + n_reph + n_port:]
        port_scores = [p.accuracy for p in portability]
        loc_scores = [agreement(e, u) for e, u in zip(locality, unedited_locality[k])]
        scores.append({
            "edit_success": mine[0].accuracy,
            "rephrase": statistics.fmean(p.accuracy for p in rephrase) if rephrase else None,
            "portability": statistics.fmean(port_scores) if port_scores else None,
            "portability_by_type": by_kind(port_scores, [i.kind for i in record.portability]),
            "locality": statistics.fmean(loc_scores) if loc_scores else None,
            "locality_by_type": by_kind(loc_scores, [i.kind for i in record.locality]),
        })
    return scores


def measure_edited_many(editor: ICELoRAEditor, records: list[BenchmarkRecord], baselines: list[Baseline],
                        seed: int, adapters: list[str] | None = None) -> list[dict[str, Any]]:
    """All per-case metrics of several records at once, each against its unedited baseline.

    ``adapters[k]`` names the adapter holding record k's edit (:meth:`ICELoRAEditor.edit_each`);
    without it every record is measured on the model as it is now. Every forward pass is batched
    over the records.
    """
    scores = teacher_forced_scores(editor, records, [b.locality for b in baselines], adapters)
    prompts = [r.request.prompt for r in records]
    afters = editor.generate_many(prompts, [greedy_length(editor, r.request.target) for r in records],
                                  adapters=adapters)
    samples = sample_texts(editor.model, editor.tokenizer, prompts, [seed + r.index for r in records],
                           adapters=adapters)
    targets = [encode_prompt_target(editor.tokenizer, r.request.prompt, r.request.target) for r in records]
    scored = [(ids, gen) for _, ids, gen in samples] + [(t.prompt_ids, t.target_ids) for t in targets]
    with editor.unedited():
        nlls = continuation_nlls(editor.model, editor.tokenizer.pad_token_id, scored)
    gen_nlls, target_nlls = nlls[: len(records)], nlls[len(records):]
    return [{**scores[k],
             "fluency": ngram_entropy(samples[k][0]),
             "fluency_unedited": baselines[k].fluency,
             "ppl_r": perplexity_ratio(gen_nlls[k], target_nlls[k]),
             "exact_match": float(starts_with_target(afters[k], record.request.target)),
             "before": baselines[k].before,
             "after": afters[k]}
            for k, record in enumerate(records)]


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregates over cases: means over the cases that have each metric (KnowEdit's pooling)."""
    def per_type(key: str) -> dict[str, float]:
        groups: dict[str, list[float]] = defaultdict(list)
        for case in cases:
            for kind, value in case[key].items():
                groups[kind].append(value)
        return {k: statistics.fmean(v) for k, v in sorted(groups.items())}

    fluency = _mean([c["fluency"] for c in cases])
    fluency_unedited = _mean([c["fluency_unedited"] for c in cases])
    seconds = [c["seconds"] for c in cases if c.get("seconds") is not None]
    case_seconds = [c["case_seconds"] for c in cases if c.get("case_seconds") is not None]
    return {
        "n_cases": len(cases),
        "edit_success": _mean([c["edit_success"] for c in cases]),
        "rephrase": _mean([c["rephrase"] for c in cases]),
        "portability": _mean([c["portability"] for c in cases]),
        "portability_by_type": per_type("portability_by_type"),
        "locality": _mean([c["locality"] for c in cases]),
        "locality_by_type": per_type("locality_by_type"),
        "fluency": fluency,
        "fluency_unedited": fluency_unedited,
        "fluency_ratio": fluency / fluency_unedited if fluency and fluency_unedited else None,
        "ppl_r": _mean([c["ppl_r"] for c in cases]),
        "ppl_r_median": _median([c["ppl_r"] for c in cases]),
        "exact_match": _mean([c["exact_match"] for c in cases]),
        "seconds_per_edit": statistics.fmean(seconds) if seconds else None,
        "seconds_per_case": statistics.fmean(case_seconds) if case_seconds else None,
        "median_steps": statistics.median([c["steps"] for c in cases if c.get("steps") is not None])
        if any(c.get("steps") is not None for c in cases) else None,
    }


def read_cases(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of a JSON-lines file a run appends to.

    Each record is written with its newline in one call, so a last line without one is a write a
    killed run never finished: it is left out, and with ``repair`` (a run about to append) cut from
    the file. Any other unreadable line is an error naming the file and line: nothing is dropped.
    """
    if not path.exists():
        return []
    lines = path.read_bytes().splitlines(keepends=True)
    cases, good_bytes = [], 0
    for number, line in enumerate(lines, 1):
        if not line.endswith(b"\n"):  # only the last line can lack it: a write the run never finished
            log.warning("%s: leaving out an unfinished last line%s", path, " (cut from the file)" if repair else "")
            if repair:
                with open(path, "r+b") as handle:
                    handle.truncate(good_bytes)
            break
        good_bytes += len(line)
        if not line.strip():
            continue
        try:
            case = json.loads(line)
        except json.JSONDecodeError as error:
            raise RunFolderError(f"{path}, line {number}: not a JSON record ({error.msg})") from None
        if not isinstance(case, dict):
            raise RunFolderError(f"{path}, line {number}: a JSON object was expected, got {type(case).__name__}")
        cases.append(case)
    return cases


def with_new_config_keys(run: dict[str, Any]) -> dict[str, Any]:
    """A ``run`` object from an older icelora, its ``config`` completed with the keys added since,
    at their defaults (which keep the older behaviour), so that such a run can be resumed."""
    config = run.get("config")
    if not isinstance(config, dict):
        return run
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(EditConfig)}
    return {**run, "config": {**{k: v for k, v in defaults.items() if k not in config}, **config}}


def resumable_part(run: dict[str, Any]) -> dict[str, Any]:
    """What must match for a run to be resumed: the ``run`` object without its volatile keys and,
    outside the sequential protocol, without the configuration keys that act only there (replay
    of earlier edits: every other protocol edits each record from the unedited model)."""
    stable = {k: v for k, v in run.items() if k not in VOLATILE_RUN_KEYS}
    if stable.get("protocol") != "sequential" and isinstance(stable.get("config"), dict):
        stable["config"] = {k: v for k, v in stable["config"].items() if k not in SEQUENTIAL_ONLY_KEYS}
    return stable


class BenchmarkRun:
    """An output folder: ``run.json`` (what was asked), ``cases.jsonl`` (appended), ``metrics.json``."""

    def __init__(self, folder: Path, run: dict[str, Any], resume: bool) -> None:
        self.folder = folder
        self.run = run
        self.cases_path = folder / CASES_FILE
        folder.mkdir(parents=True, exist_ok=True)
        run_path = folder / RUN_FILE
        if run_path.exists() or self.cases_path.exists():
            if not resume:
                raise RunFolderError(f"{folder} already holds a run; pass --resume to continue it, "
                                     "or choose another --output")
            if run_path.exists():
                previous = with_new_config_keys(json.loads(run_path.read_text()))
                stable, before = resumable_part(run), resumable_part(previous)
                if stable != before:
                    changed = sorted(k for k in set(stable) | set(before) if stable.get(k) != before.get(k))
                    raise RunFolderError(f"{folder}: cannot resume, the run differs in {changed}")
        self.earlier_peak = self._written_peak() if resume else None
        run_path.write_text(json.dumps(run, indent=2) + "\n")
        self.cases = read_cases(self.cases_path, repair=True)

    def _written_peak(self) -> float | None:
        """The peak memory an earlier process wrote into this folder's metrics file, if any."""
        path = self.folder / METRICS_FILE
        try:
            return json.loads(path.read_text()).get("peak_memory_mb") if path.exists() else None
        except json.JSONDecodeError:
            return None

    @property
    def done(self) -> set[int]:
        return {c["index"] for c in self.cases}

    def add(self, case: dict[str, Any]) -> None:
        """Append one finished case and flush it to disk."""
        with open(self.cases_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(case, ensure_ascii=False) + "\n")
            handle.flush()
        self.cases.append(case)

    def finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Write ``metrics.json``: the aggregates plus ``extra``; a resumed run keeps the larger of
        its earlier and its current peak memory."""
        ordered = sorted(self.cases, key=lambda c: c["index"])
        metrics = {**aggregate(ordered), **extra, "run": self.run}
        if self.earlier_peak is not None and metrics.get("peak_memory_mb") is not None:
            metrics["peak_memory_mb"] = max(metrics["peak_memory_mb"], self.earlier_peak)
        (self.folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics


def run_description(editor: ICELoRAEditor, method: str, protocol: str, dataset: LoadedDataset, seed: int,
                    extra: dict[str, Any] | None = None, command: str | None = None) -> dict[str, Any]:
    """The ``run`` object: model, method, hyperparameters, seed, data file and sha256, indices, versions,
    and the command that makes it (default: this process's command line)."""
    device = next(editor.model.parameters()).device
    return {
        "model": editor.model_name, "method": method, "protocol": protocol,
        "config": None if method == "none" else editor.config.to_dict(),
        "layers": None if method == "none" else editor.layers, "seed": seed,
        "data_file": str(dataset.path.resolve()), "data_sha256": sha256_of(dataset.path),
        "data_format": dataset.format, "indices": dataset.indices, "skipped": dataset.skipped,
        "dtype": str(next(editor.model.parameters()).dtype).removeprefix("torch."), "device": str(device),
        "versions": library_versions(), "command": command or " ".join(sys.argv), **(extra or {}),
    }


def case_header(record: BenchmarkRecord) -> dict[str, Any]:
    """The fields a case line starts with: which record, and its request."""
    r = record.request
    return {"index": record.index, "prompt": r.prompt, "target": r.target, "subject": r.subject,
            "ground_truth": record.ground_truth}


@dataclass(frozen=True)
class GroupTask:
    """One group of the single-edit protocol: its records, their unedited baselines, and how to edit them."""

    method: str
    records: list[BenchmarkRecord]
    baselines: list[Baseline]
    seed: int
    edits_at_once: int
    train_together: bool


def edit_group(editor: ICELoRAEditor, task: GroupTask) -> list[dict[str, Any]]:
    """Edit the task's records from the unedited model, measure them and revert: one case each.
    ``case_seconds`` is the group's wall time over its records, ``peak_memory_mb`` this process's."""
    start = time.perf_counter()
    group, base, seed = task.records, task.baselines, task.seed
    editor.revert()
    if task.method == "none":
        measures = measure_edited_many(editor, group, base, seed)
        results: list[EditResult | None] = [None] * len(group)
    elif task.edits_at_once == 1:
        results = [editor.edit(group[0].request, progress=False)]
        measures = measure_edited_many(editor, group, base, seed)
    else:
        with editor.edit_each([r.request for r in group], progress=False, together=task.train_together) as edits:
            measures = measure_edited_many(editor, group, base, seed, adapters=edits.adapters)
            results = list(edits.results)
    editor.revert()
    case_seconds = (time.perf_counter() - start) / len(group)
    memory = round(peak_memory_mb(next(editor.model.parameters()).device), 1)
    return [{**case_header(record), **measure, "steps": result.steps if result else None,
             "seconds": result.seconds if result else None, "case_seconds": case_seconds,
             "peak_memory_mb": memory}
            for record, measure, result in zip(group, measures, results)]


def run_single(editor: ICELoRAEditor, method: str, dataset: LoadedDataset, output: Path, seed: int,
               resume: bool, edits_at_once: int = 1, train_together: bool | None = None,
               command: str | None = None, workers: int = 1,
               load_worker_model: Callable[[], LoadedModel] | None = None, progress: bool = True) -> dict[str, Any]:
    """The single-edit protocol: edit, evaluate, revert, for every record; resumable.

    ``edits_at_once`` > 1 keeps that many records' edits, each in its own adapter
    (:meth:`ICELoRAEditor.edit_each`), and evaluates them in shared batches; each case's result is
    what editing it alone gives, up to float rounding. ``train_together``: train each group in one
    batched loop (default: on CUDA) or one edit after another (default on CPU, where batching the
    training does not pay). The records are grouped by position in the selection, so a resumed run
    forms the same groups. ``method`` ``none`` measures the unedited model, ``edits_at_once``
    records per batch.

    ``workers`` > 1 (CPU only) edits the groups in that many processes, the cores split between
    them (:mod:`icelora.evaluation.workers`), each building its editor from ``load_worker_model()``
    and this editor's method and configuration; cases are written as their groups finish, so
    ``cases.jsonl`` is then in finishing order. The unedited baselines are measured here first.
    ``progress``: show progress bars on stderr.
    """
    if edits_at_once < 1:
        raise IceloraError(f"edits at once must be at least 1, got {edits_at_once}")
    device = next(editor.model.parameters()).device
    check_workers(workers, device, load_worker_model)
    if train_together is None:
        train_together = device.type == "cuda"
    together = train_together and method != "none"
    extra: dict[str, Any] = {}
    if edits_at_once > 1:
        extra = {"edits_at_once": edits_at_once, "train_together": together}
    if workers > 1:
        extra["workers"] = workers
    bench = BenchmarkRun(output, run_description(editor, method, "single", dataset, seed, extra, command), resume)
    groups = [dataset.records[i: i + edits_at_once] for i in range(0, len(dataset.records), edits_at_once)]
    groups = [g for g in groups if any(r.index not in bench.done for r in g)]
    editor.revert()
    baselines = BaselineStore(output / "baselines.jsonl")
    baselines.fill(editor, [r for g in groups for r in g], seed, progress=progress)
    tasks = [GroupTask(method, g, [baselines.get(r.index) for r in g], seed, edits_at_once, together)
             for g in groups]
    if workers > 1:
        recipe = EditorRecipe(load_worker_model, editor.method, editor.config)  # type: ignore[arg-type]
        finished = (cases for _, cases in map_in_workers(edit_group, tasks, recipe, workers))
    else:
        finished = (edit_group(editor, task) for task in tasks)
    with progress_bar(None, progress, total=len(dataset.records), initial=len(bench.done),
                      desc=f"{method} single") as bar:  # closed on an error too
        for cases in finished:
            for case in cases:
                if case["index"] not in bench.done:
                    bench.add(case)
                    bar.update(1)
    return bench.finish({"peak_memory_mb": run_peak_memory(bench.cases, device), "skipped": dataset.skipped,
                         "trainable_params": 0 if method == "none" else editor.parameter_counts()[0]})


def check_workers(workers: int, device: torch.device, load_worker_model: Callable[[], LoadedModel] | None) -> None:
    """Raise :class:`IceloraError` unless ``workers`` processes can run: at least 1; more only on a
    CPU and with a way for each to load the model."""
    if workers < 1:
        raise IceloraError(f"workers must be at least 1, got {workers}")
    if workers > 1 and device.type != "cpu":
        raise IceloraError(f"workers split a CPU's cores between processes; the model is on {device} "
                           "(on a GPU, train edits together instead: --edits-at-once K --train-together yes)")
    if workers > 1 and load_worker_model is None:
        raise IceloraError("workers > 1 needs load_worker_model, the function each worker loads its model with")


def run_peak_memory(cases: list[dict[str, Any]], device: torch.device) -> float:
    """Peak memory of the whole run: this process's peak, or a larger one recorded by an earlier
    (resumed) process in its cases."""
    recorded = [c["peak_memory_mb"] for c in cases if c.get("peak_memory_mb") is not None]
    return max([round(peak_memory_mb(device), 1), *recorded])


def run_checkpoint(editor: ICELoRAEditor, dataset: LoadedDataset, output: Path, seed: int, resume: bool,
                   checkpoint: Path, progress: bool = True) -> dict[str, Any]:
    """Evaluate the edit the editor holds (loaded from ``checkpoint``) on every record."""
    run = run_description(editor, editor.method, "checkpoint", dataset, seed,
                          {"checkpoint": str(checkpoint.resolve()), "edited_requests": len(editor.ledger)})
    bench = BenchmarkRun(output, run, resume)
    device = next(editor.model.parameters()).device
    baselines = BaselineStore(output / "baselines.jsonl")
    todo = [r for r in dataset.records if r.index not in bench.done]
    for case in evaluate_fixed(editor, todo, baselines, seed, desc="checkpoint eval", progress=progress):
        bench.add(case)
    return bench.finish({"peak_memory_mb": run_peak_memory(bench.cases, device), "skipped": dataset.skipped})


def run_sequential(editor: ICELoRAEditor, dataset: LoadedDataset, output: Path, seed: int, resume: bool,
                   eval_every: int | None, command: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Edit the records one after another on one model; evaluate every ``eval_every`` edits and at the end.

    After every edit the accumulated adapter is saved to ``output/state`` and the edit is logged
    in ``output/edits.jsonl``, so ``--resume`` continues with the next record.
    """
    run = run_description(editor, editor.method, "sequential", dataset, seed, {"eval_every": eval_every}, command)
    bench = BenchmarkRun(output, run, resume)
    device = next(editor.model.parameters()).device
    edits_path, curve_path, state = output / "edits.jsonl", output / CURVE_FILE, output / "state"
    edits = read_cases(edits_path, repair=True)
    curve_done = {c["n_edits"] for c in read_cases(curve_path, repair=True)}
    if edits and state.exists():
        editor.params.load(state)
        editor.ledger = [r.request for r in dataset.records if r.index in {e["index"] for e in edits}]
    elif edits and sequential_work_left(dataset.records, bench.done, curve_done, eval_every):
        raise RunFolderError(f"{output}: {edits_path.name} lists {len(edits)} edits but {state} is missing, "
                             "so the edited model cannot be rebuilt; start the run again in a new --output")
    baselines = BaselineStore(output / "baselines.jsonl")
    with editor.unedited():  # all at once, in batches, before the evaluations need them
        baselines.fill(editor, dataset.records, seed, progress=progress)
    done = {e["index"] for e in edits}
    records = dataset.records
    for position, record in enumerate(progress_bar(records, progress, desc="sequential edits"), 1):
        if record.index not in done:
            result = editor.edit(record.request, progress=False)
            editor.save(state)
            entry = {"index": record.index, "steps": result.steps, "seconds": result.seconds,
                     "peak_memory_mb": round(peak_memory_mb(device), 1)}
            with open(edits_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
            edits.append(entry)
        if eval_every and position % eval_every == 0 and position < len(records) and position not in curve_done:
            partial = evaluate_fixed(editor, records[:position], baselines, seed, desc=f"eval after {position}",
                                     progress=progress)
            with open(curve_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"n_edits": position, **aggregate(partial)}) + "\n")
    by_index = {e["index"]: e for e in edits}
    final = [r for r in records if r.index not in bench.done]
    for case in evaluate_fixed(editor, final, baselines, seed, desc="final eval", progress=progress):
        case.update(steps=by_index[case["index"]]["steps"], seconds=by_index[case["index"]]["seconds"])
        bench.add(case)
    peak = run_peak_memory([*bench.cases, *edits], device)
    metrics = bench.finish({"peak_memory_mb": peak, "skipped": dataset.skipped,
                            "trainable_params": editor.parameter_counts()[0]})
    if len(records) not in curve_done:
        with open(curve_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"n_edits": len(records), **aggregate(bench.cases)}) + "\n")
    return metrics


def sequential_work_left(records: list[BenchmarkRecord], evaluated: set[int], curve_done: set[int],
                         eval_every: int | None) -> bool:
    """Whether a sequential run still has records to evaluate or curve points to measure (work
    that needs the edited model; a run with neither needs no saved state to be resumed)."""
    points = set(range(eval_every, len(records), eval_every)) if eval_every else set()
    return any(r.index not in evaluated for r in records) or not points | {len(records)} <= curve_done


def evaluate_fixed(editor: ICELoRAEditor, records: list[BenchmarkRecord], baselines: BaselineStore, seed: int,
                   desc: str = "eval", batch_size: int = 16, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate the model as it is, without editing, against the unedited model's stored baselines
    (computed here for records that have none), ``batch_size`` records per forward pass."""
    if any(r.index not in baselines.items for r in records):
        with editor.unedited():
            baselines.fill(editor, records, seed, progress=progress)
    cases = []
    for start in progress_bar(range(0, len(records), batch_size), progress, desc=desc):
        chunk = records[start: start + batch_size]
        measures = measure_edited_many(editor, chunk, [baselines.get(r.index) for r in chunk], seed)
        cases += [{**case_header(r), **m, "steps": None, "seconds": None} for r, m in zip(chunk, measures)]
    return cases
