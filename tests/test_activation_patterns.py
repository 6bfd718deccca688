"""Activation patterns, linear regions and unit activity against hand computations."""

from __future__ import annotations

import pytest
import torch
from conftest import gen, mlp, small_cnn
from torch import nn

from lightning_geomdim import NotApplicableError, activation_patterns, linear_regions, unit_activity


def hand_network() -> nn.Sequential:
    """1-D input, two hidden ReLU units with kinks at x = 0 and x = 1, a third unit always off."""
    net = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [1.0], [0.0]]))
        net[0].bias.copy_(torch.tensor([0.0, -1.0, -1.0]))
    return net


def test_patterns_match_hand_computation() -> None:
    x = torch.tensor([[-0.5], [0.5], [1.5], [2.0]])
    patterns = activation_patterns(hand_network(), x)
    assert list(patterns) == ["1"]
    expected = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    assert patterns["1"].dtype == torch.bool
    assert torch.equal(patterns["1"], expected)


def test_linear_regions_hand_count() -> None:
    net = hand_network()
    # three pieces of the real line: (-inf, 0), (0, 1), (1, inf)
    assert linear_regions(net, torch.tensor([[-0.5], [0.5], [1.5], [2.0]])) == 3
    assert linear_regions(net, torch.tensor([[2.0], [3.0], [4.0]])) == 1


def test_linear_regions_is_number_of_distinct_joint_patterns() -> None:
    model = mlp([2, 4, 3, 1], seed=1)
    x = torch.randn(300, 2, generator=gen(1))
    patterns = activation_patterns(model, x)
    assert [p.shape for p in patterns.values()] == [(300, 4), (300, 3)]
    # explicit: evaluate the layers by hand in float64
    m = model.double()
    z1 = m[0](x.double())
    z2 = m[2](torch.relu(z1))
    assert torch.equal(patterns["1"], z1 > 0) and torch.equal(patterns["3"], z2 > 0)
    joint = {tuple(row.tolist()) for row in torch.cat([z1 > 0, z2 > 0], dim=1)}
    assert linear_regions(model, x) == len(joint)


def test_unit_activity_dead_and_always_active() -> None:
    x = torch.tensor([[-0.5], [0.5], [1.5], [2.0]])
    activity = unit_activity(activation_patterns(hand_network(), x))["1"]
    assert activity.dead.tolist() == [False, False, True]
    assert activity.always_active.tolist() == [False, False, False]
    activity = unit_activity(activation_patterns(hand_network(), torch.tensor([[1.5], [2.0]])))["1"]
    assert activity.always_active.tolist() == [True, True, False]
    assert (activity.num_units, activity.num_dead, activity.num_always_active) == (3, 1, 2)


def test_conv_patterns_are_flattened_per_position() -> None:
    model = small_cnn(seed=2)
    x = torch.randn(5, 1, 6, 6, generator=gen(2))
    patterns = activation_patterns(model, x)
    assert patterns["1"].shape == (5, 3 * 4 * 4)
    assert patterns["5"].shape == (5, 4)
    z = model.double()[0](x.double())
    assert torch.equal(patterns["1"], (z > 0).reshape(5, -1))


def test_reused_relu_module_gets_one_key_per_call() -> None:
    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2, self.out, self.act = nn.Linear(2, 3), nn.Linear(3, 4), nn.Linear(4, 1), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.act(self.l2(self.act(self.l1(x)))))

    patterns = activation_patterns(Reuse(), torch.randn(7, 2, generator=gen(3)))
    assert {k: tuple(v.shape) for k, v in patterns.items()} == {"act#0": (7, 3), "act#1": (7, 4)}


def test_functional_relu_is_not_applicable() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(2, 3), nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    x = torch.randn(4, 2, generator=gen(4))
    assert activation_patterns(Functional(), x) == {}
    with pytest.raises(NotApplicableError, match="nn.ReLU"):
        linear_regions(Functional(), x)


def test_hooks_are_removed_even_when_forward_raises() -> None:
    model = mlp([3, 4, 2], seed=5)
    with pytest.raises(ValueError, match="forward failed"):
        activation_patterns(model, torch.randn(4, 7))
    assert not model[1]._forward_hooks
    assert all(not m._forward_hooks for m in model.modules())


def test_model_state_and_rng_untouched() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Dropout(0.5), nn.Linear(3, 1)).train()
    rng = torch.get_rng_state()
    activation_patterns(model, torch.randn(4, 2, generator=gen(6)))
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
