"""``icelora eval``: resolve the data set and model, pick the protocol, run it."""

from __future__ import annotations

import argparse
import functools
import shutil
from pathlib import Path
from typing import Any

from icelora.data_utils.dataset import load_dataset, resolve_dataset
from icelora.errors import IceloraError
from icelora.evaluation.runner import run_checkpoint, run_sequential, run_single
from icelora.icelora_editor import ICELoRAEditor
from icelora.models import load_model


def output_paths(output: str) -> tuple[Path, Path | None]:
    """(run folder, extra metrics file): ``x/eval.json`` runs in ``x/eval/`` and copies metrics to it."""
    path = Path(output)
    if path.suffix == ".json":
        return path.with_suffix(""), path
    return path, None


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``icelora eval`` and return the aggregate metrics (also written to the output folder)."""
    from icelora.cli import resolve_config

    if args.method == "none" and args.protocol != "single":
        raise IceloraError("--method none evaluates the unedited model; it runs in the single-edit protocol only")
    if args.checkpoint and args.protocol != "single":
        raise IceloraError("--checkpoint evaluates a saved edit; it takes no --protocol")
    if args.eval_every is not None and args.eval_every < 1:
        raise IceloraError(f"--eval-every must be at least 1, got {args.eval_every}")
    if args.edits_at_once < 1:
        raise IceloraError(f"--edits-at-once must be at least 1, got {args.edits_at_once}")
    if args.edits_at_once > 1 and (args.checkpoint or args.protocol != "single"):
        raise IceloraError("--edits-at-once applies to the single-edit protocol only")
    if args.workers < 1:
        raise IceloraError(f"--workers must be at least 1, got {args.workers}")
    if args.workers > 1 and (args.checkpoint or args.protocol != "single"):
        raise IceloraError("--workers applies to the single-edit protocol only (sequential edits depend on each other)")
    method_none = args.method == "none"
    if method_none:
        args.method = None
    config = resolve_config(args)
    seed = config.seed
    data_path = resolve_dataset(args.dataset, args.data_dir)
    dataset = load_dataset(data_path, indices=args.indices, limit=args.limit, skip_invalid=args.skip_invalid)
    if not dataset.records:
        raise IceloraError(f"{data_path}: no valid record selected")
    folder, metrics_copy = output_paths(args.output)
    progress = not args.quiet

    if args.checkpoint:
        editor = ICELoRAEditor.load(args.checkpoint, model=args.model,
                                    device=args.device, dtype=args.dtype)
        metrics = run_checkpoint(editor, dataset, folder, seed, args.resume, Path(args.checkpoint), progress=progress)
    else:
        load = functools.partial(load_model, args.model, device=args.device, dtype=args.dtype)  # workers load it too
        loaded = load()
        workers = {"workers": args.workers, "load_worker_model": load, "progress": progress}
        editor = ICELoRAEditor(loaded, method=args.method, config=config)
        if method_none:
            metrics = run_single(editor, "none", dataset, folder, seed, args.resume, args.edits_at_once, **workers)
        elif args.protocol == "sequential":
            metrics = run_sequential(editor, dataset, folder, seed, args.resume, args.eval_every, progress=progress)
        else:
            if args.edits_at_once > 1 and config.parameterization != "lora":
                raise IceloraError(f"--edits-at-once needs a LoRA method; {args.method} trains full matrices")
            together = {"auto": None, "yes": True, "no": False}[args.train_together]
            metrics = run_single(editor, args.method, dataset, folder, seed, args.resume, args.edits_at_once,
                                 together, **workers)
    if metrics_copy is not None:
        shutil.copyfile(folder / "metrics.json", metrics_copy)
    return metrics
