"""Seconds per edit, steps, peak memory and trainable parameters of each editing method.

Every method edits the same requests, each from the unedited model (single-edit protocol), in one
run. Each request carries 5 context sentences, so the ICE objectives of all methods see the same
contexts.

    python benchmarks/edit_speed.py --model smollm2-135m --edits 5 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import threading
from pathlib import Path

import psutil
import torch

from icelora import ICELoRAEditor, load_model
from icelora.data_utils.templates import template_contexts
from icelora.errors import IceloraError
from icelora.methods import METHODS
from icelora.request import EditRequest

log = logging.getLogger("edit_speed")

#: Counterfactual edits (prompt, target, subject); contexts come from the seeded templates.
EDITS = (
    ("The Eiffel Tower is located in the city of", "Rome", "The Eiffel Tower"),
    ("The mother tongue of Danielle Darrieux is", "English", "Danielle Darrieux"),
    ("The iPhone is produced by", "Microsoft", "The iPhone"),
    ("The Statue of Liberty is located in", "London", "The Statue of Liberty"),
    ("Romeo and Juliet was written by", "Charles Dickens", "Romeo and Juliet"),
    ("People in Brazil speak", "German", "Brazil"),
    ("The Mona Lisa was painted by", "Pablo Picasso", "The Mona Lisa"),
    ("The capital of Japan is", "Seoul", "Japan"),
    ("The largest planet in the solar system is", "Mars", "the solar system"),
    ("The Great Wall can be found in the country of", "Peru", "The Great Wall"),
)


def benchmark_requests(count: int) -> list[EditRequest]:
    """The first ``count`` benchmark edits, each with 5 template contexts."""
    if not 1 <= count <= len(EDITS):
        raise IceloraError(f"--edits must be between 1 and {len(EDITS)}, got {count}")
    requests = []
    for prompt, target, subject in EDITS[:count]:
        bare = EditRequest(prompt=prompt, target=target, subject=subject)
        requests.append(EditRequest(prompt=prompt, target=target, subject=subject,
                                    contexts=tuple(template_contexts(bare, 5))))
    return requests


class PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak on GPU, sampled process RSS on CPU."""

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device, self.interval = device, interval
        self.peak_bytes = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        process = psutil.Process(os.getpid())
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()

    @property
    def mb(self) -> float:
        return self.peak_bytes / 2**20


def time_method(model_name: str, method: str, requests: list[EditRequest], device: str | None,
                dtype: str | None) -> dict:
    """Edit each request from the unedited model with ``method``; seconds, steps, memory."""
    loaded = load_model(model_name, device=device, dtype=dtype)
    editor = ICELoRAEditor(loaded, method=method)
    seconds, steps = [], []
    with PeakMemory(next(editor.model.parameters()).device) as memory:
        for request in requests:
            result = editor.edit(request, progress=False)
            editor.revert()
            seconds.append(result.seconds)
            steps.append(result.steps)
            log.info("%s: %.2f s, %d steps (%s)", method, result.seconds, result.steps, request.prompt)
    trainable, _ = editor.parameter_counts()
    return {"method": method, "median_seconds_per_edit": statistics.median(seconds),
            "min_seconds_per_edit": min(seconds), "max_seconds_per_edit": max(seconds),
            "median_steps": statistics.median(steps), "peak_memory_mb": round(memory.mb, 1),
            "trainable_params": trainable, "seconds_per_edit": seconds, "steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="ft-m,lora,ice,ice-lora", help="comma-separated methods")
    parser.add_argument("--edits", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    try:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise IceloraError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        requests = benchmark_requests(args.edits)
        rows = []
        for method in methods:
            try:
                rows.append(time_method(args.model, method, requests, args.device, args.dtype))
            except torch.OutOfMemoryError as exc:
                rows.append({"method": method, "error": f"out of memory: {str(exc).splitlines()[0]}"})
    except IceloraError as exc:
        print(f"edit_speed: error: {exc}", file=sys.stderr)
        return 2
    ice = next((r for r in rows if r["method"] == "ice" and "error" not in r), None)
    for row in rows:
        if "error" not in row and ice:
            row["ratio_to_ice"] = round(row["median_seconds_per_edit"] / ice["median_seconds_per_edit"], 3)
    probe = load_model(args.model, device=args.device, dtype=args.dtype).model
    report = {"methods": rows, "model": args.model, "device": str(next(probe.parameters()).device),
              "dtype": str(next(probe.parameters()).dtype).removeprefix("torch."), "edits": args.edits,
              "torch_threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    print(f"{'method':<10}{'median s/edit':>14}{'min':>8}{'max':>8}{'steps':>7}{'peak MB':>10}"
          f"{'trainable':>12}{'vs ice':>8}")
    for row in rows:
        if "error" in row:
            print(f"{row['method']:<10}  {row['error']}")
            continue
        ratio = f"{row['ratio_to_ice']:.2f}" if "ratio_to_ice" in row else "-"
        print(f"{row['method']:<10}{row['median_seconds_per_edit']:>14.2f}{row['min_seconds_per_edit']:>8.2f}"
              f"{row['max_seconds_per_edit']:>8.2f}{row['median_steps']:>7.0f}{row['peak_memory_mb']:>10.0f}"
              f"{row['trainable_params']:>12,}{ratio:>8}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
