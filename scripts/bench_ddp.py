"""Data-parallel REML: time per AI-REML iteration and per LBFGS / Adam step on 1 and 2 processes.

100,000 subjects x 10 observations (n = 1,000,000): ``y = b0 + b1 t + u_s + e``, a random
intercept, AR(1) within subject and a nugget,

    V = Sum(intercept=Grouped(EqualEntryMatrix(10)), serial=Grouped(AR1Matrix(10)),
            nugget=ScalarMatrix(n))

(block diagonal over subjects: the grouped solver, no ``n x q`` Z). Each process holds a
contiguous share of the subjects as one :class:`~covmodules.distributed.ShardedREML` shard;
several processes run as gloo processes on this machine (``torch.multiprocessing.spawn``).
Measured in one run:

- AI-REML: :class:`~covmodules.optim.AIREML` from the data-driven start to convergence, total
  time / iterations (float64: AIREML works on float64 parameters);
- Adam: one step = one loss and gradient, plus the gradient all-reduce of ``fit``;
- LBFGS: one outer step (strong-Wolfe line search; the evaluations it took are shown),
  float64 and float32 (the model, ``y`` and ``X`` in float32).

Every configuration checks that it reached the same log-likelihood as the first one.

``--crossed``: crossed random intercepts, which do not split by groups, ``y ~ x + (1|A) +
(1|B) (+ (1|C))`` simulated with 200,000 rows and 2,000 × 500 levels, and with InstEval's
73,421 rows and 2,972 × 1,128 × 14 levels. Each process takes a contiguous share of the rows
as a :class:`~covmodules.crossed.CrossedREML`: building it sums the rows' sufficient
statistics and all-reduces them once (the table shows the numbers and bytes reduced; the
rows' distinct code tuples are gathered once too, for the pattern of ``ZᵀZ``); the AI-REML
fit that follows communicates nothing.

    python scripts/bench_ddp.py                      # the full size
    python scripts/bench_ddp.py --subjects 20000     # quicker
    python scripts/bench_ddp.py --crossed            # crossed designs over processes
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from covmodules import (AR1Matrix, BlockDesignMatrix, EqualEntryMatrix, Grouped, MixedModel,
                        ScalarMatrix, Sum, fit)
from covmodules.crossed import CrossedREML
from covmodules.distributed import ShardedREML, world_size
from covmodules.fitting import start_values
from covmodules.optim import AIREML


def data(subjects: int, times: int, seed: int = 0):
    """``y``, ``X`` (intercept, time) and the subject of every row, subject-major."""
    g = torch.Generator().manual_seed(seed)
    n = subjects * times
    t = torch.arange(times, dtype=torch.float64).repeat(subjects)
    X = torch.stack([torch.ones(n, dtype=torch.float64), t], 1)
    z = torch.randn(subjects, times, generator=g, dtype=torch.float64)
    e = torch.zeros_like(z)
    for j in range(times):
        e[:, j] = (0.6 * e[:, j - 1] if j else 0.0) + 0.8 * z[:, j]
    u = 1.5 * torch.randn(subjects, generator=g, dtype=torch.float64)
    y = (X @ torch.tensor([3.0, 0.2], dtype=torch.float64) + u.repeat_interleave(times)
         + e.reshape(-1) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64))
    return y, X, torch.arange(subjects).repeat_interleave(times)


def shard(subjects: int, times: int, rank: int, world: int, dtype: torch.dtype) -> ShardedREML:
    """This process's contiguous share of the subjects as a ShardedREML."""
    y, X, subject = data(subjects, times)
    first, last = rank * subjects // world, (rank + 1) * subjects // world
    rows = slice(first * times, last * times)
    s = subject[rows] - first
    model = Sum(intercept=Grouped(EqualEntryMatrix(times), groups=s),
                serial=Grouped(AR1Matrix(times), groups=s),
                nugget=ScalarMatrix(len(s))).to(dtype)
    return ShardedREML([(model, y[rows].to(dtype), X[rows].to(dtype))], solver="grouped")


def seconds(fn) -> float:
    """Wall time of ``fn()`` between barriers (the slowest process's time)."""
    if world_size() > 1:
        dist.barrier()
    start = time.perf_counter()
    fn()
    if world_size() > 1:
        dist.barrier()
    return time.perf_counter() - start


def torch_steps(objective: ShardedREML, start, method: str, steps: int):
    """``steps`` optimiser steps as :func:`covmodules.fit` takes them: (seconds per step,
    loss evaluations per step, final -logLik)."""
    model = objective.model
    model.set_free_params(start.to(next(model.parameters()).dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.LBFGS(params, lr=1.0, max_iter=20, tolerance_grad=1e-12,
                             tolerance_change=1e-14, history_size=20,
                             line_search_fn="strong_wolfe")
           if method == "lbfgs" else torch.optim.Adam(params, lr=0.05))
    calls, loss = [0], [math.nan]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        value = objective.loss()
        value.backward()
        if world_size() > 1:
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= world_size()
        return value.detach()

    def run():
        for _ in range(steps):
            loss[0] = float(opt.step(closure))

    return seconds(run) / steps, calls[0] / steps, loss[0]


def measure(subjects, times, rank, world, threads, adam_steps, lbfgs_steps):
    torch.set_num_threads(threads)
    row = {}
    for dtype in (torch.float64, torch.float32):
        name = str(dtype).removeprefix("torch.")
        objective = shard(subjects, times, rank, world, dtype)
        start = start_values(objective)
        if dtype == torch.float64:
            run = AIREML(objective)
            total = seconds(lambda: run.run(start))
            result = run.result()
            row["ai", name] = (total / result.iterations, result.iterations, result.loglik)
        row["adam", name] = torch_steps(objective, start, "adam", adam_steps)
        row["lbfgs", name] = torch_steps(objective, start, "lbfgs", lbfgs_steps)
    return row


CROSSED = {"crossed_200k": (200_000, (2000, 500)), "insteval_sized": (73_421, (2972, 1128, 14))}


def crossed_data(n: int, levels: tuple, seed: int = 0):
    """``y ~ x + (1|A) + (1|B) ...``: the codes of each factor, ``y`` and ``X``."""
    g = torch.Generator().manual_seed(seed)
    codes = [torch.randint(0, m, (n,), generator=g) for m in levels]
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = 1.0 + 0.5 * x + torch.randn(n, generator=g, dtype=torch.float64)
    for c, m in zip(codes, levels):
        y = y + 0.6 * torch.randn(m, generator=g, dtype=torch.float64)[c]
    return codes, y, torch.stack([torch.ones(n, dtype=torch.float64), x], 1)


def measure_crossed(name, rank, world, threads) -> dict:
    """Build (sums + one reduction) and fit this process's rows of a crossed design."""
    torch.set_num_threads(threads)
    n, levels = CROSSED[name]
    codes, y, X = crossed_data(n, levels)
    rows = slice(rank * n // world, (rank + 1) * n // world)
    ones = torch.ones(rows.stop - rows.start, 1, dtype=torch.float64)
    model = MixedModel(random={f"f{i}": (BlockDesignMatrix(c[rows], ones, m), ScalarMatrix(m))
                               for i, (c, m) in enumerate(zip(codes, levels))},
                       residual=ScalarMatrix(ones.shape[0]))
    box = {}
    build = seconds(lambda: box.update(objective=CrossedREML(model, y[rows], X[rows])))
    objective = box["objective"]
    total = seconds(lambda: box.update(result=fit(objective)))
    return {"build": build, "fit": total, "iterations": box["result"].iterations,
            "loglik": box["result"].loglik, "numbers": objective.communicated}


def _worker(rank, world, threads, port, args, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    row = (measure_crossed(args.workload, rank, world, threads) if args.crossed else
           measure(args.subjects, args.times, rank, world, threads, args.adam_steps,
                   args.lbfgs_steps))
    if rank == 0:
        torch.save(row, out)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configuration(world: int, threads: int, args) -> dict:
    if world == 1 and args.crossed:
        return measure_crossed(args.workload, 0, 1, threads)
    if world == 1:
        return measure(args.subjects, args.times, 0, 1, threads, args.adam_steps,
                       args.lbfgs_steps)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.pt")
        mp.spawn(_worker, args=(world, threads, free_port(), args, out), nprocs=world,
                 join=True)
        return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=100_000)
    parser.add_argument("--times", type=int, default=10)
    parser.add_argument("--adam-steps", type=int, default=5)
    parser.add_argument("--lbfgs-steps", type=int, default=2)
    parser.add_argument("--crossed", action="store_true",
                        help="crossed designs split by rows (CrossedREML) instead")
    args = parser.parse_args()
    if args.crossed:
        return crossed_table(args)
    cores = os.cpu_count()
    print(f"{args.subjects} subjects x {args.times} observations (n = "
          f"{args.subjects * args.times}), {cores} CPU cores, torch {torch.__version__}, gloo")
    layouts = [(1, 1), (2, 1), (1, 2)]
    rows = {layout: configuration(*layout, args) for layout in layouts}
    base = rows[layouts[0]]
    columns = [("ai", "float64"), ("adam", "float64"), ("lbfgs", "float64"),
               ("adam", "float32"), ("lbfgs", "float32")]
    print("\n| processes x threads | " + " | ".join(
        f"{'AI-REML iteration' if m == 'ai' else m.upper() if m == 'lbfgs' else 'Adam'}"
        f" {d} (s)" for m, d in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for (world, threads), row in rows.items():
        cells = []
        for key in columns:
            value, count, loglik = row[key]
            ratio = base[key][0] / value
            extra = f", {count:.0f} evals" if key[0] == "lbfgs" else ""
            cells.append(f"{value:.3f} ({ratio:.2f}x{extra})")
            if key[1] == "float64" and abs(loglik - base[key][2]) > 1e-8 * abs(base[key][2]):
                raise AssertionError(f"{world} x {threads}: {key} reached {loglik}, "
                                     f"not {base[key][2]}")
        print(f"| {world} x {threads} | " + " | ".join(cells) + " |")
    ai = base["ai", "float64"]
    print(f"\n(speed-up against 1 x 1 in brackets; AI-REML converged in {ai[1]} iterations, "
          f"logLik {ai[2]:.4f}; the LBFGS/Adam logLik agree to 1e-8 in float64)")


def crossed_table(args) -> None:
    print(f"crossed random intercepts split by rows, {os.cpu_count()} CPU cores, torch "
          f"{torch.__version__}, gloo")
    print("\n| workload | processes x threads | build s (sums + reduce) | fit s | iterations "
          "| logLik | numbers all-reduced per fit | MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in CROSSED:
        args.workload = name
        base = None
        for world, threads in [(1, 1), (2, 1), (1, 2)]:
            row = configuration(world, threads, args)
            base = base or row
            if abs(row["loglik"] - base["loglik"]) > 1e-8 * abs(base["loglik"]):
                raise AssertionError(f"{name} {world} x {threads}: logLik {row['loglik']}, "
                                     f"not {base['loglik']}")
            numbers = row["numbers"] if world > 1 else 0
            print(f"| {name} | {world} x {threads} | {row['build']:.2f} | {row['fit']:.2f} | "
                  f"{row['iterations']} | {row['loglik']:.4f} | {numbers:,} | "
                  f"{8 * numbers / 2 ** 20:.1f} |")
    print("\n(one process reduces nothing; every layout reaches the 1 x 1 logLik to 1e-8)")


if __name__ == "__main__":
    main()
