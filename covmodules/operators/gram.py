r"""Gram matrix of one operand: :math:`\mathbf{X X}^\top` or :math:`\mathbf{X}^\top \mathbf{X}`.

For ``V = X Xᵀ``: ``dV = dX Xᵀ + X dXᵀ``, cotangent of ``X`` ``(Ḡ + Ḡᵀ) X``, product
``dV W = dX (Xᵀ W) + X (dXᵀ W)``. For ``V = Xᵀ X``: ``dV = dXᵀ X + Xᵀ dX``, cotangent
``X (Ḡ + Ḡᵀ)``, product ``dV W = dXᵀ (X W) + Xᵀ (dX W)``. Both ``dV`` are symmetric, so the
transposed product equals the plain one.
"""

from .base import Operator

FORMS = ("XXt", "XtX")
GRAM_TYPES = {"xxt": "XXt", "xtx": "XtX"}


class Gram(Operator):
    r"""Gram matrix :math:`\mathbf{X}^\top\mathbf{X}` (default) or :math:`\mathbf{X X}^\top`.

    One operand ``X`` (a module or a fixed tensor, any shape), given positionally or by
    keyword; ``gram_type`` (keyword-only, torch-openreml's) is ``"xtx"`` (default, ``XᵀX``) or
    ``"xxt"`` (``X Xᵀ``), and ``form="XtX" | "XXt"`` says the same (give one of the two).
    ``Gram(L, gram_type="xxt")`` with ``L`` a loading matrix is a low-rank (factor-analytic)
    covariance ``L Lᵀ``.

    Example::

        >>> import torch
        >>> from covmodules import Gram
        >>> X = torch.tensor([[1.0, 2.0], [0.0, 1.0], [1.0, 0.0]])
        >>> Gram(X)()
        tensor([[2., 2.],
                [2., 5.]])
        >>> Gram(X, gram_type="xxt")().shape
        torch.Size([3, 3])
        >>> Gram(X, form="XXt").gram_type
        'xxt'
    """

    min_operands = max_operands = 1

    def __init__(self, *args, form: str | None = None, gram_type: str | None = None, **kwargs):
        if form is not None and gram_type is not None:
            raise ValueError("give Gram either form= or gram_type=, not both")
        if gram_type is not None:
            if gram_type not in GRAM_TYPES:
                raise ValueError(f"gram_type must be 'xtx' or 'xxt', got {gram_type!r}")
            form = GRAM_TYPES[gram_type]
        form = "XtX" if form is None else form
        if form not in FORMS:
            raise ValueError(f"Gram form must be one of {FORMS}, got {form!r}")
        super().__init__(*args, **kwargs)
        self.form = form

    @property
    def gram_type(self) -> str:
        """torch-openreml's spelling of :attr:`form`: ``"xxt"`` or ``"xtx"``."""
        return self.form.lower()

    @property
    def shape(self):
        n, p = self.operand_modules[0].shape
        return (n, n) if self.form == "XXt" else (p, p)

    def _evaluate(self, nat):
        (X,), _ = self._factors(nat)
        return X @ X.T if self.form == "XXt" else X.T @ X

    def _vjp(self, nat, G):
        (X,), (nx,) = self._factors(nat)
        x = self.operand_modules[0]
        if not x.num_params:
            return nx.new_zeros(0)
        S = G + G.T
        return x._vjp(nx, S @ X if self.form == "XXt" else X @ S)

    def _dv_matmul(self, nat, W, transpose=False):
        (X,), (nx,) = self._factors(nat)
        x = self.operand_modules[0]
        if not x.num_params:
            return W.new_zeros(0, self.shape[0], W.shape[1])
        if self.form == "XXt":
            return x._dv_matmul(nx, X.T @ W) + X @ x._dv_matmul(nx, W, transpose=True)
        return x._dv_matmul(nx, X @ W, transpose=True) + X.T @ x._dv_matmul(nx, W)

    def extra_repr(self):
        return f"form={self.form!r}"
