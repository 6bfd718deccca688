"""Checkpoint and resume: a run stopped after 2 epochs and resumed from its checkpoint to 4 epochs logs the same
curve (same probes, same steps, same values, no step twice) as an uninterrupted 4-epoch run. Real Trainer runs with
ModelCheckpoint, validation, an SGD with momentum and a shuffling sampler; no mocks."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_geomdim import GeometryMonitor


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class EpochShuffle(Sampler[int]):
    """A new order every epoch, a function of the epoch alone (Lightning calls set_epoch, as for
    DistributedSampler), so an interrupted run sees the same batches as an uninterrupted one."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


def dataloaders() -> dict[str, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    train = TensorDataset(x[:24], y[:24])
    return {
        "train_dataloaders": DataLoader(train, batch_size=8, sampler=EpochShuffle(24)),
        "val_dataloaders": DataLoader(TensorDataset(x[24:], y[24:]), batch_size=8),
    }


def monitor(seed: int) -> GeometryMonitor:
    # log_spaced=3: steps 1, 2, 5, 10; every epoch: 3, 6, 9, 12; and step 0
    return GeometryMonitor(max_overhead=None, every_n_epochs=1, log_spaced=3, probes=["train", "val", "random"],
                           probe_size=6, flatness_top_k=2, seed=seed)


def fit(root: Path, max_epochs: int, mon: GeometryMonitor, ckpt_path: Path | None = None) -> L.Trainer:
    torch.manual_seed(0)
    model = Classifier()
    trainer = L.Trainer(
        max_epochs=max_epochs, logger=CSVLogger(root, name="csv"),
        callbacks=[mon, ModelCheckpoint(root, save_last=True)], default_root_dir=root, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1, deterministic=True,
    )
    trainer.fit(model, ckpt_path=ckpt_path, **dataloaders())
    return trainer


def curve(*trainers: L.Trainer) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] over the CSV logs of the runs, in order."""
    points: dict[str, list[tuple[int, float]]] = {}
    for trainer in trainers:
        with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key.startswith("geometry/") and value != "":
                        points.setdefault(key, []).append((int(row["step"]), float(value)))
    return points


def test_stopped_and_resumed_run_logs_the_same_curve_as_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = fit(tmp_path / "whole", 4, monitor(seed=0))
    first_monitor = monitor(seed=0)
    first = fit(tmp_path / "first", 2, first_monitor)
    ckpt = tmp_path / "first" / "last.ckpt"
    assert first.global_step == 6 and ckpt.exists()

    resumed_monitor = monitor(seed=7)  # another seed: the checkpoint's probes must win
    resumed = fit(tmp_path / "resumed", 4, resumed_monitor, ckpt_path=ckpt)
    assert whole.global_step == resumed.global_step == 12

    for name, probe in first_monitor.probes.items():
        assert resumed_monitor.probes[name].state == probe.state
        assert torch.equal(resumed_monitor.probes[name].x, probe.x)

    expected = curve(whole)
    got = curve(first, resumed)
    assert len(expected) >= 40 and set(got) == set(expected)
    for key, points in expected.items():
        assert [s for s, _ in points] == [0, 1, 2, 3, 5, 6, 9, 10, 12], key
        assert got[key] == points or all(
            s == t and (v == w or (math.isnan(v) and math.isnan(w)))
            for (s, v), (t, w) in zip(got[key], points, strict=True)
        ), key
    # the second run took over where the first stopped: nothing before step 6, nothing measured twice
    assert [s for s, _ in curve(resumed)["geometry/train/batch_functional_dimension"]] == [9, 10, 12]


def test_resume_with_a_probe_of_another_source_builds_it_afresh(tmp_path: Path) -> None:
    """Saved probes are matched by name and source: "random" now reads the validation set, so it is built anew,
    while "train" keeps the checkpoint's indices although the new monitor has another seed."""
    first_monitor = GeometryMonitor(max_overhead=None, every_n_epochs=1, probes=["train", "random"], probe_size=6,
                                    measures=["dimension"])
    fit(tmp_path / "first", 1, first_monitor)
    second_monitor = GeometryMonitor(max_overhead=None, every_n_epochs=1,
                                     probes=["train", {"name": "random", "source": "val"}],
                                     probe_size=6, measures=["dimension"], seed=5)
    assert second_monitor.state_key == first_monitor.state_key
    second = fit(tmp_path / "second", 2, second_monitor, ckpt_path=tmp_path / "first" / "last.ckpt")
    assert second_monitor.probes["train"].state == first_monitor.probes["train"].state
    assert second_monitor.probes["random"].source == "val" and second_monitor.probes["random"].y is not None
    assert [s for s, _ in curve(second)["geometry/random/batch_functional_dimension"]] == [6]
