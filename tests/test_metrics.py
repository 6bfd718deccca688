"""torchmetrics wrappers against explicit float64 dense computations, and inside a LightningModule's own loop."""

from __future__ import annotations

import copy
import csv
import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import dense_jacobian, gen, mlp, numpy_rank
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_geomdim import (
    BatchFunctionalDimension,
    Flatness,
    LinearRegions,
    NeuronAlignment,
    NotApplicableError,
    batch_functional_dimension,
    flatness,
    neuron_alignment,
)
from lightning_geomdim.core.losses import resolve_loss_fn


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
    assert metric.result is None and metric.inputs_0 == []
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
    with pytest.raises(ValueError, match="call update"):
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
