"""LMMNN benchmark (Simchoni & Rosset, NeurIPS 2021): a network with a covariance layer.

    python scripts/lmmnn.py                          # n = 100,000, q = 1,000, 1 thread
    python scripts/lmmnn.py --n 20000 --q 200 --epochs 10

Random intercepts (:func:`training.deep.simulate_intercepts`): ``y = f(x) + u_g + e``, ten
features, one categorical feature of ``q`` levels, ``var(u) = 10``, ``var(e) = 1``; test rows are a
random 20%. Compared, with the same MLP (100-50-25-12, ReLU) and Adam:

(a) the network ignoring the category (MSE loss);
(b) the network with a learned embedding of it (``q / 10`` dimensions) concatenated to ``x``;
(c) the network with :class:`~covmodules.RandomIntercept` (Gaussian NLL of batches of whole
    groups), predicting ``f(x) + û_g`` with BLUPs from the training data.

Repeated measures (:func:`training.deep.simulate_repeated`): ``q`` subjects at ``n / q`` times,
``y = f(x) + u_g + a_gt + e`` with an AR(1) ``a`` (variance 2, correlation 0.8) within subject;
(c) the random-intercept layer, (d) :class:`~covmodules.GroupedCovariance` with
``Sum(subject=EqualEntryMatrix(T), serial=AR1Matrix(T))`` plus a nugget, predicting with its
BLUP ``f(x) + Σ_j S[t, p_j] (V_g⁻¹ r_g)_j``. Prints one table per setting and the wall times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covmodules import (AR1Matrix, EqualEntryMatrix, GroupBatchSampler,  # noqa: E402
                        GroupedCovariance, RandomIntercept, Sum)
from training.deep import mlp, simulate_intercepts, simulate_repeated  # noqa: E402


class Embedded(nn.Module):
    """(b): the MLP on ``x`` concatenated with a learned embedding of the category."""

    def __init__(self, num_levels: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_levels, dim)
        self.net = mlp(10 + dim)

    def forward(self, x, g):
        return self.net(torch.cat([x, self.embedding(g)], 1))[:, 0]


def row_batches(n: int, size: int, generator: torch.Generator):
    perm = torch.randperm(n, generator=generator)
    return [perm[i:i + size] for i in range(0, n, size)]


def train_mse(model, data, epochs, batch_size, lr, embedded, seed):
    """(a) and (b): MSE loss on shuffled row batches; returns the test MSE."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def predict(x, g):
        return model(x, g) if embedded else model(x)[:, 0]

    for _ in range(epochs):
        for idx in row_batches(len(data.y_train), batch_size, gen):
            opt.zero_grad()
            loss = ((predict(data.x_train[idx], data.g_train[idx]) - data.y_train[idx]) ** 2).mean()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float(((predict(data.x_test, data.g_test) - data.y_test) ** 2).mean())


def train_layer(net, layer, data, epochs, groups_per_batch, lr, covariance_lr, seed, positions):
    """(c) and (d): per-row Gaussian NLL of batches of whole groups; returns the test MSE."""
    opt = torch.optim.Adam([{"params": net.parameters(), "lr": lr},
                            {"params": layer.parameters(), "lr": covariance_lr}])
    sampler = GroupBatchSampler(data.g_train, groups_per_batch, seed=seed)
    extra = (lambda idx: (data.t_train[idx],)) if positions else (lambda idx: ())
    for _ in range(epochs):
        for idx in sampler:
            opt.zero_grad()
            mean = net(data.x_train[idx])[:, 0]
            loss = layer.nll(data.y_train[idx], mean, data.g_train[idx], *extra(idx),
                             reduction="mean")
            loss.backward()
            opt.step()
    layer.eval()
    with torch.no_grad():
        train_pos = (data.t_train,) if positions else ()
        layer.fit_blups(data.y_train, net(data.x_train)[:, 0], data.g_train, *train_pos)
        test_pos = (data.t_test,) if positions else ()
        pred = layer.predict(net(data.x_test)[:, 0], data.g_test, *test_pos)
        return float(((pred - data.y_test) ** 2).mean())


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def baselines(data, args, rows_per_batch):
    torch.manual_seed(args.seed)
    ignore, t_a = timed(lambda: train_mse(mlp(10), data, args.epochs, rows_per_batch, args.lr,
                                          False, args.seed))
    torch.manual_seed(args.seed)
    dim = max(1, data.num_levels // 10)
    embed, t_b = timed(lambda: train_mse(Embedded(data.num_levels, dim), data, args.epochs,
                                         rows_per_batch, args.lr, True, args.seed))
    return [("(a) ignore the category", ignore, {}, t_a),
            (f"(b) embedding ({dim} dims)", embed, {}, t_b)]


def intercept_layer(data, args):
    torch.manual_seed(args.seed)
    sizes = torch.bincount(data.g_train, minlength=data.num_levels)
    layer, net = RandomIntercept(data.num_levels, group_sizes=sizes), mlp(10)
    mse, t = timed(lambda: train_layer(net, layer, data, args.epochs, args.groups_per_batch,
                                       args.lr, args.covariance_lr, args.seed, False))
    v = layer.variance_components
    return ("(c) random-intercept layer + BLUP", mse,
            {"sigma2_e": v["residual/sigma^2"], "sigma2_b": v["intercept/sigma^2"]}, t)


def ar1_layer(data, args):
    torch.manual_seed(args.seed)
    T = data.num_positions
    within = Sum(subject=EqualEntryMatrix(T), serial=AR1Matrix(T))
    sizes = torch.bincount(data.g_train, minlength=data.num_levels)
    layer, net = GroupedCovariance(within, data.num_levels, group_sizes=sizes), mlp(10)
    mse, t = timed(lambda: train_layer(net, layer, data, args.epochs, args.groups_per_batch,
                                       args.lr, args.covariance_lr, args.seed, True))
    v = layer.variance_components
    return ("(d) intercept + AR(1) layer + BLUP", mse,
            {"sigma2_e": v["nugget/sigma^2"], "sigma2_b": v["within/subject/sigma^2"],
             "sigma2_ar": v["within/serial/sigma^2"], "rho": v["within/serial/rho"]}, t)


def table(title, rows, truth):
    columns = list(truth)
    lines = [title, f"{'model':<38}{'test MSE':>10}" + "".join(f"{c:>11}" for c in columns)
             + f"{'time (s)':>10}"]
    for name, mse, params, seconds in [("truth", float("nan"), truth, float("nan"))] + rows:
        cells = "".join(f"{params[c]:>11.3f}" if c in params else f"{'-':>11}" for c in columns)
        mse_cell = f"{mse:>10.3f}" if mse == mse else f"{'-':>10}"
        time_cell = f"{seconds:>10.1f}" if seconds == seconds else f"{'':>10}"
        lines.append(f"{name:<38}{mse_cell}{cells}{time_cell}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="rows")
    parser.add_argument("--q", type=int, default=1000, help="levels (subjects)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--groups-per-batch", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3, help="network learning rate")
    parser.add_argument("--covariance-lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is robust on a shared 2-core machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setting", choices=["intercepts", "ar1", "both"], default="both")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"n = {args.n}, q = {args.q}, {args.epochs} epochs, {args.threads} torch thread(s), "
          f"seed {args.seed}\n")
    rows_per_batch = args.groups_per_batch * args.n // args.q
    if args.setting in ("intercepts", "both"):
        data = simulate_intercepts(args.n, args.q, seed=args.seed)
        rows = baselines(data, args, rows_per_batch) + [intercept_layer(data, args)]
        print(table("Random intercepts (sigma2_b = 10, sigma2_e = 1)", rows,
                    {"sigma2_e": 1.0, "sigma2_b": 10.0}) + "\n")
    if args.setting in ("ar1", "both"):
        data = simulate_repeated(args.n, args.q, seed=args.seed)
        rows = (baselines(data, args, rows_per_batch) + [intercept_layer(data, args)]
                + [ar1_layer(data, args)])
        print(table(f"Repeated measures, AR(1) within subject ({data.num_positions} times per "
                    "subject)", rows,
                    {"sigma2_e": 1.0, "sigma2_b": 10.0, "sigma2_ar": 2.0, "rho": 0.8}) + "\n")
    print(f"wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
