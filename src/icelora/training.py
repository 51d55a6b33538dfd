"""``icelora train``: write a whole data set into one adapter, in minibatches (``batch``) or one
record after another (``sequential``), with a JSONL log and checkpoints to resume from."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from icelora.anchors import joined
from icelora.checkpoint import load_optimizer, save_optimizer
from icelora.config import EditConfig, check_keys, read_yaml_mapping
from icelora.data_utils.dataset import load_dataset, resolve_dataset
from icelora.editing_loop import StepRecord, make_optimizer, run_edit_loop
from icelora.errors import IceloraError, InvalidConfigError
from icelora.icelora_editor import ICELoRAEditor
from icelora.lora_utils import ADAPTER_NAME
from icelora.losses import CyclingObjective, Objective, build_plan
from icelora.methods import method_config
from icelora.models import EMBEDDED_MODEL, load_model

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"
RESOLVED_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"


@dataclass
class TrainConfig:
    """A training run: what to edit in (data set, records), how (method, protocol), and the
    :class:`EditConfig` keys (learning_rate, lora_rank, lambda_ice, seed, layers, ...) in ``edit``."""

    model: str = EMBEDDED_MODEL
    method: str = "ice-lora"
    dataset: str = "zsre-ice"
    data_dir: str | None = None
    indices: str | None = None
    limit: int | None = None
    skip_invalid: bool = False
    protocol: str = "batch"
    batch_size: int = 16
    num_epochs: int = 5
    device: str | None = None
    dtype: str | None = None
    edit: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> EditConfig:
        """Check the run keys and return the resolved edit configuration."""
        if self.protocol not in ("batch", "sequential"):
            raise InvalidConfigError(f"protocol must be 'batch' or 'sequential', got {self.protocol!r}")
        for name in ("batch_size", "num_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidConfigError(f"{name} must be a positive integer, got {value!r}")
        return method_config(self.method, **self.edit)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_train_config(path: str | Path) -> TrainConfig:
    """Read a training YAML: run keys plus any :class:`EditConfig` key at the top level."""
    data = read_yaml_mapping(path)
    run_keys = {f.name for f in dataclasses.fields(TrainConfig)} - {"edit"}
    edit = {k: v for k, v in data.items() if k not in run_keys}
    check_keys(edit, source=str(path))
    config = TrainConfig(**{k: v for k, v in data.items() if k in run_keys}, edit=edit)
    config.validate()
    return config


class TrainLog:
    """Append-only JSONL log of steps or edits."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[dict[str, Any]]:
        """The logged entries; an unfinished last line (a killed run) is cut before more are added."""
        from icelora.evaluation.runner import read_cases

        return read_cases(self.path, repair=True)

    def add(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")


def prepare_output(output: Path, config: TrainConfig, edit_config: EditConfig, resume: bool) -> None:
    resolved = {**config.to_dict(), "edit": edit_config.to_dict()}
    config_path = output / RESOLVED_CONFIG
    if config_path.exists():
        if not resume:
            raise IceloraError(f"{output} already holds a training run; pass --resume to continue it")
        previous = yaml.safe_load(config_path.read_text())
        if previous != resolved:
            changed = sorted(k for k in resolved if previous.get(k) != resolved[k])
            raise IceloraError(f"{output}: cannot resume, the configuration differs in {changed}")
    output.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(resolved, sort_keys=False))


def train(config: TrainConfig, output: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run a training job into ``output`` and return a summary (also in ``output/summary.json``)."""
    output = Path(output)
    edit_config = config.validate()
    dataset = load_dataset(resolve_dataset(config.dataset, config.data_dir), indices=config.indices,
                           limit=config.limit, skip_invalid=config.skip_invalid)
    requests = [r.request for r in dataset.records]
    if not requests:
        raise IceloraError("no valid record selected")
    if config.protocol == "batch":
        n_batches = math.ceil(len(requests) / config.batch_size)
        edit_config = edit_config.replace(max_steps=config.num_epochs * n_batches, early_stopping=False)
    prepare_output(output, config, edit_config, resume)
    loaded = load_model(config.model, device=config.device, dtype=config.dtype)
    editor = ICELoRAEditor(loaded, method=config.method, config=edit_config)
    started = time.perf_counter()
    log_file = TrainLog(output / TRAIN_LOG)
    if config.protocol == "batch":
        with editor.training_precision():  # in the sequential protocol each edit call enters it itself
            _train_batch(editor, requests, config, edit_config, output, log_file, resume)
    else:
        _train_sequential(editor, requests, dataset.indices, output, log_file, resume)
    editor.ledger = list(requests)
    editor.save(output, into_existing=True)
    summary = {"records": len(requests), "indices": dataset.indices, "skipped": dataset.skipped,
               "protocol": config.protocol, "seconds": time.perf_counter() - started,
               "trainable_params": editor.parameter_counts()[0], "data_file": str(dataset.path)}
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _train_batch(editor: ICELoRAEditor, requests: list, config: TrainConfig, edit_config: EditConfig,
                 output: Path, log_file: TrainLog, resume: bool) -> None:
    """Epochs over minibatches, one optimizer step per minibatch, a checkpoint after every epoch."""
    device = next(editor.model.parameters()).device
    batches = [requests[i: i + config.batch_size] for i in range(0, len(requests), config.batch_size)]
    plans = [build_plan(editor.tokenizer, b, edit_config) for b in batches]
    if edit_config.locality_anchor_kind == "general":  # one shared set, computed once
        shared = editor.anchor_teachers(plans[0])
        anchors = [shared] * len(plans)
    else:
        anchors = [editor.anchor_teachers(plan) for plan in plans]
    objectives = [Objective(plan, edit_config, device, a) for plan, a in zip(plans, anchors)]
    if len(objectives) > 1:  # a recorded training pass per minibatch would hold each one's activations at once
        for each in objectives:
            each.cuda_graphs = "sampling"
    objective = CyclingObjective(objectives)
    optimizer = make_optimizer(editor.params, edit_config)
    start = 0
    checkpoints = sorted((output / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if resume and checkpoints:
        latest = checkpoints[-1]
        editor.params.load(latest)
        load_optimizer(optimizer, latest)
        start = int(latest.name.split("-")[1])
        log.info("resuming from %s", latest)

    def on_step(record: StepRecord) -> None:
        step = record.step + 1
        log_file.add({**record.to_dict(), "step": step, "epoch": (step - 1) // len(batches) + 1})
        if step % len(batches) == 0:
            folder = output / CHECKPOINTS / f"step-{step}"
            folder.mkdir(parents=True, exist_ok=True)
            editor.params.save(folder)
            save_optimizer(optimizer, folder)

    distinct = anchors[:1] if edit_config.locality_anchor_kind == "general" else anchors
    every = None if anchors[0] is None else [joined([t for group in distinct for t in group])]
    # under lora_projection_energy: every minibatch's anchors, their inputs measured on the unedited
    # model, so that a run resumed from a checkpoint protects what its first part protected
    with editor.anchors_protected(every, [ADAPTER_NAME], on_unedited=True, resumed=start > 0):
        if start == 0:  # a resumed run's adapter comes from its checkpoint, aligned already
            editor.align_inputs([[pt.ids for plan in plans for pt in plan.encoded]], [ADAPTER_NAME])
        run_edit_loop(editor.model, editor.params, objective, edit_config, optimizer=optimizer, start_step=start,
                      on_step=on_step)


def _train_sequential(editor: ICELoRAEditor, requests: list, indices: list[int], output: Path,
                      log_file: TrainLog, resume: bool) -> None:
    """One edit after another on the same adapter; the adapter is saved after every edit."""
    done = {e["index"] for e in log_file.entries()} if resume else set()
    if done:
        editor.params.load(output)
        editor.ledger = [r for i, r in zip(indices, requests) if i in done]  # what replay draws from
    for index, request in zip(indices, requests):
        if index in done:
            continue
        result = editor.edit(request, progress=False)
        editor.ledger = [r for i, r in zip(indices, requests) if i in done or i == index]
        editor.save(output, into_existing=True)
        done.add(index)
        log_file.add({"index": index, "steps": result.steps, "seconds": result.seconds,
                      "final_loss": result.losses[-1] if result.losses else None})
