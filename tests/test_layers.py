"""Covariance layers inside deep models: losses against dense references, gradients, BLUPs,
training on a simulated problem, input errors, the group sampler and the Lightning module."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from covmodules import (AR1Matrix, DeepKernel, EqualEntryMatrix, GroupBatchSampler,
                        GroupedCovariance, KroneckerCovariance, RandomIntercept, ScalarMatrix, Sum,
                        UnconstrainedMatrix, gaussian_nll)
from covmodules.reml import REML

D = torch.float64


def dense_nll(V, r):
    L = torch.linalg.cholesky(V)
    return (torch.log(L.diagonal()).sum() + 0.5 * r @ torch.cholesky_solve(r[:, None], L)[:, 0]
            + 0.5 * r.numel() * math.log(2 * math.pi))


def perturb(layer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.4 * torch.randn((), generator=g, dtype=p.dtype))
    return layer


def grouped_batch(seed=0):
    """Ten rows of four groups of unequal sizes, shuffled, with positions 0..3."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.tensor([3, 0, 0, 1, 3, 3, 1, 0, 3, 5])
    positions = torch.tensor([0, 0, 1, 2, 1, 2, 1, 2, 3, 0])
    return groups, positions, torch.randn(10, generator=g, dtype=D), torch.randn(10, generator=g,
                                                                                 dtype=D)


def kronecker_batch(complete=True):
    """Three whole 2 x 3 grids (rows shuffled), or the same with two rows dropped."""
    g = torch.Generator().manual_seed(1)
    groups = torch.arange(3).repeat_interleave(6)
    positions = torch.cat([torch.randperm(6, generator=g) for _ in range(3)])
    perm = torch.randperm(18, generator=g)
    y, mean = torch.randn(18, generator=g, dtype=D), torch.randn(18, generator=g, dtype=D)
    rows = perm if complete else perm[:-2]
    return groups[rows], positions[rows], y[rows], mean[rows]


LAYERS = {
    "intercept": lambda: (RandomIntercept(6), grouped_batch()),
    "ar1+intercept": lambda: (GroupedCovariance(Sum(subject=EqualEntryMatrix(4),
                                                    serial=AR1Matrix(4)), 6), grouped_batch()),
    "ar1 no nugget": lambda: (GroupedCovariance(AR1Matrix(4), 6, nugget=False), grouped_batch()),
    "kronecker": lambda: (KroneckerCovariance(AR1Matrix(2), UnconstrainedMatrix(3), 4),
                          kronecker_batch()),
    "kronecker incomplete": lambda: (KroneckerCovariance(AR1Matrix(2), AR1Matrix(3), 4),
                                     kronecker_batch(complete=False)),
}


def layer_and_batch(name):
    layer, (groups, positions, y, mean) = LAYERS[name]()
    index = (groups,) if name == "intercept" else (groups, positions)
    return perturb(layer, 3), index, y, mean


def dense_reference(layer, index, y, mean):
    """``-log N`` from the batch model's dense ``V``, built by autograd from the free params."""
    V = layer.batch_model(*index)(layer.free_params())
    return dense_nll(V, y - mean)


# ----------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("name", list(LAYERS))
def test_closed_form_nll_equals_dense(name):
    layer, index, y, mean = layer_and_batch(name)
    dense = dense_reference(layer, index, y, mean)
    assert torch.allclose(layer.nll(y, mean, *index), dense, rtol=0, atol=1e-10)
    mean_loss = layer.nll(y, mean, *index, reduction="mean")
    assert torch.allclose(mean_loss, dense / len(y), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(LAYERS))
def test_gradients_equal_dense_autograd(name):
    layer, index, y, mean = layer_and_batch(name)
    params = [p for p in layer.parameters()]
    mean = mean.clone().requires_grad_()
    ours = torch.autograd.grad(layer.nll(y, mean, *index), params + [mean])
    ref = torch.autograd.grad(dense_reference(layer, index, y, mean), params + [mean])
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


def test_deep_kernel_equals_dense_gram_plus_nugget():
    g = torch.Generator().manual_seed(2)
    phi = torch.randn(9, 3, generator=g, dtype=D, requires_grad=True)
    y, mean = torch.randn(9, generator=g, dtype=D), torch.randn(9, generator=g, dtype=D)
    layer = perturb(DeepKernel(3), 4)
    s = layer.nugget.get_parameter("sigma^2")
    ours = layer.nll(y, mean, phi)
    assert torch.allclose(ours, gaussian_nll(layer.batch_model(phi), y, mean), rtol=0, atol=1e-10)
    V = phi @ phi.T + layer.nugget()[0, 0] * torch.eye(9, dtype=D)
    ref = dense_nll(V, y - mean)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-10)
    for a, b in zip(torch.autograd.grad(ours, [phi, s]), torch.autograd.grad(ref, [phi, s])):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


class Net(nn.Module):
    """A small network: ``mean = head(tanh(body(x)))``; the features are ``tanh(body(x))``."""

    def __init__(self, layer, width=3):
        super().__init__()
        self.body, self.head, self.layer = nn.Linear(2, width), nn.Linear(width, 1), layer

    def features(self, x):
        return torch.tanh(self.body(x))

    def forward(self, x):
        return self.head(self.features(x))[:, 0]


class Wrapped(nn.Module):
    """Calls ``fn(self.model)`` in ``forward`` so ``functional_call`` swaps every parameter."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn(self.model)


@pytest.mark.parametrize("name", list(LAYERS) + ["deep kernel", "reml"])
def test_gradcheck_through_a_small_network(name):
    torch.manual_seed(0)
    if name == "deep kernel":
        net, index = Net(perturb(DeepKernel(3), 5)).double(), None
        y = torch.randn(10, dtype=D)
    elif name == "reml":
        net, index = Net(perturb(RandomIntercept(6), 5)).double(), grouped_batch()[:1]
        y = grouped_batch()[2]
    else:
        layer, index, y, _ = layer_and_batch(name)
        net = Net(layer).double()
    x = torch.randn(len(y), 2, dtype=D)

    def loss(m):
        if name == "deep kernel":
            return m.layer.nll(y, m(x), m.features(x))
        if name == "reml":
            X = torch.cat([torch.ones(len(y), 1, dtype=D), m.features(x)], 1)
            return m.layer.reml(y, X, *index)
        return m.layer.nll(y, m(x), *index)

    wrapped = Wrapped(net)
    names = [n for n, _ in wrapped.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_() for p in wrapped.parameters())
    assert any(n.startswith("model.layer.") for n in names)
    assert torch.autograd.gradcheck(
        lambda *ps: functional_call(wrapped, dict(zip(names, ps)), (loss,)), values,
        eps=1e-6, atol=1e-6)


def test_reml_with_last_layer_features_equals_dense_reml():
    torch.manual_seed(1)
    groups, _, y, _ = grouped_batch()
    layer, net = perturb(RandomIntercept(6), 6), Net(None).double()
    x = torch.randn(10, 2, dtype=D)
    X = torch.cat([torch.ones(10, 1, dtype=D), net.features(x)], 1)
    ours = layer.reml(y, X, groups)
    V = layer.batch_model(groups)()
    dense_model = GroupedCovariance(EqualEntryMatrix(4), 6, nugget=True)
    dense_model.within.set_param("sigma^2", layer.variance_components["intercept/sigma^2"])
    dense_model.nugget.set_param("sigma^2", layer.variance_components["residual/sigma^2"])
    other = dense_model.reml(y, X, groups)
    assert torch.allclose(ours, other, rtol=0, atol=1e-10)
    ref = REML(layer.batch_model(groups), y, X.detach(), solver="dense").loss()
    assert torch.allclose(ours, ref, rtol=0, atol=1e-10)
    assert torch.allclose(V, dense_model.batch_model(groups)(), rtol=0, atol=1e-12)
    ours.backward()
    assert net.body.weight.grad is not None and float(net.body.weight.grad.abs().sum()) > 0
    assert layer.intercept.get_parameter("sigma^2").grad is not None
    state = layer.reml_objective(y, X.detach(), groups).state(layer.free_params().detach())
    assert state.beta.shape == (4,)


# -------------------------------------------------------------------------- prediction
def test_random_intercept_blups_for_seen_groups_and_mean_for_new():
    groups, _, y, mean = grouped_batch()
    layer = perturb(RandomIntercept(8), 7)
    u = layer.fit_blups(y, mean, groups)
    model = layer.batch_model(groups)
    Z = model.design("intercept")
    V = model()
    dense = layer.variance_components["intercept/sigma^2"] * Z.T @ torch.linalg.solve(V, y - mean)
    present = torch.unique(groups)
    assert torch.allclose(u[present], dense, rtol=0, atol=1e-12)
    assert layer.seen.tolist() == [g in present.tolist() for g in range(8)]
    new_mean = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float32)
    codes = torch.tensor([3, 2, 8, -1])        # seen, unseen level, beyond num_levels, negative
    pred = layer.predict(new_mean, codes)
    assert pred.dtype == torch.float32
    assert torch.isclose(pred[0], new_mean[0] + u[3].float())
    assert torch.equal(pred[1:], new_mean[1:])
    assert layer.predict(new_mean[:, None], codes).shape == (4, 1)


def test_grouped_blup_is_the_conditional_mean():
    groups, positions, y, mean = grouped_batch()
    within = Sum(subject=EqualEntryMatrix(4), serial=AR1Matrix(4))
    layer = perturb(GroupedCovariance(within, 6), 8)
    layer.fit_blups(y, mean, groups, positions)
    new_groups, new_pos = torch.tensor([3, 0, 1, 4]), torch.tensor([2, 3, 0, 1])
    new_mean = torch.zeros(4, dtype=D)
    pred = layer.predict(new_mean, new_groups, new_pos)
    alpha = torch.linalg.solve(layer.batch_model(groups, positions)(), y - mean)
    S = layer.within().detach()
    for k in range(3):      # seen groups: C*ᵀ V⁻¹ r with C* the within-group covariances
        same = groups == new_groups[k]
        expected = (S[new_pos[k], positions[same]] * alpha[same]).sum()
        assert torch.allclose(pred[k], expected, rtol=0, atol=1e-12)
    assert pred[3] == 0          # group 4 was not in the training data


def test_kronecker_layer_takes_a_fixed_tensor_factor():
    groups, positions, y, mean = kronecker_batch()
    layer = KroneckerCovariance(AR1Matrix(2), torch.eye(3, dtype=D), 4)
    assert list(layer.variance_components) == ["within/row/sigma^2", "within/row/rho",
                                               "nugget/sigma^2"]
    dense = dense_reference(layer, (groups, positions), y, mean)
    assert torch.allclose(layer.nll(y, mean, groups, positions), dense, rtol=0, atol=1e-10)


def test_kronecker_and_deep_kernel_blups():
    groups, positions, y, mean = kronecker_batch()
    layer = perturb(KroneckerCovariance(AR1Matrix(2), AR1Matrix(3), 4), 9)
    layer.fit_blups(y, mean, groups, positions)
    complete = layer.blup_weights.clone()
    layer._grids = lambda codes, pos: None                 # force the blockwise path
    assert torch.allclose(layer.fit_blups(y, mean, groups, positions), complete, atol=1e-12)

    g = torch.Generator().manual_seed(3)
    phi, phi_new = torch.randn(12, 2, generator=g, dtype=D), torch.randn(3, 2, generator=g, dtype=D)
    y, mean = torch.randn(12, generator=g, dtype=D), torch.zeros(12, dtype=D)
    kernel = perturb(DeepKernel(2), 10)
    kernel.fit_blups(y, mean, phi)
    V = kernel.batch_model(phi)()
    expected = phi_new @ phi.T @ torch.linalg.solve(V, y)
    assert torch.allclose(kernel.predict(torch.zeros(3, dtype=D), phi_new), expected, atol=1e-12)


# ------------------------------------------------------------------------------ training
def simulate(seed, q=1000, per_group=10, sig2u=4.0, sig2e=1.0):
    g = torch.Generator().manual_seed(seed)
    n = q * per_group
    x = torch.rand(n, 2, generator=g) * 2 - 1
    f = torch.sin(2 * x[:, 0]) + x[:, 1] ** 2
    groups = torch.arange(q).repeat_interleave(per_group)
    u = torch.randn(q, generator=g) * math.sqrt(sig2u)
    y = f + u[groups] + torch.randn(n, generator=g) * math.sqrt(sig2e)
    test = torch.rand(n, generator=g) < 0.2
    return (x[~test], y[~test], groups[~test]), (x[test], y[test], groups[test])


def small_net():
    return nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 1))



def test_training_recovers_variance_components_and_beats_ignoring_the_groups(one_thread):
    torch.manual_seed(0)
    (x, y, g), (x_test, y_test, g_test) = simulate(0)
    sizes = torch.bincount(g, minlength=1000)
    net, layer = small_net(), RandomIntercept(1000, group_sizes=sizes)
    opt = torch.optim.Adam([{"params": net.parameters(), "lr": 1e-2},
                            {"params": layer.parameters(), "lr": 5e-2}])
    sampler = GroupBatchSampler(g, groups_per_batch=100, seed=0)
    for _ in range(20):
        for idx in sampler:
            opt.zero_grad()
            layer.nll(y[idx], net(x[idx])[:, 0], g[idx], reduction="mean").backward()
            opt.step()
    v = layer.variance_components
    assert abs(v["intercept/sigma^2"] / 4.0 - 1) < 0.1
    assert abs(v["residual/sigma^2"] / 1.0 - 1) < 0.1

    torch.manual_seed(0)
    plain = small_net()
    opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    for _ in range(20):
        for idx in torch.randperm(len(y)).split(800):
            opt.zero_grad()
            ((plain(x[idx])[:, 0] - y[idx]) ** 2).mean().backward()
            opt.step()
    layer.eval()
    with torch.no_grad():
        layer.fit_blups(y, net(x)[:, 0], g)
        mse_layer = ((layer.predict(net(x_test)[:, 0], g_test) - y_test) ** 2).mean()
        mse_plain = ((plain(x_test)[:, 0] - y_test) ** 2).mean()
    assert mse_layer < 1.3 < 4.0 < mse_plain


def test_float32_network_float64_covariance_algebra():
    (x, y, g), _ = simulate(1, q=20)
    net, layer = small_net(), RandomIntercept(20)
    loss = layer.nll(y, net(x), g)
    assert loss.dtype == torch.float64 and net(x).dtype == torch.float32
    loss.backward()
    assert net[0].weight.grad.dtype == torch.float32
    assert layer.intercept.get_parameter("sigma^2").grad.dtype == torch.float64
    layer.float()               # float32 parameters: the algebra still runs in float64
    assert layer.nll(y, net(x), g).dtype == torch.float64


def fitted_layers():
    """A fitted layer of each kind with its training index and new rows to predict."""
    groups, positions, y, mean = grouped_batch()
    grouped = perturb(GroupedCovariance(AR1Matrix(4), 6), 11)
    k_groups, k_pos, k_y, k_mean = kronecker_batch()
    kron = perturb(KroneckerCovariance(AR1Matrix(2), AR1Matrix(3), 4), 12)
    g = torch.Generator().manual_seed(4)
    phi, phi_new = torch.randn(10, 2, generator=g, dtype=D), torch.randn(3, 2, generator=g, dtype=D)
    kernel = perturb(DeepKernel(2), 13)
    return [(grouped, (y, mean, groups, positions), (torch.zeros(3), groups[:3], positions[:3])),
            (kron, (k_y, k_mean, k_groups, k_pos), (torch.zeros(3), k_groups[:3], k_pos[:3])),
            (kernel, (y, mean, phi), (torch.zeros(3), phi_new)),
            (perturb(RandomIntercept(6), 14), (y, mean, groups), (torch.zeros(3), groups[:3]))]


def test_float32_layers_fit_blups_and_predict_like_float64():
    for layer, train, new in fitted_layers():
        expected = (layer.fit_blups(*train), layer.predict(*new))
        layer.float()           # float32 parameters and buffers (e.g. model.float())
        got = (layer.fit_blups(*train), layer.predict(*new))
        assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
        for a, b in zip(got, expected):
            assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layers_on_cuda_match_cpu():
    for layer, train, new in fitted_layers():
        expected = (layer.nll(*train), layer.fit_blups(*train), layer.predict(*new))
        layer.cuda()
        # tensors on the GPU; integer index lists (groups, positions) may stay on the host
        cuda_train = [t.cuda() if t.is_floating_point() else t.tolist() for t in train]
        cuda_new = [t.cuda() if t.is_floating_point() else t.tolist() for t in new]
        got = (layer.nll(*cuda_train), layer.fit_blups(*cuda_train), layer.predict(*cuda_new))
        for a, b in zip(got, expected):
            assert a.is_cuda and torch.allclose(a.cpu(), b, rtol=1e-10, atol=1e-10)


def test_a_model_owns_several_layers_and_saves_their_blups():
    class TwoResponses(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(2, 2)
            self.intercepts = RandomIntercept(5)
            self.serial = GroupedCovariance(AR1Matrix(4), 5)

    torch.manual_seed(0)
    model = TwoResponses()
    names = [n for n, _ in model.named_parameters()]
    assert {"intercepts.intercept.sigma^2", "intercepts.residual.sigma^2",
            "serial.within.rho", "serial.nugget.sigma^2"} <= set(names)
    x, y = torch.randn(8, 2), torch.randn(8, 2)
    g, t = torch.tensor([0, 0, 1, 1, 2, 2, 4, 4]), torch.tensor([0, 1, 0, 2, 1, 3, 0, 1])
    out = model.net(x)
    loss = model.intercepts.nll(y[:, 0], out[:, 0], g) + model.serial.nll(y[:, 1], out[:, 1], g, t)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.intercepts.fit_blups(y[:, 0], out[:, 0].detach(), g)
    model.serial.fit_blups(y[:, 1], out[:, 1].detach(), g, t)
    copy = TwoResponses()
    copy.load_state_dict(model.state_dict())
    out = out.detach()
    assert torch.equal(copy.intercepts.predict(out[:, 0], g),
                       model.intercepts.predict(out[:, 0], g))
    assert torch.equal(copy.serial.predict(out[:, 1], g, t), model.serial.predict(out[:, 1], g, t))


# ---------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors():
    layer = RandomIntercept(3, group_sizes=torch.tensor([2, 1, 0]))
    y, mean, g = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3), torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="y contains 1 NaN"):
        layer.nll(torch.tensor([1.0, float("nan"), 3.0]), mean, g)
    with pytest.raises(ValueError, match="mean contains"):
        layer.nll(y, torch.tensor([0.0, float("inf"), 0.0]), g)
    with pytest.raises(ValueError, match="y has 3 rows but mean has 2"):
        layer.nll(y, torch.zeros(2), g)
    with pytest.raises(ValueError, match=r"mean must have shape \(n,\) or \(n, 1\)"):
        layer.nll(y, torch.zeros(3, 2), g)
    with pytest.raises(ValueError, match=r"groups must have shape \(3,\)"):
        layer.nll(y, mean, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer codes"):
        layer.nll(y, mean, torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"codes in 0\.\.2"):
        layer.nll(y, mean, torch.tensor([0, 0, 3]))
    # the data checks of REML: integers are converted, complex and boolean tensors refused
    assert torch.equal(layer.nll(torch.tensor([1, 2, 3]), mean, g), layer.nll(y, mean, g))
    with pytest.raises(TypeError, match="y must hold real numbers.*complex64"):
        layer.nll(y.to(torch.complex64), mean, g)
    with pytest.raises(ValueError, match="reduction"):
        layer.nll(y, mean, g, reduction="none")
    with pytest.raises(ValueError, match="batch holds part of 1 group.*group 0 with 1 of its 2"):
        layer.nll(y[1:], mean[1:], g[1:])
    layer.eval()                # evaluation batches need not hold whole groups
    layer.nll(y[1:], mean[1:], g[1:])
    with pytest.raises(ValueError, match="group_sizes must have shape"):
        RandomIntercept(3, group_sizes=torch.tensor([1, 2]))

    grouped = GroupedCovariance(AR1Matrix(3), 2)
    with pytest.raises(ValueError, match=r"positions must lie in 0\.\.2"):
        grouped.nll(y, mean, g, torch.tensor([0, 3, 0]))
    with pytest.raises(ValueError, match="positions must lie"):
        grouped.nll(torch.ones(4), torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="CovarianceModule"):
        GroupedCovariance(torch.eye(3), 2)
    with pytest.raises(ValueError, match="not positive definite"):
        no_nugget = GroupedCovariance(AR1Matrix(3), 2, nugget=False)
        no_nugget.nll(y, mean, g, torch.tensor([1, 1, 0]))   # two rows at one position
    kernel = DeepKernel(2)
    with pytest.raises(ValueError, match=r"features must have shape \(3, 2\)"):
        kernel.nll(y, mean, torch.ones(3, 3))
    with pytest.raises(ValueError, match="features contain NaN"):
        kernel.nll(y, mean, torch.full((3, 2), float("nan")))
    with pytest.raises(ValueError, match="covariance has shape"):
        gaussian_nll(ScalarMatrix(2), y, mean)
    empty, no_groups = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    for empty_layer, index in ((layer, (no_groups,)), (grouped, (no_groups,)),
                               (kernel, (torch.zeros(0, 2),))):
        with pytest.raises(ValueError, match="empty: a batch needs at least one row"):
            empty_layer.nll(empty, empty, *index, reduction="mean")
    with pytest.raises(ValueError, match="groups is empty"):
        layer.batch_model(no_groups)
    with pytest.raises(TypeError, match="features must be a floating-point tensor"):
        kernel.batch_model([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"features must have shape \(n, 2\)"):
        kernel.batch_model(torch.ones(3))


def test_group_batch_sampler_yields_whole_groups_once_per_epoch():
    groups = torch.tensor([4, 0, 2, 2, 4, 1, 0, 4, 3, 1])
    sampler = GroupBatchSampler(groups, groups_per_batch=2, seed=5)
    assert len(sampler) == 3
    first = [b.tolist() for b in sampler]
    second = [b.tolist() for b in sampler]
    for epoch in (first, second):
        rows = sorted(r for b in epoch for r in b)
        assert rows == list(range(10))
        for b in epoch:             # every batch holds all rows of its groups
            for code in set(groups[b].tolist()):
                assert int((groups[b] == code).sum()) == int((groups == code).sum())
    assert first != second
    sampler.set_epoch(0)
    assert [b.tolist() for b in sampler] == first
    with pytest.raises(TypeError, match="integer codes"):
        GroupBatchSampler([0.5, 1.0], 1)
    with pytest.raises(ValueError, match="non-negative"):
        GroupBatchSampler([0, -1], 1)


# ----------------------------------------------------------------------------- Lightning
def test_lightning_config_trains_and_logs_to_tensorboard(tmp_path):
    from training.deep import main

    cli = main(["fit", "--config", "configs/lmmnn.yaml", "--data.n", "600", "--data.q", "12",
                "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
                "--trainer.enable_checkpointing", "false",
                "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert cli.model.layer.num_levels == 12
    metrics = cli.trainer.logged_metrics
    assert {"nll", "val_mse", "sigma2/intercept", "sigma2/residual"} <= set(metrics)
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_fixing_and_freeing_a_layer_parameter_reaches_every_batch():
    """The batch models reuse one float64 copy of the layer's structure; its fixed flags and
    values follow the layer's at every batch."""
    g = torch.Generator().manual_seed(4)
    layer = GroupedCovariance(AR1Matrix(4), num_levels=5)
    groups = torch.arange(20) // 4
    y = torch.randn(20, generator=g, dtype=torch.float64)
    mean = torch.zeros(20, dtype=torch.float64)
    free = layer.nll(y, mean, groups)
    layer.within.fix("rho", 0.5)
    fixed = layer.nll(y, mean, groups)
    layer.within.free("rho")
    layer.within.set_param("rho", 0.0)
    assert float(layer.nll(y, mean, groups)) == pytest.approx(float(free), rel=1e-14)
    assert float(fixed) != pytest.approx(float(free), rel=1e-6)
    dense = gaussian_nll(layer.batch_model(groups), y, mean)
    assert float(layer.nll(y, mean, groups)) == pytest.approx(float(dense), rel=1e-12)


# ------------------------------------------------------------- the layers' per-batch solver
@pytest.mark.parametrize("nugget", [True, False])
@pytest.mark.parametrize("within", ["ar1", "ar1+intercept", "unstructured"])
def test_grouped_solver_of_rows_equals_the_batch_models_solvers(within, nugget):
    """GroupedSolver.within_groups (the layers' path, no batch model) against the grouped and
    dense solvers of Grouped(S) (+ σ² I): -l, gradient and AI, ML and REML; with a nugget, two
    rows of a group at one position."""
    from covmodules import Grouped
    from covmodules.linalg import DenseSolver, GroupedSolver
    S = {"ar1": lambda: AR1Matrix(4), "unstructured": lambda: UnconstrainedMatrix(4),
         "ar1+intercept": lambda: Sum(subject=EqualEntryMatrix(4), serial=AR1Matrix(4))}[within]()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in S.parameters():
            p.add_(0.3 * torch.randn((), generator=g, dtype=p.dtype))
    groups, positions, y, _ = grouped_batch()
    if nugget:
        positions = positions.clone()
        positions[2] = positions[1]                 # group 0: two rows at position 0
    model, structure, rows = Grouped(S, groups=groups, positions=positions), S, (S,)
    if nugget:
        model = Sum(within=model, nugget=ScalarMatrix(10))
        structure = Sum(within=S, nugget=ScalarMatrix(4))
        for m in (model, structure):
            m.set_param("nugget/sigma^2", 0.7)
        rows = (S, structure.nugget)
    solver = GroupedSolver.within_groups(structure, rows[0], groups, positions, *rows[1:])
    free = structure._registered_free().detach()
    assert torch.equal(free, model._registered_free().detach())
    X = torch.stack([torch.ones(10, dtype=D), torch.randn(10, generator=g, dtype=D)], 1)
    for method in ("ml", "reml"):
        state = solver.state(free, y, X, method)
        for other in (GroupedSolver(model), DenseSolver(model)):
            ref = other.state(free, y, X, method)
            assert torch.allclose(state.neg_loglik, ref.neg_loglik, rtol=0, atol=1e-10)
            assert torch.allclose(solver.gradient(free, state), other.gradient(free, ref),
                                  rtol=0, atol=1e-10)
            assert torch.allclose(solver.average_information(free, state),
                                  other.average_information(free, ref), rtol=0, atol=1e-10)
