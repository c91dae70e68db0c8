"""Structured solvers against the dense path and against R (lme4 / nlme): one table.

Each (case, solver) is fitted by AI-REML in a fresh subprocess (so peak memory is per fit);
the fit time is the median of 3 fits when one takes under 2 s, else a single fit (R's rule in
``scale_reference.json`` with a lower threshold), model building excluded and shown apart.
Columns: ``× dense`` is dense fit time / this fit time (same run), ``× R`` is R's time / this
time. R times are the anchors in ``data/scale_reference.json`` (a copy of the oracle's; R 4.2.2,
2 cores, single-threaded reference BLAS); when ``Rscript`` with lme4 and nlme is on PATH, cases i and ii
are also timed live in the same run (iv_a needs nlme's hand-written corStruct from the oracle's
helpers.R, which is not shipped, so it stays an anchor). Dense is skipped where ``n³/3`` makes
it impractical (n > 5000). Targets (issue 5): iv_a <= 0.5 s; 100x100 field <= 5 s; 300x300
fits under 2 GB; i <= lme4; ii <= nlme; 100,000 subjects x 10 < 60 s.

Torch runs single-threaded by default (``--threads``), like R's reference BLAS and robust on a
shared 2-core machine. ``--quick`` leaves out the two largest cases.

Issue 16 adds the 1000 x 1000 field (target: fit < 10 s, < 2 GB) and the simulated
20-trial multi-environment fit (its recovery of the simulated Σ and correlations in the
table), and ``--loss``: the Kronecker ML loss + gradient alone at 100², 300² and 1000², beside
GPyTorch's exact Kronecker path on the same data and likelihood when its interpreter is there
(``--gpytorch-python``, default ``/tmp/gpytorch-venv/bin/python``: a separate venv with
``pip install torch gpytorch``; run in a subprocess like mixedlm in ``bench_crossed.py``).
Crossed random effects at scale (InstEval, 200,000 rows, 1,000,000 rows, beside mixedlm and
lme4) are timed by ``scripts/bench_crossed.py``; ``--crossed`` runs it (its ``--quick`` set).

Run: ``.venv/bin/python scripts/bench.py [--threads 1] [--quick] [--loss] [--crossed]
[--oracle DIR] [--gpytorch-python PATH]`` (``DIR``: a folder with ``data/sim_*.csv`` and the
reference JSON, by default this repository; the shared oracle folder has the same layout).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
ORACLE = ROOT          # data/*.csv and data/scale_reference.json (copied from the oracle)
DTYPE = torch.float64

# case: (description, solvers, R reference case ids, target)
CASES = {
    "iv_a": ("sim_field_40x40: AR1⊗AR1 + nugget, p = 115", ["dense", "kronecker"],
             ["iv_a_nlme_gls_ar1xar1_kronecker"], ("kronecker", 0.5)),
    "field100": ("simulated 100x100 field, p = 224", ["kronecker"], [], ("kronecker", 5.0)),
    "field300": ("simulated 300x300 field, p = 135", ["kronecker"], [], ("memory", 2048)),
    "field1000": ("simulated 1000x1000 field, y ~ 1", ["kronecker"], [], ("kronecker", 10.0)),
    "met20": ("20 trials of 30x40, 300 genotypes, FA(2) + AR1⊗AR1 + nugget each", ["met"], [],
              None),
    "i": ("sim_ris_2000x10: random intercept + slope", ["grouped"],
          ["i_lme4_ris_2000x10", "i_b_nlme_lme_ris_2000x10"], ("grouped", "R")),
    "i_200": ("sim_ris, first 200 subjects", ["dense", "grouped", "woodbury"], [], None),
    "ii": ("sim_ar1_2000x10: AR1 within subject", ["grouped"], ["ii_nlme_gls_ar1_2000x10"],
           ("grouped", "R")),
    "ii_200": ("sim_ar1, first 200 subjects", ["dense", "grouped"], [], None),
    "big": ("100,000 subjects x 10: AR1 + random intercept", ["grouped"], [], ("grouped", 60.0)),
}
LARGE = {"field300", "field1000", "met20", "big"}


# --------------------------------------------------------------------------- models and data
def field_40x40(oracle):
    from covmodules import AR1Matrix, KroneckerProduct, ScalarMatrix, Sum
    from covmodules.design import fixed_design
    from covmodules.linalg import complete_grid

    df = pd.read_csv(ROOT / "data" / "sim_field_40x40.csv")
    design = fixed_design(df, ["block", "genotype"])
    grid = complete_grid(df["row"].to_numpy(), df["col"].to_numpy(),
                         torch.tensor(df["y"].to_numpy(), dtype=DTYPE), design.matrix,
                         design.names)

    def model():
        V = Sum(field=KroneckerProduct(row=AR1Matrix(40), col=AR1Matrix(40)),
                nugget=ScalarMatrix(1600))
        V.fix("field/col/sigma^2")
        return V
    return model, grid.y, grid.X


def simulated_field(m, blocks, genotypes, seed=1):
    """``y = 10 + block + genotype + AR1(0.7) ⊗ AR1(0.4) field + N(0, 0.3)`` on an m x m grid."""
    from covmodules import AR1Matrix, KroneckerProduct, ScalarMatrix, Sum

    g = torch.Generator().manual_seed(seed)
    N = m * m
    i = torch.arange(m, dtype=DTYPE)
    lag = (i[:, None] - i[None, :]).abs()
    La, Lb = torch.linalg.cholesky(0.7 ** lag), torch.linalg.cholesky(0.4 ** lag)
    field = (La @ torch.randn(m, m, generator=g, dtype=DTYPE) @ Lb.T).reshape(-1)
    b = round(blocks ** 0.5)
    side = m // b
    r, c = torch.arange(N) // m, torch.arange(N) % m
    block = (r // side).clamp(max=b - 1) * b + (c // side).clamp(max=b - 1)
    geno = torch.randint(0, genotypes, (N,), generator=g)
    one_hot = torch.nn.functional.one_hot
    X = torch.cat([torch.ones(N, 1, dtype=DTYPE), one_hot(block, b * b)[:, 1:].to(DTYPE),
                   one_hot(geno, genotypes)[:, 1:].to(DTYPE)], 1)
    y = (10 + 0.5 * torch.randn(b * b, generator=g, dtype=DTYPE)[block]
         + torch.randn(genotypes, generator=g, dtype=DTYPE)[geno] + field
         + 0.3 ** 0.5 * torch.randn(N, generator=g, dtype=DTYPE))

    def model():
        V = Sum(field=KroneckerProduct(row=AR1Matrix(m), col=AR1Matrix(m)),
                nugget=ScalarMatrix(N))
        V.fix("field/col/sigma^2")
        return V
    return model, y, X


def subjects(oracle, name, count=None):
    path = oracle / "data" / f"{name}.csv"                  # the oracle's; this repository's
    df = pd.read_csv(path if path.exists() else path.with_suffix(".csv.gz"))   # is gzipped
    if count is not None:
        df = df[df["subject"].isin(sorted(df["subject"].unique())[:count])].reset_index(drop=True)
    from covmodules.design import fixed_design
    X = fixed_design(df, ["time"]).matrix
    return df, torch.tensor(df["y"].to_numpy(), dtype=DTYPE), X


def random_slopes(oracle, count=None):
    from covmodules import IdentityMatrix, KroneckerProduct, MixedModel, ScalarMatrix
    from covmodules import UnconstrainedMatrix
    from covmodules.design import random_design

    df, y, X = subjects(oracle, "sim_ris_2000x10", count)
    rd = random_design(df, "subject", ["1", "time"])

    def model():
        G = KroneckerProduct(IdentityMatrix(rd.num_levels), UnconstrainedMatrix(2))
        return MixedModel(random={"subject": (rd, G)}, residual=ScalarMatrix(len(df)))
    return model, y, X


def ar1_within(oracle, count=None):
    from covmodules import AR1Matrix, Grouped

    df, y, X = subjects(oracle, "sim_ar1_2000x10", count)
    return (lambda: Grouped(AR1Matrix(10), groups=df["subject"].to_numpy())), y, X


def big_grouped(oracle, S=100_000, T=10, seed=5):
    """100,000 subjects x 10 times: 2 N(0, 4) intercepts + AR1(0.6) residual, y ~ 1 + time."""
    from covmodules import AR1Matrix, DesignMatrix, Grouped, MixedModel, ScalarMatrix

    g = torch.Generator().manual_seed(seed)
    codes = torch.arange(S).repeat_interleave(T)
    t = (torch.arange(S * T) % T).to(DTYPE)
    X = torch.stack([torch.ones(S * T, dtype=DTYPE), t], 1)
    e = torch.empty(S, T, dtype=DTYPE)
    e[:, 0] = torch.randn(S, generator=g, dtype=DTYPE)
    for j in range(1, T):
        e[:, j] = 0.6 * e[:, j - 1] + 0.8 * torch.randn(S, generator=g, dtype=DTYPE)
    y = (X @ torch.tensor([10.0, 0.5], dtype=DTYPE)
         + 2 * torch.randn(S, generator=g, dtype=DTYPE)[codes] + e.reshape(-1))

    def model():
        return MixedModel(random={"subject": (DesignMatrix(codes), ScalarMatrix(S))},
                          residual=Grouped(AR1Matrix(T), groups=codes))
    return model, y, X


def met20(oracle, E=20, shape=(30, 40), genotypes=300):
    """The simulated multi-environment trial; ``check`` compares the fit with the truth."""
    from covmodules.trials import multi_environment, simulate_trials

    df, truth = simulate_trials([shape] * E, genotypes, k=2, seed=1)
    trial = multi_environment(df, sigma="fa", k=2)

    def check(result):
        with torch.no_grad():
            S = result.model._modules["gxe"].operand_modules[1]()
        rho = torch.tensor([[result.params[f"residual/env{e}/field/{a}/rho"] for e in range(E)]
                            for a in ("row", "col")])
        true_rho = torch.stack([truth["rho_row"], truth["rho_col"]])
        sd = truth["Sigma"].diagonal().sqrt()
        return (f"Σ: max |err| / sd_i sd_j {float(((S - truth['Sigma']) / torch.outer(sd, sd)).abs().max()):.2f}; "
                f"ρ: mean |err| {float((rho - true_rho).abs().mean()):.3f}")
    return (lambda: multi_environment(df, sigma="fa", k=2).model), trial.y, trial.X, check


BUILDERS = {
    "iv_a": field_40x40,
    "field100": lambda oracle: simulated_field(100, 25, 200),
    "field300": lambda oracle: simulated_field(300, 36, 100),
    "field1000": lambda oracle: simulated_field(1000, 1, 1),
    "met20": met20,
    "i": random_slopes,
    "i_200": lambda oracle: random_slopes(oracle, 200),
    "ii": ar1_within,
    "ii_200": lambda oracle: ar1_within(oracle, 200),
    "big": big_grouped,
}
NEEDS_ORACLE = {"i", "i_200", "ii", "ii_200"}


# ----------------------------------------------------------------------------------- worker
def worker(case, solver, oracle):
    """Fit one case with one solver; print a JSON record."""
    from covmodules import fit

    warnings.simplefilter("ignore")
    start = time.perf_counter()
    factory, y, X, *check = BUILDERS[case](oracle)
    model = factory()
    setup = time.perf_counter() - start
    times, result = [], None
    while True:
        start = time.perf_counter()
        result = fit(model, y, X, solver=solver)
        times.append(time.perf_counter() - start)
        if len(times) == 3 or times[0] >= 2.0:
            break
        model = factory()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"case": case, "solver": result.solver, "n": result.n, "setup": setup,
                      "time": statistics.median(times), "iterations": result.iterations,
                      "converged": result.converged, "loglik": result.loglik,
                      "peak_mb": peak, "check": check[0](result) if check else ""}))


def run_worker(case, solver, args):
    cmd = [sys.executable, __file__, "--worker", case, solver, "--threads", str(args.threads),
           "--oracle", str(args.oracle)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or [f"exit status {out.returncode}"]
        return {"case": case, "solver": solver, "error": lines[-1]}   # killed: no stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------- R
R_SCRIPT = """suppressMessages({library(lme4); library(nlme)})
d <- read.csv("%s"); d$subject <- factor(d$subject)
fit <- function() %s
times <- replicate(3, system.time(fit())[["elapsed"]]); f <- fit()
cat(median(times), as.numeric(logLik(f)), "\\n")
"""


def r_available() -> bool:
    if shutil.which("Rscript") is None:
        return False
    check = subprocess.run(["Rscript", "-e", "suppressMessages({library(lme4); library(nlme)})"],
                           capture_output=True)
    return check.returncode == 0


def r_live(reference, oracle):
    """(seconds, logLik) of R's own call on the case's data, timed now."""
    path = (oracle / reference["data_file"]).resolve()
    if not path.exists():                                      # shipped gzipped; R reads it
        path = path.with_suffix(".csv.gz")
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as f:
        f.write(R_SCRIPT % (path, reference["call"]))
    out = subprocess.run(["Rscript", f.name], capture_output=True, text=True, timeout=600)
    seconds, loglik = out.stdout.split()[:2]
    return float(seconds), float(loglik)


# ------------------------------------------------------------------- loss + gradient alone
GPYTORCH = textwrap.dedent("""
    import json, statistics, sys, time
    import torch, gpytorch
    from linear_operator.operators import (ConstantDiagLinearOperator, DenseLinearOperator,
                                           KroneckerProductAddedDiagLinearOperator,
                                           KroneckerProductLinearOperator)
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    y = torch.load(spec["y"])
    m = spec["m"]
    lag = (torch.arange(m)[:, None] - torch.arange(m)).abs().to(y.dtype)
    losses, grads, times = [], [], []
    for point, beta in zip(spec["points"], spec["beta"]):
        start = time.process_time()
        nat = torch.tensor(point, dtype=y.dtype, requires_grad=True)   # s_row, rho_row, rho_col, s
        K = KroneckerProductLinearOperator(DenseLinearOperator(nat[0] * nat[1] ** lag),
                                           DenseLinearOperator(nat[2] ** lag))
        V = KroneckerProductAddedDiagLinearOperator(
            K, ConstantDiagLinearOperator(nat[3:], diag_shape=m * m))
        mean = torch.full_like(y, beta)
        loss = -gpytorch.distributions.MultivariateNormal(mean, V).log_prob(y)
        loss.backward()
        times.append(time.process_time() - start)
        losses.append(float(loss))
        grads.append(nat.grad.tolist())
    print(json.dumps({"seconds": statistics.median(times[1:]), "losses": losses,
                      "grads": grads, "version": gpytorch.__version__}))
""")
LOSS_PARAMS = ["field/row/sigma^2", "field/row/rho", "field/col/rho", "nugget/sigma^2"]


def loss_gradient(args, sizes=(100, 300, 1000), repeats=7):
    """One ML loss + gradient of ``AR1 ⊗ AR1 + σ² I``, ``y ~ 1``, near the simulation's
    values, each evaluation at new correlations (so every eigendecomposition is recomputed):
    covmodules, and GPyTorch's exact Kronecker path (``KroneckerProductAddedDiagLinearOperator``
    of a Kronecker product and a constant diagonal: per-factor eigendecompositions, autograd)
    in its own interpreter (``--gpytorch-python``) when installed, on the same data at the same
    points. GPyTorch evaluates the Gaussian density at the GLS mean ``b̂(θ)`` of ours (the
    profiled ML loss equals it there and, ``b̂`` being stationary, so does its gradient), by the
    natural parameters; the table shows the largest relative differences. Median CPU seconds
    (``time.process_time``: both run on one thread, and CPU time varies less than wall time on
    a shared machine) of ``repeats`` after a first evaluation."""
    from bench_crossed import run
    from covmodules.linalg import KroneckerSolver

    peer = Path(args.gpytorch_python).exists()
    rows = []
    for m in sizes:
        factory, y, X = simulated_field(m, 1, 1)
        model = factory()
        model.set_params({"field/row/rho": 0.7, "field/col/rho": 0.4, "nugget/sigma^2": 0.3})
        base = model.free_params().to(DTYPE)
        rho = [model.free_param_names.index(n) for n in ("field/row/rho", "field/col/rho")]
        points = []
        for i in range(repeats + 1):
            f = base.clone()
            f[rho] += 1e-3 * (i + 1)
            points.append(f)
        solver = KroneckerSolver(model)
        times, losses, grads = [], [], []
        for f in points:
            f = f.clone().requires_grad_(True)
            start = time.process_time()
            loss = solver.loss(f, y, X, "ml")
            loss.backward()
            times.append(time.process_time() - start)
            natural = f.grad / model.trans_grad(f.detach())          # d loss / d natural
            keep = [model.free_param_names.index(n) for n in LOSS_PARAMS]
            losses.append(float(loss.detach()))
            grads.append(natural[keep])
        out = {"grid": f"{m} x {m}", "covmodules s": f"{statistics.median(times[1:]):.4f}"}
        if peer:
            out.update(gpytorch_row(args, run, model, points, y, X, losses, grads, times))
        else:
            out["GPyTorch"] = f"not installed ({args.gpytorch_python})"
        rows.append(out)
    print(pd.DataFrame(rows).to_string(index=False))


def gpytorch_row(args, run, model, points, y, X, losses, grads, times):
    """GPyTorch's time at the same points, and its largest relative differences from ours."""
    from covmodules.linalg import KroneckerSolver

    fresh = KroneckerSolver(model)                   # b̂ at each point, outside the timings
    beta = [float(fresh.state(f, y, X, "ml").beta[0]) for f in points]
    nat = [model.build_params(f, include_fixed=False) for f in points]
    index = [model.free_param_names.index(n) for n in LOSS_PARAMS]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "y.pt"
        torch.save(y, path)
        spec = {"y": str(path), "m": round(len(y) ** 0.5), "threads": args.threads,
                "points": [v[index].tolist() for v in nat], "beta": beta}
        peer = run([args.gpytorch_python, "-c", GPYTORCH, json.dumps(spec)], 1800)
    if "error" in peer:
        return {"GPyTorch s": peer["error"]}
    theirs = statistics.median(times[1:])
    d_loss = max(abs(a - b) / abs(b) for a, b in zip(losses, peer["losses"]))
    d_grad = max(float(((g - torch.tensor(h, dtype=DTYPE)).abs()
                        / torch.tensor(h, dtype=DTYPE).abs().clamp(min=1e-300)).max())
                 for g, h in zip(grads, peer["grads"]))
    return {f"GPyTorch {peer['version']} s": f"{peer['seconds']:.4f}",
            "GPyTorch / covmodules": f"{peer['seconds'] / theirs:.1f}",
            "Δ loss (rel)": f"{d_loss:.1e}", "Δ gradient (rel)": f"{d_grad:.1e}"}


# ------------------------------------------------------------------------------------ table
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="skip the two largest cases")
    parser.add_argument("--oracle", type=Path, default=ORACLE)
    parser.add_argument("--loss", action="store_true",
                        help="time the Kronecker ML loss + gradient alone at 100², 300², 1000²")
    parser.add_argument("--gpytorch-python", default="/tmp/gpytorch-venv/bin/python",
                        help="GPyTorch's interpreter for --loss (skipped when absent)")
    parser.add_argument("--crossed", action="store_true",
                        help="time crossed random effects beside mixedlm and lme4")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "SOLVER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(*args.worker, args.oracle)
        return
    if args.loss:
        loss_gradient(args)
        return
    if args.crossed:
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_crossed.py")),
                        "--quick"], check=True)
        return
    reference_file = next((f for f in (args.oracle / "scale_reference.json",
                                       args.oracle / "data" / "scale_reference.json")
                           if f.exists()), args.oracle / "scale_reference.json")
    references = ({c["id"]: c for c in json.loads(reference_file.read_text())["cases"]}
                  if reference_file.exists() else {})
    live = r_available()
    print(f"torch {torch.__version__}, {args.threads} thread(s); R live: "
          f"{'yes' if live else 'no (Rscript with lme4 + nlme not found)'}; "
          f"R anchors: {reference_file if references else 'not found'}\n")
    rows = []
    for case, (title, solvers, ref_ids, target) in CASES.items():
        if args.quick and case in LARGE:
            continue
        if case in NEEDS_ORACLE and not (args.oracle / "data").exists():
            print(f"skipping {case}: {args.oracle / 'data'} not found")
            continue
        records = {s: run_worker(case, s, args) for s in solvers}
        dense = records.get("dense", {}).get("time")
        refs = [references[r] for r in ref_ids if r in references]
        r_loglik = refs[0]["logLik_REML"] if refs else None
        for solver, rec in records.items():
            rows.append(row(title, solver, rec, dense, refs, r_loglik, target))
        for ref in refs:
            rows.append(r_row(title, ref, r_loglik, live and case in ("i", "ii"), args.oracle))
    print(pd.DataFrame(rows).fillna("").to_string(index=False))


def row(title, solver, rec, dense, refs, r_loglik, target):
    if "error" in rec:
        return {"case": title, "solver": solver, "fit s": rec["error"]}
    r_time = refs[0]["fit_time_s"] if refs else None
    return {
        "case": title, "n": rec["n"], "solver": rec["solver"],
        "setup s": f"{rec['setup']:.2f}", "fit s": f"{rec['time']:.3f}",
        "iter": str(rec["iterations"]) + ("" if rec["converged"] else " (no conv.)"),
        "logLik": f"{rec['loglik']:.6f}",
        "Δ R": "" if r_loglik is None else f"{rec['loglik'] - r_loglik:+.1e}",
        "× dense": "" if dense is None else f"{dense / rec['time']:.1f}",
        "× R": "" if r_time is None else f"{r_time / rec['time']:.1f}",
        "peak MB": f"{rec['peak_mb']:.0f}",
        "target": verdict(target, rec, r_time), "recovery": rec.get("check", ""),
    }


def verdict(target, rec, r_time):
    if target is None or target[0] not in (rec["solver"], "memory"):
        return ""
    kind, limit = target
    if kind == "memory":
        return f"< {limit} MB: {'ok' if rec['peak_mb'] < limit else 'MISSED'}"
    limit = r_time if limit == "R" else limit
    return f"<= {limit:.3g} s: {'ok' if rec['time'] <= limit else 'MISSED'}"


def r_row(title, ref, r_loglik, live, oracle):
    out = {"case": title, "n": ref["n"], "solver": f"R {ref['package']} (reference)",
           "fit s": f"{ref['fit_time_s']:.3f}", "logLik": f"{ref['logLik_REML']:.6f}",
           "Δ R": f"{ref['logLik_REML'] - r_loglik:+.1e}"}
    if live:
        seconds, loglik = r_live(ref, oracle)
        out.update({"solver": f"R {ref['package']} (live / ref {ref['fit_time_s']:.3f} s)",
                    "fit s": f"{seconds:.3f}", "logLik": f"{loglik:.6f}"})
    return out


if __name__ == "__main__":
    main()
