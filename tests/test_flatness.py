"""Flatness (Hessian eigenvalues, trace, flat dimension), Lanczos and trace estimators against dense float64."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import dense_jacobian, gen, mlp, numpy_rank, small_cnn
from torch import Tensor, nn

from lightning_geomdim import FlatnessResult, batch_functional_dimension, flatness
from lightning_geomdim.core.errors import MemoryBudgetError
from lightning_geomdim.core.flatness import DEFAULT_TRACE_SAMPLES
from lightning_geomdim.core.lanczos import lanczos
from lightning_geomdim.core.trace_estimation import hutch_plus_plus, hutchinson

LossFn = Callable[[Tensor, Tensor], Tensor]


#: One intra-op thread (``conftest.one_thread``): results do not depend on it, the time does.
pytestmark = pytest.mark.usefixtures("one_thread")


def explicit_hessian(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> Tensor:
    """The dense (P, P) float64 Hessian with torch.func.hessian on the flattened trainable parameters."""
    ref = copy.deepcopy(model).double().eval()
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    target = y.double() if y.is_floating_point() else y

    def loss(theta: Tensor) -> Tensor:
        params, start = {}, 0
        for n, p in named:
            params[n] = theta[start : start + p.numel()].view_as(p)
            start += p.numel()
        return loss_fn(torch.func.functional_call(ref, params, (x.double(),)), target)

    return torch.func.hessian(loss)(flat)


def ce_case() -> tuple[nn.Module, LossFn, Tensor, Tensor]:
    return mlp([4, 6, 5, 3], seed=0), F.cross_entropy, torch.randn(10, 4, generator=gen(1)), \
        torch.randint(0, 3, (10,), generator=gen(2))


def mse_case() -> tuple[nn.Module, LossFn, Tensor, Tensor]:
    return mlp([3, 5, 4, 2], seed=1), F.mse_loss, torch.randn(8, 3, generator=gen(3)), \
        torch.randn(8, 2, generator=gen(4))


def cnn_case() -> tuple[nn.Module, LossFn, Tensor, Tensor]:
    return small_cnn(seed=2), F.cross_entropy, torch.randn(6, 1, 6, 6, generator=gen(5)), \
        torch.randint(0, 3, (6,), generator=gen(6))


CASES = {"mlp-cross-entropy": ce_case, "mlp-mse": mse_case, "cnn-cross-entropy": cnn_case}


def top_eigenvalues(h: Tensor, k: int) -> Tensor:
    return torch.linalg.eigvalsh(h).flip(0)[:k]


@pytest.mark.parametrize("case", list(CASES))
def test_dense_path_is_exact(case: str) -> None:
    model, loss_fn, x, y = CASES[case]()
    h = explicit_hessian(model, loss_fn, x, y)
    res = flatness(model, loss_fn, x, y, top_k=3, method="dense")
    assert isinstance(res, FlatnessResult)
    assert res.method == "dense" and res.num_params == h.shape[0] and res.num_hvps == h.shape[0]
    assert res.top_eigenvalues.dtype == torch.float64 and res.top_eigenvalues.shape == (3,)
    torch.testing.assert_close(res.top_eigenvalues, top_eigenvalues(h, 3), rtol=1e-10, atol=1e-12)
    assert res.max_eigenvalue == float(res.top_eigenvalues[0])
    assert res.trace == pytest.approx(float(h.trace()), rel=1e-10)
    assert res.trace_std_error == 0.0 and res.converged
    with torch.no_grad():
        loss = loss_fn(copy.deepcopy(model).double()(x.double()), y.double() if y.is_floating_point() else y)
    assert res.loss == pytest.approx(float(loss), rel=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_lanczos_and_hutch_plus_plus_match_explicit_hessian(case: str) -> None:
    model, loss_fn, x, y = CASES[case]()
    h = explicit_hessian(model, loss_fn, x, y)
    res = flatness(model, loss_fn, x, y, top_k=3, method="lanczos", generator=gen(7))
    assert res.method == "lanczos" and res.converged
    expected = top_eigenvalues(h, 3)
    assert ((res.top_eigenvalues - expected).abs() / expected.abs()).max() < 1e-6
    assert (res.eigenvalue_residuals <= 1e-6 * res.max_eigenvalue).all()
    # Hutch++ (99 HVPs): 33 sketch, 33 products, 33 probes; given the sketch, the error is Hutchinson's on
    # the deflated Hessian, std ≤ sqrt(2/33)·‖H‖_F (the deflation does not increase the Frobenius norm).
    bound = math.sqrt(2 / 33) * float(torch.linalg.matrix_norm(h))
    assert abs(res.trace - float(h.trace())) < 4 * bound
    assert 0 < res.trace_std_error < bound
    lanczos_hvps = res.num_hvps - 99
    assert 3 <= lanczos_hvps <= h.shape[0]


def test_hutchinson_trace_within_its_exact_standard_deviation() -> None:
    model, loss_fn, x, y = ce_case()
    h = explicit_hessian(model, loss_fn, x, y)
    n = 60
    res = flatness(model, loss_fn, x, y, method="lanczos", trace_method="hutchinson", trace_samples=n,
                   generator=gen(8))
    # one Rademacher probe has variance 2(‖H‖_F² − Σ H_ii²)
    std = math.sqrt(2 * (float(h.square().sum()) - float(h.diagonal().square().sum())) / n)
    assert abs(res.trace - float(h.trace())) < 4 * std
    assert 0.5 * std < res.trace_std_error < 2 * std


def test_interpolating_mse_minimum_hessian_is_gauss_newton_and_flat_dimension_counts_zero_eigenvalues() -> None:
    model = mlp([3, 4, 2], seed=3)  # P = 26, 4 hidden neurons
    x = torch.randn(5, 3, generator=gen(9))
    y = copy.deepcopy(model).double()(x.double()).detach()  # zero residual: an interpolating minimum
    p = sum(q.numel() for q in model.parameters())
    res = flatness(model, F.mse_loss, x, y, top_k=p, method="dense", flat_dimension=True)
    jac = dense_jacobian(model, x)
    gauss_newton = 2 / jac.shape[0] * jac.T @ jac  # mse_loss averages over the M = N·K outputs
    torch.testing.assert_close(res.top_eigenvalues, top_eigenvalues(gauss_newton, p), rtol=1e-9, atol=1e-12)
    rank = numpy_rank(jac)
    assert res.functional_dimension == rank and res.flat_dimension == p - rank
    nonzero = int((res.top_eigenvalues > p * torch.finfo(torch.float64).eps * res.max_eigenvalue).sum())
    assert nonzero == rank  # H = (2/M) JᵀJ: its rank is the batch functional dimension
    # Low rank: Lanczos' Krylov space becomes invariant after rank + 1 steps and must restart to reach past it
    k = rank + 2
    lz = flatness(model, F.mse_loss, x, y, top_k=k, method="lanczos", trace_samples=3, generator=gen(10))
    assert lz.converged and lz.num_hvps - 3 <= rank + 4
    torch.testing.assert_close(lz.top_eigenvalues, res.top_eigenvalues[:k], rtol=0, atol=1e-9 * res.max_eigenvalue)


def test_flat_dimension_is_params_minus_jacobian_rank_and_reuses_a_dimension() -> None:
    model, loss_fn, x, y = cnn_case()
    res = flatness(model, loss_fn, x, y, flat_dimension=True)
    assert res.flat_dimension == res.num_params - numpy_rank(dense_jacobian(model, x))
    dim = batch_functional_dimension(model, x)
    assert flatness(model, loss_fn, x, y, dimension=dim).flat_dimension == res.flat_dimension  # default: reused
    assert flatness(model, loss_fn, x, y, dimension=dim, flat_dimension=True).flat_dimension == res.flat_dimension
    default = flatness(model, loss_fn, x, y)  # default without a dimension: not computed (the costly part)
    assert default.flat_dimension is None and default.functional_dimension is None
    assert default.max_eigenvalue == res.max_eigenvalue
    with pytest.raises(ValueError, match="same model"):
        flatness(model, loss_fn, x, y, dimension=batch_functional_dimension(mlp([4, 3]), torch.randn(2, 4)))


def test_auto_method_threshold() -> None:
    model, loss_fn, x, y = ce_case()  # P = 83 ≤ 100 + 99
    assert flatness(model, loss_fn, x, y).method == "dense"
    assert flatness(model, loss_fn, x, y, lanczos_iterations=40, trace_samples=30).method == "lanczos"


def test_generator_only_source_of_randomness_and_global_rng_untouched() -> None:
    model, loss_fn, x, y = ce_case()
    dim = batch_functional_dimension(model, x)
    kwargs = {"method": "lanczos", "trace_samples": 12, "top_k": 2, "dimension": dim}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = flatness(model, loss_fn, x, y, generator=gen(1), **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)  # another global state: same generator seed, same numbers
    second = flatness(model, loss_fn, x, y, generator=gen(1), **kwargs)
    assert first.trace == second.trace
    assert torch.equal(first.top_eigenvalues, second.top_eigenvalues)
    other = flatness(model, loss_fn, x, y, generator=gen(2), **kwargs)
    assert other.trace != first.trace  # the generator's draws are used
    default = [flatness(model, loss_fn, x, y, **kwargs).trace for _ in range(2)]
    assert default[0] == default[1]  # no generator: a fresh, fixed-seed one


def test_model_state_restored_and_eval_mode_used() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 2)).train()
    model[3].bias.requires_grad_(False)
    grads = {}
    for name, p in model.named_parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
        grads[name] = p.grad
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(6, 3, generator=gen(1)), torch.randint(0, 2, (6,), generator=gen(2))
    res = flatness(model, F.cross_entropy, x, y, top_k=2, method="lanczos", trace_samples=9)
    assert res.num_params == 15 + 5 + 10  # the frozen bias is not a parameter of the Hessian
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]
    for name, p in model.named_parameters():
        assert p.grad is grads[name] and p.dtype == torch.float32
        assert torch.equal(p.detach(), before[name])
        if p.grad is not None:
            assert torch.equal(p.grad, torch.ones_like(p))
    eval_model = copy.deepcopy(model).eval()
    model[3].bias.requires_grad_(True)
    eval_model[3].bias.requires_grad_(False)
    h = explicit_hessian(eval_model, F.cross_entropy, x, y)  # dropout off: deterministic Hessian
    assert res.max_eigenvalue == pytest.approx(float(top_eigenvalues(h, 1)), rel=1e-6)


def test_invalid_arguments() -> None:
    model, loss_fn, x, y = ce_case()
    with pytest.raises(ValueError, match="top_k"):
        flatness(model, loss_fn, x, y, top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        flatness(model, loss_fn, x, y, top_k=84)
    with pytest.raises(ValueError, match="trace_samples"):
        flatness(model, loss_fn, x, y, trace_samples=2)
    with pytest.raises(ValueError, match="method"):
        flatness(model, loss_fn, x, y, method="power")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lanczos_basis"):
        flatness(model, loss_fn, x, y, top_k=3, lanczos_basis=4)
    with pytest.raises(ValueError, match="scalar"):
        flatness(model, lambda out, t: F.cross_entropy(out, t, reduction="none"), x, y)


def test_unconverged_lanczos_warns() -> None:
    model, loss_fn, x, y = ce_case()
    with pytest.warns(RuntimeWarning, match="lanczos_iterations"):
        res = flatness(model, loss_fn, x, y, top_k=3, method="lanczos", lanczos_iterations=4, trace_samples=3)
    assert not res.converged and res.num_hvps == 4 + 3


# --- Lanczos and the trace estimators on explicit matrices ------------------------------------------------


def symmetric(eigenvalues: list[float], seed: int) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen(seed), dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def test_lanczos_top_eigenvalues_with_negative_spectrum() -> None:
    spectrum = torch.linspace(-3.0, 2.0, 60, dtype=torch.float64).tolist()
    spectrum[-1], spectrum[-2] = 10.0, 7.0
    a = symmetric(spectrum, seed=1)
    res = lanczos(lambda v: a @ v, 60, k=4, generator=gen(2))
    assert res.converged and res.num_runs == 2  # the first run, then the check run from a fresh vector
    expected = torch.tensor(sorted(spectrum, reverse=True)[:4], dtype=torch.float64)
    torch.testing.assert_close(res.eigenvalues, expected, rtol=1e-8, atol=1e-12)
    # Ritz vectors are unit eigenvectors: ‖A v − λ v‖ equals the reported residual
    r = a @ res.eigenvectors - res.eigenvectors * res.eigenvalues
    torch.testing.assert_close(torch.linalg.vector_norm(r, dim=0), res.residuals, rtol=1e-3, atol=1e-10)


def test_lanczos_finds_repeated_eigenvalues_by_restarting() -> None:
    a = symmetric([5.0, 5.0, 5.0, 3.0, 1.0, 1.0, 0.0, 0.0], seed=3)  # Krylov space of one vector: dimension 4
    res = lanczos(lambda v: a @ v, 8, k=4, max_iterations=40, generator=gen(4))
    assert res.converged and res.num_runs >= 3  # one run per copy of 5, then the check
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 5.0, 5.0, 3.0], dtype=torch.float64))


def test_lanczos_without_convergence_reports_it() -> None:
    a = symmetric(torch.linspace(0, 1, 50).tolist(), seed=5)
    res = lanczos(lambda v: a @ v, 50, k=2, max_iterations=3, generator=gen(6))
    assert not res.converged and res.num_matvecs == 3 and (res.residuals > 0).all()
    with pytest.raises(ValueError, match="k must be"):
        lanczos(lambda v: a @ v, 50, k=51, generator=gen(6))


def test_hutchinson_is_unbiased_with_the_predicted_variance() -> None:
    a = symmetric(torch.linspace(-1, 4, 20).tolist(), seed=7)
    g, n, reps = gen(8), 4, 400
    estimates = torch.tensor([hutchinson(lambda z: a @ z, 20, n, generator=g).value for _ in range(reps)])
    var = 2 * (float(a.square().sum()) - float(a.diagonal().square().sum())) / n
    assert abs(float(estimates.mean()) - float(a.trace())) < 4 * math.sqrt(var / reps)
    assert 0.75 < float(estimates.var()) / var < 1.33


def test_hutch_plus_plus_is_unbiased_and_exact_on_low_rank() -> None:
    a = symmetric(torch.linspace(-1, 4, 20).tolist(), seed=9)
    g, reps = gen(10), 300
    runs = [hutch_plus_plus(lambda z: a @ z, 20, 9, generator=g) for _ in range(reps)]
    assert all(r.num_matvecs == 9 for r in runs)
    estimates = torch.tensor([r.value for r in runs])
    # each run's error is at most sqrt(2/3)·‖A‖_F in standard deviation (3 probes on the deflated matrix)
    bound = math.sqrt(2 / 3) * float(torch.linalg.matrix_norm(a))
    assert abs(float(estimates.mean()) - float(a.trace())) < 4 * bound / math.sqrt(reps)
    low_rank = symmetric([3.0, -2.0, 1.0] + [0.0] * 17, seed=11)  # rank 3 ≤ 4 sketch vectors: exact
    res = hutch_plus_plus(lambda z: low_rank @ z, 20, 12, generator=gen(12))
    assert res.value == pytest.approx(2.0, abs=1e-12) and not res.exact
    full = hutch_plus_plus(lambda z: a @ z, 20, 60, generator=gen(13))  # 20 sketch vectors span R^20
    assert full.exact and full.std_error == 0.0 and full.num_matvecs == 40
    assert full.value == pytest.approx(float(a.trace()), rel=1e-12)


def test_estimators_leave_global_rng_alone() -> None:
    a = symmetric([1.0, 2.0, 3.0, 4.0], seed=14)
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hutchinson(lambda z: a @ z, 4, 3, generator=gen(1))
        hutch_plus_plus(lambda z: a @ z, 4, 3, generator=gen(1))
        lanczos(lambda v: a @ v, 4, k=2, generator=gen(1))
    assert torch.equal(torch.get_rng_state(), state)


# --- memory budget: refused before the Hessian-vector products --------------------------------------------


class CountingMLP(nn.Module):
    """An MLP counting its forward calls (every HVP block, probe and dimension pass calls it)."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.net = mlp(widths, seed=0)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.net(x)


def test_budget_too_small_is_refused_before_any_hvp_with_the_numbers() -> None:
    model = CountingMLP([4, 6, 5, 3])  # P = 83
    x, y = torch.randn(10, 4, generator=gen(1)), torch.randint(0, 3, (10,), generator=gen(2))
    # A = input 10·4 + leaf outputs 10·(6 + 6 + 5 + 5 + 3) = 290 values
    cases = {
        "lanczos": ["Lanczos basis of 40 vectors", "hutch++ trace: 165 vectors", "lanczos_basis (now 40"],
        "dense": ["dense Hessian 3 × P²", "use method='lanczos'"],
    }
    for method, parts in cases.items():
        model.calls = 0
        with pytest.raises(MemoryBudgetError) as err:
            flatness(model, F.cross_entropy, x, y, method=method, max_memory_bytes=1000)
        message = str(err.value)
        for part in ["P = 83 parameters", "A = 290 activation values", "max_memory_bytes", *parts]:
            assert part in message
        assert model.calls == 1  # only the forward pass that counts A: no loss, no HVP, no dimension


def test_budget_boundary_is_the_documented_estimate() -> None:
    model, loss_fn, x, y = ce_case()  # P = 83, A = 290
    dim = batch_functional_dimension(model, x)
    kwargs = {"method": "lanczos", "lanczos_iterations": 5, "trace_samples": 9, "chunk_size": 4, "dimension": dim}
    p, a = 83, 290
    hvps = lambda c: 14 * p + 4 * a + (c - 1) * (10 * p + 3 * a)  # noqa: E731
    eigen = (5 + 2 * 1 + 4) * p + hvps(1)  # basis min(40, 5 iterations), 2 top_k Ritz vectors, 4 temporaries
    trace = max(3 * 3, 3 + 4 * 3) * p + hvps(3)  # Hutch++: 3 sketch and 3 probe vectors, 3 HVPs at once
    needed = 8 * (2 * p + max(eigen, trace))
    with pytest.raises(MemoryBudgetError, match="lanczos_basis"):
        flatness(model, loss_fn, x, y, max_memory_bytes=needed - 1, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 5 Lanczos iterations need not converge
        res = flatness(model, loss_fn, x, y, max_memory_bytes=needed, **kwargs)
    assert res.num_hvps <= 5 + 9
    dense = 8 * (2 * p + 3 * p * p + hvps(4))
    with pytest.raises(MemoryBudgetError, match="method='lanczos'"):
        flatness(model, loss_fn, x, y, method="dense", chunk_size=4, dimension=dim, max_memory_bytes=dense - 1)
    assert flatness(model, loss_fn, x, y, method="dense", chunk_size=4, dimension=dim,
                    max_memory_bytes=dense).method == "dense"


def test_dimension_too_large_for_the_budget_fails_before_the_hessian_work() -> None:
    model = CountingMLP([4, 40, 40, 3])  # P = 1963; the probe has M = 1200 outputs: a 1200 × 1200 Gram
    x, y = torch.randn(400, 4, generator=gen(3)), torch.randint(0, 3, (400,), generator=gen(4))
    budget = 4 * 1024**2  # flatness itself needs ≈ 2.6 MB here, the dimension ≈ 23 MB
    with pytest.raises(MemoryBudgetError) as alone:
        batch_functional_dimension(model, x, max_memory_bytes=budget)
    dimension_calls, model.calls = model.calls, 0
    with pytest.raises(MemoryBudgetError) as err:
        flatness(model, F.cross_entropy, x, y, method="lanczos", lanczos_iterations=3, trace_samples=3,
                 chunk_size=1, max_memory_bytes=budget, flat_dimension=True)
    assert str(err.value) == str(alone.value)  # the dimension's refusal ...
    assert model.calls == dimension_calls == 1  # ... after the one traced forward pass it shares: no HVP ran


def test_flat_dimension_is_computed_with_the_given_dimension_settings() -> None:
    """Without a ``dimension``, flatness computes one with ``dimension_options``, not with silent defaults."""
    model = mlp([3, 5, 2], seed=31)
    x, y = torch.randn(10, 3, generator=gen(31)), torch.randint(0, 2, (10,), generator=gen(32))
    options = {"engine": "jacrev", "rtol": 0.5}
    res = flatness(model, F.cross_entropy, x, y, dimension_options=options, flat_dimension=True)
    coarse = batch_functional_dimension(model, x, **options)
    exact = batch_functional_dimension(model, x)
    assert res.functional_dimension == coarse.rank < exact.rank
    assert res.flat_dimension == res.num_params - coarse.rank
    default_engine = flatness(model, F.cross_entropy, x, y, flat_dimension=True)
    assert default_engine.functional_dimension == exact.rank  # default engine: the exact one


class SelfAttentionClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.attention(x, x, x, need_weights=False)
        return self.head(h.mean(1))


@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_attention_models_get_hessians_through_the_math_kernel(method: str) -> None:
    """nn.MultiheadAttention dispatches to a fused SDPA kernel with no forward-mode / double derivative on CPU;
    measurements run under the math kernel, and agree with a dense Hessian computed under it."""
    torch.manual_seed(0)
    model = SelfAttentionClassifier()
    x, y = torch.randn(4, 5, 8, generator=gen(5)), torch.randint(0, 3, (4,), generator=gen(6))
    res = flatness(model, F.cross_entropy, x, y, method=method, top_k=2, trace_samples=30)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        h = explicit_hessian(model, F.cross_entropy, x, y)
    torch.testing.assert_close(res.top_eigenvalues, top_eigenvalues(h, 2), rtol=1e-8, atol=1e-10)


def test_fit_memory_uses_fewer_trace_samples_then_a_smaller_basis_instead_of_refusing() -> None:
    """With ``fit_memory`` a budget too small for the defaults shrinks the trace sketch (then the Lanczos basis) to
    the largest that fits; the top eigenvalue is unchanged, the trace still unbiased within its larger error."""
    from lightning_geomdim.core.flatness_memory import fitted_sizes

    torch.manual_seed(60)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 3))  # P = 723: Lanczos
    g = torch.Generator().manual_seed(61)
    x, y = torch.randn(16, 20, generator=g), torch.randint(0, 3, (16,), generator=g)
    loss = nn.functional.cross_entropy
    full = flatness(model, loss, x, y, method="lanczos")
    budget = 100 * 723 * 8  # 100 vectors of P: the default trace phase needs about 181 (and 4 A values)
    with pytest.raises(MemoryBudgetError):
        flatness(model, loss, x, y, method="lanczos", max_memory_bytes=budget)
    fitted = flatness(model, loss, x, y, method="lanczos", max_memory_bytes=budget, fit_memory=True)
    assert 3 <= fitted.trace_samples < DEFAULT_TRACE_SAMPLES and fitted.lanczos_basis == full.lanczos_basis == 40
    assert fitted.max_eigenvalue == pytest.approx(full.max_eigenvalue, rel=1e-8)
    assert abs(fitted.trace - full.trace) < 5 * (fitted.trace_std_error + full.trace_std_error)
    assert full.trace_samples == DEFAULT_TRACE_SAMPLES

    def needed(samples: int, basis: int) -> int:  # a toy estimate: 2 units per sample, 1 per basis vector
        return 2 * samples + basis

    assert fitted_sizes(needed, 300, trace_samples=99, basis=40, top_k=1, minimum=3) == (99, 40)
    assert fitted_sizes(needed, 100, trace_samples=99, basis=40, top_k=1, minimum=3) == (30, 40)
    assert fitted_sizes(needed, 30, trace_samples=99, basis=40, top_k=1, minimum=3) == (3, 24)
    assert fitted_sizes(needed, 10, trace_samples=99, basis=40, top_k=1, minimum=3) is None


class _CompositeHardsigmoid(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return (x + 3).clamp(0, 6) / 6


@pytest.mark.parametrize("width", [8, 40])  # P = 67 and 335, on the dense and the Lanczos paths
def test_hardsigmoid_models_get_their_curvature(width: int) -> None:
    """torch's hardsigmoid has no double derivative: both HVP formulations used to fail (MobileNetV3). Measured
    through the composite clamp(x + 3, 0, 6) / 6, the same function: equal to a reference built with it."""
    torch.manual_seed(62)
    model = nn.Sequential(nn.Linear(4, width), nn.Hardsigmoid(), nn.Linear(width, 3), nn.Hardsigmoid(),
                          nn.Linear(3, 3))
    reference = copy.deepcopy(model)
    reference[1], reference[3] = _CompositeHardsigmoid(), _CompositeHardsigmoid()
    g = torch.Generator().manual_seed(63)
    x, y = torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g)
    method = "dense" if width == 8 else "lanczos"
    got = flatness(model, F.cross_entropy, x, y, method=method)
    want = flatness(reference, F.cross_entropy, x, y, method=method)
    assert got.max_eigenvalue == pytest.approx(want.max_eigenvalue, rel=1e-10) and got.max_eigenvalue > 0
    assert got.trace == pytest.approx(want.trace, rel=1e-10)
    assert all(isinstance(m, nn.Hardsigmoid) for m in (model[1], model[3]))  # the model is untouched
