"""A fixed, known matrix (no parameters), e.g. a design matrix given as a tensor."""

from ..base import Structure
from ..validation import as_matrix


class FixedMatrix(Structure):
    """A constant matrix; operators wrap tensor operands in it.

    Example::

        >>> import torch
        >>> from covmodules import FixedMatrix
        >>> FixedMatrix(torch.ones(2, 3))().shape
        torch.Size([2, 3])
    """

    def __init__(self, value, name: str = "value"):
        super().__init__()
        self.register_buffer("value", as_matrix(value, name).clone())

    @property
    def shape(self):
        return tuple(self.value.shape)

    def _evaluate(self, nat):
        return self.value.to(nat.dtype)

    def _jacobian(self, nat):
        return self.value.new_zeros(0, *self.value.shape).to(nat.dtype)

    def _dv_matmul(self, nat, W, transpose=False):
        rows = self.value.shape[1] if transpose else self.value.shape[0]
        return W.new_zeros(0, rows, W.shape[1])

    def extra_repr(self):
        return f"shape={self.shape}"
