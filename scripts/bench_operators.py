"""Peak memory and backward time of operator trees: closed-form backward vs plain autograd.

For each tree, ``loss = (V * C).sum()`` with a fixed random ``C`` and ``loss.backward()``:

- closed form: ``V = module()`` (``CovarianceFunction``: backward = the modules' ``_vjp``);
- autograd: ``V = module._evaluate(module._natural(module._full_raw(free)))`` with ``free``
  requiring grad, so autograd records and differentiates the construction itself.

Peak memory is the highest level of memory allocated during forward + backward above the
level at the start (``V``, the loss's temporaries, the cotangent and everything the backward
allocates; ``C`` and the module's own buffers exist before and are not counted). On CUDA it
is ``torch.cuda.max_memory_allocated``; on CPU the allocator's events recorded by
``torch.profiler`` (``profile_memory=True``), summed in time order. Backward time is the
median wall time of ``loss.backward()`` alone (forward excluded), without the profiler.

Run: ``.venv/bin/python scripts/bench_operators.py [--repeats 5] [--device cpu|cuda]``.
"""

import argparse
import contextlib
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from covmodules import (AR1Matrix, CovariancePropagation, Grouped, HadamardProduct,
                        KroneckerProduct, ScalarMatrix, Sum)

N = 3000


def one_hot(codes, q):
    Z = torch.zeros(len(codes), q, dtype=torch.float64)
    Z[torch.arange(len(codes)), codes] = 1.0
    return Z


def mixed_model_sum(g):
    """Six terms at n = 3000: 200 subjects x 15 visits, 60 blocks, 10 sites.

    Three random intercepts ``Z_k σ_k² I Z_kᵀ`` (one-hot ``Z_k``: site q=10, block q=60,
    subject q=200), a known relationship matrix with its own variance
    ``HadamardProduct(ScalarMatrix(1), K)``, AR(1) serial correlation within subject
    ``Grouped(AR1Matrix(15), subject)`` and a nugget ``ScalarMatrix(n)``.
    """
    rows = torch.arange(N)
    subject, visit = rows // 15, rows % 15
    block = subject % 60
    site = subject % 10
    L = torch.randn(N, 50, generator=g, dtype=torch.float64) / 50 ** 0.5
    K = L @ L.T + torch.eye(N, dtype=torch.float64)
    return Sum(site=CovariancePropagation(one_hot(site, 10), ScalarMatrix(10)),
               block=CovariancePropagation(one_hot(block, 60), ScalarMatrix(60)),
               subject=CovariancePropagation(one_hot(subject, 200), ScalarMatrix(200)),
               genetic=HadamardProduct(scale=ScalarMatrix(1), K=K),
               serial=Grouped(AR1Matrix(15), groups=subject, positions=visit),
               nugget=ScalarMatrix(N))


def field_kronecker(g):
    """``KroneckerProduct(AR1Matrix(60), AR1Matrix(50))``: a 60 x 50 field, n = 3000."""
    return KroneckerProduct(row=AR1Matrix(60), col=AR1Matrix(50))


def closed_form_loss(module, C):
    return (module() * C).sum()


def autograd_loss(module, C):
    free = module._registered_free().detach().requires_grad_(True)
    return (module._evaluate(module._natural(module._full_raw(free))) * C).sum()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def kineto_quiet():
    """Silence the profiler's start/stop lines, which it writes straight to file descriptor 2."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes(module, C, build):
    """Peak memory of forward + backward above the starting level, in bytes."""
    module.zero_grad(set_to_none=True)
    module.reset_intermediates()
    device = C.device
    if device.type == "cuda":
        sync(device)
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        build(module, C).backward()
        sync(device)
        return torch.cuda.max_memory_allocated() - start
    with kineto_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        build(module, C).backward()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def backward_seconds(module, C, build, repeats):
    times = []
    for _ in range(repeats):
        module.zero_grad(set_to_none=True)
        module.reset_intermediates()
        loss = build(module, C)
        sync(C.device)
        t0 = time.perf_counter()
        loss.backward()
        sync(C.device)
        times.append(time.perf_counter() - t0)
        del loss
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"float64, n = {N}")
    header = (f"{'tree':<30} {'V MB':>7} {'peak MB':>8} {'peak/V':>7} {'autograd peak/V':>16} "
              f"{'backward s':>11} {'autograd s':>11} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for name, make in [("Sum of 6 terms", mixed_model_sum),
                       ("Kronecker(AR1(60), AR1(50))", field_kronecker)]:
        module = make(g).to(device)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(0.3 * torch.randn((), generator=g, dtype=torch.float64))
        C = torch.randn(N, N, generator=g, dtype=torch.float64).to(device)
        v_bytes = N * N * C.element_size()
        ours = peak_bytes(module, C, closed_form_loss)
        theirs = peak_bytes(module, C, autograd_loss)
        t_ours = backward_seconds(module, C, closed_form_loss, args.repeats)
        t_theirs = backward_seconds(module, C, autograd_loss, args.repeats)
        print(f"{name:<30} {v_bytes / 2**20:7.1f} {ours / 2**20:8.1f} {ours / v_bytes:7.2f} "
              f"{theirs / v_bytes:16.2f} {t_ours:11.4f} {t_theirs:11.4f} "
              f"{t_ours / t_theirs:6.2f}")


if __name__ == "__main__":
    main()
