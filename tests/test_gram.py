"""The structured Gram engine against the explicit float64 dense Jacobian, and the "auto" fallback rules."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from conftest import assert_matches_dense, dense_jacobian, gen, mlp, numpy_rank, small_cnn
from torch import nn

from lightning_geomdim import MemoryBudgetError, NotApplicableError, batch_functional_dimension
from lightning_geomdim.core import gram as gram_module
from lightning_geomdim.core.functional_model import FunctionalModel, ProbeInputs, measurement_mode
from lightning_geomdim.core.gram import gram_matrix
from lightning_geomdim.core.gram_plan import gram_bytes
from lightning_geomdim.core.probe_trace import ProbeTrace
from lightning_geomdim.core.structure import gram_plan, gram_unsupported_reason


def subset_model(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy whose only trainable parameters are ``names`` (so dense_jacobian measures the subset)."""
    ref = copy.deepcopy(model)
    for n, p in ref.named_parameters():
        p.requires_grad_(n in names)
    return ref


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("more_rows", [False, True])  # M < P and M > P
def test_mlp_depths_match_dense(depth: int, more_rows: bool) -> None:
    widths = [3, 4, 4, 3, 2][: depth + 1]
    model = mlp(widths, seed=depth)
    num_params = sum(p.numel() for p in model.parameters())
    num_samples = num_params // widths[-1] + 3 if more_rows else 2
    jac = assert_matches_dense(model, torch.randn(num_samples, 3, generator=gen(depth)))
    assert (jac.shape[0] > jac.shape[1]) == more_rows


@pytest.mark.parametrize("num_samples", [2, 20])  # M = 6 and 60 < P = 97
def test_small_cnn_matches_dense(num_samples: int) -> None:
    assert_matches_dense(small_cnn(), torch.randn(num_samples, 1, 6, 6, generator=gen(1)))


def test_cnn_more_outputs_than_params() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 2))
    x = torch.randn(25, 1, 4, 4, generator=gen(3))  # M = 50 > P = 48
    jac = assert_matches_dense(model, x)
    assert jac.shape[0] > jac.shape[1]


@pytest.mark.parametrize(
    "conv",
    [
        # small output map, many input features: the position-pair kernel is cheaper
        lambda: nn.Conv2d(6, 3, 3),
        # stride, padding, dilation; explicit per-sample weight gradients
        lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1),
        lambda: nn.Conv2d(2, 3, 2, padding=2, dilation=2),
        lambda: nn.Conv2d(2, 2, 3, padding="same", bias=False),
    ],
)
def test_conv_variants_match_dense(conv: Callable[[], nn.Conv2d]) -> None:
    torch.manual_seed(5)
    layer = conv()
    x = torch.randn(4, layer.in_channels, 4, 4, generator=gen(5))
    out = layer(x)
    model = nn.Sequential(layer, nn.LeakyReLU(0.1), nn.AvgPool2d(1), nn.Flatten(), nn.Linear(out[0].numel(), 2))
    assert_matches_dense(model, x)


def test_softmax_head_matches_dense_and_loses_a_dimension_per_sample() -> None:
    model = mlp([4, 6, 3], softmax=True, seed=2)
    x = torch.randn(5, 4, generator=gen(2))
    assert_matches_dense(model, x)
    res = batch_functional_dimension(model, x, engine="gram")
    assert res.rank <= 5 * (3 - 1)


def test_dead_layer_matches_dense() -> None:
    model = mlp([4, 6, 6, 3], seed=4)
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # second hidden layer never active: only the last bias moves f
    x = torch.rand(8, 4, generator=gen(4))
    assert_matches_dense(model, x)
    assert batch_functional_dimension(model, x, engine="gram").rank == 3


def test_params_subset_only_measured_blocks_contribute() -> None:
    model = mlp([4, 6, 5, 3], seed=6)
    x = torch.randn(10, 4, generator=gen(6))
    names = ["0.weight", "2.bias", "4.weight"]  # weight-only, bias-only and weight-only blocks
    jac = dense_jacobian(subset_model(model, names), x)
    res = batch_functional_dimension(model, x, params=names, engine="gram")
    assert res.num_params == jac.shape[1] and res.rank == numpy_rank(jac)
    sv = torch.linalg.svdvals(jac)
    torch.testing.assert_close(res.spectrum.singular_values, sv, rtol=0, atol=1e-7 * float(sv[0]))


def test_frozen_layer_excluded_and_more_rows_than_params() -> None:
    model = mlp([3, 4, 2], seed=7)
    model[0].requires_grad_(False)
    x = torch.randn(8, 3, generator=gen(7))
    jac = assert_matches_dense(model, x)
    assert jac.shape == (16, 10)


def test_module_that_never_runs_gives_zero_singular_values() -> None:
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp([3, 4, 2], seed=8)
            self.spare = nn.Linear(3, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model = WithSpare()
    x = torch.randn(16, 3, generator=gen(8))  # M = 32 > P_used = 26, P = 46
    res = batch_functional_dimension(model, x, engine="gram")
    jac = dense_jacobian(model, x)
    assert res.engine == "gram" and res.rank == numpy_rank(jac) and res.spectrum.singular_values.shape == (32,)
    sv = torch.linalg.svdvals(jac)
    torch.testing.assert_close(res.spectrum.singular_values, sv, rtol=0, atol=1e-7 * float(sv[0]))


def test_linear_on_sequences_and_per_sample_modules() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Tanh(), nn.Flatten(), nn.Linear(5 * 4, 4),
        nn.Unflatten(1, (2, 2)), nn.LogSoftmax(dim=-1),
    )
    x = torch.randn(6, 5, 3, generator=gen(9))  # Linear applied at 5 positions per sample
    model.train()  # measured in eval mode regardless; mode restored
    assert_matches_dense(model, x, auto_engine="gram")  # tanh: not piecewise linear
    assert model.training


def test_float32_computation_dtype_keeps_dense_rank() -> None:
    model = mlp([4, 6, 5, 3], seed=10)
    x = torch.randn(12, 4, generator=gen(10))
    res = batch_functional_dimension(model, x, engine="gram", dtype=torch.float32)
    assert res.rank == numpy_rank(dense_jacobian(model, x))


def test_chunk_size_gives_same_gram() -> None:
    model = mlp([4, 5, 3], seed=11, softmax=True)
    x = torch.randn(7, 4, generator=gen(11))
    a = batch_functional_dimension(model, x, engine="gram")
    b = batch_functional_dimension(model, x, engine="gram", chunk_size=1)
    torch.testing.assert_close(a.spectrum.singular_values, b.spectrum.singular_values)


@pytest.mark.parametrize("num_samples", [3, 34])  # M = 9 < P = 97 and M = 102 > P
def test_gram_matrix_equals_dense_gram(num_samples: int) -> None:
    model = small_cnn(seed=12)
    x = torch.randn(num_samples, 1, 6, 6, generator=gen(12))
    jac = dense_jacobian(model, x)
    with measurement_mode(model):
        gram, plan = gram_matrix(ProbeTrace.of(model, x))
    expected = jac @ jac.T if plan.side == "outputs" else None
    if expected is not None:
        torch.testing.assert_close(gram, expected, rtol=1e-10, atol=1e-12)
    else:  # Jᵀ J up to a permutation of the columns: compare the spectra
        torch.testing.assert_close(torch.linalg.eigvalsh(gram), torch.linalg.eigvalsh(jac.T @ jac), rtol=0,
                                   atol=1e-9 * float(gram.diagonal().sum()))
    assert plan.side == ("outputs" if num_samples == 3 else "params")


@pytest.mark.parametrize("num_samples", [4, 30])  # J Jᵀ (M = 12 < P = 43) and Jᵀ J (M = 90 > P)
def test_blocked_lower_triangle_accumulation(num_samples: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gram_module, "_BLOCK_ENTRIES", 40)  # many row blocks even on a tiny Gram
    model = mlp([4, 5, 3], seed=18, softmax=True)
    x = torch.randn(num_samples, 4, generator=gen(18))
    jac = dense_jacobian(model, x)
    with measurement_mode(model):
        fm = FunctionalModel.from_module(model)
        inputs = ProbeInputs.from_batch(x, dtype=torch.float64, device=fm.device)
        trace = ProbeTrace.record(fm, inputs)
        full, plan = gram_matrix(trace)
        lower, _ = gram_matrix(trace, lower_only=True)
    torch.testing.assert_close(lower, full.tril(), rtol=0, atol=1e-12)
    assert not lower.triu(1).any()
    torch.testing.assert_close(full, full.T, rtol=0, atol=1e-12)
    if plan.side == "outputs":
        torch.testing.assert_close(full, jac @ jac.T, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(torch.linalg.eigvalsh(full), torch.linalg.eigvalsh(jac.T @ jac), rtol=0,
                                   atol=1e-10 * float(full.diagonal().sum()))
    assert_matches_dense(model, x)


def test_memory_budget_refused_before_allocating_with_numbers() -> None:
    model = mlp([4, 6, 3], seed=13)
    x = torch.randn(10, 4, generator=gen(13))
    refusal = r"30 × 30 Gram.* needs about [0-9.]+ [KMG]?i?B.*a probe of at most 1 sample \(the largest"
    with pytest.raises(MemoryBudgetError, match=refusal):
        batch_functional_dimension(model, x, engine="gram", max_memory_bytes=1000)
    with measurement_mode(model):
        fm = FunctionalModel.from_module(model)
        plan = gram_plan(ProbeTrace.record(fm, ProbeInputs.from_batch(x, dtype=torch.float64, device=fm.device)))
    assert gram_bytes(plan) >= 16 * 30 * 30


# ------------------------------------------------------------------------------------------ fallback


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class CenterBatch(nn.Module):
    """Mixes samples with functional code between modules."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h - h.mean(0))


class InPlaceMix(CenterBatch):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h.sub_(h.detach().mean(0))  # in place: same tensor object, new version
        return self.b(h)


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


class TwoCalls(CenterBatch):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.b(self.a(x))))


class BiasOutside(CenterBatch):
    """a.bias also scales the output: a use outside a's forward that only the gradient check sees."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) * self.a.bias.sum()


class RelativeToFirst(nn.Module):
    """f_n = z_n − z_0: every sample's output depends on sample 0 (and sample 0's on none): only an ordered test of
    the pairs of samples sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.b(torch.tanh(self.a(x)))
        return z - z[:1]


def _fallback_models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(14)
    x = torch.randn(6, 3, generator=gen(14))
    return {
        "tied": (Tied(), x),
        "unknown_layer": (nn.Sequential(nn.Linear(3, 2), Scale()), x),
        "prelu": (nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2)), x),
        "mixing_forward": (CenterBatch(), x),
        "softmax_over_samples": (nn.Sequential(nn.Linear(3, 2), nn.Softmax(dim=0)), x),
        "shared_call": (TwoCalls(), x),
        "outputs_relative_to_sample_0": (RelativeToFirst(), torch.randn(4, 3, generator=gen(16))),
        "parameter_used_outside_its_module": (BiasOutside(), x),
        "batchnorm_without_running_stats": (
            nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)), x),
    }


@pytest.mark.parametrize("case", list(_fallback_models()))
def test_auto_falls_back_to_jacrev_and_gram_refuses(case: str) -> None:
    model, x = _fallback_models()[case]
    res = batch_functional_dimension(model, x)
    assert res.engine == "jacrev"
    assert res.rank == numpy_rank(dense_jacobian(model, x))
    with pytest.raises(NotApplicableError, match="engine='jacrev'"):
        batch_functional_dimension(model, x, engine="gram")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed


def _no_longer_refused() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    x = torch.randn(6, 3, generator=gen(14))
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    bn(torch.randn(16, 3, generator=gen(15)))  # non-trivial running statistics
    return {
        "batchnorm": (bn, x),
        "in_place_change_with_detached_statistics": (InPlaceMix(), x),
        "unknown_parameter_free": (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4, elementwise_affine=False),
                                                 nn.Linear(4, 2)), x),
    }


@pytest.mark.parametrize("case", list(_no_longer_refused()))
def test_code_between_layers_is_measured_by_the_gram_engine(case: str) -> None:
    """The float Gram engine measures these when one backward shows that samples do not interact and the factor forms
    give the whole gradient (InPlaceMix's mean is detached); "auto" picks the exact engine for the BatchNorm MLP."""
    model, x = _no_longer_refused()[case]
    assert_matches_dense(model, x, auto_engine="exact" if case == "batchnorm" else "gram")


def test_output_fn_that_selects_is_exact_and_one_that_computes_is_gram() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp([3, 4, 2], seed=16)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.net(x)
            return out, x

    model, x = Pair(), torch.randn(5, 3, generator=gen(16))
    picked = batch_functional_dimension(model, x, output_fn=lambda out: out[0])
    assert picked.engine == "exact" and picked.rank == numpy_rank(dense_jacobian(model.net, x))
    doubled = batch_functional_dimension(model, x, output_fn=lambda out: 2 * out[0])
    assert doubled.engine == "gram" and doubled.rank == picked.rank  # the exact engine re-runs modules only


@pytest.mark.parametrize(("case", "named"), [
    ("prelu", "'1' (PReLU)"), ("mixing_forward", "samples interact"), ("parameter_used_outside_its_module", "'a.bias'"),
    ("batchnorm_without_running_stats", "'1' (BatchNorm1d) has no running statistics"),
])
def test_reason_names_the_module(case: str, named: str) -> None:
    model, x = _fallback_models()[case]
    with measurement_mode(model):
        reason = gram_unsupported_reason(ProbeTrace.of(model, x))
    assert reason is not None and named in reason


class OnePairMix(CenterBatch):
    """Mixes one ordered pair of samples only: sample ``to`` reads module ``a``'s output at sample ``source``."""

    def __init__(self, source: int, to: int) -> None:
        super().__init__()
        self.source, self.to = source, to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        mix = torch.zeros(h.shape[0], 1, dtype=h.dtype)
        mix[self.to] = 0.5
        return self.b(h + mix * h[self.source])


def test_the_check_finds_a_mix_of_any_one_ordered_pair_of_samples() -> None:
    """The check's sets (4 for 6 samples, where the bits of the index and their complements took 6) separate every
    ordered pair: a model that mixes a single pair of samples, in either direction, is found."""
    x = torch.randn(6, 3, generator=gen(30))
    for source in range(6):
        for to in range(6):
            model = OnePairMix(source, to)
            with measurement_mode(model):
                reason = gram_unsupported_reason(ProbeTrace.of(model, x))
            if source == to:
                assert reason is None, (source, to)  # h[n] + 0.5 h[n]: no interaction
            else:
                assert reason is not None and "samples interact" in reason, (source, to)


def test_model_state_untouched() -> None:
    model = small_cnn(seed=17)
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    x = torch.randn(3, 1, 6, 6, generator=gen(17))
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    batch_functional_dimension(model, x, engine="gram")
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight)) and model[4].weight.grad is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
