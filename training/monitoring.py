"""What the REML module shows in TensorBoard: covariance heatmaps and BLUP histograms.

Images are rendered with NumPy (no plotting library): a matrix becomes an RGB heatmap on a
blue-white-red scale from -1 to 1, enlarged by whole pixels so small matrices stay visible.
"""

from __future__ import annotations

import numpy as np
import torch

from covmodules import CovarianceModule, MixedModel, Sum
from covmodules.results import FitResult, leading_block, term_covariances

__all__ = ["heatmap", "correlation", "covariance_blocks", "fitted_v_block", "component_blups",
           "blup_values"]

MAX_DENSE_ROWS = 4096


def correlation(M: torch.Tensor) -> torch.Tensor:
    """``M`` on the correlation scale (rows/columns with zero variance stay zero)."""
    d = M.diagonal().clamp(min=0).sqrt()
    scale = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return M * scale[:, None] * scale[None, :]


def heatmap(M, vmax: float = 1.0, min_pixels: int = 128) -> np.ndarray:
    """``(H, W, 3)`` uint8 image of ``M``: blue (``-vmax``), white (0), red (``+vmax``)."""
    a = np.clip(np.asarray(M, dtype=np.float64) / vmax, -1.0, 1.0)
    pos, neg = np.clip(a, 0, 1), np.clip(-a, 0, 1)
    rgb = np.stack([1 - neg * 0.8, 1 - 0.8 * (pos + neg), 1 - pos * 0.8], axis=-1)
    zoom = max(1, -(-min_pixels // max(a.shape)))
    rgb = rgb.repeat(zoom, axis=0).repeat(zoom, axis=1)
    return (rgb * 255).round().astype(np.uint8)


def covariance_blocks(model: CovarianceModule, size: int) -> dict[str, torch.Tensor]:
    """The covariance heatmaps, on the correlation scale, by name: for a
    :class:`~covmodules.MixedModel` the ``k × k`` covariance of one level of each random term
    (``Subject``), then, as for any other model, the top-left ``size × size`` block of every
    leaf structure with parameters (``residual/field/row``), by
    :func:`~covmodules.results.leading_block`: neither ``G`` nor ``V`` is formed."""
    mixed = isinstance(model, MixedModel)
    out = {name: correlation(G.double().cpu())
           for name, G in (term_covariances(model) if mixed else {}).items()}
    root, prefix = (model.residual, "residual") if mixed else (model, "")
    with torch.no_grad():
        for name, module in root.named_modules(prefix=prefix):
            if (isinstance(module, CovarianceModule) and module.num_params
                    and not _has_operands(module)):
                block = leading_block(module, module.build_params(), size)
                out[name.replace(".", "/") or "model"] = correlation(block.double().cpu())
    return out


def _has_operands(module: CovarianceModule) -> bool:
    return any(isinstance(m, CovarianceModule) for m in module.children())


def fitted_v_block(model: CovarianceModule, size: int) -> torch.Tensor:
    """The top-left ``size × size`` block of ``V`` at the registered parameters, from the
    blocks of its pieces: ``Σ Z_s G Z_sᵀ + R_s`` (``Z_s`` the first rows of ``Z``) for a
    :class:`~covmodules.MixedModel`, :func:`~covmodules.results.leading_block` otherwise."""
    with torch.no_grad():
        nat = model.build_params()
        if not isinstance(model, MixedModel):
            return leading_block(model, nat, size).double().cpu()
        n = model.shape[0]
        V = leading_block(model.residual, model._split(nat)[-1], size)
        E = torch.eye(n, V.shape[0], dtype=nat.dtype, device=nat.device)
        for name, G, part in model._terms(nat):
            ZtE = model.zt_matmul(name, E).to(nat)            # (q, size): Z_sᵀ
            V = V + ZtE.T @ G._matmul(part, ZtE)
        return V.double().cpu()


def component_blups(result: FitResult) -> dict[str, np.ndarray]:
    """BLUPs ``V_k P y`` of the components of a :class:`~covmodules.Sum` residual
    (e.g. the spatial field of ``ar1xar1_nugget``), one value per row, by name."""
    model = result.model
    residual = model.residual if isinstance(model, MixedModel) else None
    if not isinstance(residual, Sum) or residual.shape[0] > MAX_DENSE_ROWS:
        return {}
    Py = result.state.Py
    with torch.no_grad():
        return {f"residual/{name}": op.matmul(Py).cpu().numpy()
                for name, op in residual.operands.items() if isinstance(op, CovarianceModule)}


def blup_values(result: FitResult) -> dict[str, np.ndarray]:
    """All BLUPs as flat arrays: each random term, then the residual components."""
    out = {name: frame.to_numpy().ravel() for name, frame in result.blups().items()}
    out.update(component_blups(result))
    return out
