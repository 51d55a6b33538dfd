"""Forward and backward time of scaled-dot-product attention on the CPU, by kernel and dtype.

    python benchmarks/attention_backward_speed.py

For the shapes of an editing step on the embedded model (9 query heads of 64 over 3 key-value
heads, a causal boolean mask; 5 rows: one edit's contexts, 80 rows: 16 edits trained together),
the milliseconds of one forward and backward pass, median of ``--repeats``, four ways:

- ``float32``: float32 inputs (the flash-attention kernel, which SDPA picks on the CPU);
- ``bf16 flash``: bfloat16 inputs, the flash-attention kernel;
- ``bf16 math``: bfloat16 inputs, the math kernel;
- ``bf16 as float32``: bfloat16 inputs cast to float32 and the output cast back (what
  :mod:`icelora.attention_precision` does in passes that train).

Each bfloat16 row also gives the output's largest difference from the float32 row and the
relative difference of the query's gradient (bfloat16 rounding of the inputs and outputs).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

#: (rows, tokens) timed: one edit's and 16 edits' training rows, and the sampling prefill's width.
SHAPES = ((5, 14), (80, 14), (5, 40), (80, 34))
WAYS = ("float32", "bf16 flash", "bf16 math", "bf16 as float32")


def attention(way: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One attention call the ``way`` named (:data:`WAYS`)."""
    if way == "bf16 as float32":
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
    backend = SDPBackend.MATH if way == "bf16 math" else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def forward_backward(way: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     upstream: torch.Tensor) -> torch.Tensor:
    """One forward and backward pass of :func:`attention` (each key-value head serving 3 query
    heads, spelled out as transformers does), the query's gradient left in ``q.grad``."""
    q.grad = None
    out = attention(way, q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), mask)
    (out.float() * upstream).sum().backward()
    return out


def median_ms(run: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``run`` over ``repeats`` calls, after one untimed call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'rows':>4} {'tokens':>6} {'way':<16} {'fwd+bwd ms':>10} {'max out diff':>12} {'q grad rel diff':>15}")
    for rows, tokens in SHAPES:
        q32 = torch.randn(rows, 9, tokens, 64, generator=generator)
        k32, v32 = (torch.randn(rows, 3, tokens, 64, generator=generator) for _ in range(2))
        mask = torch.ones(rows, 1, tokens, tokens, dtype=torch.bool).tril()
        upstream = torch.randn(rows, 9, tokens, 64, generator=generator)
        reference = None
        for way in WAYS:
            dtype = torch.float32 if way == "float32" else torch.bfloat16
            q, k, v = (x.to(dtype, copy=True).requires_grad_(True) for x in (q32, k32, v32))
            step = functools.partial(forward_backward, way, q, k, v, mask, upstream)
            ms = median_ms(step, args.repeats)
            out = step().detach().float()
            grad = q.grad.float()
            if reference is None:
                reference = (out, grad)
            out_diff = (out - reference[0]).abs().max().item()
            grad_diff = ((grad - reference[1]).norm() / reference[1].norm()).item()
            print(f"{rows:>4} {tokens:>6} {way:<16} {ms:>10.2f} {out_diff:>12.2e} {grad_diff:>15.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
