"""The main job: build the seed example and print it (a real REML fit replaces this)."""

import torch

from covmodules import AR1Matrix, KroneckerProduct, ScalarMatrix


def main() -> None:
    op = KroneckerProduct(time=AR1Matrix(2), subject=ScalarMatrix(2))
    params = torch.tensor([1.0, 1.0, 1.0])
    print(op)
    print(op(params))
    grad, names = op.manual_grad(params)
    print(names)
    print(grad)


if __name__ == "__main__":
    main()
