"""Crossed random effects at scale: covmodules beside mixedlm and lme4, timed in one run.

Each workload is written to a CSV once and fitted by REML in a fresh process per program
(covmodules with torch's default threads; mixedlm from its own venv; lme4 through Rscript),
which reports its wall time, log-likelihood and peak resident memory. ``--load`` fits
covmodules again while two busy processes compete for the cores. Peers are skipped when not
installed (``--mixedlm-python``: mixedlm's interpreter, default ``/tmp/mixedlm-venv``).

Workloads (``--quick`` leaves out the two largest):

- ``insteval``: ``y ~ 1 + (1|s) + (1|d) + (1|dept)`` on lme4's InstEval (73,421 rows; read from
  ``--insteval CSV`` or exported by R when lme4 is installed; else simulated with its level
  counts 2,972 / 1,128 / 14);
- ``insteval_service``: ``y ~ service + (1|s) + (1|d) + (1|dept:service)``;
- ``crossed_200k``: ``y ~ x + (1|A) + (1|B)``, 200,000 rows, 2,000 × 500 levels;
- ``slopes_20k``: ``y ~ time + (time|subject)``, 20,000 subjects × 5;
- ``dense_z``: ``y ~ time + (time|subject)``, 2,000 × 10, ``Z`` passed as a dense tensor, beside
  the same model on codes;
- ``crossed_1m``: ``y ~ 1 + (1|A) + (1|B) + (1|C)``, 1,000,000 rows, 50,000 × 10,000 × 100.

Run: ``python scripts/bench_crossed.py [--quick] [--load] [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

OURS = textwrap.dedent("""
    import json, resource, sys, time
    import pandas as pd, torch
    from covmodules import (BlockDesignMatrix, IdentityMatrix, KroneckerProduct, MixedModel,
                            ScalarMatrix, UnconstrainedMatrix, fit)
    spec = json.loads(sys.argv[1])
    df = pd.read_csv(spec["csv"])
    n = len(df)
    designs = {}
    for group, slope in spec["terms"]:
        codes = torch.tensor(pd.factorize(df[group], sort=True)[0])
        L = int(codes.max()) + 1
        if slope:
            values = torch.stack([torch.ones(n, dtype=torch.float64),
                                  torch.tensor(df[slope].values, dtype=torch.float64)], 1)
            Z, G = BlockDesignMatrix(codes, values, L), KroneckerProduct(
                IdentityMatrix(L), UnconstrainedMatrix(2))
        else:
            Z, G = BlockDesignMatrix(codes, torch.ones(n, 1), L), ScalarMatrix(L)
        if spec.get("dense"):                          # the user's dense n x q tensor
            dense = torch.zeros(n, Z.shape[1], dtype=torch.float64)
            for a in range(Z.k):
                dense[torch.arange(n), codes * Z.k + a] = Z.values[:, a]
            Z = dense
        designs[group] = (Z, G)
    start = time.perf_counter()                      # from the user's data to the fit
    random = dict(designs)
    X = [torch.ones(n, dtype=torch.float64)]
    for col in spec["fixed"]:
        X.append(torch.tensor(df[col].values, dtype=torch.float64))
    y = torch.tensor(df["y"].values, dtype=torch.float64)
    model = MixedModel(random=random, residual=ScalarMatrix(n))
    result = fit(model, y, torch.stack(X, 1))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "loglik": result.loglik, "solver": result.solver,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")

MIXEDLM = textwrap.dedent("""
    import json, resource, sys, time
    import pandas as pd, mixedlm
    spec = json.loads(sys.argv[1])
    df = pd.read_csv(spec["csv"])
    for col in df.columns.difference(["y", "x", "time"]):
        df[col] = df[col].astype(str)
    start = time.perf_counter()
    m = mixedlm.lmer(spec["formula"], df, REML=True)
    seconds = time.perf_counter() - start
    ll = m.logLik()
    print(json.dumps({"seconds": seconds, "loglik": float(getattr(ll, "value", ll)),
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")

LME4 = textwrap.dedent("""
    suppressMessages(library(lme4))
    a <- commandArgs(TRUE)
    d <- read.csv(a[1])
    for (g in setdiff(names(d), c("y", "x", "time"))) d[[g]] <- factor(d[[g]])
    t <- system.time(m <- lmer(as.formula(a[2]), data = d, REML = TRUE))[["elapsed"]]
    cat(sprintf('{"seconds": %.4f, "loglik": %.10f}\\n', t, as.numeric(logLik(m))))
""")


def simulate_crossed(n, levels, seed, slope=None):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({name: rng.integers(0, m, n) for name, m in levels.items()})
    df["x"] = rng.standard_normal(n)
    y = 1.0 + 0.5 * df["x"].to_numpy()
    for name, m in levels.items():
        y = y + 0.6 * rng.standard_normal(m)[df[name].to_numpy()]
    df["y"] = y + rng.standard_normal(n)
    return df


def simulate_slopes(subjects, times, seed):
    rng = np.random.default_rng(seed)
    subject = np.repeat(np.arange(subjects), times)
    time_ = np.tile(np.arange(times, dtype=float), subjects)
    b = rng.standard_normal((subjects, 2)) * [1.0, 0.3]
    y = 1 + 0.5 * time_ + b[subject, 0] + b[subject, 1] * time_ + 0.5 * rng.standard_normal(
        subjects * times)
    return pd.DataFrame({"subject": subject, "time": time_, "y": y})


def insteval(path: str | None, folder: Path) -> tuple[pd.DataFrame, str]:
    """InstEval from ``path``, from R's lme4, or simulated with its level counts."""
    df, source = None, "lme4's InstEval"
    if path:
        df = pd.read_csv(path)
    elif shutil.which("Rscript"):
        out = folder / "insteval.csv"
        code = ('suppressMessages(library(lme4)); d <- InstEval; write.csv(data.frame(y = d$y, '
                's = as.integer(d$s), d = as.integer(d$d), dept = as.integer(d$dept), '
                'service = as.integer(d$service) - 1), "%s", row.names = FALSE)' % out)
        if subprocess.run(["Rscript", "-e", code], capture_output=True).returncode == 0:
            df = pd.read_csv(out)
    if df is None:
        df = simulate_crossed(73421, {"s": 2972, "d": 1128, "dept": 14}, seed=1)
        df["service"], source = (df["x"] > 0).astype(int), "simulated, InstEval's levels"
    df["dept:service"] = df["dept"].astype(str) + ":" + df["service"].astype(str)
    return df, source


def workloads(args, folder: Path):
    inst, source = insteval(args.insteval, folder)
    yield ("insteval", source, inst, dict(terms=[["s", None], ["d", None], ["dept", None]],
                                          fixed=[], formula="y ~ 1 + (1|s) + (1|d) + (1|dept)"))
    yield ("insteval_service", source, inst, dict(
        terms=[["s", None], ["d", None], ["dept:service", None]], fixed=["service"],
        formula="y ~ service + (1|s) + (1|d) + (1|dept:service)"))
    if not args.quick:
        yield ("crossed_200k", "simulated", simulate_crossed(200_000, {"A": 2000, "B": 500}, 2),
               dict(terms=[["A", None], ["B", None]], fixed=["x"],
                    formula="y ~ x + (1|A) + (1|B)"))
    yield ("slopes_20k", "simulated", simulate_slopes(20_000, 5, 3),
           dict(terms=[["subject", "time"]], fixed=["time"],
                formula="y ~ time + (time|subject)"))
    small = simulate_slopes(2000, 10, 4)
    yield ("dense_z", "simulated", small, dict(terms=[["subject", "time"]], fixed=["time"],
                                              formula="y ~ time + (time|subject)", dense=True))
    yield ("codes_2k", "simulated", small, dict(terms=[["subject", "time"]], fixed=["time"],
                                               formula="y ~ time + (time|subject)"))
    if not args.quick:
        yield ("crossed_1m", "simulated",
               simulate_crossed(1_000_000, {"A": 50_000, "B": 10_000, "C": 100}, 5),
               dict(terms=[["A", None], ["B", None], ["C", None]], fixed=[],
                    formula="y ~ 1 + (1|A) + (1|B) + (1|C)"))


def run(cmd, timeout, env=None):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"> {timeout} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:60]}
    return json.loads(lines[-1])


class Load:
    """Two busy processes on the cores while the block runs."""

    def __enter__(self):
        spin = "while True: pass"
        self.procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--load", action="store_true", help="also time ours under a load")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--insteval", default=None, help="InstEval as CSV (y, s, d, dept, "
                        "service)")
    parser.add_argument("--mixedlm-python", default="/tmp/mixedlm-venv/bin/python")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    have_mixedlm = Path(args.mixedlm_python).exists()
    have_r = shutil.which("Rscript") is not None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, source, df, spec in workloads(args, folder):
            if args.only and name not in args.only:
                continue
            csv = folder / f"{name}.csv"
            df.to_csv(csv, index=False)
            spec = dict(spec, csv=str(csv))
            arg = json.dumps(spec)
            ours = run([sys.executable, "-c", OURS, arg], args.timeout, env)
            loaded = {}
            if args.load:
                with Load():
                    loaded = run([sys.executable, "-c", OURS, arg], args.timeout, env)
            peer = run([args.mixedlm_python, "-c", MIXEDLM, arg], args.timeout) \
                if have_mixedlm and not spec.get("dense") else {}
            r = run(["Rscript", "-e", LME4, str(csv), spec["formula"]],
                    args.timeout) if have_r and not spec.get("dense") else {}
            rows.append((name, source, len(df), ours, loaded, peer, r))
            print(f"{name}: ours {ours}, loaded {loaded}, mixedlm {peer}, lme4 {r}",
                  file=sys.stderr, flush=True)
    print(table(rows))


def fmt(result, key="seconds", digits=2):
    if not result:
        return "—"
    if "error" in result:
        return result["error"]
    return f"{result[key]:.{digits}f}"


def table(rows) -> str:
    head = ("| workload | rows | covmodules s | peak MB | solver | under load s | mixedlm s "
            "| lme4 s | logLik covmodules | Δ mixedlm | Δ lme4 |")
    lines = [head, "|" + "---|" * 11]
    for name, source, n, ours, loaded, peer, r in rows:
        deltas = []
        for other in (peer, r):
            ok = other and "loglik" in other and "loglik" in ours
            deltas.append(f"{ours['loglik'] - other['loglik']:.1e}" if ok else "—")
        lines.append(f"| {name} ({source}) | {n:,} | {fmt(ours)} | {fmt(ours, 'peak_mb', 0)} | "
                     f"{ours.get('solver', '—')} | {fmt(loaded)} | {fmt(peer)} | {fmt(r)} | "
                     f"{fmt(ours, 'loglik', 4)} | {deltas[0]} | {deltas[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
