"""Neuron alignment on constructed layers with known structure, against explicit float64 computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import gen, mlp, small_cnn
from torch import Tensor, nn

from lightning_geomdim import AlignmentStats, NotApplicableError, activation_patterns, neuron_alignment
from lightning_geomdim.core.alignment import alignment_bytes
from lightning_geomdim.core.errors import MemoryBudgetError


def set_layer(layer: nn.Module, weight: Tensor, bias: Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(layer.weight.shape))
        layer.bias.copy_(bias)


def explicit_cosines(neurons: np.ndarray) -> np.ndarray:
    u = neurons / np.linalg.norm(neurons, axis=1, keepdims=True)
    return np.clip(u @ u.T, -1.0, 1.0)


def explicit_stable_rank(weight: np.ndarray) -> float:
    return float(np.linalg.norm(weight, "fro") ** 2 / np.linalg.norm(weight, 2) ** 2)


def clustered_linear() -> tuple[nn.Sequential, np.ndarray]:
    """Rows (w_j, b_j): v, v (duplicate), 2.5·v (positive multiple), −v (opposite side), two random ones."""
    rng = np.random.default_rng(0)
    v = rng.standard_normal(4)
    rows = np.stack([v, v, 2.5 * v, -v, rng.standard_normal(4), rng.standard_normal(4)])
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    rows32 = torch.tensor(rows, dtype=torch.float32)
    set_layer(net[0], rows32[:, :3], rows32[:, 3])
    return net, rows32.double().numpy()


def test_known_clusters_duplicates_multiples_and_random_directions() -> None:
    net, rows = clustered_linear()
    stats = neuron_alignment(net)
    assert list(stats) == ["0"]  # the output layer feeds no ReLU
    s = stats["0"]
    assert isinstance(s, AlignmentStats)
    assert s.num_neurons == 6 and s.num_clusters == 4
    assert s.cluster_labels.tolist() == [0, 0, 0, 1, 2, 3]
    cos = explicit_cosines(rows)
    np.testing.assert_allclose(s.cosines.numpy(), cos, rtol=0, atol=1e-12)
    best = np.where(np.eye(6, dtype=bool), -np.inf, cos).max(axis=1)
    np.testing.assert_allclose(s.max_cosines.numpy(), best, rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.max_cosines[:3].numpy(), 1.0, atol=1e-12)
    assert s.mean_max_cosine == pytest.approx(float(best.mean()), abs=1e-12)
    assert s.cosines[0, 3] == pytest.approx(-1.0)  # the opposite side of the same hyperplane: not aligned
    assert s.stable_rank == pytest.approx(explicit_stable_rank(rows[:, :3]), rel=1e-10)
    assert s.dead is None and s.always_active is None and s.duplicate_patterns is None
    assert s.num_dead is None
    assert set(s.scalars()) == {"num_neurons", "num_clusters", "mean_max_cosine", "stable_rank"}


def test_clusters_are_connected_components_of_the_threshold_graph() -> None:
    # directions at 0°, 6°, 12° in the (w, b) plane: cos 6° = 0.9945 > 0.99 > cos 12° = 0.978
    angles = np.deg2rad([0.0, 6.0, 12.0, 90.0])
    net = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    set_layer(net[0], torch.tensor(np.cos(angles)), torch.tensor(np.sin(angles)))
    assert neuron_alignment(net, threshold=0.99)["0"].num_clusters == 2  # 0°–6°–12° chain into one component
    assert neuron_alignment(net, threshold=0.999)["0"].num_clusters == 4
    assert neuron_alignment(net, threshold=-1.0)["0"].num_clusters == 1
    for bad in (1.0, 1.5, -1.1):
        with pytest.raises(ValueError, match="threshold"):
            neuron_alignment(net, threshold=bad)


def test_conv_neurons_are_filters_with_their_bias() -> None:
    net = nn.Sequential(nn.Conv2d(2, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    w = torch.randn(4, 2, 2, 2, generator=gen(1), dtype=torch.float64)
    b = torch.randn(4, generator=gen(2), dtype=torch.float64)
    w[1], b[1] = 3.0 * w[0], 3.0 * b[0]  # positive multiple of filter 0 (bias included)
    w[3], b[3] = w[0], b[0] + 5.0  # same weights, another bias: a different hyperplane
    set_layer(net[0], w.float(), b.float())
    s = neuron_alignment(net)["0"]
    neurons = torch.cat([net[0].weight.detach().double().reshape(4, -1), net[0].bias.detach().double()[:, None]], 1)
    np.testing.assert_allclose(s.cosines.numpy(), explicit_cosines(neurons.numpy()), rtol=0, atol=1e-12)
    assert s.num_neurons == 4 and s.num_clusters == 3 and s.cluster_labels.tolist() == [0, 0, 1, 2]
    assert s.stable_rank == pytest.approx(explicit_stable_rank(neurons[:, :-1].numpy()), rel=1e-10)


def test_small_cnn_reports_the_layers_feeding_relus_with_and_without_x() -> None:
    model = small_cnn(seed=3)
    x = torch.randn(5, 1, 6, 6, generator=gen(3))
    without, traced = neuron_alignment(model), neuron_alignment(model, x)
    assert list(without) == list(traced) == ["0", "4"]  # Conv2d → ReLU, Linear → ReLU; not the head
    for name in without:
        assert torch.equal(without[name].cosines, traced[name].cosines)
        assert without[name].num_clusters == traced[name].num_clusters
    patterns = activation_patterns(model, x)
    conv = patterns["1"].reshape(5, 3, 16)  # (N, channels, positions)
    assert torch.equal(traced["0"].dead, ~conv.any(dim=2).any(dim=0))
    assert torch.equal(traced["0"].always_active, conv.all(dim=2).all(dim=0))
    assert torch.equal(traced["4"].dead, ~patterns["5"].any(dim=0))


def test_dead_always_active_and_duplicate_patterns_from_constructed_biases() -> None:
    net = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 1))
    weight = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, -1.0], [2.0, -2.0], [1.0, 0.0]])
    bias = torch.tensor([-10.0, 10.0, 0.0, 0.0, -0.5])  # x in [0, 1]²: unit 0 never fires, unit 1 always
    set_layer(net[0], weight, bias)
    x = torch.rand(64, 2, generator=gen(4))
    s = neuron_alignment(net, x)["0"]
    assert s.dead.tolist() == [True, False, False, False, False]
    assert s.always_active.tolist() == [False, True, False, False, False]
    # unit 3 = 2 · unit 2: the same activation column; the others are all distinct
    assert s.duplicate_patterns.tolist() == [False, False, True, True, False]
    assert (s.num_dead, s.num_always_active, s.num_duplicate_patterns) == (1, 1, 2)
    assert s.scalars()["num_duplicate_patterns"] == 2.0
    z = x.double() @ weight.double().T + bias.double()
    assert torch.equal(activation_patterns(net, x)["1"], z > 0)


def test_conv_dead_and_always_active_channels() -> None:
    net = nn.Sequential(nn.Conv2d(1, 3, 2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3, 1))
    w = torch.full((3, 1, 2, 2), 0.1)
    w[2] = torch.tensor([[1.0, -1.0], [0.0, 0.0]])
    set_layer(net[0], w, torch.tensor([-100.0, 100.0, 0.0]))
    x = torch.rand(4, 1, 3, 3, generator=gen(5))
    s = neuron_alignment(net, x)["0"]
    assert s.dead.tolist() == [True, False, False]
    assert s.always_active.tolist() == [False, True, False]
    assert s.duplicate_patterns.tolist() == [False, False, False]


def test_traced_custom_forward_shared_relu_and_broken_links() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(4, 4)
            self.drop, self.bn, self.act, self.out = nn.Dropout(0.3), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            side = self.fc3(x[:, :1].expand(-1, 4))  # interleaved call: must not break fc1's link
            h = self.act(self.drop(self.fc1(x)))  # through dropout: reported
            h = self.act(self.bn(self.fc2(h)))  # through BatchNorm (eval): reported, the BatchNorm folded in
            return self.out(h + side)

    torch.manual_seed(0)
    model = Custom().train()
    x = torch.randn(9, 3, generator=gen(6))
    stats = neuron_alignment(model, x)
    assert list(stats) == ["fc1", "fc2"] and stats["fc1"].folded == () and stats["fc2"].folded == ("bn",)
    first = activation_patterns(model, x)["act#0"]  # the shared ReLU's first call
    assert torch.equal(stats["fc1"].dead, ~first.any(dim=0))
    assert all(m.training for m in model.modules())
    with pytest.raises(NotApplicableError, match="pass a probe batch x"):
        neuron_alignment(model)  # not a Sequential: the data flow needs a trace


def test_not_applicable_without_relu_or_without_a_feeding_layer() -> None:
    tanh = mlp([2, 3, 1])
    tanh[1] = nn.Tanh()
    x = torch.randn(4, 2, generator=gen(7))
    for arg in (None, x):
        with pytest.raises(NotApplicableError, match="no nn.ReLU"):
            neuron_alignment(tanh, arg)
    layer_norm_first = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.ReLU(), nn.Linear(3, 1))  # not foldable
    for arg in (None, x):
        with pytest.raises(NotApplicableError, match="feeds a ReLU"):
            neuron_alignment(layer_norm_first, arg)


def test_single_neuron_and_zero_neuron() -> None:
    net = nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 1))
    s = neuron_alignment(net)["0"]
    assert s.num_clusters == 1 and math.isnan(s.mean_max_cosine) and math.isnan(float(s.max_cosines[0]))
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    set_layer(net[0], torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]), torch.tensor([0.0, 1.0, 2.0]))
    s = neuron_alignment(net)["0"]
    assert s.cosines[0].tolist() == [0.0, 0.0, 0.0]  # an all-zero neuron has no direction
    assert s.num_clusters == 2


def test_global_rng_and_model_state_untouched() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    model[0].bias.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0)
    grads = [p.grad for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(6, 3, generator=gen(8))
    state = torch.get_rng_state()
    neuron_alignment(model, x)
    neuron_alignment(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True]
    for p, g, b in zip(model.parameters(), grads, before, strict=True):
        assert p.grad is g and torch.equal(g, torch.full_like(p, 2.0))
        assert torch.equal(p.detach(), b) and p.dtype == torch.float32


class BatchRecorder(nn.Module):
    """Linear → ReLU → Linear recording the batch size of every forward call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)
        self.batches: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.batches.append(x.shape[0])
        return self.out(self.act(self.fc(x)))


def test_memory_budget_refused_before_the_cosines_and_the_patterns() -> None:
    net, _ = clustered_linear()  # one layer: n = 6 neurons of length 4
    needed = 8 * 6**2 + 19 * 6**2 + 16 * 6 * 4  # kept cosines + the layer's working memory
    assert alignment_bytes([(6, 4)]) == needed == 1356
    assert neuron_alignment(net, max_memory_bytes=needed)["0"].num_clusters == 4
    with pytest.raises(MemoryBudgetError, match=r"n = 6 neurons") as err:
        neuron_alignment(net, max_memory_bytes=needed - 1)
    assert "'0'" in str(err.value) and "max_memory_bytes" in str(err.value)
    # with x: refused after tracing one sample, before the activation patterns of the whole batch
    model = BatchRecorder()
    x = torch.randn(7, 3, generator=gen(9))
    with pytest.raises(MemoryBudgetError):
        neuron_alignment(model, x, max_memory_bytes=100)
    assert model.batches and max(model.batches) == 1
    model.batches.clear()
    assert list(neuron_alignment(model, x)) == ["fc"] and max(model.batches) == 7


def test_memory_estimate_keeps_every_layer_and_works_on_the_widest() -> None:
    shapes = [(6, 4), (40, 7)]
    assert alignment_bytes(shapes) == 8 * (36 + 1600) + 19 * 1600 + 16 * 40 * 7


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_batchnorm_in_eval_is_folded_into_the_neurons_it_follows(kind: str) -> None:
    """conv → BatchNorm → ReLU (the standard block): the neurons are those of the composed affine map,
    w ← s w, b ← s b + β − s μ with s = γ / √(σ² + ε), from the running statistics (eval mode)."""
    torch.manual_seed(3)
    if kind == "linear":
        layer, norm, x = nn.Linear(5, 6), nn.BatchNorm1d(6), torch.randn(12, 5, generator=gen(3))
    else:
        layer, norm, x = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), torch.randn(4, 2, 5, 5, generator=gen(3))
    model = nn.Sequential(layer, norm, nn.ReLU(), nn.Flatten(), nn.LazyLinear(2) if kind == "conv" else nn.Linear(6, 2))
    model(x)  # materialise the lazy layer
    with torch.no_grad():  # running statistics and affine parameters far from the defaults
        norm.running_mean.uniform_(-1, 1, generator=gen(4))
        norm.running_var.uniform_(0.2, 3, generator=gen(5))
        norm.weight.uniform_(-2, 2, generator=gen(6))
        norm.bias.uniform_(-1, 1, generator=gen(7))
        layer.weight[1] = 3 * layer.weight[0]  # the same direction before the fold ...
        layer.bias[1] = 3 * layer.bias[0]
    s = norm.weight.detach().double() / (norm.running_var.double() + norm.eps).sqrt()
    w = layer.weight.detach().double().reshape(6, -1) * s[:, None]
    b = s * layer.bias.detach().double() + norm.bias.detach().double() - s * norm.running_mean.double()
    u = torch.cat([w, b[:, None]], dim=1)
    u = u / u.norm(dim=1, keepdim=True)
    for stats in (neuron_alignment(model, x)["0"], neuron_alignment(model)["0"]):  # traced, and from the Sequential
        assert stats.folded == ("1",)
        torch.testing.assert_close(stats.cosines, (u @ u.T).clamp(-1, 1), rtol=0, atol=1e-12)
    # ... stays aligned after it only if the two channels' BatchNorm maps agree, which they do not here
    assert abs(float(stats.cosines[0, 1])) < 0.999

