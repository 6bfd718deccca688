"""The exact engine against explicit references: float64 dense SVD ranks where the spectrum has a clear gap,
properties of the dimension (invariances, softmax = logit differences), reproducibility and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import dense_jacobian, gen, mlp, numpy_rank, small_cnn
from torch import nn

from lightning_geomdim import NotApplicableError, batch_functional_dimension
from lightning_geomdim.core.exact import PRIMES, exact_rank
from lightning_geomdim.core.exact_program import exact_program
from lightning_geomdim.core.functional_model import FunctionalModel, ProbeInputs, measurement_mode
from lightning_geomdim.core.probe_trace import ProbeTrace


def clear_gap_rank(model: nn.Module, x: torch.Tensor, *, logit_differences: bool = False) -> int:
    """numpy's rank of the dense float64 Jacobian, asserting that it is unambiguous: σ_r / σ_{r+1} > 1e6."""
    jac = dense_jacobian(model, x, logit_differences=logit_differences)
    sv = torch.linalg.svdvals(jac)
    rank = numpy_rank(jac)
    if 0 < rank < sv.numel():
        assert float(sv[rank - 1]) > 1e6 * float(sv[rank]), "the reference has no clear gap: pick another case"
    return rank


def check_exact(model: nn.Module, x: torch.Tensor, **kwargs: object) -> int:
    res = batch_functional_dimension(model, x, **kwargs)
    assert res.engine == "exact" and res.exact
    expected = clear_gap_rank(model, x, logit_differences=res.num_rows != res.num_outputs)
    assert res.rank == expected
    assert res.rank <= res.upper_bound <= min(res.num_rows, res.num_params)
    assert all(r <= res.rank for r in res.exact_ranks) and res.rank in res.exact_ranks
    if res.rank == res.upper_bound:
        assert res.failure_bound == 0.0 and len(res.exact_ranks) == 1  # one draw reaching a proven bound is exact
    else:
        assert len(res.exact_ranks) == 2 and 0.0 <= res.failure_bound < 1e-3
    assert res.spectrum is None  # opt-in
    return res.rank


def dead_units_mlp() -> nn.Sequential:
    model = mlp([4, 8, 6, 3], seed=1)
    with torch.no_grad():
        model[0].bias[:3] = -100.0  # three first-layer units never active
        model[2].bias[:2] = -100.0
    return model


CASES = {
    "mlp_m_below_p": lambda: (mlp([3, 6, 5, 2], seed=2), torch.randn(6, 3, generator=gen(2))),
    "mlp_m_above_p_minus_hidden": lambda: (mlp([3, 6, 5, 2], seed=3), torch.randn(60, 3, generator=gen(3))),
    "dead_units": lambda: (dead_units_mlp(), torch.randn(40, 4, generator=gen(4))),
    # shallow 1-D network: the dimension is tied to the linear regions the inputs fall into
    "shallow_1d": lambda: (mlp([1, 8, 1], seed=5), torch.linspace(-2, 2, 12).reshape(12, 1)),
    "shallow_1d_few_regions": lambda: (mlp([1, 8, 1], seed=5), torch.linspace(0.1, 0.2, 30).reshape(30, 1)),
    "cnn_maxpool": lambda: (small_cnn(seed=6), torch.randn(30, 1, 6, 6, generator=gen(6))),
    "softmax": lambda: (mlp([4, 6, 3], seed=7, softmax=True), torch.randn(30, 4, generator=gen(7))),
    "log_softmax": lambda: (nn.Sequential(*mlp([4, 6, 3], seed=8), nn.LogSoftmax(-1)),
                            torch.randn(30, 4, generator=gen(8))),
}


def seeded(seed: int, *modules: nn.Module) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*modules)


MORE_CASES = {
    "leaky_relu": lambda: (seeded(9, nn.Linear(3, 5), nn.LeakyReLU(0.1), nn.Linear(5, 4), nn.LeakyReLU(0.3),
                                  nn.Linear(4, 2)), torch.randn(40, 3, generator=gen(9))),
    "relu6_hardtanh_clamped": lambda: (seeded(10, nn.Linear(3, 6), nn.ReLU6(), nn.Linear(6, 5), nn.Hardtanh(-0.5, 0.5),
                                              nn.Linear(5, 2)), 4 * torch.randn(40, 3, generator=gen(10))),
    "conv_stride_padding_dilation_avgpool": lambda: (
        seeded(11, nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, padding=2, dilation=2),
               nn.ReLU(), nn.AvgPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)),
        torch.randn(20, 2, 5, 5, generator=gen(11))),
    "adaptive_pools_dropout_identity": lambda: (
        seeded(12, nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveMaxPool2d(3), nn.Dropout(0.5),
               nn.Conv2d(4, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Identity(), nn.Flatten(), nn.Linear(3, 2)),
        torch.randn(25, 1, 7, 7, generator=gen(12))),
    "linear_on_sequences_unflatten": lambda: (
        seeded(13, nn.Linear(3, 4), nn.ReLU(), nn.Flatten(), nn.Linear(20, 6), nn.Unflatten(1, (2, 3)),
               nn.Softmax(-1)),
        torch.randn(15, 5, 3, generator=gen(13))),
}


@pytest.mark.parametrize("case", [*CASES, *MORE_CASES])
def test_exact_equals_the_dense_svd_rank_on_clear_gap_cases(case: str) -> None:
    model, x = {**CASES, **MORE_CASES}[case]()
    check_exact(model, x)


def test_m_above_p_minus_hidden_reaches_the_bound_and_dead_units_lower_it() -> None:
    model, x = mlp([3, 6, 2], seed=3), torch.randn(60, 3, generator=gen(3))
    res = batch_functional_dimension(model, x)
    assert res.rank == res.upper_bound == res.num_params - res.num_hidden_neurons == 38 - 6
    assert res.exact_ranks == (32,) and res.failure_bound == 0.0
    dead, xd = CASES["dead_units"]()
    assert check_exact(dead, xd) < batch_functional_dimension(dead, xd).upper_bound


def test_params_subset_frozen_layer_and_pruned_weights() -> None:
    model = mlp([4, 6, 5, 3], seed=14)
    x = torch.randn(30, 4, generator=gen(14))
    subset = batch_functional_dimension(model, x, params=["2.weight", "2.bias"])
    ref = copy.deepcopy(model)
    for n, p in ref.named_parameters():
        p.requires_grad_(n in ("2.weight", "2.bias"))
    assert subset.engine == "exact" and subset.rank == clear_gap_rank(ref, x)
    model[0].requires_grad_(False)  # frozen: exact images of its float weights, no columns
    check_exact(model, x)
    with torch.no_grad():
        model[2].weight[:, :3] = 0.0  # pruned weights stay exactly zero
    model[0].requires_grad_(True)
    check_exact(model, x)


def test_softmax_equals_its_logit_differences_at_saturated_weights() -> None:
    """Probabilities ~1e-60: every float rank of the softmax output collapses, the dimension does not."""
    logits = mlp([5, 8, 4], seed=15)
    with torch.no_grad():
        logits[2].weight.mul_(400.0)
        logits[2].bias.mul_(400.0)
    model = nn.Sequential(*logits, nn.Softmax(dim=-1))
    x = torch.randn(40, 5, generator=gen(15))
    with torch.no_grad():
        assert float(model.double()(x.double()).min()) < 1e-30
    model.float()
    soft = batch_functional_dimension(model, x, spectrum=True)
    assert soft.rank == clear_gap_rank(model, x, logit_differences=True)
    # the dense float64 SVD of the softmax output itself (the authors' method) sees almost nothing
    saturated = numpy_rank(dense_jacobian(model, x))
    assert saturated < soft.rank
    # the float spectrum is read from the logit differences too: it agrees here
    assert soft.spectrum.numerical_rank == soft.rank


def test_invariant_under_permutation_and_positive_rescaling() -> None:
    model = mlp([3, 6, 5, 2], seed=16)
    x = torch.randn(8, 3, generator=gen(16))
    base = batch_functional_dimension(model, x)
    other = copy.deepcopy(model)
    perm = torch.randperm(6, generator=gen(17))
    scale = torch.rand(6, generator=gen(18)) * 10 + 0.1
    with torch.no_grad():
        other[0].weight.copy_(model[0].weight[perm] * scale[:, None])
        other[0].bias.copy_(model[0].bias[perm] * scale)
        other[2].weight.copy_(model[2].weight[:, perm] / scale)
    torch.testing.assert_close(other(x), model(x), rtol=1e-5, atol=1e-5)
    assert batch_functional_dimension(other, x).rank == base.rank == clear_gap_rank(model, x)


def test_reproducible_from_the_seed_and_global_rng_untouched() -> None:
    model, x = CASES["dead_units"]()
    state = torch.get_rng_state()
    a = batch_functional_dimension(model, x, seed=3)
    b = batch_functional_dimension(model, x, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.exact_ranks == b.exact_ranks and a.rank == b.rank
    assert batch_functional_dimension(model, x, seed=4).rank == a.rank  # another point, same generic rank


def test_draws_use_distinct_primes_and_the_failure_bound() -> None:
    model, x = CASES["dead_units"]()
    with measurement_mode(model):
        fm = FunctionalModel.from_module(model)
        inputs = ProbeInputs.from_batch(x, dtype=torch.float64, device=fm.device)
        res = exact_rank(ProbeTrace.record(fm, inputs), upper_bound=10**6, draws=3)
    assert res.primes == PRIMES[:3] and len(set(res.primes)) == 3 and len(res.ranks) == 3
    depth = 3
    assert res.failure_bound == pytest.approx(
        torch.prod(torch.tensor([2 * (depth - 1) * 10**6 / p for p in res.primes], dtype=torch.float64)).item()
        if all(2 * (depth - 1) * 10**6 < p for p in res.primes) else 1.0
    )
    with pytest.raises(ValueError, match="draws=1"):
        exact_rank(ProbeTrace.record(fm, inputs), upper_bound=5, draws=1)


class SquaredSkip(nn.Module):
    """A skip connection through a product, not piecewise linear (sums are: tests/test_exact_networks.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.relu, self.b = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.relu(self.a(x)) + x * x)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 2)), r"'1' \(GELU\) is not piecewise linear"),
        (nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)), r"'1' \(Tanh\) is not piecewise linear"),
        (nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 2)), r"'1' \(LayerNorm\)"),
        (SquaredSkip(), r"the function 'mul'"),
        (nn.Sequential(nn.Linear(4, 5), nn.Softmax(-1), nn.Linear(5, 2)), r"Softmax\) is not piecewise linear"),
    ],
    ids=["gelu", "tanh", "layernorm", "squared_skip", "inner_softmax"],
)
def test_refusals_name_the_module_and_auto_falls_back_to_a_float_engine(model: nn.Module, match: str) -> None:
    x = torch.randn(6, 4, generator=gen(19))
    with pytest.raises(NotApplicableError, match=match) as info:
        batch_functional_dimension(model, x, engine="exact")
    assert "the exact engine does not apply" in str(info.value) and "engine='auto'" in str(info.value)
    auto = batch_functional_dimension(model, x)
    assert auto.engine in ("gram", "jacrev") and not auto.exact
    assert auto.spectrum is not None and auto.rank == auto.spectrum.numerical_rank
    assert auto.exact_ranks == () and auto.failure_bound != auto.failure_bound  # nan: no bound for a float rank


def test_exact_program_records_patterns_once_and_is_reusable() -> None:
    model, x = CASES["cnn_maxpool"]()
    with measurement_mode(model):
        fm = FunctionalModel.from_module(model)
        inputs = ProbeInputs.from_batch(x, dtype=torch.float64, device=fm.device)
        trace = ProbeTrace.record(fm, inputs)
        program = exact_program(trace)
        first = exact_rank(trace, upper_bound=10**6, program=program)
        second = exact_rank(trace, upper_bound=10**6, program=program)
    assert first == second
    assert program.depth == 3 and program.plan.num_samples == 30


class SquareSkip(nn.Module):
    """b(h) + h[:, :2] ** 2: the hidden tensor h also feeds code outside b, so rescaling h's units changes f."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(20)
        self.a, self.relu, self.b = nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.a(x))
        return self.b(h) + h[:, :2] ** 2


def test_no_rescaling_symmetry_when_the_hidden_tensor_feeds_other_code() -> None:
    model = SquareSkip()
    x = torch.randn(30, 3, generator=gen(20))
    res = batch_functional_dimension(model, x)
    assert res.num_hidden_neurons == 0 and res.upper_bound == min(60, 26)
    assert res.rank == clear_gap_rank(model, x) == 24 <= res.upper_bound


@pytest.mark.parametrize("samples", [36, 60, 80])
def test_gram_side_chosen_by_cost_gives_the_rank_on_either_side(samples: int) -> None:
    """Just past M = P the exact engine keeps J Jᵀ (cheaper to assemble and eliminate than Jᵀ J); far past it
    takes Jᵀ J. Same rank as the dense SVD on both sides. mlp [3, 6, 5, 2]: P = 71, M = 2 · samples."""
    model, x = mlp([3, 6, 5, 2], seed=3), torch.randn(samples, 3, generator=gen(9))
    with measurement_mode(model):
        plan = exact_program(ProbeTrace.of(model, x)).plan
    assert plan.num_outputs > plan.used_params == 71
    assert plan.side == ("outputs" if samples < 80 else "params")
    assert plan.size == (plan.num_outputs if plan.side == "outputs" else plan.used_params)
    check_exact(model, x)
