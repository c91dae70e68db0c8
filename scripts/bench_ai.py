"""AI-REML iteration cost on the dense path, relative to one Cholesky of V.

Prints, at n = 2000 (float64, CPU unless CUDA is available), the time of one AI-REML
iteration divided by the time of one ``torch.linalg.cholesky`` of the same V, for a model with
K = 2 covariance parameters (random intercept + iid residual) and one with K = 6 (correlated
random intercept and slope, a crossed random intercept, AR(1) residual within subject).
Target: ratio <= 3 for both. Run: ``.venv/bin/python scripts/bench_ai.py``.
"""

import argparse
import statistics
import time

import torch

from covmodules import (AR1Matrix, BlockDesignMatrix, Grouped, IdentityMatrix,
                        KroneckerProduct, MixedModel, ScalarMatrix, UnconstrainedMatrix)
from covmodules.optim import AIREML
from covmodules.reml import REML


def simulate(n: int, K: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = 10
    subjects = n // T
    subject = torch.arange(n) // T
    time_ = (torch.arange(n) % T).double()
    X = torch.stack([torch.ones(n, dtype=torch.float64), time_], 1)
    y = X @ torch.tensor([10.0, 0.5], dtype=torch.float64) + torch.randn(n, generator=g,
                                                                        dtype=torch.float64)
    y += 2.0 * torch.randn(subjects, generator=g, dtype=torch.float64)[subject]
    Z = BlockDesignMatrix(subject, torch.ones(n, 1), subjects)
    if K == 2:
        model = MixedModel(random={"subject": (Z, ScalarMatrix(subjects))},
                           residual=ScalarMatrix(n))
    else:
        Zs = BlockDesignMatrix(subject, torch.stack([torch.ones(n, dtype=torch.float64), time_], 1),
                               subjects)
        site = torch.randint(0, 20, (n,), generator=g)
        Zc = BlockDesignMatrix(site, torch.ones(n, 1), 20)
        model = MixedModel(
            random={"subject": (Zs, KroneckerProduct(IdentityMatrix(subjects),
                                                      UnconstrainedMatrix(2))),
                    "site": (Zc, ScalarMatrix(20))},
            residual=Grouped(AR1Matrix(T), groups=subject))
    return model.to(device), y.to(device), X.to(device)


def timed(fn, repeats: int, device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"n = {args.n}, device = {device}, threads = {torch.get_num_threads()}")
    inverse = None
    print(f"{'K':>3} {'cholesky (s)':>13} {'AI iteration (s)':>17} {'ratio':>7}  target <= 3")
    for K in (2, 6):
        model, y, X = simulate(args.n, K, device)
        objective = REML(model, y, X, solver="dense")
        assert model.num_free_params == K
        free = model._registered_free().detach()
        V = model(free).detach()
        chol = timed(lambda: torch.linalg.cholesky(V), args.repeats, device)
        L = torch.linalg.cholesky(V)
        inverse = timed(lambda: torch.cholesky_inverse(L), args.repeats, device) / chol
        runner = AIREML(objective)

        def iteration():
            state = objective.state(free)               # trial point: one factorisation
            score = -objective.gradient(free, state)    # one closed-form backward pass
            ai = objective.average_information(free, state)
            runner._direction(ai, score, torch.ones(K, dtype=torch.bool))

        it = timed(iteration, args.repeats, device)
        print(f"{K:>3} {chol:>13.4f} {it:>17.4f} {it / chol:>7.2f}")
    print(f"floor: one iteration needs one Cholesky and V⁻¹ for the score's trace term; "
          f"here cholesky_inverse alone costs {inverse:.2f} Choleskys")


if __name__ == "__main__":
    main()
