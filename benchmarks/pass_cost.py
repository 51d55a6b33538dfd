"""What one pass through the model costs on this machine, whatever its size, against an ICE step.

    python benchmarks/pass_cost.py --config configs/ice-lora-frozen-bf16.yaml --dtype bfloat16 --compile

An ICE step on one edit runs at least five passes through the model's blocks: the sampling's
prefill and its ``completion_length - 1`` decode passes (no gradient), then the training passes
(on a CPU the prefix pass and the continuation pass of :mod:`icelora.shared_prefix`), each forward
and backward. Part of a pass's time does not grow with its tokens: every weight is read and each
of the blocks' thousand-odd operations is dispatched however few tokens there are. This measures
that fixed cost on the model's blocks (the output layer apart; the embedded model unless ``--model``):

- forward passes without gradient of 5 rows of 1, 3, 15 and 45 tokens (a decode, the
  continuation, a prompt, a context row's prefill);
- forward and backward of 5 rows of 2 tokens, the gradient starting where an edit's does, at its
  first edited block;
- the output layer on 5 rows, in the editing model's own dtype (``frozen_dtype`` keeps it so);
- with ``--compile``, the same forward passes through ``torch.compile`` (dynamic shapes, compiled
  once), and the compile time.

Then it times one benchmark edit with early stopping off for ``--steps`` steps under ``--config``
and sets the passes' fixed cost beside it; then the same edit with the configuration's stopping
rule, and with ``ice`` (the reference objective on full matrices, float32; its first call, as
``edit_speed.py`` times it without ``--warmup``), and the least share of
``ice``'s time an edit taking that many steps can reach while each of its steps runs these passes:

    fixed cost of a step >= completion_length * forward(5 x 1) + 2 * forward and backward(5 x 2)
                            + completion_length * output layer(5 rows)

Each pass is timed ``--repeats`` times after 3 untimed runs; the least time (printed beside the
median) goes into the bound, so that a busy machine cannot raise it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from edit_speed import benchmark_requests

from icelora import ICELoRAEditor, load_model
from icelora.methods import config_from_file
from icelora.output_layer import output_layer

FORWARD_SHAPES = [(5, 1), (5, 3), (5, 15), (5, 45)]


@dataclass
class Timing:
    """Wall times of one pass, in milliseconds."""

    least: float
    median: float

    def __str__(self) -> str:
        return f"{self.least:.1f} ms (median {self.median:.1f})"


def time_ms(run: Callable[[], object], repeats: int) -> Timing:
    """Least and median wall time of ``run`` over ``repeats`` calls, after 3 untimed ones. The
    least is what the bound uses: a pass takes at least that on this machine, however busy."""
    times = []
    for k in range(repeats + 3):
        start = time.perf_counter()
        run()
        if k >= 3:
            times.append((time.perf_counter() - start) * 1000)
    return Timing(min(times), statistics.median(times))


def some_tokens(body: torch.nn.Module, rows: int, tokens: int) -> torch.Tensor:
    """``rows`` x ``tokens`` token ids drawn from the first thousand of ``body``'s vocabulary, seeded."""
    vocabulary = min(1000, body.get_input_embeddings().num_embeddings)
    return torch.randint(0, vocabulary, (rows, tokens), generator=torch.Generator().manual_seed(0))


def forward_ms(body: Callable[..., object], rows: int, tokens: int, repeats: int) -> Timing:
    """A forward pass of ``body`` (the model's blocks) on ``rows`` x ``tokens`` tokens, no gradient."""
    ids = some_tokens(body, rows, tokens)
    with torch.no_grad():
        return time_ms(lambda: body(input_ids=ids, use_cache=False), repeats)


def forward_backward_ms(body: torch.nn.Module, first: torch.nn.Module, rows: int, tokens: int,
                        repeats: int) -> Timing:
    """Forward and backward of ``body`` on ``rows`` x ``tokens`` tokens, the gradient starting at
    the hidden states that enter block ``first`` (an edit's backward ends at its first edited block)."""
    ids = some_tokens(body, rows, tokens)

    def needs_gradient(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs

    hook = first.register_forward_pre_hook(needs_gradient, with_kwargs=True)
    try:
        return time_ms(lambda: body(input_ids=ids, use_cache=False).last_hidden_state.float().square().mean()
                         .backward(), repeats)
    finally:
        hook.remove()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model name or folder (default: the embedded model)")
    parser.add_argument("--config", default=None, help="YAML of configuration keys (default: the ice-lora preset)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype the blocks' passes are timed in")
    parser.add_argument("--edit", type=int, default=2, help="which benchmark edit (0-based, as edit_speed.py)")
    parser.add_argument("--steps", type=int, default=10, help="steps of the timed edit (early stopping off)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of each pass")
    parser.add_argument("--compile", action="store_true", help="also time the forward passes through torch.compile")
    args = parser.parse_args(argv)
    method, config = config_from_file(args.config, early_stopping=False, max_steps=args.steps)
    editor = ICELoRAEditor(load_model(args.model, device="cpu"), method=method, config=config)
    first = min(editor.layers)
    head = output_layer(editor.model)
    hidden = torch.randn(5, 1, head.in_features, dtype=head.weight.dtype)
    with torch.no_grad():
        logits = time_ms(lambda: head(hidden), args.repeats)
    narrow = load_model(args.model, device="cpu", dtype=args.dtype).model
    body, first_block = narrow.base_model, narrow.get_submodule(editor.architecture.layer_prefix(first))
    print(f"{torch.get_num_threads()} threads, blocks in {args.dtype}, output layer in {head.weight.dtype}, "
          f"first edited block {first}")
    forward = {shape: forward_ms(body, *shape, args.repeats) for shape in FORWARD_SHAPES}
    for (rows, tokens), timing in forward.items():
        print(f"forward, no gradient, {rows} x {tokens} tokens: {timing}", flush=True)
    both = forward_backward_ms(body, first_block, 5, 2, args.repeats)
    print(f"forward and backward, 5 x 2 tokens, the gradient from block {first} on: {both}", flush=True)
    print(f"output layer, 5 rows: {logits}", flush=True)
    if args.compile:
        compiled = torch.compile(body, dynamic=True)
        start = time.perf_counter()
        forward_ms(compiled, 5, 7, 1)
        print(f"torch.compile: first call {time.perf_counter() - start:.0f} s", flush=True)
        for rows, tokens in FORWARD_SHAPES:
            timing = forward_ms(compiled, rows, tokens, args.repeats)
            print(f"compiled forward, {rows} x {tokens} tokens: {timing}; eager {forward[rows, tokens]}", flush=True)
    del narrow, body, first_block
    request = benchmark_requests(args.edit + 1)[args.edit]
    editor.edit(request, progress=False)  # untimed: the frozen copies and first calls
    editor.revert()
    start = time.perf_counter()
    result = editor.edit(request, progress=False)
    step = (time.perf_counter() - start) / result.steps * 1000
    m = config.completion_length
    decode, train, head_ms = forward[5, 1].least, both.least, logits.least
    fixed = m * decode + 2 * train + m * head_ms
    print(f"{method} edit ({args.config or 'preset'}), {result.steps} steps: {step:.0f} ms per step, its "
          f"once-per-edit work included; the passes' fixed cost, {m} x {decode:.1f} + 2 x {train:.1f} + "
          f"{m} x {head_ms:.1f} ms = {fixed:.0f} ms, is {fixed / step:.0%} of it", flush=True)
    editor.revert()
    editor.config = config_from_file(args.config)[1]  # the same keys, its own stopping rule and step cap
    own = editor.edit(request, progress=False)
    editor.revert()
    reference = ICELoRAEditor(load_model(args.model, device="cpu"), method="ice").edit(request, progress=False)
    bound = fixed / 1000 * own.steps
    print(f"with its stopping rule: {own.steps} steps, {own.seconds:.2f} s; ice: {reference.steps} steps, "
          f"{reference.seconds:.2f} s; {method} / ice = {own.seconds / reference.seconds:.2f}, and no less than "
          f"{bound:.2f} / {reference.seconds:.2f} = {bound / reference.seconds:.2f} while each step runs these passes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
