"""Computable full functional dimension: estimate, stopping rule, generator discipline."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_jacobian, gen, mlp, numpy_rank

from lightning_geomdim import computable_full_functional_dimension, gaussian_sampler


def test_cffd_reaches_p_minus_hidden_on_generic_network() -> None:
    model = mlp([4, 5, 3], seed=1)  # P = 43, hidden = 5
    res = computable_full_functional_dimension(model, (4,), sizes=[2, 4, 8, 16, 32])
    assert res.estimate == res.upper_bound == 43 - 5
    assert res.saturated
    assert list(res.ranks) == sorted(res.ranks)
    assert res.sizes[-1] * 3 >= 38  # needed M >= P - hidden to get there


def test_cffd_ranks_match_dense_on_the_same_gaussian_draws() -> None:
    model = mlp([3, 4, 2], seed=2)
    sizes = [2, 5, 9]
    res = computable_full_functional_dimension(model, (3,), sizes=sizes, generator=gen(7), mean=0.5, std=1.0)
    g = gen(7)
    sample = gaussian_sampler((3,), mean=0.5, std=1.0)
    for n, rank in zip(res.sizes, res.ranks, strict=True):
        x = sample(n, g)
        assert rank == numpy_rank(dense_jacobian(model, x))


def test_gaussian_sampler_mean_and_std() -> None:
    x = gaussian_sampler((10,), mean=0.5, std=2.0)(5000, gen(3))
    assert x.shape == (5000, 10)
    assert float(x.mean()) == pytest.approx(0.5, abs=0.05)
    assert float(x.std()) == pytest.approx(2.0, rel=0.03)


def test_default_sizes_grow_until_enough_rows() -> None:
    model = mlp([4, 5, 3], seed=4)
    res = computable_full_functional_dimension(model, (4,))
    assert res.estimate == 38
    assert res.sizes[0] == 8 and res.saturated


def test_stops_when_rank_saturates_below_bound() -> None:
    model = mlp([3, 4, 2], seed=5)
    with torch.no_grad():
        model[0].bias.fill_(-50.0)  # dead hidden layer: only the last bias moves the output
    res = computable_full_functional_dimension(model, (3,), sizes=[1, 2, 4, 8])
    assert res.ranks == (2, 2)
    assert res.estimate == 2 and res.saturated


def test_custom_sampler_and_global_rng_untouched() -> None:
    model = mlp([3, 4, 2], seed=6)
    calls = []

    def sampler(n: int, generator: torch.Generator) -> torch.Tensor:
        calls.append(n)
        return torch.rand(n, 3, generator=generator)

    state = torch.get_rng_state()
    res = computable_full_functional_dimension(model, sampler, sizes=[2, 4])
    assert torch.equal(torch.get_rng_state(), state)
    assert calls[: len(res.sizes)] == list(res.sizes)
    again = computable_full_functional_dimension(model, sampler, sizes=[2, 4])
    assert again.ranks == res.ranks  # seeded generator: reproducible


@pytest.mark.parametrize("sizes", [[], [0, 2], [4, 2], [3, 3]])
def test_bad_sizes_are_refused(sizes: list[int]) -> None:
    with pytest.raises(ValueError, match="increasing sequence"):
        computable_full_functional_dimension(mlp([2, 2], seed=0), (2,), sizes=sizes)
