"""Low-precision training: the monitor still measures in float64, and its values equal those of a float32 run of
the same weights; BatchNorm statistics, Dropout (the global RNG), modes and dtypes are untouched. Real Trainer runs
on CPU, no mocks.

On CPU, Lightning replaces ``precision="16-mixed"`` by ``"bf16-mixed"`` (with a warning: AMP with fp16 needs a
GPU), so the "16-mixed" case runs bf16 autocast here; float16 weights are covered by ``"16-true"``.
"""

from __future__ import annotations

import csv
import math
import random
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_geomdim import BatchFunctionalDimension, GeometryMonitor, batch_functional_dimension

IN, HIDDEN, CLASSES = 4, 6, 3


class Classifier(L.LightningModule):
    """Linear → BatchNorm → ReLU → Dropout → Linear."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(HIDDEN, CLASSES))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x.to(self.dtype)).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class StateRecorder(Callback):
    """Placed after the monitor: the modes and dtypes the monitor leaves behind at each of its hooks."""

    def __init__(self) -> None:
        self.modes: list[bool] = []
        self.dtypes: set[torch.dtype] = set()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.modes.extend(m.training for m in pl_module.modules())
        self.dtypes.update(p.dtype for p in pl_module.parameters())


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, IN, generator=g), torch.randint(0, CLASSES, (48,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)


def run(root: Path, precision: str, *, with_monitor: bool = True, lr: float = 0.1,
        weights: dict[str, torch.Tensor] | None = None, max_steps: int = 4) -> tuple[L.Trainer, Classifier, Any]:
    L.seed_everything(3)
    model = Classifier(lr=lr)
    if weights is not None:
        model.load_state_dict(weights)
    monitor = GeometryMonitor(max_overhead=None, every_n_steps=1, probes=["train", "random"], probe_size=8,
                              flatness_top_k=2)
    recorder = StateRecorder()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*AMP with fp16 is not supported on CPU.*")
        trainer = L.Trainer(
            precision=precision, accelerator="cpu", max_steps=max_steps, logger=CSVLogger(root, name="csv"),
            callbacks=[monitor, recorder] if with_monitor else [recorder], enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        )
    trainer.fit(model, data())
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    return trainer, model, (rng, recorder, monitor)


def logged(trainer: L.Trainer) -> dict[str, list[tuple[int, float]]]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in rows[0] if k.startswith("geometry/")]
    return {k: [(int(r["step"]), float(r[k])) for r in rows if r[k] != ""] for k in keys}


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true", "16-true"])
def test_low_precision_training_is_measured_in_float64_and_left_untouched(tmp_path: Path, precision: str) -> None:
    watched, model, (rng, recorder, monitor) = run(tmp_path / "watched", precision)
    expected = {"bf16-mixed": "bf16-mixed", "16-mixed": "bf16-mixed"}.get(precision, precision)
    assert watched.precision == expected  # 16-mixed falls back to bf16 autocast on CPU
    low = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)
    assert recorder.dtypes == {low}  # the parameters kept the run's dtype
    assert recorder.modes and all(recorder.modes)  # every module is back in train mode after each measurement

    # the monitor is an observer: weights, BatchNorm statistics and the RNG (Dropout masks) as without it
    _, plain_model, (plain_rng, _, _) = run(tmp_path / "plain", precision, with_monitor=False)
    for key, value in plain_model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert torch.equal(rng[0], plain_rng[0]) and rng[1] == plain_rng[1] and np.array_equal(rng[2], plain_rng[2])
    assert model.net[1].num_batches_tracked.item() == 4

    # the last values equal those of a float32 run (lr=0, measured at step 0) of the same weights
    values = logged(watched)
    assert [s for s, _ in values["geometry/train/numerical_rank"]] == [0, 1, 2, 3, 4]
    weights32 = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    reference, _, _ = run(tmp_path / "float32", "32-true", lr=0.0, weights=weights32, max_steps=1)
    ref = logged(reference)
    assert set(ref) == set(values) and len(values) >= 20
    differ = {k: (values[k][-1], ref[k][0]) for k in values
              if not (values[k][-1][1] == ref[k][0][1] or (math.isnan(values[k][-1][1]) and math.isnan(ref[k][0][1])))}
    assert not differ

    # and they are the float64 measure of those weights (eval mode: BatchNorm running statistics, no Dropout)
    net32 = Classifier().net
    net32.load_state_dict({k.removeprefix("net."): v for k, v in weights32.items()})
    res = batch_functional_dimension(net32, monitor.probes["train"].x, spectrum=True)
    assert values["geometry/train/batch_functional_dimension"][-1][1] == res.rank and res.exact
    assert values["geometry/train/numerical_rank"][-1][1] == res.spectrum.numerical_rank
    assert values["geometry/train/stable_rank"][-1][1] == res.spectrum.stable_rank
    assert values["geometry/train/num_hidden_neurons"][-1][1] == 0  # BatchNorm in between: no rescaling claimed


class MetricInValidation(L.LightningModule):
    """Logs the batch functional dimension from its own validation_step, where bf16 autocast is active."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
        self.val_bfd = BatchFunctionalDimension(self.net)
        self.autocast_seen: list[bool] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.autocast_seen.append(torch.is_autocast_enabled("cpu") and self.net(batch[0]).dtype == torch.bfloat16)
        self.val_bfd.update(batch[0])
        self.log("val_bfd", self.val_bfd)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_metric_logged_under_bf16_autocast_is_the_float64_value(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = MetricInValidation()
    g = torch.Generator().manual_seed(1)
    val_x = torch.randn(32, IN, generator=g)  # M = 96 > P = 51: the ReLU bound P − 6 = 45 is below min(M, P)
    trainer = L.Trainer(
        precision="bf16-mixed", accelerator="cpu", max_epochs=1, limit_train_batches=2,
        logger=CSVLogger(tmp_path, name="csv"), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, data(), DataLoader(TensorDataset(val_x, torch.zeros(32, dtype=torch.long)), batch_size=8))
    assert model.autocast_seen == [True] * 4
    res = batch_functional_dimension(model.net, val_x)
    assert res.upper_bound == 45 and res.rank <= 45
    assert trainer.callback_metrics["val_bfd"].item() == res.rank
