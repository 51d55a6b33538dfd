"""Where one edit's time goes: torch.profiler over an edit, by phase and by operator.

    python benchmarks/profile_edit.py --shape gpt2-xl --device cuda --dtype bfloat16 --tokenizer DIR
    python benchmarks/profile_edit.py --model smollm2-135m --method ice-lora
    python benchmarks/profile_edit.py --model smollm2-135m --method ice-lora --edit 2 --shapes
    python benchmarks/profile_edit.py --shape gpt2-xl --device cuda --dtype bfloat16 --tokenizer DIR --edits-at-once 32

With ``--edits-at-once K``, K edits trained together (each in its own adapter) take the one edit's
place, and the steps are the joint steps (the most any of them took). The edit runs once untimed
(first-call costs), then once under the profiler. Printed: the wall time and steps; each phase of
the steps (the objective's passes, of which the sampling; the backward pass; the optimizer) with its
host time and, on CUDA, the device time of the kernels it launched (the backward pass's kernels are
launched by autograd's own thread, outside its range); the device's busy fraction (kernel time over
wall time: far under 1 means the host, not the arithmetic, sets the pace) and the number of kernel
launches per step; the work an edit does once (its anchors and, under ``lora_projection_energy``,
the protected directions); then the operators with the most host time and, on CUDA, the most device
time. ``--trace FILE`` also writes a Chrome trace. ``--shapes`` also lists the matrix products by
their shapes (rows x inner x columns), with the rate each ran at, and the share of the products'
time spent at few rows, where a pass is bound by reading the weights rather than by arithmetic.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from edit_speed import SHAPES, benchmark_requests, load_tokenizer, random_model
from torch.profiler import ProfilerActivity, profile, record_function

import icelora.icelora_editor
import icelora.losses
import icelora.sampling_graphs
from icelora import ICELoRAEditor, load_model
from icelora.errors import IceloraError
from icelora.methods import METHOD_PRESETS, METHODS
from icelora.models import EMBEDDED_MODEL
from icelora.request import EditRequest
from icelora.sampling_graphs import CUDA_GRAPHS_SETTINGS

#: Host calls that launch a kernel.
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")

#: Profiler ranges opened around these functions (module, attribute, range name).
PHASES = (
    (icelora.losses.Objective, "__call__", "objective"),
    (icelora.losses, "sample_from_batch", "sampling"),
    (icelora.sampling_graphs.FixedShapeSampler, "__call__", "sampling"),
    (torch.Tensor, "backward", "backward"),
    (torch.optim.Adam, "step", "optimizer"),
)
#: The matrix-product operators ``--shapes`` lists.
PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")
#: Row counts (the product's first dimension) up to which ``--shapes`` counts a product as few-row.
FEW_ROWS = (16, 128)

#: Ranges around the work an edit does once, before its steps (printed per edit, not per step).
EDIT_PHASES = (
    (icelora.icelora_editor.ICELoRAEditor, "anchor_teachers", "anchors"),
    (icelora.icelora_editor, "module_inputs", "protection inputs"),
    (icelora.icelora_editor, "leading_directions_each", "protection directions"),
)


def _ranged(function: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return function(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def phase_ranges() -> Iterator[None]:
    """Open a named profiler range around each phase's function while the block runs."""
    saved = []
    for owner, attribute, name in PHASES + EDIT_PHASES:
        original = getattr(owner, attribute)
        setattr(owner, attribute, _ranged(original, name))
        saved.append((owner, attribute, original))
    try:
        yield
    finally:
        for owner, attribute, original in reversed(saved):
            setattr(owner, attribute, original)


def device_time_us(event: Any, self_only: bool = False) -> float:
    """Device (kernel) time of a profiler event average in microseconds, all of it or its own
    (``self_only``); 0 on the CPU. torch renamed ``cuda_time`` to ``device_time``: either is read."""
    prefix = "self_" if self_only else ""
    for name in (f"{prefix}device_time_total", f"{prefix}cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def product_shape(key: str, shapes: list[list[int]]) -> tuple[int, int, int, int] | None:
    """(batch, rows, inner, columns) of a matrix product from its operator and recorded input
    shapes (``addmm``'s bias comes first), or None where they are not a product's."""
    operands = shapes[1:3] if key == "aten::addmm" else shapes[:2]
    if len(operands) != 2:
        return None
    (a, b) = operands
    if key == "aten::bmm" and len(a) == len(b) == 3:
        return a[0], a[1], a[2], b[2]
    if len(a) == len(b) == 2:
        return 1, a[0], a[1], b[1]
    return None


def print_products(events: Any, steps: int, rows: int, cuda: bool) -> None:
    """The matrix products grouped by shape, most time first, and the share of their time at few rows."""
    timed = []
    for event in events:
        shape = product_shape(event.key, event.input_shapes) if event.key in PRODUCTS else None
        if shape is None:
            continue
        us = device_time_us(event, self_only=True) if cuda else event.self_cpu_time_total
        timed.append((us, event.count, shape))
    total = sum(us for us, _, _ in timed)
    if not total:
        print("no matrix products recorded")
        return
    timed.sort(key=lambda t: t[0], reverse=True)
    clock = "device" if cuda else "host"
    print(f"matrix products by shape ({clock} time; {total / 1e3 / steps:.1f} ms per step in all, the work done "
          "once per edit included)")
    print(f"{'batch x rows x inner x columns':<32} {'calls':>7} {'ms/step':>9} {'us/call':>9} {'GFLOP/s':>8}")
    for us, count, (batch, m, k, n) in timed[:rows]:
        label = f"{batch} x {m} x {k} x {n}" if batch > 1 else f"{m} x {k} x {n}"
        rate = 2 * batch * m * k * n * count / us / 1e3
        print(f"{label:<32} {count:>7} {us / 1e3 / steps:>9.1f} {us / count:>9.1f} {rate:>8.1f}")
    for limit in FEW_ROWS:
        few = sum(us for us, _, (_, m, _, _) in timed if m <= limit)
        print(f"products with at most {limit} rows: {few / total:.0%} of the products' time")


def edit_call(editor: ICELoRAEditor, requests: list[EditRequest]) -> int:
    """Edit ``requests`` (one: :meth:`ICELoRAEditor.edit`; more: trained together, each in its own
    adapter), then undo it; the steps taken (with several edits, the most any of them took)."""
    if len(requests) == 1:
        steps = editor.edit(requests[0], progress=False).steps
        editor.revert()
        return steps
    with editor.edit_each(requests, progress=False, together=True) as edits:
        return max(result.steps for result in edits.results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="a model name or folder (trained weights)")
    parser.add_argument("--shape", default=None, help=f"a randomly initialised model instead: {', '.join(SHAPES)}")
    parser.add_argument("--method", default="ice-lora")
    parser.add_argument("--edit", type=int, default=0, help="which benchmark edit (0-based)")
    parser.add_argument("--edits-at-once", type=int, default=1,
                        help="profile this many benchmark edits (from --edit on) trained together, each in "
                             "its own adapter, instead of one")
    parser.add_argument("--steps", type=int, default=None, help="cap the edit at this many steps")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--tokenizer", default=None, help="with --shape: a folder holding the tokenizer")
    parser.add_argument("--rows", type=int, default=20, help="operators listed per table")
    parser.add_argument("--cuda-graphs", default="auto", choices=sorted(CUDA_GRAPHS_SETTINGS),
                        help="replay ICE's sampling and training passes from CUDA graphs "
                             "(auto: on CUDA; sampling: the sampling passes only)")
    parser.add_argument("--trace", default=None, help="write a Chrome trace to this file")
    parser.add_argument("--shapes", action="store_true",
                        help="also list the matrix products by shape, with their rates (records input shapes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    try:
        if args.method not in METHODS:
            raise IceloraError(f"unknown method {args.method!r}; choose from {list(METHODS)}")
        if args.shape is not None and args.shape not in SHAPES:
            raise IceloraError(f"unknown shape {args.shape!r}; choose from {list(SHAPES)}")
        if args.edits_at_once < 1:
            raise IceloraError(f"--edits-at-once must be at least 1, got {args.edits_at_once}")
        if args.edits_at_once > 1 and METHOD_PRESETS[args.method]["parameterization"] != "lora":
            raise IceloraError(f"--edits-at-once needs a LoRA method; {args.method!r} trains full matrices")
        requests = benchmark_requests(args.edit + args.edits_at_once)[args.edit:]
        if args.shape:
            loaded = random_model(args.shape, args.device, args.dtype, load_tokenizer(args.tokenizer))
        else:
            loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    except IceloraError as exc:
        print(f"profile_edit: {exc}", file=sys.stderr)
        return 2
    editor = ICELoRAEditor(loaded, method=args.method, **({"max_steps": args.steps} if args.steps else {}))
    editor.cuda_graphs = CUDA_GRAPHS_SETTINGS[args.cuda_graphs]
    device = next(editor.model.parameters()).device
    cuda = device.type == "cuda"
    edit_call(editor, requests)  # untimed: first-call costs
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with phase_ranges(), profile(activities=activities, record_shapes=args.shapes) as prof:
        start = time.perf_counter()
        steps_taken = edit_call(editor, requests)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    steps = max(steps_taken, 1)
    together = f", {len(requests)} edits trained together" if len(requests) > 1 else ""
    print(f"{args.method} on {args.shape or args.model} ({device}, {next(editor.model.parameters()).dtype}"
          f"{together}): {wall:.3f} s under the profiler, {steps_taken} steps, {wall / steps * 1e3:.1f} ms per step")
    print(f"{'phase':<12} {'host ms/step':>13} {'device ms/step':>15}")
    host_side = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    by_name = {e.key: e for e in host_side}  # a range also has a device-side twin of the same name
    for name in dict.fromkeys(name for _, _, name in PHASES):
        event = by_name.get(name)
        if event is not None:
            host, on_device = event.cpu_time_total / 1e3 / steps, device_time_us(event) / 1e3 / steps
            print(f"{name:<12} {host:>13.1f} {on_device:>15.1f}")
    print(f"{'once per edit call':<22} {'host ms':>8} {'device ms':>10}")
    for name in dict.fromkeys(name for _, _, name in EDIT_PHASES):
        event = by_name.get(name)
        if event is not None:
            print(f"{name:<22} {event.cpu_time_total / 1e3:>8.1f} {device_time_us(event) / 1e3:>10.1f}")
    if cuda:
        busy = sum(device_time_us(e, self_only=True) for e in host_side) / 1e6  # each kernel counted under its launcher
        launches = sum(e.count for e in events if e.key in LAUNCH_CALLS)
        print(f"device busy {busy:.3f} s of {wall:.3f} s ({busy / wall:.0%}); {launches / steps:.0f} kernel launches "
              "per step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if cuda:
        ranked = sorted(events, key=lambda e: device_time_us(e, self_only=True), reverse=True)[: args.rows]
        print(f"{'operator':<60} {'calls':>7} {'device ms':>10}")
        for event in ranked:
            print(f"{event.key[:60]:<60} {event.count:>7} {device_time_us(event, self_only=True) / 1e3:>10.2f}")
    if args.shapes:
        print_products(prof.key_averages(group_by_input_shape=True), steps, args.rows, cuda)
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
