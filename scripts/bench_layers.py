"""Covariance layers: time of one batch's loss and backward pass (the step a network takes).

Prints, per layer and batch size, the minimum and median over ``--repeats`` runs of
``layer.nll(y, mean, ...)`` plus ``backward()`` on simulated data, single-threaded by default.

Run: ``.venv/bin/python scripts/bench_layers.py [--repeats 25] [--threads 1]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from covmodules import AR1Matrix, RandomIntercept
from covmodules.layers import GroupedCovariance

DTYPE = torch.float64


def grouped_batch(n: int, levels: int, T: int, g: torch.Generator):
    """``n`` draws of (group, position), duplicates removed, with a response and a mean."""
    key = torch.unique(torch.randint(0, levels, (n,), generator=g) * T
                       + torch.randint(0, T, (n,), generator=g))
    y = torch.randn(len(key), generator=g, dtype=DTYPE)
    mean = torch.zeros(len(key), dtype=DTYPE, requires_grad=True)
    return y, mean, (key // T, key % T)


def timed(step, repeats: int) -> tuple[float, float]:
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times), 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    T, levels = 100, 2000
    layers = {"GroupedCovariance(AR1(100))": GroupedCovariance(AR1Matrix(T), num_levels=levels),
              "RandomIntercept": RandomIntercept(levels)}
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} repeats")
    print(f"{'layer':>28} {'rows':>6} {'min ms':>8} {'median ms':>10}")
    for name, layer in layers.items():
        for n in (800, 3200):
            y, mean, (groups, positions) = grouped_batch(n, levels, T, g)
            index = (groups, positions) if isinstance(layer, GroupedCovariance) else (groups,)

            def step():
                layer.nll(y, mean, *index).backward()

            low, mid = timed(step, args.repeats)
            print(f"{name:>28} {len(y):>6} {low:>8.2f} {mid:>10.2f}")


if __name__ == "__main__":
    main()
