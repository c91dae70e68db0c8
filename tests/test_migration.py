"""Code written for torch-openreml 0.3.0a0 runs with ``torch_openreml.covariance`` replaced by
``covmodules`` (issue 15). Each test pastes an example of upstream's documentation (the page is
cited; ``DOCS`` = https://torch-openreml.patrickli.org/generated/) with its printed numbers as
the expected values; printed to 4 decimals, so compared to within 5e-5. The remaining
deliberate differences are the README's "Migrating from torch-openreml" table."""

import warnings

import pytest
import torch

from covmodules import (Adapter, AR1Matrix, BlockDiagonal, CovariancePropagation,
                        DiagonalMatrix, DummyMatrix, EquicorrelationMatrix, Gram,
                        HadamardProduct, KroneckerProduct, LowerTriangularMatrix, ScalarMatrix,
                        SimpleMatrix, Sum, UnconstrainedMatrix, simple_param_specs)
from covmodules.testing import check_gradients, random_points
from covmodules.transform import TransformExp, TransformIdentity
from covmodules.transforms import ExpPow2

DTYPE = torch.float64
PRINTED = dict(atol=5e-5, rtol=0)


def close(actual, expected):
    torch.testing.assert_close(actual.detach().to(DTYPE), torch.tensor(expected, dtype=DTYPE),
                               **PRINTED)


# ------------------------------------------------------------------------ 1. names
def test_upstream_names_are_keys_everywhere():
    # DOCS torch_openreml.covariance.Matrix.html (build_params): fixing by upstream's name
    mat = DiagonalMatrix(3)
    free_params = torch.tensor([0.0, 0.5, 1.0])
    mat.param_specs["sigma^2_2"]["fixed"] = True
    close(mat.build_params(free_params[0:2]), [1.0000, 2.7183, 1.0000])
    close(mat.build_params(free_params[0:2], include_fixed=False), [1.0000, 2.7183])
    close(mat.build_params(free_params[0:2], include_fixed=False, trans=False), [0.0, 0.5])
    assert mat.fixed_param_names == ["sigma^2[2]"]
    # fix / set_param / get_param / dict input by the upstream spelling
    mat.free("sigma^2_2")
    mat.set_param("sigma^2_1", 2.5)
    assert mat.get_param("sigma^2[1]") == pytest.approx(2.5)
    mat.fix("sigma^2_0", 4.0)
    assert mat.fixed_param_names == ["sigma^2[0]"] and mat.get_param("sigma^2_0") == 4.0
    by_alias = mat({"sigma^2_1": torch.tensor([0.5]), "sigma^2_2": torch.tensor([1.0])})
    by_name = mat({"sigma^2[1]": torch.tensor([0.5]), "sigma^2[2]": torch.tensor([1.0])})
    torch.testing.assert_close(by_alias, by_name)
    close(by_alias.diagonal(), [4.0, 2.7183, 7.3891])
    with pytest.raises(ValueError, match="twice"):
        mat({"sigma^2_1": 0.0, "sigma^2[1]": 0.0, "sigma^2[2]": 0.0})


def test_positional_operands_answer_to_op_i():
    # DOCS torch_openreml.covariance.Operator.html: positional operands are op_0, op_1, ...
    x = Sum(ScalarMatrix(2), ScalarMatrix(2))
    close(x.build_params(torch.tensor([0.0, 0.5])), [1.0000, 2.7183])
    d = x.build_params(torch.tensor([0.0, 0.5]), out_format="dict")
    close(d["op_0/sigma^2"], [1.0]), close(d["op_1/sigma^2"], [2.7183])
    x.fix("op_0/sigma^2", 2.0)
    assert x.fixed_param_names == ["0/sigma^2"]
    close(x({"op_1/sigma^2": torch.tensor([0.0])}), [[3.0, 0.0], [0.0, 3.0]])
    nested = KroneckerProduct(Sum(AR1Matrix(2), DiagonalMatrix(2)), ScalarMatrix(1))
    nested.set_param("op_0/op_1/sigma^2_1", 3.0)
    assert nested.get_param("0/1/sigma^2[1]") == pytest.approx(3.0)


@pytest.mark.parametrize("make", [
    lambda: Sum(KroneckerProduct(AR1Matrix(2), DiagonalMatrix(3)), ScalarMatrix(6)),
    lambda: BlockDiagonal(LowerTriangularMatrix(2), DiagonalMatrix(2), AR1Matrix(2)),
    lambda: HadamardProduct(DiagonalMatrix(3), Gram(LowerTriangularMatrix(3, 2), gram_type="xxt")),
])
def test_every_alias_addresses_its_parameter(make):
    """For the class, not one case: each parameter's alias, wherever a name is accepted,
    reaches the same parameter as its name."""
    m = make()
    aliases = {s.alias: s.name for s in m.param_specs if s.alias is not None}
    assert len(aliases) == m.num_params
    p = random_points(m, 1)[0]
    by_alias = {a: p[m.free_param_names.index(n)] for a, n in aliases.items()}
    torch.testing.assert_close(m(by_alias), m(p))
    for k, (alias, name) in enumerate(aliases.items()):
        value = 0.5 + 0.1 * k if "rho" not in name else 0.3
        m.set_param(alias, value)
        assert m.get_param(name) == pytest.approx(value)
        assert m.param_specs[alias]["default"] == m.param_specs[name]["default"]


# ------------------------------------------------------------------- 2. LowerTriangular
def test_lower_triangular_row_major_layout():
    # DOCS torch_openreml.covariance.LowerTriangularMatrix.html: the default layout
    mat = LowerTriangularMatrix(3, 2)
    assert mat.free_param_defaults.tolist() == [1.0] * 5
    close(mat(), [[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    free_params = torch.tensor([0.0, 0.5, 1.0, 0.2, -0.3])
    close(mat(free_params), [[0.0, 0.0], [0.5, 1.0], [0.2, -0.3]])
    grad, names = mat.grad(free_params)
    expected = torch.zeros(5, 3, 2, dtype=DTYPE)
    for k, (i, j) in enumerate([(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]):
        expected[k, i, j] = 1.0
    close(grad, expected.tolist())
    assert names == ["L[0,0]", "L[1,0]", "L[1,1]", "L[2,0]", "L[2,1]"]
    # covmodules' former layout under order="col": the same entry answers to L_i_j
    col = LowerTriangularMatrix(3, 2, order="col")
    assert col.free_param_names == ["L[0,0]", "L[1,0]", "L[2,0]", "L[1,1]", "L[2,1]"]
    for m in (mat, col):
        m.set_param("L_2_0", 7.0)
        assert m()[2, 0] == 7.0
    assert LowerTriangularMatrix(2, 3).shape == (2, 3)                  # upstream allows m > n
    check_gradients(mat, random_points(mat, 2))
    with pytest.raises(ValueError, match="order must be 'row' or 'col'"):
        LowerTriangularMatrix(2, order="column")


@pytest.mark.parametrize("shape", [(3,), (4, 2)])
def test_lower_triangular_state_dict_moves_between_orders(shape):
    """Names key the state dict, so a module saved under one order loads into the other and
    gives the same matrix; only the flat order of the free vector differs."""
    col = Gram(L=LowerTriangularMatrix(*shape, order="col"), gram_type="xxt")
    for k, name in enumerate(col.free_param_names):
        col.set_param(name, 0.3 * k - 0.7)
    row = Gram(L=LowerTriangularMatrix(*shape), gram_type="xxt")
    row.load_state_dict(col.state_dict())
    torch.testing.assert_close(row(), col())
    assert sorted(row.free_param_names) == sorted(col.free_param_names)
    assert row.free_param_names != col.free_param_names


# ----------------------------------------------------------------------------- 3. Gram
def test_gram_type():
    # DOCS torch_openreml.covariance.Gram.html (x = upstream's LowerTriangularMatrix(3, 2))
    x = LowerTriangularMatrix(3, 2)
    op = Gram(x)
    close(op(), [[3.0, 2.0], [2.0, 2.0]])
    op_xxt = Gram(x, gram_type="xxt")
    close(op_xxt(), [[1.0, 1.0, 1.0], [1.0, 2.0, 2.0], [1.0, 2.0, 2.0]])
    free_params = torch.tensor([0.0, 0.5, 1.0, 0.2, -0.3])
    grad, grad_names = op.manual_grad(free_params)
    close(grad, [[[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]], [[0.0, 0.5], [0.5, 2.0]],
                 [[0.4, -0.3], [-0.3, 0.0]], [[0.0, 0.2], [0.2, -0.6]]])
    assert grad_names == ["0/L[0,0]", "0/L[1,0]", "0/L[1,1]", "0/L[2,0]", "0/L[2,1]"]
    grad_xxt, _ = op_xxt.manual_grad(free_params)
    close(grad_xxt[3], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.5, 0.4]])
    assert (op.gram_type, op.form, op_xxt.gram_type) == ("xtx", "XtX", "xxt")
    torch.testing.assert_close(Gram(x, gram_type="xtx")(), op())
    torch.testing.assert_close(Gram(x, form="XXt")(), op_xxt())
    with pytest.raises(ValueError, match="gram_type must be 'xtx' or 'xxt'"):
        Gram(x, gram_type="XtX")
    with pytest.raises(ValueError, match="not both"):
        Gram(x, form="XtX", gram_type="xtx")


# ------------------------------------------------------------------------ 4. Hadamard
@pytest.mark.parametrize("b", [torch.tensor([5.0]), torch.tensor(5.0), torch.tensor([[5.0]])])
def test_hadamard_one_element_operand_broadcasts(b):
    # DOCS torch_openreml.covariance.HadamardProduct.html
    op = HadamardProduct(a=EquicorrelationMatrix(4), b=b)
    off = 3.2071
    close(op(torch.tensor([1.0])), [[5.0 if i == j else off for j in range(4)] for i in range(4)])
    grad, grad_names = op.manual_grad(torch.tensor([1.0]))
    close(grad[0], [[0.0 if i == j else 1.3107 for j in range(4)] for i in range(4)])
    assert grad_names == ["a/rho"]
    check_gradients(op, random_points(op, 2))


# ---------------------------------------------------------------------- 5. SimpleMatrix
def test_simple_matrix_upstream_signature():
    # DOCS torch_openreml.covariance.SimpleMatrix.html
    def my_v(free_params):
        return torch.diag(free_params)

    mat = SimpleMatrix(num_free_params=3, call=my_v, default=1.0)
    close(mat(torch.tensor([1.0, 2.0, 3.0])), torch.diag(torch.tensor([1.0, 2, 3])).tolist())
    close(mat(), torch.eye(3).tolist())
    close(mat({"theta_0": torch.tensor([2.0]), "theta_1": torch.tensor([3.0]),
               "theta_2": torch.tensor([4.0])}), torch.diag(torch.tensor([2.0, 3, 4])).tolist())
    grad, names = mat.grad(torch.tensor([1.0, 2.0, 3.0]))
    close(grad, torch.eye(3)[:, None, :].expand(3, 3, 3).mul(torch.eye(3)).tolist())
    assert names == ["theta_0", "theta_1", "theta_2"]
    assert SimpleMatrix(2, my_v).free_param_defaults.tolist() == [0.0, 0.0]
    assert SimpleMatrix(0, call=lambda p: torch.eye(2)).grad() == (None, [])
    with pytest.raises(ValueError, match="'call' must be provided"):
        SimpleMatrix(3, call=None)
    # as upstream, call sees the free parameters only
    seen = []
    fixed = SimpleMatrix(2, lambda t: seen.append(t) or t.sum() * torch.eye(2, dtype=t.dtype))
    fixed.fix("theta_1", 5.0)
    close(fixed(torch.tensor([2.0])), [[2.0, 0.0], [0.0, 2.0]])
    assert seen[-1].tolist() == [2.0]


def test_simple_matrix_manual_grad_callback_is_used():
    # V = theta_0 * A: the callback's Jacobian is used (a wrong one would show), autograd agrees
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=DTYPE)
    calls = []

    def manual(theta):
        calls.append(theta)
        return A[None].to(theta.dtype), ["theta_0"]

    mat = SimpleMatrix(1, lambda theta: theta[0] * A.to(theta.dtype), manual_grad=manual)
    J, _ = mat.grad(torch.tensor([0.7], dtype=DTYPE))
    assert calls and torch.equal(J[0], A)
    torch.testing.assert_close(mat.auto_grad(torch.tensor([0.7], dtype=DTYPE))[0], J)
    check_gradients(mat, random_points(mat, 2))
    bad = SimpleMatrix(1, lambda t: t[0] * A.to(t.dtype), manual_grad=lambda t: (A, []))
    with pytest.raises(ValueError, match="manual_grad must return"):
        bad.manual_grad()


def test_simple_param_specs():
    # DOCS torch_openreml.covariance.simple_param_specs.html
    specs = simple_param_specs(3)
    assert list(specs) == ["theta_0", "theta_1", "theta_2"]
    for spec in specs.values():
        assert spec["fixed"] is False and torch.equal(spec["default"], torch.tensor([0.0]))
        assert spec["trans"] == TransformIdentity()
    assert simple_param_specs(1, default=torch.tensor([2.0]))["theta_0"]["default"] == 2.0
    with pytest.raises(ValueError, match=r"shape \(1,\)"):
        simple_param_specs(1, default=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="default must be"):
        simple_param_specs(1, default="0")


# ----------------------------------------------------------------------- 6. DummyMatrix
def test_dummy_matrix_examples():
    # DOCS torch_openreml.covariance.DummyMatrix.html
    rep, block = ["rep1", "rep2", "rep2"], ["block1", "block2", "block1"]
    mat = DummyMatrix(rep, block)
    close(mat(), [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    assert mat.colnames == ["rep1⋈block1", "rep1⋈block2", "rep2⋈block1", "rep2⋈block2"]
    mat = DummyMatrix(rep, block, drop_first=True)
    close(mat(), [[0, 0, 0], [0, 0, 1], [0, 1, 0]])
    assert mat.colnames == ["rep1⋈block2", "rep2⋈block1", "rep2⋈block2"]
    mat = DummyMatrix(rep, block, levels=[["rep1", "rep2", "rep3"], ["block1", "block2"]])
    close(mat(), [[1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]])
    assert mat.colnames[-2:] == ["rep3⋈block1", "rep3⋈block2"]
    with pytest.warns(RuntimeWarning, match="unknown combination"):
        mat = DummyMatrix(rep, block, levels=[["rep3", "rep1"], ["block1", "block2"]],
                          lex_order=False)
    close(mat(), [[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert mat.colnames == ["rep3⋈block1", "rep3⋈block2", "rep1⋈block1", "rep1⋈block2"]
    mat = DummyMatrix(rep, block, levels=[["rep2", "rep1"], ["block1", "block2"]],
                      lex_order=False, drop_empty_cols=True)
    close(mat(), [[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    assert mat.colnames == ["rep2⋈block1", "rep2⋈block2", "rep1⋈block1"]
    mat = DummyMatrix(["rep1", "rep2", "rep2"])
    assert mat(torch.tensor([], dtype=DTYPE)).dtype == DTYPE and mat.num_params == 0
    assert mat.param_specs == {} and mat.grad(torch.tensor([])) == (None, [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DummyMatrix(rep, block).shape == (3, 4)


# ------------------------------------------------------------------------ 7. transforms
def test_transforms_under_upstream_names():
    # DOCS torch_openreml.covariance.transform.Transform*.html
    from covmodules.transform import (TransformChain, TransformExp, TransformExp2,
                                      TransformExp10, TransformExpPow2, TransformIdentity,
                                      TransformPow, TransformScaleShift, TransformSigmoid)
    t = TransformChain([TransformExp(), TransformPow(factor=2.0)])
    close(t(torch.tensor([1.0])), [7.3891])
    close(t.inverse(torch.tensor([4.0])), [0.6931])
    close(t.grad(torch.tensor([1.0])), [14.7781])
    close(TransformExp()(torch.tensor([0.0, 1.0])), [1.0, 2.7183])
    close(TransformExp2()(torch.tensor([0.0, 1.0])), [1.0, 2.0])
    close(TransformExp2().inverse(torch.tensor([1.0, 2.0])), [0.0, 1.0])
    close(TransformExp2().grad(torch.tensor([1.0])), [1.3863])
    close(TransformExp10()(torch.tensor([0.0, 1.0])), [1.0, 10.0])
    close(TransformExp10().inverse(torch.tensor([1.0, 10.0])), [0.0, 1.0])
    close(TransformExp10().grad(torch.tensor([1.0])), [23.0259])
    close(TransformExpPow2().grad(torch.tensor([0.0, 1.0])), [2.0, 14.7781])
    assert TransformPow().factor == 2.0 and TransformScaleShift(2.0).b == 0.0
    x = torch.linspace(-1.5, 1.5, 7, dtype=DTYPE)
    for tr in [TransformIdentity(), TransformExp(), TransformExp2(), TransformExp10(),
               TransformExpPow2(), TransformSigmoid(), TransformScaleShift(2.0, -1.0),
               TransformChain([TransformSigmoid(), TransformScaleShift(2.0, -1.0)])]:
        torch.testing.assert_close(tr.grad(x), tr.derivative(x))
        torch.testing.assert_close(tr.inverse(tr(x)), x)
        auto = torch.func.vmap(torch.func.grad(lambda v: tr(v)))(x)
        torch.testing.assert_close(tr.grad(x), auto)
        assert isinstance(tr.domain, str) and isinstance(tr.codomain, str)
    assert str(TransformExp()) == "Exp: ℝ ↦ ℝ⁺"
    assert TransformChain([TransformSigmoid()]).codomain == "(0, 1)"
    # the covmodules defaults are instances of upstream's classes
    assert isinstance(AR1Matrix(2).param_trans[0], TransformExpPow2)
    assert isinstance(AR1Matrix(2).param_trans[1], TransformChain)


# ------------------------------------------------------------------ 8. introspection
def test_build_operands_and_operands_grad_shapes():
    # DOCS torch_openreml.covariance.Operator.html (build_operands, operands_grad)
    x = Sum(ScalarMatrix(2), ScalarMatrix(2))
    v_groups = x.build_operands(torch.tensor([1.0, 2.0]))
    assert isinstance(v_groups, list) and len(v_groups) == 2
    close(v_groups[0], [[7.3891, 0.0], [0.0, 7.3891]])
    close(v_groups[1], [[54.5981, 0.0], [0.0, 54.5981]])
    a, b = v_groups
    torch.testing.assert_close(v_groups["op_1"], b)
    grad_groups, grad_name_groups = x.operands_grad(torch.tensor([1.0, 2.0]))
    close(grad_groups[0], [[[14.7781, 0.0], [0.0, 14.7781]]])
    close(grad_groups[1], [[[109.1963, 0.0], [0.0, 109.1963]]])
    assert grad_name_groups == [["0/sigma^2"], ["1/sigma^2"]]
    fixed = CovariancePropagation(Z=torch.eye(2), G=ScalarMatrix(2))
    grads, names = fixed.operands_grad()
    assert grads[0] is None and names == [[], ["G/sigma^2"]]


def test_call_tree_and_grad_tree():
    # DOCS torch_openreml.covariance.Operator.html (call_tree, grad_tree)
    op = Sum(inner=BlockDiagonal(DiagonalMatrix(2), ScalarMatrix(2)), extra=ScalarMatrix(4))
    free = torch.tensor([0.0, 0.5, 1.0, 0.5])
    results, free_params_by_path = op.call_tree(free)
    assert list(results) == ["/", "inner", "inner/0", "inner/1", "extra"]
    close(results["/"].diagonal(), [3.7183, 5.4366, 10.1073, 10.1073])
    close(results["inner"].diagonal(), [1.0, 2.7183, 7.3891, 7.3891])
    close(results["inner/op_0"], [[1.0, 0.0], [0.0, 2.7183]])
    close(results["inner/op_1"], [[7.3891, 0.0], [0.0, 7.3891]])
    close(results["extra"], (2.7183 * torch.eye(4)).tolist())
    close(free_params_by_path["inner"], [0.0, 0.5, 1.0])
    close(free_params_by_path["inner/op_1"], [1.0])
    grads, _ = op.grad_tree(free)
    J, names = grads["inner/op_0"]
    close(J, [[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 5.4366]]])
    assert names == ["sigma^2[0]", "sigma^2[1]"]
    assert grads["inner"][1] == ["0/sigma^2[0]", "0/sigma^2[1]", "1/sigma^2"]
    torch.testing.assert_close(grads["/"][0], op.manual_grad(free)[0])
    with_tensor = CovariancePropagation(Z=torch.eye(2), G=ScalarMatrix(2))
    values, params = with_tensor.call_tree()
    assert params["Z"] is None and with_tensor.grad_tree()[0]["Z"] == (None, [])


# ---------------------------------------------------------------------- 9. build_params
def test_build_params_keywords():
    # DOCS torch_openreml.covariance.KroneckerProduct.html lists build_params(free_params,
    # include_fixed, trans, out_format); values from .../Operator.html (build_params)
    x = Sum(ScalarMatrix(2), ScalarMatrix(2))
    free = torch.tensor([0.0, 0.5])
    close(x.build_params(free), [1.0, 2.7183])
    close(x.build_params(), [1.0, 1.0])
    close(x.build_params(free, trans=False), [0.0, 0.5])
    d = x.build_params(free, out_format="dict")
    assert list(d) == ["0/sigma^2", "1/sigma^2"]
    op = KroneckerProduct(time=AR1Matrix(2), subject=ScalarMatrix(2))
    op.fix("time/rho", 0.5)
    d = op.build_params(torch.tensor([1.0, 1.0]), include_fixed=False, out_format="dict")
    assert list(d) == ["time/sigma^2", "subject/sigma^2"]
    assert op.build_params(torch.tensor([1.0, 1.0]), trans=False)[1] == pytest.approx(
        AR1Matrix(2).param_trans[1].inverse(torch.tensor(0.5, dtype=DTYPE)).item())
    with pytest.raises(ValueError, match="out_format must be 'tensor' or 'dict'"):
        x.build_params(out_format="list")


# ---------------------------------------------------- 10. Adapter, dtype/device, modes
def test_adapter_example_and_chain_rule():
    # DOCS torch_openreml.covariance.Adapter.html
    adaptee = DiagonalMatrix(2)

    def param_map(params):
        p = torch.sigmoid(params[0])
        return torch.stack([p, 1 - p])

    param_specs = {"logit": {"fixed": False, "default": torch.tensor([0.0]),
                             "trans": TransformIdentity()}}
    adapter = Adapter(adaptee, param_specs, param_map)
    close(adapter(torch.tensor([0.0])), [[2.7183, 0.0], [0.0, 2.7183]])
    for method in ("jacfwd", "jacrev", "jacobian"):
        adapter.jacobian_method = method
        J, names = adapter.manual_grad(torch.tensor([0.3], dtype=DTYPE))
        torch.testing.assert_close(J, adapter.auto_grad(torch.tensor([0.3], dtype=DTYPE))[0])
        assert names == ["logit"]
    check_gradients(adapter, random_points(adapter, 3))
    assert [n for n, _ in adapter.named_parameters()] == ["logit"]
    # as upstream (its tests/covariance/test_adapter.py), param_map sees the free parameters
    seen = []
    specs = {**param_specs, "offset": {"fixed": True, "default": torch.tensor([0.5]),
                                       "trans": TransformIdentity()}}
    fixed = Adapter(DiagonalMatrix(2), specs, lambda t: seen.append(t) or param_map(t))
    fixed(torch.tensor([0.7]))
    assert torch.equal(seen[-1], torch.tensor([0.7])) and fixed.num_free_params == 1
    J, names = fixed.manual_grad(torch.tensor([0.3], dtype=DTYPE))
    assert J.shape == (1, 2, 2) and names == ["logit"]
    torch.testing.assert_close(J, fixed.auto_grad(torch.tensor([0.3], dtype=DTYPE))[0])
    fixed.param_specs["logit"]["fixed"] = True
    assert fixed.manual_grad() == (None, [])
    with pytest.raises(ValueError, match="identity transform"):
        Adapter(adaptee, simple_param_specs(1, trans=TransformExp()), param_map)
    with pytest.raises(ValueError, match=r"param_map must return a tensor of shape \(2,\)"):
        Adapter(adaptee, simple_param_specs(1), lambda t: t)()


def test_get_default_dtype_device():
    # DOCS torch_openreml.covariance.Matrix.html (get_default_dtype_device): (device, dtype);
    # float64 here, where upstream's parameters default to torch's float32
    assert ScalarMatrix(3).get_default_dtype_device() == (torch.device("cpu"), torch.float64)
    assert ScalarMatrix(3).float().get_default_dtype_device()[1] == torch.float32
    from covmodules import IdentityMatrix
    assert IdentityMatrix(2).get_default_dtype_device() == (torch.get_default_device(),
                                                            torch.get_default_dtype())


def test_grad_mode_and_jacobian_method_are_honoured():
    # a deliberately wrong closed form tells which path grad() took
    wrong = SimpleMatrix(1, lambda t: t[0] ** 2 * torch.eye(2, dtype=t.dtype),
                         manual_grad=lambda t: (torch.zeros(1, 2, 2, dtype=t.dtype), ["theta_0"]))
    p = torch.tensor([1.5], dtype=DTYPE)
    assert wrong.grad_mode == "default" and wrong.jacobian_method == "jacfwd"
    assert wrong.grad(p)[0].abs().max() == 0
    wrong.grad_mode = "manual"
    assert wrong.grad(p)[0].abs().max() == 0
    wrong.grad_mode = "auto"
    for method in ("jacfwd", "jacrev", "jacobian"):
        wrong.jacobian_method = method
        torch.testing.assert_close(wrong.grad(p)[0], 3.0 * torch.eye(2, dtype=DTYPE)[None])
    wrong.jacobian_method = "finite"
    with pytest.raises(ValueError, match="jacobian_method must be"):
        wrong.grad(p)
    wrong.grad_mode = "numeric"
    with pytest.raises(RuntimeError, match="unknown grad_mode"):
        wrong.grad(p)
    # the three methods agree on every kind of module, operators included
    op = Sum(KroneckerProduct(AR1Matrix(2), UnconstrainedMatrix(2)), ScalarMatrix(4))
    q = random_points(op, 1)[0]
    for method in ("jacfwd", "jacrev", "jacobian"):
        op.jacobian_method = method
        torch.testing.assert_close(op.auto_grad(q)[0], op.manual_grad(q)[0])


# -------------------------------------------------------------------- 11. param_specs
def test_param_specs_mapping():
    # DOCS torch_openreml.covariance.Matrix.html: param_specs is {name: {fixed, default,
    # trans}}, edited in place to fix a parameter
    op = KroneckerProduct(time=AR1Matrix(2), subject=ScalarMatrix(2))
    specs = op.param_specs
    assert list(specs.keys()) == op.param_names and "time/rho" in specs
    entry = specs["time/rho"]
    assert dict(entry).keys() == {"fixed", "default", "trans"}
    assert entry["fixed"] is False and entry["trans"] == op.param_trans[1]
    torch.testing.assert_close(entry["default"], torch.zeros(1, dtype=DTYPE))
    specs["time/rho"]["fixed"] = True
    assert op.fixed_param_names == ["time/rho"]
    assert "time.rho" not in dict(op.named_parameters())
    specs["time/rho"]["default"] = torch.tensor([1.0])        # free scale, as upstream
    rho = 2 * torch.sigmoid(torch.tensor(1.0)).item() - 1
    assert op.get_param("time/rho") == pytest.approx(rho)
    specs["time/rho"]["fixed"] = False
    assert op.num_free_params == 3
    for name, spec in op.param_specs.items():
        assert spec["default"].shape == (1,)
    with pytest.raises(TypeError, match="fixed at construction"):
        specs["time/rho"]["trans"] = TransformIdentity()
    with pytest.raises(TypeError, match="must be a bool"):
        specs["time/rho"]["fixed"] = 1
    with pytest.raises(KeyError, match="unknown parameter"):
        specs["rho"]
    assert [s.name for s in op.param_specs] == op.param_names          # still the records
    assert ScalarMatrix(2).param_specs == {"sigma^2": {"fixed": False, "trans": ExpPow2(),
                                                       "default": torch.zeros(1, dtype=DTYPE)}}

