"""Count the model's forward passes over the probe and the float64 copies of its parameters in one measurement
step of GeometryMonitor, every measure on (dimension with its spectrum, linear regions, flatness, alignment).

A real ``Trainer`` fits a small ReLU MLP for one step with ``GeometryMonitor(probes=["train"], at_start=True)``
and nothing else scheduled, so the only measurement is the one at step 0, on one probe. Counted:

* forward passes over the probe: calls of the network's root module on a float64 input of more than one sample
  (training runs in float32, the measures in float64), and all float64 calls (one-sample traces included);
* float64 copies of the parameters: ``aten._to_copy`` calls producing a float64 tensor from the storage of the
  network's first weight (every copy of the parameters copies that one).

Only public imports, so the same script measures any commit::

    python benchmarks/count_passes.py            # the default engine ("auto": exact here) with spectrum=True
    python benchmarks/count_passes.py --engine gram
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_geomdim import GeometryMonitor


class CountingMLP(nn.Sequential):
    """A ReLU MLP that counts its float64 forward passes (the measures'; training runs in float32), and among them
    the passes over more than one sample (a probe, not a one-sample trace)."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        self.float64_passes = 0
        self.probe_passes = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float64:
            self.float64_passes += 1
            self.probe_passes += x.shape[0] > 1
        return super().forward(x)


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = CountingMLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=16)


class ParameterCopies(TorchDispatchMode):
    """Counts float64 copies made from the storage of one parameter."""

    def __init__(self, param: torch.Tensor) -> None:
        super().__init__()
        self.storage = param.untyped_storage().data_ptr()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.Tensor):
            src = args[0]
            if src.untyped_storage().data_ptr() == self.storage and out.dtype == torch.float64:
                self.count += 1
        return out


def one_measurement_step(engine: str, root: str) -> tuple[int, int, int]:
    """Fit one step with every measure due at step 0 on one probe of 32 samples, logging to a CSVLogger under
    ``root``; return (forward passes over the whole probe, float64 forward passes in all, float64 copies of the
    parameters)."""
    L.seed_everything(0, verbose=False)
    model = Classifier()
    monitor = GeometryMonitor(
        probes=["train"], probe_size=32, at_start=True, every_n_steps=10**9, max_overhead=None, engine=engine,
        spectrum=True, tensorboard_extras=False,
    )
    trainer = L.Trainer(max_steps=1, logger=CSVLogger(root), enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[monitor], default_root_dir=root)
    copies = ParameterCopies(model.net[0].weight)
    with warnings.catch_warnings(), copies:
        warnings.simplefilter("ignore")
        trainer.fit(model)
    return model.net.probe_passes, model.net.float64_passes, copies.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="auto", choices=["auto", "exact", "gram", "jacrev"])
    args = parser.parse_args()
    passes, all_passes, copies = one_measurement_step(args.engine, tempfile.mkdtemp())
    print(f"one measurement step (dimension with spectrum [engine={args.engine}], linear regions, flatness, "
          f"alignment) on one probe of 32 samples: {passes} forward passes over the probe ({all_passes} float64 "
          f"passes in all, one-sample passes included), {copies} float64 copies of the parameters")


if __name__ == "__main__":
    main()
