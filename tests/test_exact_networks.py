"""The exact engine on residual networks with BatchNorm in eval mode (the ResNet block: conv-BN-ReLU-conv-BN plus
the skip, ``out += identity``, in-place ReLU, a 1×1 downsampling branch, max-pooling stem, ``torch.flatten``) against
the generic rank of the dense float64 Jacobian (numpy's SVD rule, on instances with a clear spectral gap)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import dense_jacobian, gen, numpy_rank
from torch import nn

from lightning_geomdim import NotApplicableError, batch_functional_dimension


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, line for line."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _bn(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _bn(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class TinyResNet(nn.Module):
    """torchvision's ResNet forward with two BasicBlocks (the second downsamples) and 2 channels."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, 1, 1, bias=False)
        self.bn1 = _bn(2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(2, 2), BasicBlock(2, 3, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b, self.head = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.a(x)))
        h = torch.relu(self.b(h) + x)
        return self.head(h.view(h.size(0), -1))


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    g = gen(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def _cases() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(50)
    return {
        "tiny_resnet_few_samples": (TinyResNet(), torch.randn(3, 1, 8, 8, generator=gen(51))),  # M < P
        "tiny_resnet_many_samples": (TinyResNet(), torch.randn(100, 1, 8, 8, generator=gen(52))),  # M > P
        "residual_mlp_with_batchnorm": (ResidualMLP(), torch.randn(12, 4, generator=gen(53))),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_exact_engine_on_residual_networks_matches_the_dense_svd_rank(case: str) -> None:
    model, x = _cases()[case]
    _randomise(model, 54)
    res = batch_functional_dimension(model, x)
    jac = dense_jacobian(model, x)
    sv = torch.linalg.svdvals(jac)
    expected = numpy_rank(jac)
    assert res.engine == "exact"
    assert res.rank == expected <= res.upper_bound
    if expected < min(jac.shape):  # the instance has a clear gap: the dense count is not a tolerance artefact
        assert float(sv[expected - 1] / sv[expected]) > 1e6
    dense = batch_functional_dimension(model, x, engine="jacrev")
    assert dense.rank == expected


def test_tiny_resnet_dimension_is_below_both_bounds() -> None:
    """With more rows than parameters the exact dimension is below both M and P (rescaling symmetries of the
    channels, dead units): it carries information, and the result says it is not saturated."""
    model, x = _cases()["tiny_resnet_many_samples"]
    _randomise(model, 55)
    res = batch_functional_dimension(model, x)
    num_params = sum(p.numel() for p in model.parameters())
    assert res.engine == "exact" and res.num_rows > num_params and res.rank < num_params
    assert not res.saturated


@pytest.mark.parametrize(
    ("forward", "match"),
    [
        (lambda self, x: self.b(self.a(x) * x.sum(1, keepdim=True)), "the function 'mul'"),
        (lambda self, x: self.b(torch.tanh(self.a(x))), "the function 'tanh'"),
    ],
    ids=["product", "tanh"],
)
def test_functions_the_exact_engine_cannot_rerun_are_refused_by_name(forward: object, match: str) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    Net.forward = forward  # type: ignore[attr-defined]
    model, x = Net(), torch.randn(5, 3, generator=gen(56))
    with pytest.raises(NotApplicableError, match=match):
        batch_functional_dimension(model, x, engine="exact")
    assert batch_functional_dimension(model, x).engine == "gram"  # the float engine measures it


class ChangedAfterReLU(nn.Module):
    """The ReLU's input is changed in place after the call: its pattern cannot be read back from it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2, self.fc3 = nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        a = self.act(h)
        h += self.fc2(a)
        return self.fc3(h)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (ChangedAfterReLU(), r"the input of module 'act' \(ReLU\) was changed in place after the call"),
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False, track_running_stats=False), nn.ReLU(),
                       nn.Linear(4, 2)), r"'1' \(BatchNorm1d\) has no running statistics"),
    ],
    ids=["input_changed_after_the_call", "batchnorm_without_statistics_or_parameters"],
)
def test_what_the_exact_engine_cannot_read_back_is_refused_and_auto_is_right(model: nn.Module, match: str) -> None:
    x = torch.randn(40, 3, generator=gen(57))
    with pytest.raises(NotApplicableError, match=match):
        batch_functional_dimension(model, x, engine="exact")
    assert batch_functional_dimension(model, x).rank == numpy_rank(dense_jacobian(model, x))


@pytest.mark.parametrize("case", ["tiny_resnet_few_samples", "tiny_resnet_many_samples", "residual_mlp_with_batchnorm"])
def test_exact_block_dimensions_match_the_dense_svd_rank_of_the_block_columns(case: str) -> None:
    """The exact engine's per-block dimension (the same modular draws, one Gram mod p per block) against numpy's
    rank of the dense float64 Jacobian's columns of each block, and the float Gram's numerical rank."""
    model, x = _cases()[case]
    _randomise(model, 54)
    names = [n for n, _ in model.named_parameters()]
    modules = sorted({n.rsplit(".", 1)[0] for n in names})  # every layer its own block: small blocks resolve
    res = batch_functional_dimension(model, x, blocks={m: m for m in modules}, spectrum=True)
    assert res.engine == "exact" and set(res.block_dimensions) == set(modules)
    jac = dense_jacobian(model, x)
    offsets, start = {}, 0
    for n, p in model.named_parameters():
        offsets.setdefault(n.rsplit(".", 1)[0], []).extend(range(start, start + p.numel()))
        start += p.numel()
    resolved = 0
    for m in modules:
        expected = numpy_rank(jac[:, offsets[m]])
        assert res.block_dimensions[m] == expected, m
        assert res.block_failure_bounds[m] < 1e-2, m
        assert res.blocks[m].numerical_rank == expected, m  # the gaps are clear on these small blocks
        resolved += expected < min(jac.shape[0], len(offsets[m]))
    assert case == "tiny_resnet_few_samples" or resolved  # some block below its bound: not only full ranks


def test_blocks_below_their_bound_get_every_draw_though_the_whole_rank_reached_its_bound() -> None:
    """The whole J reaches its row bound at the first draw (a proof), a block with a dead unit does not: the draws go
    on for it (its failure bound is a product over two primes), on the exact engine's cheaper Gram side."""
    torch.manual_seed(55)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 40), nn.ReLU(), nn.Linear(40, 2))
    with torch.no_grad():
        model[0].bias[1] = -100.0  # unit 1 never fires: 4 zero columns in block "0"
    x = torch.randn(10, 3, generator=gen(56))  # 20 rows < P − hidden
    res = batch_functional_dimension(model, x, blocks={"first": "0"}, spectrum=True)
    assert res.engine == "exact" and res.rank == res.upper_bound == 20 and len(res.exact_ranks) == 1
    expected = numpy_rank(dense_jacobian(model, x)[:, :20])
    assert res.block_dimensions["first"] == expected <= 16 < 20
    assert 0 < res.block_failure_bounds["first"] < 1e-8  # two primes: one alone gives about 2e-5
    assert batch_functional_dimension(model, x, blocks={"first": "0"}).block_dimensions == {}  # spectrum=False
