"""The main job: fit the simulated 40 × 40 spatial field trial with Lightning and TensorBoard.

Runs ``configs/field_trial.yaml`` through the CLI (AI-REML on ``y ~ block + genotype`` with the
residual ``σ²_f AR1(row) ⊗ AR1(col) + σ²_n I``), prints the fit summary, compares it with
nlme's fit of the same model (data/README.md) and says where the TensorBoard logs are.
Extra arguments go to the CLI, e.g. ``--trainer.max_epochs 20``.
"""

import sys
import time

from .cli import report, run_cli

CONFIG = "configs/field_trial.yaml"

# nlme 3.1-162 gls() with a Kronecker AR1 x AR1 + nugget corStruct (data/README.md;
# tests/data/scale_reference_iv_a.json); nugget = σ²_n / (σ²_f + σ²_n).
NLME = {"logLik_REML": -2123.15697497368, "sigma2": 1.26043803300873,
        "rho_row": 0.696813120977147, "rho_col": 0.426692041463626,
        "nugget": 0.219593839568359}


def comparison(params: dict, loglik: float) -> str:
    """A table of our estimates against nlme's, on nlme's parametrisation."""
    field = params["residual/field/row/sigma^2"] * params["residual/field/col/sigma^2"]
    nugget = params["residual/nugget/sigma^2"]
    ours = {"logLik_REML": loglik, "sigma2": field + nugget,
            "rho_row": params["residual/field/row/rho"],
            "rho_col": params["residual/field/col/rho"], "nugget": nugget / (field + nugget)}
    lines = [f"{'':12s} {'covmodules':>16s} {'nlme':>16s} {'difference':>12s}"]
    for key, ref in NLME.items():
        lines.append(f"{key:12s} {ours[key]:16.8f} {ref:16.8f} {ours[key] - ref:12.2e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    start = time.perf_counter()
    args = ["fit", "--config", CONFIG, *(sys.argv[1:] if argv is None else argv)]
    cli = run_cli(args)
    if cli is None:
        return 2
    result = cli.model.result
    print()
    report(cli)
    if result is not None:
        print("\nComparison with nlme's REML fit of the same model:")
        print(comparison(result.params, result.loglik))
    print(f"\nfit, logs and summary took {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
