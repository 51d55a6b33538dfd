"""Time of the protected directions of one module (``lora_projection_energy``), three ways.

    python benchmarks/direction_speed.py --device cuda
    python benchmarks/direction_speed.py --device cpu --positions 48,96 --features 576,1536

For inputs ``X`` [positions, features] on ``--device`` (random, with a decaying spectrum), the
milliseconds until the directions are on that device, median of ``--repeats``:

- ``host svd``: :func:`icelora.input_projection.svd_directions` on a host copy of ``X`` (the
  float64 SVD of ``X^T``), the directions copied back to the device;
- ``device svd``: ``svd_directions`` on the device, ``k`` read from the device;
- ``gram eigh``: :func:`icelora.input_projection.gram_directions` (``X X^T`` [positions, positions]
  in float64 on the device, its eigendecomposition on the host, ``U = X^T V S^-1`` on the device;
  what ``leading_directions`` does off the CPU).

Each row also gives the largest difference between the projections ``U U^T`` of the host SVD
and the other two (the same subspace gives a difference near rounding). On the CPU the first two
are the same computation. ``--positions`` defaults to sizes up to about what one edit's relation anchors
give (416 positions for ZsRE record 1000 on the embedded model).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from icelora.input_projection import gram_directions, svd_directions


def host_svd(inputs: torch.Tensor, energy: float) -> torch.Tensor:
    return svd_directions(inputs.cpu(), energy).to(inputs.device)


def timed(function: Callable[[torch.Tensor, float], torch.Tensor], inputs: torch.Tensor, energy: float,
          repeats: int) -> tuple[float, torch.Tensor]:
    seconds = []
    for _ in range(repeats + 1):  # the first call is a warm-up
        if inputs.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = function(inputs, energy)
        if inputs.is_cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:]) * 1e3, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--positions", default="48,192,400", help="comma-separated numbers of anchor positions")
    parser.add_argument("--features", default="1600,6400", help="comma-separated input widths")
    parser.add_argument("--energy", type=float, default=0.98)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    print(f"{'positions':>9} {'features':>8} {'k':>4} {'host svd ms':>12} {'device svd ms':>14} {'gram eigh ms':>13} "
          f"{'max diff svd':>13} {'max diff gram':>14}")
    for p in (int(v) for v in args.positions.split(",")):
        for n in (int(v) for v in args.features.split(",")):
            scales = torch.logspace(0, -3, n)
            inputs = (torch.randn(p, n, generator=generator) * scales).to(args.device)
            host, u = timed(host_svd, inputs, args.energy, args.repeats)
            on_device, u_device = timed(svd_directions, inputs, args.energy, args.repeats)
            gram, u_gram = timed(gram_directions, inputs, args.energy, args.repeats)
            projector = (u @ u.T).double()
            diffs = [((v @ v.T).double() - projector).abs().max().item() if v.shape == u.shape else float("nan")
                     for v in (u_device, u_gram)]
            print(f"{p:>9} {n:>8} {u.shape[1]:>4} {host:>12.2f} {on_device:>14.2f} {gram:>13.2f} "
                  f"{diffs[0]:>13.1e} {diffs[1]:>14.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
