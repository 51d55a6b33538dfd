"""``icelora compare``: several methods on the same records, each in its own resumable run folder.

The plan comes from a YAML file (``configs/compare.yaml``)::

    model: smollm2-135m
    seed: 0
    single:                      # the single-edit protocol on each data set
      datasets: {zsre-ice: "0:200", recent: "0:200"}
      methods: [none, ft-l, ft-m, lora, ice, ice-lora]
      edits_at_once: 16          # LoRA methods and the unedited reference
    sequential:                  # one growing edit, evaluated every eval_every edits
      datasets: {zsre-ice: "0:100"}
      methods: [ft-m, lora, ice-lora]
      eval_every: 10
    method_configs:              # optional: a YAML of configuration keys per method
      ice-lora: configs/methods/ice-lora.yaml
    targets:                     # checked by ``icelora report --targets`` (icelora.evaluation.targets)
      - {dataset: zsre-ice, method: ice-lora, metric: locality, at_least: 0.90}

Single-edit runs go to ``OUTPUT/<dataset>/<method>/``, sequential ones to
``OUTPUT/sequential-<dataset>/<method>/`` (a data set given as a JSON path is named by its file
stem). Every run is resumed where it stopped; a finished run is only re-read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icelora.config import read_config_file, read_yaml_mapping
from icelora.errors import InvalidConfigError
from icelora.methods import METHODS, method_config

log = logging.getLogger(__name__)

PROTOCOLS = ("single", "sequential")
TOP_KEYS = {"model", "seed", "data_dir", "device", "dtype", "method_configs", "targets", *PROTOCOLS}
PROTOCOL_KEYS = {"single": {"datasets", "methods", "edits_at_once"},
                 "sequential": {"datasets", "methods", "eval_every"}}


@dataclass(frozen=True)
class CompareJob:
    """One run of the study: a method under a protocol on the selected records of a data set."""

    protocol: str
    dataset: str
    indices: str
    method: str
    folder: Path
    edits_at_once: int = 1
    eval_every: int | None = None


@dataclass
class CompareConfig:
    """The parsed study file."""

    jobs_by_protocol: dict[str, dict[str, Any]]
    model: str = "smollm2-135m"
    seed: int = 0
    data_dir: str | None = None
    device: str | None = None
    dtype: str | None = None
    method_configs: dict[str, dict[str, Any]] = field(default_factory=dict)


def _require(condition: bool, path: Path, where: str, message: str) -> None:
    if not condition:
        raise InvalidConfigError(f"{path}: {where}: {message}")


def _beside(study: Path, name: str) -> Path:
    """A path named in the study file: as given when it exists, else relative to the file's folder."""
    given = Path(name)
    return given if given.is_absolute() or given.exists() else study.parent / given


def read_compare_config(path: str | Path) -> CompareConfig:
    """Read and check a study file; errors name the file and the key."""
    path = Path(path)
    data = read_yaml_mapping(path)
    unknown = sorted(set(data) - TOP_KEYS)
    _require(not unknown, path, "top level", f"unknown key(s) {unknown}; known: {sorted(TOP_KEYS)}")
    _require(any(p in data for p in PROTOCOLS), path, "top level", "give 'single' and/or 'sequential'")
    protocols: dict[str, dict[str, Any]] = {}
    for protocol in PROTOCOLS:
        if protocol not in data:
            continue
        section = data[protocol]
        _require(isinstance(section, dict), path, protocol, "must be a mapping")
        unknown = sorted(set(section) - PROTOCOL_KEYS[protocol])
        _require(not unknown, path, protocol, f"unknown key(s) {unknown}; known: {sorted(PROTOCOL_KEYS[protocol])}")
        datasets = section.get("datasets")
        _require(isinstance(datasets, dict) and bool(datasets), path, f"{protocol}.datasets",
                 "must map data set names to record ranges, e.g. {zsre-ice: '0:200'}")
        for name, indices in datasets.items():
            _require(isinstance(indices, str) and bool(indices.strip()), path, f"{protocol}.datasets.{name}",
                     f"must be a record range like '0:200', got {indices!r}")
        methods = section.get("methods")
        _require(isinstance(methods, list) and bool(methods), path, f"{protocol}.methods", "must be a list")
        allowed = set(METHODS) | ({"none"} if protocol == "single" else set())
        bad = [m for m in methods if m not in allowed]
        _require(not bad, path, f"{protocol}.methods", f"unknown method(s) {bad}; choose from {sorted(allowed)}")
        for key in ("edits_at_once", "eval_every"):
            if key in section:
                value = section[key]
                _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, path,
                         f"{protocol}.{key}", f"must be a positive integer, got {value!r}")
        protocols[protocol] = section
    method_configs: dict[str, dict[str, Any]] = {}
    for method, config_path in (data.get("method_configs") or {}).items():
        _require(method in METHODS, path, f"method_configs.{method}", f"unknown method; choose from {list(METHODS)}")
        settings = read_config_file(_beside(path, str(config_path)))
        file_method = settings.pop("method", method)
        _require(file_method == method, path, f"method_configs.{method}",
                 f"{config_path} is a configuration of {file_method!r}")
        method_config(method, **settings)  # validate now, not hours into the study
        method_configs[method] = settings
    if "targets" in data:
        from icelora.evaluation.targets import read_targets

        read_targets(path)  # checked now; ``icelora report --targets`` reads them
    seed = data.get("seed", 0)
    _require(isinstance(seed, int) and not isinstance(seed, bool), path, "seed", f"must be an integer, got {seed!r}")
    return CompareConfig(jobs_by_protocol=protocols, model=str(data.get("model", "smollm2-135m")), seed=seed,
                         data_dir=data.get("data_dir"), device=data.get("device"), dtype=data.get("dtype"),
                         method_configs=method_configs)


def plan_jobs(config: CompareConfig, output: Path) -> list[CompareJob]:
    """Every run of the study, in order: single-edit runs by data set, then sequential ones."""
    jobs = []
    for protocol, section in config.jobs_by_protocol.items():
        for dataset, indices in section["datasets"].items():
            for method in section["methods"]:
                name = dataset_name(dataset)
                prefix = name if protocol == "single" else f"sequential-{name}"
                lora_like = method == "none" or method_config(
                    method, **config.method_configs.get(method, {})).parameterization == "lora"
                jobs.append(CompareJob(
                    protocol=protocol, dataset=dataset, indices=indices, method=method,
                    folder=output / prefix / method,
                    edits_at_once=section.get("edits_at_once", 1) if protocol == "single" and lora_like else 1,
                    eval_every=section.get("eval_every") if protocol == "sequential" else None))
    return jobs


def run_job(job: CompareJob, config: CompareConfig, command: str | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Run (or resume, or re-read) one job and return its aggregate metrics; ``command`` is recorded
    in the run folder as the command that makes it; ``progress``: progress bars on stderr."""
    from icelora.data_utils.dataset import load_dataset, resolve_dataset
    from icelora.evaluation.runner import run_sequential, run_single
    from icelora.icelora_editor import ICELoRAEditor
    from icelora.models import load_model

    dataset = load_dataset(resolve_dataset(job.dataset, config.data_dir), indices=job.indices)
    loaded = load_model(config.model, device=config.device, dtype=config.dtype)
    settings = {**config.method_configs.get(job.method, {}), "seed": config.seed}
    editor = ICELoRAEditor(loaded, method="ice-lora" if job.method == "none" else job.method,
                           config=method_config("ice-lora" if job.method == "none" else job.method, **settings))
    if job.protocol == "sequential":
        return run_sequential(editor, dataset, job.folder, config.seed, True, job.eval_every, command=command,
                              progress=progress)
    return run_single(editor, job.method, dataset, job.folder, config.seed, True, job.edits_at_once, command=command,
                      progress=progress)


def dataset_name(dataset: str) -> str:
    """A study data set's name in folder names (a JSON path's stem)."""
    return Path(dataset).stem if dataset.endswith(".json") else dataset


def select_jobs(config: CompareConfig, output: Path, only: list[str] | None = None,
                datasets: list[str] | None = None, protocols: list[str] | None = None) -> list[CompareJob]:
    """The study's jobs of the methods ``only``, the data sets ``datasets`` and the protocols
    ``protocols`` (each ``None``: all); an error when a name is not in the study or nothing matches."""
    jobs = plan_jobs(config, output)
    for name, chosen, present in (("method", only, {j.method for j in jobs}),
                                  ("dataset", datasets, {dataset_name(j.dataset) for j in jobs}),
                                  ("protocol", protocols, {j.protocol for j in jobs})):
        unknown = sorted(set(chosen or []) - present)
        if unknown:
            raise InvalidConfigError(f"the study has no {name} {unknown}; it has {sorted(present)}")
    selected = [j for j in jobs if (not only or j.method in only)
                and (not datasets or dataset_name(j.dataset) in datasets)
                and (not protocols or j.protocol in protocols)]
    if not selected:
        raise InvalidConfigError("no run of the study matches the chosen methods, data sets and protocols")
    return selected


def run_compare(config: CompareConfig, output: Path, only: list[str] | None = None,
                command: str | None = None, datasets: list[str] | None = None,
                protocols: list[str] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run every job of the study, or those :func:`select_jobs` picks; one summary row per job
    (``progress``: progress bars on stderr)."""
    rows = []
    for job in select_jobs(config, output, only, datasets, protocols):
        log.info("%s %s on %s (%s) -> %s", job.protocol, job.method, job.dataset, job.indices, job.folder)
        metrics = run_job(job, config, command, progress)
        rows.append({"protocol": job.protocol, "dataset": job.dataset, "method": job.method,
                     "folder": str(job.folder), "n_cases": metrics.get("n_cases"),
                     "edit_success": metrics.get("edit_success"), "locality": metrics.get("locality"),
                     "portability": metrics.get("portability"), "fluency_ratio": metrics.get("fluency_ratio"),
                     "seconds_per_edit": metrics.get("seconds_per_edit")})
    return rows
