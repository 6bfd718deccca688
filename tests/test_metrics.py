"""torchmetrics wrappers against explicit float64 dense computations and the core functions, inside a LightningModule's
own loop, and under a real two-process gloo group; the torchmetrics contract: states declared in ``__init__`` with
"cat" reductions, no cached ``compute()``, nested inputs bit-exact, ``max_samples`` bounding the stored inputs."""

from __future__ import annotations

import copy
import csv
import json
import os
import warnings
from collections import namedtuple
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import dense_jacobian, gen, mlp, numpy_rank, small_cnn, spawn_and_join
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.utilities.data import dim_zero_cat

from lightning_geomdim import (
    BatchFunctionalDimension,
    Flatness,
    LinearRegions,
    NeuronAlignment,
    NotApplicableError,
    activation_patterns,
    batch_functional_dimension,
    flatness,
    linear_regions,
    neuron_alignment,
)
from lightning_geomdim.core.activation_patterns import count_regions
from lightning_geomdim.core.losses import resolve_loss_fn
from lightning_geomdim.metrics.packing import layout_of, pack, unpack


def test_compute_measures_the_current_weights_not_a_cached_value() -> None:
    model = mlp([3, 4, 2], seed=2)
    x = torch.randn(12, 3, generator=gen(2))
    metric = BatchFunctionalDimension(model)
    metric.update(x)
    before = int(metric.compute())
    assert before == numpy_rank(dense_jacobian(model, x)) > 2
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every hidden unit dies: only the last bias moves f
    after = int(metric.compute())  # no update() in between: torchmetrics would return its cached value
    assert after == 2 == numpy_rank(dense_jacobian(model, x))


def test_dimension_accumulates_updates_and_matches_the_dense_rank() -> None:
    model = mlp([3, 5, 2], seed=1)
    x = torch.randn(9, 3, generator=gen(1))
    metric = BatchFunctionalDimension(model, spectrum=True)
    for chunk in x.split(4):
        metric.update(chunk)
    value = metric.compute()
    jac = dense_jacobian(model, x)
    assert value.dtype == torch.float64 and value.shape == ()
    assert int(value) == metric.result.rank == numpy_rank(jac) and metric.result.engine == "exact"
    torch.testing.assert_close(metric.result.spectrum.singular_values, torch.linalg.svdvals(jac), rtol=1e-6, atol=1e-9)
    assert metric.result.num_outputs == 18 and metric.result.num_params == 32
    metric.reset()
    assert metric.result is None and metric.inputs == []
    # max_samples keeps the first N accumulated inputs
    small = BatchFunctionalDimension(model, max_samples=2)
    small.update(x)
    assert int(small.compute()) == numpy_rank(dense_jacobian(model, x[:2])) == 4


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(left) + self.b(right)))


def test_tuple_and_dict_inputs() -> None:
    model = TwoInputs()
    left, right = torch.randn(6, 3, generator=gen(2)), torch.randn(6, 2, generator=gen(3))
    expected = batch_functional_dimension(model, (left, right)).rank
    as_tuple = BatchFunctionalDimension(model)
    as_tuple.update((left[:3], right[:3]))
    as_tuple.update((left[3:], right[3:]))
    assert int(as_tuple.compute()) == expected
    as_dict = BatchFunctionalDimension(model)
    as_dict.update({"left": left, "right": right})
    assert int(as_dict.compute()) == expected
    with pytest.raises(ValueError, match="structured as"):
        as_dict.update(left)
    with pytest.raises(TypeError, match="pass a Tensor"):
        BatchFunctionalDimension(model).update([left, "text"])
    with pytest.raises(ValueError, match="call update"), pytest.warns(UserWarning, match="before the ``update``"):
        BatchFunctionalDimension(model).compute()


def test_metric_can_live_inside_the_module_it_measures() -> None:
    model = mlp([3, 4, 2])
    keys = list(model.state_dict())
    model.metric = BatchFunctionalDimension(model)
    assert list(model.metric.children()) == [] and model.metric.model is model
    assert list(model.state_dict()) == keys  # states are not persistent, the model is not a child
    model.metric.to(torch.float64)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    clone = copy.deepcopy(model)
    assert clone.metric.model is clone


def test_linear_regions_match_explicit_patterns() -> None:
    model = mlp([2, 6, 5, 3], seed=4)
    x = torch.randn(40, 2, generator=gen(5))
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        z1 = ref[0](x.double())
        z2 = ref[2](torch.relu(z1))
    explicit = torch.unique(torch.cat([z1 > 0, z2 > 0], dim=1), dim=0).shape[0]
    metric = LinearRegions(model)
    metric.update(x[:20])
    metric.update(x[20:])
    assert int(metric.compute()) == metric.result == explicit
    tanh = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    no_relu = LinearRegions(tanh)
    no_relu.update(x)
    with pytest.raises(NotApplicableError, match="no nn.ReLU"):
        no_relu.compute()


def explicit_hessian_max_eigenvalue(model: nn.Module, loss_fn: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    ref = copy.deepcopy(model).double().eval()
    names = [n for n, _ in ref.named_parameters()]
    shapes = [p.shape for _, p in ref.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in ref.named_parameters()])
    target = y.double() if y.is_floating_point() else y

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = theta[start : start + s.numel()].reshape(s)
            start += s.numel()
        return loss_fn(torch.func.functional_call(ref, params, (x.double(),)), target)

    return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1])


@pytest.mark.parametrize("targets", ["classes", "regression"])
def test_flatness_default_loss_matches_an_explicit_hessian(targets: str) -> None:
    model = mlp([3, 4, 2], seed=6)
    x = torch.randn(10, 3, generator=gen(6))
    if targets == "classes":
        y, reference_loss = torch.randint(0, 2, (10,), generator=gen(7)), F.cross_entropy
    else:
        y, reference_loss = torch.randn(10, 2, generator=gen(7)), F.mse_loss
    metric = Flatness(model, top_k=2, flat_dimension=True)
    metric.update(x[:5], y[:5])
    metric.update(x[5:], y[5:])
    value = float(metric.compute())
    assert value == pytest.approx(explicit_hessian_max_eigenvalue(model, reference_loss, x, y), rel=1e-9)
    direct = flatness(model, reference_loss, x, y, top_k=2, generator=torch.Generator().manual_seed(0),
                      flat_dimension=True)
    assert metric.result.trace == pytest.approx(direct.trace, rel=1e-12)
    assert metric.result.flat_dimension == direct.flat_dimension
    assert metric.result.top_eigenvalues.shape == (2,)


def test_loss_resolution() -> None:
    ce = resolve_loss_fn(None, torch.tensor([0, 1]))
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(4, 3, generator=g), torch.randint(0, 3, (4,), generator=g)
    assert torch.equal(ce(logits, labels), F.cross_entropy(logits, labels))
    # sequence outputs (N, T, V) with token targets (N, T): token-level, also when T == V
    seq, tokens = torch.randn(2, 5, 5, generator=g), torch.randint(0, 5, (2, 5), generator=g)
    torch.testing.assert_close(ce(seq, tokens), F.cross_entropy(seq.reshape(10, 5), tokens.reshape(10)))
    assert not torch.allclose(ce(seq, tokens), F.cross_entropy(seq, tokens))  # what dimension 1 would have given
    # segmentation (N, C, H, W) with (N, H, W): classes in dimension 1, as F.cross_entropy reads them
    seg, masks = torch.randn(2, 3, 4, 5, generator=g), torch.randint(0, 3, (2, 4, 5), generator=g)
    assert torch.equal(ce(seg, masks), F.cross_entropy(seg, masks))
    with pytest.raises(ValueError, match=r"output \(2, 5, 7\) and targets \(2, 4\): pass loss_fn="):
        ce(torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
    mse = resolve_loss_fn(None, torch.zeros(4))
    # targets (N,) against outputs (N, 1) are reshaped, not broadcast to (N, N)
    assert float(mse(torch.ones(4, 1, dtype=torch.float64), torch.zeros(4))) == 1.0
    assert resolve_loss_fn("mse", torch.tensor([0, 1])) is not F.cross_entropy
    with pytest.raises(ValueError, match="loss_fn"):
        resolve_loss_fn("hinge", torch.zeros(2))
    with pytest.raises(ValueError, match="loss_fn"):
        Flatness(mlp([2, 2]), "hinge")


def test_alignment_matches_the_function() -> None:
    model = mlp([3, 6, 4, 2], seed=8)
    x = torch.randn(12, 3, generator=gen(8))
    metric = NeuronAlignment(model, threshold=0.9)
    metric.update(x)
    total = int(metric.compute())
    direct = neuron_alignment(model, x, threshold=0.9)
    assert list(metric.result) == list(direct) == ["0", "2"]
    assert total == sum(s.num_clusters for s in direct.values())
    for name, stats in direct.items():
        assert metric.result[name].scalars() == stats.scalars()
    weights_only = NeuronAlignment(model)
    with pytest.warns(UserWarning, match="before the ``update``"):
        weights_only.compute()
    assert weights_only.result["0"].dead is None


class SelfLogging(L.LightningModule):
    """Logs the batch functional dimension of its network on the validation set with ``self.log``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp([3, 4, 2], seed=9)
        self.val_bfd = BatchFunctionalDimension(self.net)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_bfd.update(batch[0])
        self.log("val_bfd", self.val_bfd, on_epoch=True, on_step=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_logging_a_metric_from_validation_step(tmp_path: Path) -> None:
    g = gen(10)
    train = TensorDataset(torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g))
    val_x = torch.randn(5, 3, generator=g)
    val = TensorDataset(val_x, torch.zeros(5, dtype=torch.int64))
    module = SelfLogging()
    trainer = L.Trainer(
        max_epochs=1, logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, DataLoader(train, batch_size=8), DataLoader(val, batch_size=2))  # 3 val batches
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        logged = [float(r["val_bfd"]) for r in csv.DictReader(f) if r.get("val_bfd")]
    # the whole validation set (5 inputs over 3 batches), on the weights after training
    assert logged == [float(numpy_rank(dense_jacobian(module.net, val_x)))]
    assert module.val_bfd.update_count == 0  # Lightning reset it at the end of the epoch


# --- the torchmetrics contract ------------------------------------------------------------------------------------

Pair = namedtuple("Pair", "left right")


def test_states_are_declared_in_init_with_cat_reductions() -> None:
    model = mlp([3, 4, 2])
    for metric in (BatchFunctionalDimension(model), LinearRegions(model), NeuronAlignment(model), Flatness(model)):
        names = ["inputs", "targets"] if isinstance(metric, Flatness) else ["inputs"]
        assert list(metric._defaults) == names, type(metric).__name__
        for name in names:
            assert metric._reductions[name] is dim_zero_cat and metric._persistent[name] is False
            assert getattr(metric, name) == []
        assert metric.compute_with_cache is False and metric.full_state_update is False
    # update() stores rows in the declared state, whatever the structure: it never adds one
    nested = BatchFunctionalDimension(TwoInputs())
    nested.update({"left": torch.randn(2, 3), "right": torch.randn(2, 2)})
    assert list(nested._defaults) == ["inputs"] and len(nested.inputs) == 1 and nested.inputs[0].dtype == torch.uint8
    with pytest.raises(ValueError, match="compute_with_cache=True is refused"):
        BatchFunctionalDimension(model, compute_with_cache=True)


def _reinit(model: nn.Sequential, seed: int) -> None:
    g = gen(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.8, generator=g)
                nn.init.normal_(layer.bias, std=0.8, generator=g)


@pytest.mark.parametrize("kind", ["dimension", "regions", "flatness", "alignment"])
def test_every_compute_measures_the_weights_at_its_call(kind: str) -> None:
    model = mlp([3, 6, 5, 2], seed=12)
    x, y = torch.randn(16, 3, generator=gen(13)), torch.randint(0, 2, (16,), generator=gen(14))
    direct = {
        "dimension": lambda: batch_functional_dimension(model, x),
        "regions": lambda: linear_regions(model, x),
        "flatness": lambda: flatness(model, F.cross_entropy, x, y, generator=torch.Generator().manual_seed(0)),
        "alignment": lambda: neuron_alignment(model, x),
    }[kind]
    metric = {"dimension": BatchFunctionalDimension, "regions": LinearRegions, "flatness": Flatness,
              "alignment": NeuronAlignment}[kind](model)
    if kind == "flatness":
        metric.update(x, y)
    else:
        metric.update(x)
    before = metric.compute()
    if kind == "dimension":
        with torch.no_grad():
            model[2].weight.zero_()  # the second hidden layer no longer depends on x: the dimension drops
        assert int(metric.compute()) == metric.result.rank == numpy_rank(dense_jacobian(model, x)) < int(before)
    _reinit(model, seed=15)
    after = metric.compute()  # no update() since the first compute: a cached value would be `before`
    assert metric._computed is None
    expected = direct()
    if kind == "dimension":
        assert metric.result.rank == expected.rank == numpy_rank(dense_jacobian(model, x))
    elif kind == "regions":
        assert metric.result == expected != int(before)
    elif kind == "flatness":
        assert metric.result.max_eigenvalue == pytest.approx(expected.max_eigenvalue, rel=1e-12)
        assert float(after) != pytest.approx(float(before), rel=1e-3)
    else:
        for name, stats in expected.items():
            torch.testing.assert_close(metric.result[name].cosines, stats.cosines)
    assert float(after) == float(metric._value(expected))


def test_nested_inputs_round_trip_bit_exact() -> None:
    inputs = {
        "ids": torch.tensor([[2**62 + 1], [-(2**53) - 1]]),  # not representable in float64
        "mask": torch.tensor([[True, False], [False, True]]),
        "half": torch.randn(2, 1, 3, generator=gen(17)).half(),
        "pair": Pair(torch.randn(2, 2, dtype=torch.float64, generator=gen(18)), torch.zeros(2, 0)),
    }
    rows = pack(inputs)
    assert rows.dtype == torch.uint8 and rows.shape == (2, 8 + 2 + 3 * 2 + 2 * 8)
    back = unpack(rows, layout_of(inputs))
    assert type(back) is dict and list(back) == list(inputs) and type(back["pair"]) is Pair
    for a, b in zip(tree_leaves(inputs), tree_leaves(back), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert torch.equal(unpack(pack(inputs, limit=1), layout_of(inputs))["ids"], inputs["ids"][:1])

    model = TwoInputs()
    left, right = torch.randn(6, 3, generator=gen(19)), torch.randn(6, 2, generator=gen(20))
    metric = BatchFunctionalDimension(model)
    metric.update(Pair(left[:2], right[:2]))
    metric.update(Pair(left[2:], right[2:]))
    metric.set_dtype(torch.float16)  # torchmetrics converts every state, the byte rows too: they survive it
    seen = metric._gathered("inputs")
    assert type(seen) is Pair and torch.equal(seen.left, left) and torch.equal(seen.right, right)
    assert int(metric.compute()) == batch_functional_dimension(model, (left, right)).rank
    # the structure is the container type, the keys in their order, the dtypes and per-sample shapes
    for other in [(left, right), Pair(left[:, :2], right), Pair(left.double(), right)]:
        with pytest.raises(ValueError, match="structured as"):
            metric.update(other)
    keyed = BatchFunctionalDimension(model)
    keyed.update({"left": left, "right": right})
    with pytest.raises(ValueError, match="structured as"):
        keyed.update({"right": right, "left": left})
    with pytest.raises(ValueError, match="different numbers of samples"):
        keyed.update({"left": left, "right": right[:5]})
    keyed.reset()  # a reset forgets the structure with the inputs
    keyed.update((left, right))
    assert int(keyed.compute()) == int(metric.compute())


def test_max_samples_bounds_the_stored_inputs() -> None:
    model = mlp([3, 5, 2], seed=1)
    x, y = torch.randn(12, 3, generator=gen(21)), torch.randint(0, 2, (12,), generator=gen(22))
    metric = Flatness(model, max_samples=6)
    for xs, ys in zip(x.split(4), y.split(4), strict=True):
        metric.update(xs, ys)
    assert [r.shape[0] for r in metric.inputs] == [4, 2, 0] == [r.shape[0] for r in metric.targets]
    metric.compute()
    direct = flatness(model, F.cross_entropy, x[:6], y[:6], generator=torch.Generator().manual_seed(0))
    assert metric.result.max_eigenvalue == pytest.approx(direct.max_eigenvalue, rel=1e-12)
    with pytest.raises(ValueError, match="each input needs its target"):
        metric.update(x[:2], y[:3])
    with pytest.raises(ValueError, match="max_samples"):
        Flatness(model, max_samples=0)


def test_alignment_without_inputs_warns_once_per_metric() -> None:
    model = mlp([3, 6, 2], seed=8)
    metric = NeuronAlignment(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            metric.compute()
        metric.reset()
        metric.compute()
    messages = [str(w.message) for w in caught]
    assert sum("before the ``update``" in m for m in messages) == 1
    assert not any("The ``compute`` method of metric" in m for m in messages)  # torchmetrics' per-call warning
    assert metric.result["0"].dead is None
    with pytest.warns(UserWarning, match="Warned once per metric"):
        NeuronAlignment(model).compute()  # another instance warns once itself
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_inputs = NeuronAlignment(model)
        with_inputs.update(torch.randn(5, 3, generator=gen(23)))
        with_inputs.compute()
    assert with_inputs.result["0"].dead is not None


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn(seed=3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}


def test_linear_regions_is_the_core_count_regions() -> None:
    model = DictOutput()
    x = torch.randn(30, 1, 6, 6, generator=gen(24))
    metric = LinearRegions(model, output_fn=lambda out: out["logits"], dtype=torch.float32)
    for chunk in x.split(7):
        metric.update(chunk)
    patterns = activation_patterns(model, x, dtype=torch.float32, output_fn=lambda out: out["logits"])
    assert int(metric.compute()) == metric.result == count_regions(patterns, model) > 1


# --- under a real process group: compute() sees the inputs of every process -------------------------------------

DDP_TIMEOUT_S = 180  # a healthy run takes a few seconds; a deadlock must fail the test, not hang it


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = TwoInputs()
        left, right = torch.randn(10, 3, generator=gen(25)), torch.randn(10, 2, generator=gen(26))
        lo, hi = (0, 4) if rank == 0 else (4, 10)  # uneven shares, in two updates on rank 1
        metric = BatchFunctionalDimension(model)
        for a, b in [(lo, hi)] if rank == 0 else [(lo, 7), (7, hi)]:
            metric.update(Pair(left[a:b], right[a:b]))
        value = int(metric.compute())
        metric.sync()
        seen = metric._gathered("inputs")
        metric.unsync()
        bounded = BatchFunctionalDimension(model, max_samples=3)
        bounded.update(Pair(left[lo:hi], right[lo:hi]))
        local_rows = sum(r.shape[0] for r in bounded.inputs)
        bounded_value = int(bounded.compute())
        result = {
            "value": value, "in_order": type(seen) is Pair and torch.equal(seen.left, left)
            and torch.equal(seen.right, right), "local_rows": local_rows, "bounded_value": bounded_value,
            "local_after_compute": sum(r.shape[0] for r in metric.inputs),
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_compute_gathers_every_process_inputs(tmp_path: Path) -> None:
    spawn_and_join(_ddp_worker, (2, str(tmp_path / "init"), str(tmp_path)), timeout_s=DDP_TIMEOUT_S)
    model = TwoInputs()
    left, right = torch.randn(10, 3, generator=gen(25)), torch.randn(10, 2, generator=gen(26))
    expected = batch_functional_dimension(model, (left, right)).rank
    three = batch_functional_dimension(model, (left[:3], right[:3])).rank
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            got = json.load(f)
        assert got == {"value": expected, "in_order": True, "local_rows": 3, "bounded_value": three,
                       "local_after_compute": 4 if rank == 0 else 6}
