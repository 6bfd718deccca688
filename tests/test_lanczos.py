"""Restarted Lanczos with repeated eigenvalues (issue 15), eigenvectors, skipping the flat dimension, the HVPs.

References: dense float64 Hessians (``torch.func.hessian``) and ``torch.linalg.eigvalsh``; ``scipy``'s ``eigsh``
where scipy is installed.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from conftest import gen, mlp
from torch import Tensor, nn

from lightning_geomdim import batch_functional_dimension, flatness
from lightning_geomdim.core.functional_model import FunctionalModel, ProbeInputs, measurement_mode
from lightning_geomdim.core.hessian import HessianOperator, convert_targets
from lightning_geomdim.core.lanczos import default_tolerance, lanczos, lanczos_vectors
from lightning_geomdim.core.probe_trace import ProbeTrace

LossFn = Callable[[Tensor, Tensor], Tensor]


#: One intra-op thread (``conftest.one_thread``): results do not depend on it, the time does.
pytestmark = pytest.mark.usefixtures("one_thread")


def dense_hessian(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, params: Sequence[str] | None = None
) -> Tensor:
    """(P, P) float64 Hessian w.r.t. ``params`` (default all trainable), by ``torch.func.hessian``."""
    ref = copy.deepcopy(model).double().eval()
    named = dict(ref.named_parameters())
    names = list(params) if params is not None else [n for n, p in named.items() if p.requires_grad]
    fixed = {n: p.detach() for n, p in named.items() if n not in names}
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])
    target = y.double() if y.is_floating_point() else y

    def loss(theta: Tensor) -> Tensor:
        values, start = dict(fixed), 0
        for n in names:
            values[n] = theta[start : start + named[n].numel()].view_as(named[n])
            start += named[n].numel()
        return loss_fn(torch.func.functional_call(ref, values, (x.double(),)), target)

    h = torch.func.hessian(loss)(flat)
    return (h + h.T) / 2


def linear_case() -> tuple[nn.Module, Tensor, Tensor]:
    """Issue 15's first reproduction: H = (2 / (N·10)) I₁₀ ⊗ [X 1]ᵀ[X 1], every eigenvalue 10 times."""
    torch.manual_seed(0)
    model = nn.Linear(50, 10).double()
    x = torch.randn(256, 50, dtype=torch.float64) * torch.linspace(0.2, 2.0, 50, dtype=torch.float64)
    y = torch.randn(256, 10, dtype=torch.float64)
    return model, x, y


def last_layer_case() -> tuple[nn.Module, Tensor, Tensor, list[str]]:
    """Issue 15's second reproduction: an MLP [20, 64, 64, 5], MSE, Hessian of the last layer only (I₅ ⊗ ·)."""
    model = mlp([20, 64, 64, 5], seed=0)
    x, y = torch.randn(256, 20, generator=gen(1)), torch.randn(256, 5, generator=gen(2))
    return model, x, y, ["4.weight", "4.bias"]


def top(h: Tensor, k: int) -> Tensor:
    return torch.linalg.eigvalsh(h).flip(0)[:k]


def symmetric(eigenvalues: list[float], seed: int) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen(seed), dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


# --- the two reproductions of issue 15 ------------------------------------------------------------------------


def test_linear_model_returns_every_copy_of_the_top_eigenvalue() -> None:
    model, x, y = linear_case()
    expected = top(dense_hessian(model, F.mse_loss, x, y), 6)
    assert torch.allclose(expected[:5], expected[0].expand(5), rtol=1e-12)  # multiplicity 10: five copies
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # converges within the default iterations
        res = flatness(model, F.mse_loss, x, y, top_k=5, flat_dimension=False)
    assert res.method == "lanczos" and res.converged  # P = 510: matrix-free
    torch.testing.assert_close(res.top_eigenvalues, expected[:5], rtol=1e-10, atol=0)
    assert (res.eigenvalue_residuals <= default_tolerance(torch.float64) * res.max_eigenvalue).all()


@pytest.mark.parametrize("method", ["lanczos", "auto"])
def test_last_layer_hessian_returns_every_copy_of_the_top_eigenvalue(method: str) -> None:
    model, x, y, params = last_layer_case()
    expected = top(dense_hessian(model, F.mse_loss, x, y, params), 5)
    assert float(expected[0] - expected[4]) < 1e-12 * float(expected[0])  # one eigenvalue, five copies
    res = flatness(model, F.mse_loss, x, y, top_k=5, params=params, method=method, flat_dimension=False)
    assert res.converged and res.num_params == 325
    torch.testing.assert_close(res.top_eigenvalues, expected, rtol=1e-10, atol=0)


# --- Lanczos on explicit matrices: multiplicities, the convergence flag, thick restarts ------------------------


@pytest.mark.parametrize("k", [1, 4, 6])
def test_multiplicity_four_top_eigenvalue_against_eigvalsh(k: int) -> None:
    spectrum = [4.0] * 4 + [3.5] + [3.0] * 2 + torch.linspace(-1.0, 2.0, 113, dtype=torch.float64).tolist()
    a = symmetric(spectrum, seed=1)
    res = lanczos(lambda v: a @ v, a.shape[0], k=k, max_iterations=400, generator=gen(2))
    assert res.converged and res.num_runs >= 2  # at least the first run and the check run
    torch.testing.assert_close(res.eigenvalues, top(a, k), rtol=1e-10, atol=0)
    vectors = res.eigenvectors
    assert vectors.shape == (a.shape[0], k) and vectors.dtype == torch.float64
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(a @ vectors, vectors * res.eigenvalues, rtol=0, atol=1e-7)


def test_multiplicity_against_scipy_eigsh() -> None:
    sla = pytest.importorskip("scipy.sparse.linalg")
    np = pytest.importorskip("numpy")
    spectrum = [2.0] * 3 + [1.9] * 2 + torch.linspace(-0.5, 1.5, 95, dtype=torch.float64).tolist()
    a = symmetric(spectrum, seed=3)
    res = lanczos(lambda v: a @ v, 100, k=5, max_iterations=400, generator=gen(4))
    reference = np.sort(sla.eigsh(a.numpy(), k=5, which="LA", v0=np.ones(100))[0])[::-1].copy()
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, torch.from_numpy(reference), rtol=1e-10, atol=0)


def test_single_run_answer_is_not_reported_converged() -> None:
    """Out of iterations before the check run: the first run's top-k Ritz pairs have converged, yet two copies of
    the repeated eigenvalue are missing; the flag must say so."""
    a = symmetric([5.0] * 3 + torch.linspace(0.0, 1.0, 57).tolist(), seed=5)
    first = lanczos(lambda v: a @ v, 60, k=3, max_iterations=400, generator=gen(6))
    assert first.converged and torch.allclose(first.eigenvalues, torch.full((3,), 5.0, dtype=torch.float64))
    short = lanczos(lambda v: a @ v, 60, k=3, max_iterations=first.num_matvecs - 1, generator=gen(6))
    assert not short.converged


def test_thick_restart_bounds_the_basis_and_keeps_the_answer() -> None:
    spectrum = torch.linspace(0.0, 1.0, 300, dtype=torch.float64)
    spectrum[-3:] = torch.tensor([1.3, 1.2, 1.1], dtype=torch.float64)
    a = symmetric(spectrum.tolist(), seed=7)
    sizes: list[int] = []

    def matvec(v: Tensor) -> Tensor:
        sizes.append(v.numel())
        return a @ v

    res = lanczos(matvec, 300, k=3, max_iterations=600, max_basis=8, generator=gen(8))
    assert res.converged and res.num_matvecs > 8  # restarted (the basis holds 8 vectors)
    torch.testing.assert_close(res.eigenvalues, top(a, 3), rtol=1e-9, atol=0)
    assert lanczos_vectors(300, k=3, max_iterations=600, max_basis=8) == 8 + 2 * 3 + 4
    assert lanczos_vectors(10**6, k=1, max_iterations=10**4) == 40 + 6  # does not grow with the iterations
    with pytest.raises(ValueError, match="max_basis"):
        lanczos(matvec, 300, k=3, max_basis=4, generator=gen(8))


def test_low_rank_operator_counts_zero_copies() -> None:
    u = torch.linalg.qr(torch.randn(40, 3, generator=gen(9), dtype=torch.float64))[0]
    a = u @ torch.diag(torch.tensor([3.0, 2.0, 2.0], dtype=torch.float64)) @ u.T  # rank 3, 2.0 twice
    res = lanczos(lambda v: a @ v, 40, k=5, max_iterations=60, generator=gen(10))
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, torch.tensor([3.0, 2.0, 2.0, 0.0, 0.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)


# --- flatness: eigenvectors, skipping the flat dimension --------------------------------------------------------


@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_return_eigenvectors(method: str) -> None:
    model = mlp([4, 6, 5, 3], seed=0)
    x, y = torch.randn(10, 4, generator=gen(1)), torch.randint(0, 3, (10,), generator=gen(2))
    h = dense_hessian(model, F.cross_entropy, x, y)
    res = flatness(model, F.cross_entropy, x, y, top_k=3, method=method, return_eigenvectors=True, trace_samples=3,
                   flat_dimension=False)
    v = res.eigenvectors
    assert v is not None and v.shape == (h.shape[0], 3) and v.dtype == torch.float64 and v.device.type == "cpu"
    torch.testing.assert_close(torch.linalg.vector_norm(v, dim=0), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(v.T @ v, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(res.top_eigenvalues, top(h, 3), rtol=1e-9, atol=1e-12)
    scale = res.max_eigenvalue
    torch.testing.assert_close(h @ v, v * res.top_eigenvalues, rtol=0, atol=1e-7 * scale)
    assert flatness(model, F.cross_entropy, x, y, method=method, trace_samples=3).eigenvectors is None


@pytest.mark.parametrize("flat_dimension", [False, None])
def test_flat_dimension_false_or_default_skips_the_dimension(
    monkeypatch: pytest.MonkeyPatch, flat_dimension: bool | None,
) -> None:
    model = mlp([4, 6, 3], seed=4)
    x, y = torch.randn(8, 4, generator=gen(3)), torch.randint(0, 3, (8,), generator=gen(4))
    with_dimension = flatness(model, F.cross_entropy, x, y, flat_dimension=True)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the batch functional dimension must not be computed")

    monkeypatch.setattr(importlib.import_module("lightning_geomdim.core.flatness"), "batch_functional_dimension", fail)
    res = flatness(model, F.cross_entropy, x, y, flat_dimension=flat_dimension)
    assert res.flat_dimension is None and res.functional_dimension is None
    assert res.max_eigenvalue == with_dimension.max_eigenvalue and res.trace == with_dimension.trace
    dim = batch_functional_dimension(model, x)
    with pytest.raises(ValueError, match="flat_dimension=False"):
        flatness(model, F.cross_entropy, x, y, flat_dimension=False, dimension=dim)
    given = flatness(model, F.cross_entropy, x, y, dimension=dim)  # a given dimension needs no computation
    assert given.functional_dimension == dim.rank == with_dimension.functional_dimension


# --- Hessian-vector products ------------------------------------------------------------------------------------


def operator(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, chunk_size: int | None = 1) -> HessianOperator:
    fm = FunctionalModel.from_module(model, dtype=torch.float64)
    inputs = ProbeInputs.from_batch(x, dtype=torch.float64, device=fm.device)
    targets = convert_targets(y, dtype=torch.float64, device=fm.device)
    return HessianOperator(ProbeTrace.record(fm, inputs), loss_fn, targets, chunk_size)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_cached_reverse_products_match_forward_over_reverse_and_the_dense_hessian(loss: str) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3))
    x = torch.randn(12, 4, generator=gen(5))
    if loss == "cross_entropy":
        y, loss_fn = torch.randint(0, 3, (12,), generator=gen(6)), F.cross_entropy
    else:
        y, loss_fn = torch.randn(12, 3, generator=gen(6)), F.mse_loss
    h = dense_hessian(model.eval(), loss_fn, x, y)
    v = torch.randn(h.shape[0], 5, generator=gen(7), dtype=torch.float64)
    with measurement_mode(model):
        op = operator(model, loss_fn, x, y)
        single = torch.stack([op.matvec(v[:, i]) for i in range(5)], dim=1)
        looped = op.matmat(v)
        assert op.mode == "reverse" and op.num_hvps == 10
        batched = operator(model, loss_fn, x, y, chunk_size=2).matmat(v)
        forward = torch.stack([op._forward(v[:, i]) for i in range(5)], dim=1)
    for result in (single, looped, batched, forward):
        torch.testing.assert_close(result, h @ v, rtol=1e-10, atol=1e-12)
    assert torch.equal(single, looped)  # the same backward, one product at a time


def test_op_without_double_backward_falls_back_to_forward_over_reverse() -> None:
    """The plumbing of the fallback: the reverse formulation raising PyTorch's "derivative ... is not implemented"."""
    model = mlp([3, 4, 2], seed=11)
    x, y = torch.randn(6, 3, generator=gen(11)), torch.randint(0, 2, (6,), generator=gen(12))
    h = dense_hessian(model, F.cross_entropy, x, y)
    v = torch.randn(h.shape[0], 3, generator=gen(13), dtype=torch.float64)

    def missing(*args: object, **kwargs: object) -> Tensor:
        raise RuntimeError("the derivative for '_some_backward' is not implemented.")

    with measurement_mode(model):
        op = operator(model, F.cross_entropy, x, y)
        op._reverse = missing  # type: ignore[method-assign]
        with pytest.warns(RuntimeWarning, match="double-backward"):
            first = op.matvec(v[:, 0])
        assert op.mode == "forward"
        block = op.matmat(v)
        other = operator(model, F.cross_entropy, x, y, chunk_size=2)
        other._reverse = missing  # type: ignore[method-assign]
        with pytest.warns(RuntimeWarning, match="double-backward"):
            from_block = other.matmat(v)
    torch.testing.assert_close(first, h @ v[:, 0], rtol=1e-10, atol=1e-12)
    for result in (block, from_block):
        torch.testing.assert_close(result, h @ v, rtol=1e-10, atol=1e-12)


def test_loss_linear_in_the_parameters_has_a_zero_hessian() -> None:
    model = nn.Linear(3, 1)
    x, y = torch.randn(5, 3, generator=gen(14)), torch.zeros(5, 1)
    res = flatness(model, lambda out, t: (out - t).sum(), x, y, top_k=2, method="lanczos", trace_samples=3,
                   flat_dimension=False)
    assert res.converged and res.top_eigenvalues.tolist() == [0.0, 0.0] and res.trace == 0.0
