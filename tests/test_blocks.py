"""Per-block ranks: the blocks found in the module tree, and the numerical rank of J's columns of each block from
the Gram engine's factors and from the dense Jacobian against numpy's rank of the dense float64 columns."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_jacobian, gen, numpy_rank
from torch import nn

from lightning_geomdim import batch_functional_dimension
from lightning_geomdim.core.blocks import parameter_blocks, resolve_blocks


class Stage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.layer1 = nn.Sequential(Stage(), Stage())
        self.fc = nn.Linear(2, 3)


class Gpt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, 8)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
        self.head = nn.Linear(8, 10)
        self.scale = nn.Parameter(torch.ones(1))


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), ["0", "2"]),
        (Wrapped(), ["net.0", "net.2"]),  # through the LightningModule-style wrapper
        (ResNetLike(), ["conv1", "layer1", "fc"]),  # a stage is one block
        (Gpt(), ["<root>", "tok", "encoder.layers.0", "encoder.layers.1", "head"]),  # transformer blocks
    ],
    ids=["sequential", "wrapper", "resnet_stages", "transformer_blocks"],
)
def test_blocks_from_the_module_tree(model: nn.Module, expected: list[str]) -> None:
    names = [n for n, _ in model.named_parameters()]
    blocks = parameter_blocks(model, names)
    assert list(blocks) == expected
    assert sorted(p for ps in blocks.values() for p in ps) == sorted(names)  # every parameter in one block


def test_frozen_parameters_are_left_out_of_blocks() -> None:
    model = Wrapped()
    blocks = parameter_blocks(model, ["net.2.weight", "net.2.bias"])
    assert blocks == {"net.2": ["net.2.weight", "net.2.bias"]}


def _dead_unit_mlp() -> nn.Sequential:
    """A hidden unit dead on every input: its input weights and bias are zero columns of J."""
    torch.manual_seed(40)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].bias[1] = -100.0
    return model


@pytest.mark.parametrize("engine", ["gram", "jacrev"])
def test_block_ranks_match_numpy_on_the_dense_columns(engine: str) -> None:
    model, x = _dead_unit_mlp(), torch.randn(30, 3, generator=gen(40))
    res = batch_functional_dimension(model, x, engine=engine, blocks="auto")
    jac = dense_jacobian(model, x)
    offsets = {"0": (0, 20), "2": (20, 44), "4": (44, 54)}
    assert set(res.blocks) == set(offsets)  # M = 60 ≥ every block's P_b
    for name, (a, b) in offsets.items():
        block = res.blocks[name]
        assert block.num_params == b - a and block.bound == min(60, b - a)
        assert block.numerical_rank == numpy_rank(jac[:, a:b]), name
        assert block.spectrum.engine == engine
    assert res.blocks["0"].numerical_rank <= 20 - 4  # at least the dead unit's 3 weights and bias are lost


def test_auto_blocks_keep_only_those_the_rows_can_resolve_and_a_dict_names_modules() -> None:
    model, x = _dead_unit_mlp(), torch.randn(4, 3, generator=gen(41))  # M = 8 rows
    names = [n for n, _ in model.named_parameters()]
    assert resolve_blocks("auto", model, names, 8) == {}  # every block has more than 8 parameters
    assert list(resolve_blocks("auto", model, names, 23)) == ["0", "4"]  # 20, 24 and 10 parameters
    mapping = resolve_blocks({"body": ["0", "2"], "head": "4"}, model, names, 8)
    assert mapping == {"body": names[:4], "head": names[4:]}
    res = batch_functional_dimension(model, x, engine="gram", blocks={"head": "4"})
    assert res.blocks["head"].numerical_rank == numpy_rank(dense_jacobian(model, x)[:, 44:])
    with pytest.raises(ValueError, match="holds no measured parameter"):
        resolve_blocks({"x": "nope"}, model, names, 8)
    with pytest.raises(ValueError, match="blocks='all'"):
        resolve_blocks("all", model, names, 8)


def test_blocks_need_the_float_spectrum() -> None:
    """The exact engine alone computes no float spectrum, hence no blocks; with spectrum=True it does."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(20, 3, generator=gen(42))
    assert batch_functional_dimension(model, x, blocks="auto").blocks == {}
    res = batch_functional_dimension(model, x, blocks="auto", spectrum=True)
    assert res.engine == "exact" and set(res.blocks) == {"0", "2"}


@pytest.mark.parametrize("engine", ["gram", "jacrev"])
def test_a_block_whose_layers_never_run_has_rank_zero(engine: str) -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.aux = nn.Linear(3, 3), nn.Linear(3, 2), nn.Linear(1, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(44)
    model, x = Unused(), torch.randn(10, 3, generator=gen(43))
    res = batch_functional_dimension(model, x, engine=engine, blocks="auto")
    assert res.blocks["aux"].numerical_rank == 0 and res.blocks["aux"].bound == 8
    assert res.blocks["fc2"].numerical_rank == numpy_rank(dense_jacobian(model, x)[:, 12:20])  # fc1: 12 columns
