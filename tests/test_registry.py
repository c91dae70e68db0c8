"""The parameter registry: every seed-named attribute, read from one cached table that fix,
free and a changed operand make stale; the intermediate cache and the seed's torch-openreml
interface (grad, map_theta_to_v, map_theta_to_dv, trans_grad, to_free)."""

import pytest
import torch

from covmodules import (AR1Matrix, CAR1Matrix, KroneckerProduct, MixedModel, ScalarMatrix, Sum,
                        UnconstrainedMatrix)
from covmodules.base import ROLE_SCALE_POWER, default_role
from covmodules.params import ParamTable
from covmodules.transforms import Chain, Exp, ExpPow2, Identity, ScaleShift, Sigmoid, Softplus

DTYPE = torch.float64


def seed_operator():
    """The seed page's example, ``time/rho`` fixed."""
    op = KroneckerProduct(time=AR1Matrix(2), subject=ScalarMatrix(2))
    op.fix("time/rho", 0.5)
    return op


# ---------------------------------------------------------------- the all / free / fixed grid
def test_all_free_and_fixed_views():
    op = seed_operator()
    assert op.param_names == ["time/sigma^2", "time/rho", "subject/sigma^2"]
    assert [s.name for s in op.param_specs] == op.param_names
    assert [s.fixed for s in op.param_specs] == [False, True, False]
    assert op.free_param_names == ["time/sigma^2", "subject/sigma^2"]
    assert op.fixed_param_names == ["time/rho"]
    assert op.free_param_index == [0, 2] and op.fixed_param_index == [1]
    assert (op.num_params, op.num_free_params, op.num_fixed_params) == (3, 2, 1)
    defaults = torch.tensor([s.default for s in op.param_specs], dtype=DTYPE)
    torch.testing.assert_close(op.param_defaults, defaults, rtol=0, atol=0)
    torch.testing.assert_close(op.free_param_defaults, defaults[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(op.fixed_param_defaults, defaults[[1]], rtol=0, atol=0)
    assert op.param_trans == [s.transform for s in op.param_specs]
    assert op.free_param_trans == [op.param_trans[0], op.param_trans[2]]
    assert op.fixed_param_trans == [op.param_trans[1]]
    assert [type(t) for t in op.free_param_trans] == [ExpPow2, ExpPow2]
    assert isinstance(op.fixed_param_trans[0], Chain)
    assert op.free_param_roles == ["variance", "variance"]


def test_views_are_copies_of_one_cached_table():
    op = seed_operator()
    assert op._param_table() is op._param_table()
    names, defaults = op.free_param_names, op.param_defaults
    names.append("x")
    defaults.fill_(7.0)
    assert op.free_param_names == ["time/sigma^2", "subject/sigma^2"]
    assert op.param_defaults.tolist() == [s.default for s in op.param_specs] != [7.0] * 3


def test_fix_and_free_make_the_table_stale_here_and_above():
    model = MixedModel(random={"g": (torch.eye(4, dtype=DTYPE), ScalarMatrix(4))},
                       residual=Sum(serial=AR1Matrix(4), nugget=ScalarMatrix(4)))
    before = model._param_table()
    model.residual.serial.fix("rho")                # an operand's own fix
    assert model._param_table() is not before
    assert model.fixed_param_names == ["residual/serial/rho"]
    assert model.residual.fixed_param_names == ["serial/rho"]
    assert model.num_free_params == 3 and model.free_param_index == [0, 1, 3]
    model.free("residual/serial/rho")
    assert model.fixed_param_names == [] and model.num_free_params == 4
    model.fix("g/sigma^2", 2.0)
    assert model.residual.num_fixed_params == 0 and model.fixed_param_index == [0]


def test_a_replaced_operand_makes_the_table_stale():
    op = KroneckerProduct(time=AR1Matrix(2), subject=ScalarMatrix(2))
    assert op.num_params == 3
    times = CAR1Matrix(torch.tensor([0.0, 1.5], dtype=DTYPE))
    times.fix("sigma^2")
    op.time = times
    assert op.param_names == ["time/sigma^2", "time/phi", "subject/sigma^2"]
    assert op.fixed_param_names == ["time/sigma^2"]


def test_any_spec_change_makes_every_table_stale():
    op = seed_operator()
    table = op._param_table()
    assert table.current
    ParamTable.specs_changed()
    assert not table.current and op._param_table() is not table
    assert op._param_table().names == table.names


# ------------------------------------------------------------------------ parameter roles
@pytest.mark.parametrize("transform, role", [
    (ExpPow2(), "variance"), (Softplus(), "variance"), (Exp(), "sd"),
    (Chain(Sigmoid(), ScaleShift(2.0, -1.0)), "correlation"), (Sigmoid(), "correlation"),
    (Identity(), "free")])
def test_default_role_of_a_transform(transform, role):
    assert default_role(transform) == role
    assert role in ROLE_SCALE_POWER


# ------------------------------------------------------------ the torch-openreml interface
def test_grad_and_map_theta_are_the_closed_form_jacobian_and_the_matrix():
    op = seed_operator()
    theta = torch.tensor([0.3, -0.2], dtype=DTYPE)
    J, names = op.grad(theta)
    Jm, names_m = op.manual_grad(theta)
    assert names == names_m == op.free_param_names
    torch.testing.assert_close(J, Jm, rtol=0, atol=0)
    torch.testing.assert_close(op.map_theta_to_dv(theta), Jm, rtol=0, atol=0)
    torch.testing.assert_close(op.map_theta_to_v(theta), op(theta), rtol=0, atol=0)
    assert op.map_theta_to_v().shape == (4, 4)


def test_trans_grad_and_to_free_are_the_chain_rule():
    op = KroneckerProduct(time=AR1Matrix(3), subject=UnconstrainedMatrix(2))
    op.fix("time/sigma^2", 2.0)
    free = torch.tensor([0.4, -0.3, 0.2, 0.5], dtype=DTYPE)
    x = free.clone().requires_grad_(True)
    nat = op.build_params(x, include_fixed=False)
    jac = torch.stack([torch.autograd.grad(nat[k], x, retain_graph=True)[0]
                       for k in range(len(nat))])
    torch.testing.assert_close(op.trans_grad(free), jac.diagonal(), rtol=1e-12, atol=1e-14)
    g_nat = torch.randn(op.num_params, 3, generator=torch.Generator().manual_seed(0),
                        dtype=DTYPE)
    expected = g_nat[op.free_param_index] * jac.diagonal()[:, None]
    torch.testing.assert_close(op.to_free(g_nat, free), expected, rtol=1e-12, atol=1e-14)
    assert op.build_params(free).shape == (op.num_params,)


def test_repr_dict_of_a_structure_and_an_operator():
    op = seed_operator()
    assert op.repr_dict == {"time": op.time, "subject": op.subject}
    assert op.time.repr_dict == {"shape": (2, 2), "sigma^2": 1.0, "rho": 0.5}


# ------------------------------------------------------------------ intermediate cache
def test_intermediates_are_kept_per_parameter_vector():
    op = seed_operator()
    p = torch.tensor([0.1, 0.2], dtype=DTYPE)
    assert op.get_intermediates(p) is None
    op.set_intermediates(p, "values at p")
    assert op.get_intermediates(p.clone()) == "values at p"
    assert op.get_intermediates(p + 1e-12) is None            # another point
    assert op.get_intermediates(p.clone().requires_grad_(True)) is None   # a graph: none
    op.set_intermediates(p.clone().requires_grad_(True), "with a graph")
    assert op.get_intermediates(p) == "values at p"
    op.reset_intermediates()
    assert op.get_intermediates(p) is None
    op.set_intermediates(p, "values at p")
    op.to(torch.float32)                                      # a conversion clears it
    assert op.get_intermediates(p) is None
