"""GeometryMonitor in real Trainer runs on tiny models (CPU): logged tags and steps, loggers, batch formats,
observer guarantee, errors, probes, resume, LightningCLI. No mocks of Lightning or TensorBoard."""

from __future__ import annotations

import csv
import functools
import glob
import io
import math
import os
import random
import re
import warnings
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_geomdim import GeometryError, GeometryMonitor, batch_functional_dimension
from lightning_geomdim.callback.probes import probe_seed, select_indices
from lightning_geomdim.callback.schedule import log_spaced_steps
from lightning_geomdim.callback.tensorboard import cosine_heatmap, encode_heatmap, log_heatmap

IN, HIDDEN, CLASSES = 4, 6, 3


class Classifier(L.LightningModule):
    """Linear → [BatchNorm] → ReLU → [Dropout] → Linear, cross-entropy, SGD."""

    def __init__(
        self, dropout: float = 0.0, batchnorm: bool = False, dict_batches: bool = False, fail_in_eval: bool = False,
        lr: float = 0.1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(IN, HIDDEN)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(HIDDEN))
        layers.append(nn.ReLU())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(HIDDEN, CLASSES))
        self.net = nn.Sequential(*layers)
        self.dict_batches, self.fail_in_eval, self.lr = dict_batches, fail_in_eval, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_in_eval and not self.training:
            raise RuntimeError("this forward refuses to run in eval mode")
        return self.net(x)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = (batch["image"], batch["label"]) if self.dict_batches else batch
        return nn.functional.cross_entropy(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class NoForward(Classifier):
    """The network lives in ``self.net``; the LightningModule has no forward of its own."""

    forward = L.LightningModule.forward

    def _loss(self, batch: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch["image"]), batch["label"])


class DictDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "label": self.y[i]}


def data(n: int, seed: int, dicts: bool = False) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, IN, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    return DictDataset(x, y) if dicts else TensorDataset(x, y)


class TinyData(L.LightningDataModule):
    def __init__(self, train_size: int = 32, val_size: int = 16, batch_size: int = 8) -> None:
        super().__init__()
        self.train_size, self.val_size, self.batch_size = train_size, val_size, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(data(self.train_size, 0), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(data(self.val_size, 1), batch_size=self.batch_size)


def trainer(tmp_path: Path, monitor: GeometryMonitor | None, logger: Any = "tb", **kwargs: Any) -> L.Trainer:
    if logger == "tb":
        logger = TensorBoardLogger(tmp_path, name="tb")
    elif logger == "csv":
        logger = CSVLogger(tmp_path, name="csv")
    options = {
        "max_epochs": 2, "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
        "num_sanity_val_steps": 0, "log_every_n_steps": 1, "default_root_dir": tmp_path, "deterministic": True,
    }
    options.update(kwargs)
    return L.Trainer(logger=logger, callbacks=[monitor] if monitor else [], **options)


def loaders(train: int = 24, val: int | None = 16, batch: int = 8, dicts: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"train_dataloaders": DataLoader(data(train, 0, dicts), batch_size=batch, shuffle=True)}
    if val is not None:
        out["val_dataloaders"] = DataLoader(data(val, 1, dicts), batch_size=batch)
    return out


def events(tr: L.Trainer) -> EventAccumulator:
    acc = EventAccumulator(tr.logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def csv_rows(tr: L.Trainer) -> list[dict[str, str]]:
    with open(os.path.join(tr.logger.log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- TensorBoard: tags, steps, extras


def test_tensorboard_tags_extras_and_values(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = Classifier()
    monitor = GeometryMonitor(max_overhead=None, every_n_epochs=1, probes=["train", "val", "random"], probe_size=8,
                              flatness_top_k=2)
    tr = trainer(tmp_path, monitor, max_epochs=1, limit_train_batches=2)
    tr.fit(model, **loaders())
    acc = events(tr)
    tags = acc.Tags()
    for probe in ("train", "val", "random"):
        for key in ("batch_functional_dimension", "upper_bound", "num_outputs", "num_rows", "num_params",
                    "num_hidden_neurons", "numerical_rank", "numerical_rank_rtol", "resolution", "spectral_gap",
                    "stable_rank", "effective_rank", "linear_regions"):
            assert steps(acc, f"geometry/{probe}/{key}") == [0, 2], key
        assert f"geometry/{probe}/log10_singular_values" in tags["histograms"]
        assert [e.step for e in acc.Histograms(f"geometry/{probe}/log10_singular_values")] == [0, 2]
    for key in ("max_eigenvalue", "eigenvalue_1", "eigenvalue_2", "trace", "trace_std_error", "flat_dimension",
                "loss", "num_params"):
        assert steps(acc, f"geometry/flatness/{key}") == [0, 2], key
    for key in ("num_neurons", "num_clusters", "mean_max_cosine", "stable_rank", "num_dead", "num_always_active",
                "num_duplicate_patterns"):
        assert steps(acc, f"geometry/alignment/net.0/{key}") == [0, 2], key
    assert steps(acc, "geometry/alignment/num_clusters") == [0, 2]
    assert tags["images"] == ["geometry/alignment/net.0/cosine_similarity"]
    image = acc.Images("geometry/alignment/net.0/cosine_similarity")[-1]
    assert image.step == 2 and image.width >= 128 and image.height == image.width

    # the last values are those of the final weights on the stored probe (float64 measure)
    x = monitor.probes["train"].x
    res = batch_functional_dimension(model.net, x, spectrum=True, blocks={"net.2": "2"})
    assert res.engine == "exact"
    assert acc.Scalars("geometry/train/batch_functional_dimension")[-1].value == res.rank
    assert acc.Scalars("geometry/train/numerical_rank")[-1].value == res.spectrum.numerical_rank
    assert acc.Scalars("geometry/train/resolution")[-1].value == pytest.approx(res.spectrum.resolution)
    assert acc.Scalars("geometry/train/upper_bound")[-1].value == res.upper_bound == min(8 * CLASSES, 51 - HIDDEN)
    assert acc.Scalars("geometry/train/num_outputs")[-1].value == 8 * CLASSES
    # per-block ranks: the head (21 parameters ≤ 24 rows) is resolved, the first layer (30) is not
    assert steps(acc, "geometry/train/block/net.2/numerical_rank") == [0, 2]
    assert not any("block/net.0" in t for t in tags["scalars"])
    assert acc.Scalars("geometry/train/block/net.2/numerical_rank")[-1].value == res.blocks["net.2"].numerical_rank
    # and its exact rank (the exact engine's draws), beside the numerical one
    assert steps(acc, "geometry/train/block/net.2/batch_functional_dimension") == [0, 2]
    assert (acc.Scalars("geometry/train/block/net.2/batch_functional_dimension")[-1].value
            == res.block_dimensions["net.2"])
    assert acc.Scalars("geometry/train/block/net.2/bound")[-1].value == 21

    # custom-scalars layout: each probe's dimension beside its bounds, and the probes on one chart
    config = acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(config)
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["train: dimension, numerical rank and bounds"] == [
        r"geometry/train/batch_functional_dimension", r"geometry/train/numerical_rank", r"geometry/train/upper_bound",
        r"geometry/train/num_rows",
    ]
    assert charts["batch functional dimension: train vs val vs random"] == [
        f"geometry/{p}/batch_functional_dimension" for p in ("train", "val", "random")
    ]
    assert "flatness: max eigenvalue and trace" in charts

    # the README's table of logged keys names exactly the scalars that were logged
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("## Logged keys"):]
    documented = re.findall(r"^\| `(geometry/[^`]+)` \|", table, flags=re.MULTILINE)
    wildcards = {"<probe>": "[^/]+", "<layer>": ".+", "<block>": ".+", "<i>": r"\d+"}
    patterns = {d: re.compile(functools.reduce(lambda acc, kv: acc.replace(*kv), wildcards.items(), re.escape(d)))
                for d in documented}
    logged = [t for t in tags["scalars"] if t.startswith("geometry/")]
    assert [t for t in logged if not any(p.fullmatch(t) for p in patterns.values())] == []
    assert [d for d, p in patterns.items() if not any(p.fullmatch(t) for t in logged)] == []


def test_cosine_heatmap_colours() -> None:
    cos = torch.tensor([[1.0, 0.0], [-1.0, float("nan")]])
    img = cosine_heatmap(cos)
    assert img.shape == (3, 128, 128) and img.dtype == torch.float32
    pixel = {(i, j): img[:, 64 * i, 64 * j].tolist() for i in range(2) for j in range(2)}
    assert pixel == {(0, 0): [1, 0, 0], (0, 1): [1, 1, 1], (1, 0): [0, 0, 1], (1, 1): [0.5, 0.5, 0.5]}


def test_the_images_of_a_measure_count_as_its_time(tmp_path: Path) -> None:
    """Writing the heatmaps is the alignment's time, the spectra the dimension's, the scalars no measure's: the
    budget then counts a point's whole cost (on the MNIST example the heatmaps cost as much as the alignment)."""
    from lightning_geomdim.callback.log import log_measurement
    from lightning_geomdim.callback.measures import Measurement
    from lightning_geomdim.callback.overhead_budget import OverheadBudget

    trainer = L.Trainer(logger=TensorBoardLogger(tmp_path), enable_progress_bar=False)
    out = Measurement(spectra={"train": torch.tensor([3.0, 1.0])}, heatmaps={"net.1": encode_heatmap(torch.eye(3))})
    out.scalars["alignment"]["geometry/alignment/num_clusters"] = 3.0
    budget = OverheadBudget(0.05, measures=("dimension", "alignment"))
    budget.start()
    budget.select(["dimension", "alignment"])
    log_measurement(trainer, out, 7, extras=True, charge=budget.measuring)
    assert set(budget.spent_s) == {"dimension", "alignment"} and budget.cost_s == budget.spent_s
    assert budget.measuring_s > sum(budget.spent_s.values())  # the scalars: shared
    trainer.logger.experiment.flush()
    acc = EventAccumulator(trainer.logger.log_dir)
    acc.Reload()
    assert acc.Tags()["images"] == ["geometry/alignment/net.1/cosine_similarity"]
    assert acc.Tags()["histograms"] == ["geometry/train/log10_singular_values"]


def decoded_images(log_dir: str) -> dict[str, np.ndarray]:
    """Each image tag's last image, as TensorBoard's reader gives it, decoded to (H, W, 3) uint8."""
    from PIL import Image

    acc = EventAccumulator(log_dir, size_guidance={"images": 0})
    acc.Reload()
    out = {}
    for name in acc.Tags()["images"]:
        with Image.open(io.BytesIO(acc.Images(name)[-1].encoded_image_string)) as img:
            out[name] = np.array(img.convert("RGB"))
    return out


@pytest.mark.parametrize("closed", [False, True], ids=["open writer", "closed writer: add_image"])
def test_an_encoded_heatmap_reads_back_as_its_colours(tmp_path: Path, closed: bool) -> None:
    """The PNG the alignment encodes is the heatmap, pixel for pixel, read back with TensorBoard's own reader,
    whether written as it is or, through a closed writer (no event file writer), decoded and given to add_image."""
    gen = torch.Generator().manual_seed(0)
    cos = (torch.rand(40, 40, generator=gen, dtype=torch.float64) * 2 - 1).fill_diagonal_(1.0)
    cos[3, 5] = math.nan
    logger = TensorBoardLogger(tmp_path, name="heat", prefix="run")
    if closed:
        logger.experiment.close()
    log_heatmap(logger, "net.0", encode_heatmap(cos), 3)
    logger.experiment.flush()
    images = decoded_images(logger.log_dir)
    expected = (cosine_heatmap(cos) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert list(images) == ["run-geometry/alignment/net.0/cosine_similarity"]
    np.testing.assert_array_equal(images["run-geometry/alignment/net.0/cosine_similarity"], expected)
    assert expected.shape == (160, 160, 3) and (expected[4 * 3, 4 * 5] == 128).all()  # upsampled ×4; NaN grey


def test_the_heatmaps_are_encoded_within_the_alignments_time_limit() -> None:
    """The PNGs are part of the alignment's measurement: a time limit that ends at the checkpoint before the last
    heatmap stops the measure there, and a stop (time limit or SIGTERM) leaves out every image, not some (on
    ResNet-18 the 17 heatmaps took 0.69 s at PNG's default level, outside any limit, and its first point ran past
    its allowance)."""
    from dataclasses import fields, replace

    from lightning_geomdim.callback.measures import Measurement, MeasureSettings, _alignment
    from lightning_geomdim.callback.probe_data import ProbeData
    from lightning_geomdim.core.errors import MeasurementInterrupted, MeasurementOverTime
    from lightning_geomdim.core.interrupt import interruptible, time_limit

    monitor = GeometryMonitor()
    own = {f.name for f in fields(MeasureSettings)} - {"max_memory_bytes", "heatmaps"}  # the monitor's arguments
    settings = MeasureSettings(max_memory_bytes=None, heatmaps=True, **{name: getattr(monitor, name) for name in own})
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))

    def checks(options: MeasureSettings) -> tuple[int, Measurement]:
        """How often the time limit reads its clock in a whole measure (at entry and at every checkpoint)."""
        calls, out = [], Measurement()
        with time_limit(1.0, timer=lambda: calls.append(1) or 0.0):
            _alignment(model, ProbeData(model, None, options, ["alignment"]), options, out)
        return len(calls), out

    total, out = checks(settings)
    without, quiet = checks(replace(settings, heatmaps=False))
    assert list(out.heatmaps) == ["0", "2"] and quiet.heatmaps == {}  # no TensorBoardLogger (or not rank 0): none
    assert total - without == 2  # one checkpoint before each heatmap: the last two clock readings

    def late(after: int) -> Callable[[], float]:
        count = iter(range(1, 10**6))
        return lambda: 1e9 if next(count) >= after else 0.0

    out = Measurement()
    with pytest.raises(MeasurementOverTime), time_limit(1.0, timer=late(total)):  # at the last heatmap's checkpoint
        _alignment(model, ProbeData(model, None, settings, ["alignment"]), settings, out)
    assert out.heatmaps == {}  # the first heatmap, encoded, is left out with the rest
    with time_limit(1.0, timer=late(total + 1)):  # one reading later: the whole measure fits
        _alignment(model, ProbeData(model, None, settings, ["alignment"]), settings, out)
    assert list(out.heatmaps) == ["0", "2"]
    out, asked = Measurement(), iter(range(1, 10**6))
    with pytest.raises(MeasurementInterrupted), interruptible(lambda: next(asked) >= total - 1):  # SIGTERM there
        _alignment(model, ProbeData(model, None, settings, ["alignment"]), settings, out)
    assert out.heatmaps == {}


@pytest.mark.parametrize(
    ("schedule", "epochs", "batches", "expected"),
    [
        ({"every_n_steps": 2, "every_n_epochs": None}, 2, 3, [0, 2, 4, 6]),
        ({"every_n_steps": None, "every_n_epochs": 1}, 3, 3, [0, 3, 6, 9]),
        ({"every_n_steps": None, "every_n_epochs": 2, "at_start": False}, 3, 3, [6]),
        ({"every_n_steps": None, "every_n_epochs": None, "log_spaced": 4}, 3, 7, [0, *log_spaced_steps(4, 21)]),
    ],
    ids=["every_n_steps", "every_n_epochs", "every_2_epochs_no_start", "log_spaced"],
)
def test_schedules_log_the_right_steps(
    tmp_path: Path, schedule: dict, epochs: int, batches: int, expected: list[int]
) -> None:
    assert log_spaced_steps(4, 21) == [1, 2, 3, 6, 10, 18]
    L.seed_everything(0)
    monitor = GeometryMonitor(max_overhead=None, probes=["train"], probe_size=4, measures=["dimension"], **schedule)
    tr = trainer(tmp_path, monitor, max_epochs=epochs, limit_train_batches=batches)
    tr.fit(Classifier(), **loaders(train=64, val=None))
    assert tr.global_step == epochs * batches
    assert steps(events(tr), "geometry/train/batch_functional_dimension") == expected


def test_per_measure_schedules_and_gradient_accumulation(tmp_path: Path) -> None:
    L.seed_everything(0)
    monitor = GeometryMonitor(
        every_n_steps=1, every_n_epochs=None, max_overhead=None, probes=["train"], probe_size=4,
        measures=["dimension", "flatness"],
        schedules={"flatness": {"every_n_steps": None, "every_n_epochs": 1, "at_start": False}},
    )
    # 4 batches per epoch, accumulate 2: global steps 1, 2 per epoch; each measured once
    tr = trainer(tmp_path, monitor, max_epochs=2, limit_train_batches=4, accumulate_grad_batches=2)
    tr.fit(Classifier(), **loaders(train=64, val=None))
    acc = events(tr)
    assert steps(acc, "geometry/train/batch_functional_dimension") == [0, 1, 2, 3, 4]
    assert steps(acc, "geometry/flatness/max_eigenvalue") == [2, 4]


@pytest.mark.parametrize("max_overhead", [1e-9, 1e6])
def test_time_budget_takes_what_fits_and_no_first_point_beyond_it(tmp_path: Path, max_overhead: float) -> None:
    """A budget no measurement fits in (1e-9 of the wall time) takes no point, not even a first one, and warns
    once, when the run's length is known (after the second batch); an ample one keeps every scheduled point."""
    L.seed_everything(0)
    monitor = GeometryMonitor(
        every_n_steps=1, every_n_epochs=None, max_overhead=max_overhead, probes=["train"], probe_size=4,
        measures=["dimension", "flatness"],
        schedules={"flatness": {"every_n_steps": None, "every_n_epochs": 1, "at_start": False}},
    )
    tr = trainer(tmp_path, monitor, max_epochs=2, limit_train_batches=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(Classifier(), **loaders(train=64, val=None))
    skips = [str(w.message) for w in caught if "to stay within max_overhead" in str(w.message)]
    acc = events(tr)
    state = monitor.state_dict()["overhead"]
    assert state["measuring_s"] > 0 and state["other_s"] > 0  # building the probe is measuring time
    if max_overhead < 1:
        assert state["cost_s"] == {} and "geometry/train/batch_functional_dimension" not in acc.Tags()["scalars"]
        # the first batch anchors the pace of the run, the second gives its length: the warning comes at step 2
        assert len(skips) == 1 and skips[0].startswith("GeometryMonitor: skipped ['dimension'] at step 2")
        assert "dimension's share of the whole run is 0.00 s, too little to try a point" in skips[0]
        assert "pass max_overhead=None to take every scheduled point" in skips[0]
    else:
        assert set(state["cost_s"]) == {"dimension", "flatness"}
        # step 0 is not scheduled under a budget (it cannot pay for a point before the run's length is known)
        assert steps(acc, "geometry/train/batch_functional_dimension") == [1, 2, 3, 4, 5, 6]
        assert steps(acc, "geometry/flatness/max_eigenvalue") == [3, 6]
        assert skips == []


# ---------------------------------------------------------------- other loggers and batch formats


def test_csv_logger_gets_the_scalars(tmp_path: Path) -> None:
    L.seed_everything(0)
    mine = torch.randn(5, IN, generator=torch.Generator().manual_seed(3))
    monitor = GeometryMonitor(max_overhead=None, every_n_epochs=1,
                              probes=["train", "val", {"name": "mine", "x": mine}], probe_size=8,
                              measures=["dimension"])
    tr = trainer(tmp_path, monitor, logger="csv", max_epochs=2, limit_train_batches=2)
    model = Classifier()
    tr.fit(model, **loaders())
    rows = csv_rows(tr)
    final = [float(r["geometry/mine/batch_functional_dimension"]) for r in rows
             if r.get("geometry/mine/batch_functional_dimension")]
    assert len(final) == 3 and final[-1] == batch_functional_dimension(model, mine).rank
    assert monitor.state_dict()["probes"]["mine"] == {"source": "tensor", "num_samples": 5}
    logged = [(int(r["step"]), float(r["geometry/val/batch_functional_dimension"])) for r in rows
              if r.get("geometry/val/batch_functional_dimension")]
    assert [s for s, _ in logged] == [0, 2, 4]
    assert all(0 < v <= 8 * CLASSES for _, v in logged)
    assert any(r.get("geometry/train/linear_regions") for r in rows)
    assert not glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)


def test_dict_batches_and_a_named_submodule(tmp_path: Path) -> None:
    L.seed_everything(0)
    monitor = GeometryMonitor(max_overhead=None, every_n_epochs=1, probes=["train"], probe_size=8, module="net",
                              measures=["dimension", "flatness", "alignment"])
    tr = trainer(tmp_path, monitor, max_epochs=1, limit_train_batches=2)
    model = NoForward(dict_batches=True)
    tr.fit(model, **loaders(val=None, dicts=True))
    probe = monitor.probes["train"]
    assert probe.x.shape == (8, IN) and probe.y.dtype == torch.int64  # default dict keys "image" / "label"
    acc = events(tr)
    assert steps(acc, "geometry/train/batch_functional_dimension") == [0, 2]
    assert steps(acc, "geometry/flatness/max_eigenvalue") == [0, 2]
    assert steps(acc, "geometry/alignment/0/num_clusters") == [0, 2]  # layer names relative to module="net"


def test_dropout_batchnorm_and_the_observer_guarantee(tmp_path: Path) -> None:
    """Same seed, shuffling dataloader, Dropout and BatchNorm: the final state_dicts (weights and BatchNorm
    statistics) and the global RNG states are bit-identical with and without the monitor."""

    def run(with_monitor: bool) -> tuple[dict[str, torch.Tensor], Any]:
        L.seed_everything(123)
        model = Classifier(dropout=0.5, batchnorm=True)
        monitor = GeometryMonitor(max_overhead=None, every_n_steps=1, probes=["train", "val", "random"], probe_size=6,
                                  flatness_top_k=2,
                                  log_spaced=5) if with_monitor else None
        tr = trainer(tmp_path / str(with_monitor), monitor, logger="csv", max_epochs=2, limit_train_batches=3)
        tr.fit(model, **loaders(train=48))
        if with_monitor:
            rows = csv_rows(tr)
            # BatchNorm in eval mode is affine: the exact engine's dimension, and the float spectrum beside it
            assert sum(bool(r.get("geometry/random/numerical_rank")) for r in rows) == 7
            assert sum(bool(r.get("geometry/random/batch_functional_dimension")) for r in rows) == 7
            assert sum(bool(r.get("geometry/flatness/max_eigenvalue")) for r in rows) == 7
            # measured in eval mode: BatchNorm is affine there, Dropout off: the ReLU scaling bound holds
            assert all(float(r["geometry/train/num_hidden_neurons"]) == 0 for r in rows
                       if r.get("geometry/train/num_hidden_neurons"))
        rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
        return {k: v.clone() for k, v in model.state_dict().items()}, rng

    plain, plain_rng = run(False)
    watched, watched_rng = run(True)
    assert plain.keys() == watched.keys()
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key
    assert torch.equal(plain_rng[0], watched_rng[0])
    assert plain_rng[1] == watched_rng[1]
    assert np.array_equal(plain_rng[2], watched_rng[2])


# ---------------------------------------------------------------- errors


def test_a_failing_measure_warns_logs_nan_and_training_continues(tmp_path: Path) -> None:
    L.seed_everything(0)
    monitor = GeometryMonitor(max_overhead=None, every_n_epochs=1, probes=["train"], probe_size=4,
                              measures=["dimension", "flatness"])
    tr = trainer(tmp_path, monitor, logger="csv", max_epochs=2, limit_train_batches=2)
    with pytest.warns(RuntimeWarning, match="refuses to run in eval mode") as record:
        tr.fit(Classifier(fail_in_eval=True), **loaders(val=None))
    assert any("pass on_error='raise'" in str(w.message) for w in record)
    failed = [str(w.message) for w in record if "failed and is logged as NaN" in str(w.message)]
    assert len(failed) == 3  # one per cause (dimension, linear_regions, flatness), not one per point (3 each)
    assert tr.global_step == 4  # training went on to the end
    rows = csv_rows(tr)
    bfd = [(int(r["step"]), r["geometry/train/batch_functional_dimension"]) for r in rows
           if r.get("geometry/train/batch_functional_dimension")]
    assert [s for s, _ in bfd] == [0, 2, 4] and all(math.isnan(float(v)) for _, v in bfd)
    assert all(math.isnan(float(r["geometry/flatness/max_eigenvalue"])) for r in rows
               if r.get("geometry/flatness/max_eigenvalue"))
    assert monitor._errors.failures == {}  # no exception (and the tensors its traceback holds) outlives its measurement


def test_on_error_raise_is_fatal(tmp_path: Path) -> None:
    L.seed_everything(0)
    monitor = GeometryMonitor(max_overhead=None, every_n_epochs=1, probes=["train"], probe_size=4,
                              measures=["dimension"],
                              on_error="raise")
    tr = trainer(tmp_path, monitor, logger="csv", max_epochs=2, limit_train_batches=2)
    with pytest.raises(GeometryError, match=r"dimension on probe 'train' failed.*refuses to run in eval mode"):
        tr.fit(Classifier(fail_in_eval=True), **loaders(val=None))
    assert tr.global_step == 0  # the step-0 measurement stopped the run


def test_not_applicable_measures_are_skipped_with_one_warning(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = Classifier()
    model.net[1] = nn.Tanh()  # no ReLU: the dimension is defined, regions and alignment are not
    monitor = GeometryMonitor(max_overhead=None, every_n_epochs=1, probes=["train"], probe_size=4,
                              measures=["dimension", "alignment"])
    tr = trainer(tmp_path, monitor, max_epochs=2, limit_train_batches=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tr.fit(model, **loaders(val=None))
    messages = [str(w.message) for w in record if "not applicable" in str(w.message)]
    assert len(messages) == 2  # once for linear regions, once for alignment, not at every measurement
    acc = events(tr)
    assert steps(acc, "geometry/train/numerical_rank") == [0, 2, 4]  # tanh: not piecewise linear, no exact dimension
    assert "geometry/train/batch_functional_dimension" not in acc.Tags()["scalars"]
    assert not [t for t in acc.Tags()["scalars"] if "linear_regions" in t or "alignment" in t]


@pytest.mark.parametrize(
    ("monitor_kwargs", "model_cls", "trainer_kwargs", "fit_kwargs", "match"),
    [
        ({}, Classifier, {"logger": False}, {}, "needs a logger"),
        ({"module": "nope"}, Classifier, {}, {}, "has no such submodule"),
        ({}, NoForward, {}, {}, "does not define forward"),
        ({"probes": ["val"]}, Classifier, {}, {"val": None}, "needs a val dataloader"),
        ({"probes": ["random"], "measures": ["flatness"]}, Classifier, {}, {}, "flatness needs a probe with targets"),
    ],
    ids=["no_logger", "unknown_module", "no_forward", "no_val_data", "flatness_without_targets"],
)
def test_unsupported_setups_are_refused_before_training(
    tmp_path: Path, monitor_kwargs: dict, model_cls: type, trainer_kwargs: dict, fit_kwargs: dict, match: str
) -> None:
    monitor = GeometryMonitor(max_overhead=None, probe_size=4, **{"measures": ["dimension"], **monitor_kwargs})
    tr = trainer(tmp_path, monitor, **{"logger": "tb", **trainer_kwargs})
    with pytest.raises(MisconfigurationException, match=match):
        tr.fit(model_cls(), **loaders(**fit_kwargs))
    assert tr.global_step == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"measures": ["curvature"]}, "choose among"),
        ({"every_n_steps": 0}, "positive integer"),
        ({"schedules": {"flatness": {"every_n_epochs": 2}}, "measures": ["dimension"]}, "not measured"),
        ({"probes": ["train", "train"]}, "unique"),
        ({"probes": [{"source": "test"}]}, "source"),
        ({"probes": ["flatness"]}, "source"),
        ({"probes": [{"name": "flatness", "source": "train"}]}, "invalid"),
        ({"flatness_probe": "val", "probes": ["train"]}, "not one of the probes"),
        ({"engine": "magic"}, "engine"),
        ({"dtype": "float16"}, "dtype"),
        ({"on_error": "ignore"}, "on_error"),
        ({"loss_fn": "hinge"}, "loss_fn"),
        ({"max_overhead": 0}, "max_overhead"),
        ({"max_overhead": -0.5}, "max_overhead"),
        ({"max_overhead": "10%"}, "max_overhead"),
        ({"max_overhead": float("inf")}, "max_overhead"),
    ],
)
def test_invalid_arguments_are_refused_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        GeometryMonitor(**kwargs)


# ---------------------------------------------------------------- probes


def test_validation_only_probe(tmp_path: Path) -> None:
    L.seed_everything(0)
    monitor = GeometryMonitor(max_overhead=None, every_n_epochs=1, probes=["val"], probe_size=6,
                              measures=["dimension", "flatness"])
    tr = trainer(tmp_path, monitor, max_epochs=1, limit_train_batches=2)
    fit = loaders(train=48, val=10)
    tr.fit(Classifier(), **fit)
    probe = monitor.probes["val"]
    indices = probe.state["indices"]
    assert indices == select_indices(10, 6, probe_seed(0, "val"))
    val_set = fit["val_dataloaders"].dataset
    assert torch.equal(probe.x, val_set.tensors[0][indices]) and torch.equal(probe.y, val_set.tensors[1][indices])
    scalars = events(tr).Tags()["scalars"]
    assert "geometry/val/batch_functional_dimension" in scalars
    assert "geometry/flatness/max_eigenvalue" in scalars  # the val probe has targets
    assert not [t for t in scalars if t.startswith("geometry/train/")]


def test_default_probes_leave_out_val_without_validation_data(tmp_path: Path) -> None:
    L.seed_everything(0)
    monitor = GeometryMonitor(max_overhead=None, every_n_epochs=1, probe_size=4, measures=["dimension"])
    tr = trainer(tmp_path, monitor, max_epochs=1, limit_train_batches=1)
    tr.fit(Classifier(), **loaders(val=None))
    assert list(monitor.probes) == ["train", "random"]
    assert monitor.probes["random"].x.shape == (4, IN)


def test_resume_from_checkpoint_keeps_the_probes(tmp_path: Path) -> None:
    L.seed_everything(0)
    first = GeometryMonitor(max_overhead=None, every_n_epochs=1,
                            probes=["train", "val", {"name": "noise", "source": "random"}],
                            probe_size=6, measures=["dimension"], seed=1)
    tr = trainer(tmp_path / "a", first, logger="csv", max_epochs=1, limit_train_batches=2)
    tr.fit(Classifier(), **loaders(train=48))
    ckpt = tmp_path / "a.ckpt"
    tr.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"][first.state_key]
    assert saved["probes"]["train"]["indices"] == first.probes["train"].state["indices"]
    assert saved["clock"]["last_step"] == {"dimension": 2}

    # a new monitor with another seed: resuming restores the probes of the first run
    second = GeometryMonitor(max_overhead=None, every_n_epochs=1,
                             probes=["train", "val", {"name": "noise", "source": "random"}],
                             probe_size=6, measures=["dimension"], seed=99)
    assert second.state_key == first.state_key
    tr2 = trainer(tmp_path / "b", second, logger="csv", max_epochs=2, limit_train_batches=2)
    tr2.fit(Classifier(), ckpt_path=ckpt, **loaders(train=48))
    fresh = select_indices(48, 6, probe_seed(99, "train"))
    assert fresh != first.probes["train"].state["indices"]  # so the equality below is not a coincidence
    for name in ("train", "val", "noise"):
        assert second.probes[name].state == first.probes[name].state
        assert torch.equal(second.probes[name].x, first.probes[name].x)
    rows = csv_rows(tr2)
    assert [int(r["step"]) for r in rows if r.get("geometry/noise/batch_functional_dimension")] == [4]  # no step 0


# ---------------------------------------------------------------- LightningCLI


def test_lightning_cli_yaml_config(tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI

    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "enable_progress_bar": False,
            "enable_model_summary": False, "enable_checkpointing": False, "default_root_dir": str(tmp_path),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "callbacks": [{
                "class_path": "lightning_geomdim.GeometryMonitor",
                "init_args": {
                    "every_n_epochs": 1,
                    "max_overhead": None,
                    "probes": ["train", "val", {"name": "noise", "source": "random", "size": 5, "mean": 0.5}],
                    "probe_size": 6,
                    "measures": ["dimension", "flatness"],
                    "schedules": {"flatness": {"at_start": False}},
                    "loss_fn": "cross_entropy",
                    "dtype": "float64",
                    "on_error": "raise",
                },
            }],
        },
        "model": {"dropout": 0.1},
        "data": {"train_size": 24, "val_size": 8},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(Classifier, TinyData, args=["fit", "--config", str(path)])
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, GeometryMonitor))
    assert monitor.loss_fn == "cross_entropy" and monitor.dtype == torch.float64 and monitor._time.max_overhead is None
    assert monitor.probes["noise"].num_samples == 5
    rows = csv_rows(cli.trainer)
    assert [int(r["step"]) for r in rows if r.get("geometry/noise/batch_functional_dimension")] == [0, 2]
    assert [int(r["step"]) for r in rows if r.get("geometry/flatness/max_eigenvalue")] == [2]


# ---------------------------------------------------------------- README


def test_readme_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The "Add it to your training" snippet, as written except for 1 epoch instead of 10 (runtime)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Add it to your training"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[: code.index("```")]
    assert "max_epochs=10" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(code.replace("max_epochs=10", "max_epochs=1"), "README.md", "exec"), namespace)
    tr = namespace["trainer"]
    acc = events(tr)
    assert Path(tr.logger.log_dir).is_relative_to(tmp_path)
    assert steps(acc, "geometry/val/batch_functional_dimension") == [0, 1, 2, 3, 4, 6, 10]
    assert steps(acc, "geometry/flatness/max_eigenvalue") == [0]
    assert acc.Scalars("geometry/random/upper_bound")[0].value == 244 - 16


def test_flat_dimension_uses_the_monitors_dimension_settings_when_measured_alone(tmp_path: Path) -> None:
    """Flatness due at a step where the dimension is not: its flat dimension is computed with the monitor's
    engine and rtol, so it equals P − the dimension the monitor logs with those settings."""
    L.seed_everything(0)
    model = Classifier()
    monitor = GeometryMonitor(max_overhead=None, every_n_steps=1, at_start=False, probes=["train"], probe_size=8,
                              engine="gram", rtol=0.3, measures=["dimension", "flatness"],
                              schedules={"dimension": {"every_n_steps": 2, "every_n_epochs": None}})
    tr = trainer(tmp_path, monitor, max_epochs=1, limit_train_batches=3)
    tr.fit(model, **loaders())
    acc = events(tr)
    assert steps(acc, "geometry/train/numerical_rank") == [2]
    assert steps(acc, "geometry/flatness/flat_dimension") == [1, 2, 3]
    res = batch_functional_dimension(model.net, monitor.probes["train"].x, engine="gram", rtol=0.3)
    assert res.rank < batch_functional_dimension(model.net, monitor.probes["train"].x).rank  # the settings matter
    assert acc.Scalars("geometry/flatness/flat_dimension")[-1].value == res.num_params - res.rank


def test_flatness_without_flat_dimension_skips_it_and_does_not_need_the_dimension(tmp_path: Path) -> None:
    L.seed_everything(0)
    monitor = GeometryMonitor(max_overhead=None, every_n_steps=1, probes=["train"], probe_size=8,
                              measures=["flatness"], flatness_flat_dimension=False)
    tr = trainer(tmp_path, monitor, max_epochs=1, limit_train_batches=2)
    tr.fit(Classifier(), **loaders())
    scalars = events(tr).Tags()["scalars"]
    assert steps(events(tr), "geometry/flatness/max_eigenvalue") == [0, 1, 2]
    assert "geometry/flatness/flat_dimension" not in scalars and "geometry/flatness/trace" in scalars


class SoftmaxClassifier(Classifier):
    """Classifier whose forward returns probabilities (the network ends with nn.Softmax)."""

    def __init__(self) -> None:
        super().__init__()
        self.net.append(nn.Softmax(dim=-1))

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.nll_loss(self(x).log(), y)


def test_per_probe_logit_differences_and_spectrum(tmp_path: Path) -> None:
    """A probe with logit_differences=False logs the softmax output's numerical rank and no dimension; a probe
    with spectrum=False logs the exact dimension without the float spectrum; values match the core."""
    L.seed_everything(0)
    monitor = GeometryMonitor(
        max_overhead=None, every_n_epochs=1, measures=["dimension"], probe_size=24,
        probes=[{"name": "train", "source": "train"},
                {"name": "train_softmax", "source": "train", "logit_differences": False},
                {"name": "random", "source": "random", "spectrum": False}],
    )
    tr = trainer(tmp_path, monitor, max_epochs=1)
    model = SoftmaxClassifier()
    tr.fit(model, **loaders(train=24, val=None))
    scalars = set(events(tr).Tags()["scalars"])
    assert {"geometry/train/batch_functional_dimension", "geometry/train/numerical_rank"} <= scalars
    assert "geometry/train_softmax/numerical_rank" in scalars
    assert not [t for t in scalars if t.startswith("geometry/train_softmax/batch_functional")]
    assert "geometry/random/batch_functional_dimension" in scalars
    assert not [t for t in scalars if t.startswith("geometry/random/") and "rank" in t]
    acc = events(tr)
    x = monitor.probes["train_softmax"].x
    soft = batch_functional_dimension(model, x, logit_differences=False)
    assert soft.engine != "exact"
    assert acc.Scalars("geometry/train_softmax/numerical_rank")[-1].value == soft.rank
    assert acc.Scalars("geometry/train_softmax/num_rows")[-1].value == 24 * CLASSES
    assert acc.Scalars("geometry/train/num_rows")[-1].value == 24 * (CLASSES - 1)
    with pytest.raises(MisconfigurationException, match="must be true or false"):
        GeometryMonitor(probes=[{"source": "train", "spectrum": "yes"}])


# ---------------------------------------------------------------- defaults on modules nobody here wrote (issue 14)
def test_an_explicit_schedule_is_honoured_exactly_and_the_budget_only_when_asked(tmp_path: Path) -> None:
    """every_n_steps=5 over 40 steps: 9 points (0, 5, …, 40) although measuring costs far more than 5 % of
    this tiny run; with an explicit max_overhead the budget applies again (no point fits in this one)."""
    L.seed_everything(0)
    monitor = GeometryMonitor(every_n_steps=5, probes=["train"], probe_size=8, measures=["dimension"])
    tr = trainer(tmp_path / "written", monitor, max_steps=40, max_epochs=-1)
    tr.fit(Classifier(), **loaders(train=8, val=None, batch=1))
    assert monitor._time.max_overhead is None
    assert steps(events(tr), "geometry/train/batch_functional_dimension") == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    L.seed_everything(0)
    budgeted = GeometryMonitor(every_n_steps=5, max_overhead=1e-9, probes=["train"], probe_size=8,
                               measures=["dimension"])
    tr = trainer(tmp_path / "budgeted", budgeted, max_steps=40, max_epochs=-1)
    with pytest.warns(UserWarning, match="to stay within max_overhead"):
        tr.fit(Classifier(), **loaders(train=8, val=None, batch=1))
    assert "geometry/train/batch_functional_dimension" not in events(tr).Tags()["scalars"]
    assert GeometryMonitor()._time.max_overhead == 0.05  # the default schedule keeps the ~5 % promise
    assert GeometryMonitor(schedules={"flatness": {"every_n_epochs": 3}})._time.max_overhead is None


def test_boring_model_without_targets_warns_once_and_measures_the_rest(tmp_path: Path) -> None:
    from lightning.pytorch.demos.boring_classes import BoringModel

    L.seed_everything(0)
    monitor = GeometryMonitor(max_overhead=None)  # defaults but the budget: a 1-second run earns no point at 5 %
    tr = trainer(tmp_path, monitor, max_epochs=1, limit_train_batches=4, limit_val_batches=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(BoringModel())
    messages = [str(w.message) for w in caught if "GeometryMonitor" in str(w.message)]
    assert len([m for m in messages if "flatness needs targets" in m]) == 1
    assert monitor.measures == ("dimension",)  # flatness dropped at start, alignment (no ReLU) after its first try
    scalars = events(tr).Tags()["scalars"]
    assert "geometry/train/batch_functional_dimension" in scalars
    assert not [t for t in scalars if t.startswith("geometry/flatness/")]
    with pytest.raises(MisconfigurationException, match="flatness needs a probe with targets"):
        trainer(tmp_path / "explicit", GeometryMonitor(measures=["flatness"]), max_epochs=1,
                limit_train_batches=2).fit(BoringModel())


def test_state_key_is_built_once_and_alignment_threshold_matches_the_core() -> None:
    monitor = GeometryMonitor()
    assert monitor.state_key is monitor.state_key  # Lightning reads it several times per step
    assert GeometryMonitor(alignment_threshold=-0.5).alignment_threshold == -0.5
    for bad in (1.0, -1.5):
        with pytest.raises(MisconfigurationException, match=r"must be in \[-1, 1\)"):
            GeometryMonitor(alignment_threshold=bad)


def test_lightning_dispatches_only_the_batch_hook_the_monitor_uses(tmp_path: Path) -> None:
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.profilers import SimpleProfiler

    from lightning_geomdim.callback.monitor import UNUSED_BATCH_HOOKS

    class Counting(GeometryMonitor):  # a subclass that uses one of the masked hooks keeps it
        calls = 0

        def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
            Counting.calls += 1

    profiler = SimpleProfiler()
    tr = trainer(tmp_path, GeometryMonitor(max_overhead=None), max_epochs=1, limit_train_batches=3,
                 limit_val_batches=2, profiler=profiler)
    tr.callbacks.append(Counting(max_overhead=None, at_start=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BoringModel has no targets: flatness is dropped with a warning
        tr.fit(BoringModel())
    dispatched = {name.split(".")[-1] for name in profiler.recorded_durations if "]GeometryMonitor" in name}
    assert "on_train_batch_end" in dispatched and "on_validation_end" in dispatched
    assert not dispatched & set(UNUSED_BATCH_HOOKS), dispatched & set(UNUSED_BATCH_HOOKS)
    assert Counting.calls == 3  # one per batch
    assert "geometry/train/batch_functional_dimension" in events(tr).Tags()["scalars"]  # the measures still ran


class KeywordTextClassifier(L.LightningModule):
    """A Hugging Face style module: ``forward(input_ids, attention_mask)``, dict batches with ``labels``."""

    def __init__(self, vocab: int = 20, dim: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, dim), nn.Sequential(nn.Linear(dim, 8), nn.ReLU(),
                                                                         nn.Linear(8, classes))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        labels = batch["labels"]
        return nn.functional.cross_entropy(self(**{k: v for k, v in batch.items() if k != "labels"}), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TokenDataset(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids, self.labels = torch.randint(0, 20, (n, 5), generator=g), torch.randint(0, 3, (n,), generator=g)
        self.mask = (torch.rand(n, 5, generator=g) > 0.2).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def test_hugging_face_dict_batches_go_in_as_keyword_inputs(tmp_path: Path) -> None:
    L.seed_everything(0)
    monitor = GeometryMonitor(probe_size=8, max_overhead=None)  # a 1-second run earns no point at 5 %
    tr = trainer(tmp_path, monitor, max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(KeywordTextClassifier(), DataLoader(TokenDataset(16), batch_size=4))
    probe = monitor.probes["train"]
    assert set(probe.x) == {"input_ids", "attention_mask"} and probe.y.shape == (8,)  # labels are the targets
    scalars = events(tr).Tags()["scalars"]
    assert "geometry/train/numerical_rank" in scalars and "geometry/flatness/max_eigenvalue" in scalars
    assert not [w for w in caught if "failed" in str(w.message)]


Pair = namedtuple("Pair", "a b")
Batch = namedtuple("Batch", "x y")
Sample = namedtuple("Sample", "label image")  # the target first: read by field name


class NamedTupleData(Dataset):
    """Samples as namedtuples: ``Batch(x=Pair(a, b), y)`` (the model input is itself a namedtuple, passed as
    positional inputs ``model(a, b)``), or ``Sample(label, image)``."""

    def __init__(self, n: int, kind: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y, self.kind = torch.randn(n, IN, generator=g), torch.randint(0, CLASSES, (n,), generator=g), kind

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Any:
        if self.kind == "Batch":
            return Batch(Pair(self.x[i, :2], self.x[i, 2:]), self.y[i])
        return Sample(self.y[i], self.x[i])


class NamedTupleClassifier(Classifier):
    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(a if b is None else torch.cat([a, b], dim=-1))

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = (batch.x, batch.y) if isinstance(batch, Batch) else ((batch.image,), batch.label)
        return nn.functional.cross_entropy(self(*x), y)


@pytest.mark.parametrize("kind", ["Batch", "Sample"])
def test_namedtuple_batches_and_namedtuple_inputs(tmp_path: Path, kind: str) -> None:
    """A dataset of namedtuples, collated by the default collate_fn into namedtuples of batches, in a real run:
    ``Batch(x=Pair(a, b), y)`` keeps its structure (the model input ``Pair`` goes in as ``model(a, b)``);
    ``Sample(label, image)`` is read by field name, whatever the order of the fields."""
    L.seed_everything(0)
    monitor = GeometryMonitor(max_overhead=None, probes=["train", {"name": "mine", "source": "train", "size": 4}],
                              probe_size=8)
    tr = trainer(tmp_path, monitor, max_epochs=1, limit_train_batches=2)
    model = NamedTupleClassifier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(model, DataLoader(NamedTupleData(16, kind), batch_size=4))
    assert not [w for w in caught if "failed" in str(w.message) or "left out" in str(w.message)]
    probe = monitor.probes["train"]
    assert probe.y.dtype == torch.int64 and probe.y.shape == (8,)
    if kind == "Batch":
        assert type(probe.x) is Pair and probe.x.a.shape == (8, 2)
    else:
        assert isinstance(probe.x, torch.Tensor) and probe.x.shape == (8, IN)
    acc = events(tr)
    for key in ("train/numerical_rank", "mine/numerical_rank", "train/linear_regions", "flatness/max_eigenvalue",
                "alignment/num_clusters"):
        assert steps(acc, f"geometry/{key}") == [0, 2], key
    res = batch_functional_dimension(model, probe.x, spectrum=True)  # the final weights on the stored probe
    assert acc.Scalars("geometry/train/numerical_rank")[-1].value == res.spectrum.numerical_rank
    assert acc.Scalars("geometry/train/upper_bound")[-1].value == res.upper_bound


class TwoOptimizers(Classifier):
    """Manual optimisation with two optimizers (a GAN's pattern): ``global_step`` advances by 2 per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        first, second = self.optimizers()
        for opt in (first, second):
            opt.zero_grad()
            loss = self._loss(batch)
            self.manual_backward(loss)
            opt.step()
        self.log("loss", loss)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[-1].parameters(), lr=0.1)]


def test_steps_the_counter_jumps_over_are_measured_at_the_next_step(tmp_path: Path) -> None:
    L.seed_everything(0)
    monitor = GeometryMonitor(every_n_steps=3, probes=["train"], probe_size=8, measures=["dimension"])
    tr = trainer(tmp_path, monitor, max_steps=12, max_epochs=-1)
    tr.fit(TwoOptimizers(), **loaders(train=8, val=None, batch=1))
    assert tr.global_step == 12  # 6 batches, 2 optimizer steps each: global steps 2, 4, ..., 12
    # scheduled 3, 6, 9, 12: 3 and 9 were jumped over and are taken at the next step (global steps 0, 4, 6, 10, 12),
    # none is lost. They are logged where Lightning logs the loss, at the batches that stepped: the loss of batch b
    # at b, the weights after b batches' updates at b
    acc = events(tr)
    assert steps(acc, "loss") == [0, 1, 2, 3, 4, 5]
    assert steps(acc, "geometry/train/batch_functional_dimension") == [0, 2, 3, 5, 6]


def test_a_probe_too_small_for_its_dimension_to_move_is_flagged_once(tmp_path: Path) -> None:
    """Classifier: P = 51, 6 hidden neurons, 3 outputs. 8 samples give 24 rows < 45: the dimension is its row
    bound (saturated = 1, one warning naming 15 samples); 24 samples give 72 rows: not saturated."""
    L.seed_everything(0)
    monitor = GeometryMonitor(every_n_epochs=1, measures=["dimension"], probes=[
        {"name": "small", "source": "train", "size": 8}, {"name": "large", "source": "train", "size": 24}])
    tr = trainer(tmp_path, monitor, max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(Classifier(), **loaders(train=24, val=None))
    acc = events(tr)
    small = [e.value for e in acc.Scalars("geometry/small/batch_functional_dimension")]
    assert small == [24.0] * 3 and [e.value for e in acc.Scalars("geometry/small/saturated")] == [1.0] * 3
    assert {e.value for e in acc.Scalars("geometry/large/saturated")} == {0.0}
    assert max(e.value for e in acc.Scalars("geometry/large/batch_functional_dimension")) <= 45
    notes = [str(w.message) for w in caught if "too small for it to show anything else" in str(w.message)]
    assert len(notes) == 1 and "probe 'small'" in notes[0] and "at least 15 samples" in notes[0]
    res = batch_functional_dimension(Classifier(), torch.randn(8, IN))
    assert res.parameter_bound == 45 and res.saturated == (res.rank == 24)


def test_a_first_point_over_its_time_allowance_is_stopped_and_retried(tmp_path: Path, monkeypatch: Any) -> None:
    """A measure's first point may take FIRST_POINT_SECONDS (here 0.1 ms) beyond what the run has earned: past it the
    measure stops at its next chunk of work, logs nothing, warns once, and is retried with twice the time once the run
    earned it; the training and its weights are as without the monitor."""
    from lightning_geomdim.callback import overhead_budget as schedule

    monkeypatch.setattr(schedule, "FIRST_POINT_SECONDS", 1e-4)

    class StopAfter(L.Callback):  # a run planned for 200 epochs, ended after 12 (early stopping's way)
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            trainer.should_stop = trainer.should_stop or trainer.current_epoch >= 11

    L.seed_everything(0)
    plain = Classifier()
    tr = trainer(tmp_path / "plain", None, max_epochs=200)
    tr.callbacks.append(StopAfter())
    tr.fit(plain, **loaders(train=64, val=None))
    L.seed_everything(0)
    model = Classifier()
    # a budget as large as the training time: the projected run (200 epochs) gives each first point a share, what the
    # run has earned at its first steps (a few ms) is less than a point, and the doubling allowance covers one of
    # this tiny model within 12 epochs
    monitor = GeometryMonitor(every_n_steps=1, max_overhead=1.0, probes=["train"], probe_size=8,
                              measures=["dimension", "flatness"])
    tr = trainer(tmp_path / "watched", monitor, max_epochs=200)
    tr.callbacks.append(StopAfter())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(model, **loaders(train=64, val=None))
    # once per measure: stopped at the allowance, or (the dimension) not begun, its estimate on an eighth of the
    # probe being past it (which of the two depends on how fast the machine is at that moment)
    stopped = [str(w.message) for w in caught
               if "was stopped at its time allowance" in str(w.message) or "was not begun" in str(w.message)]
    assert sorted(m.split()[1] for m in stopped) == ["dimension", "flatness"], stopped
    acc = events(tr)
    dimension = steps(acc, "geometry/train/batch_functional_dimension")
    assert 0 not in dimension and dimension, dimension  # stopped at step 0, measured once the budget allowed
    for key, value in plain.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_a_max_time_run_counts_in_its_progress_only_what_the_timer_saw(tmp_path: Path, monkeypatch: Any) -> None:
    """Lightning starts its Timer (max_time) after the monitor's train-start hook has built the probes: the
    progress subtracts from the Timer's elapsed time only the measuring seconds since then."""
    from lightning_geomdim.callback import monitor as monitor_module

    seen: list[float] = []
    real = monitor_module.training_progress

    def recording(*args: Any, **kwargs: Any) -> float | None:
        seen.append(kwargs["measuring_s"])
        return real(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "training_progress", recording)
    monitor = GeometryMonitor(probes=["train"], probe_size=8, measures=["alignment"])
    tr = trainer(tmp_path, monitor, max_time={"minutes": 5}, max_epochs=2)
    tr.fit(Classifier(), **loaders(val=None))
    names = [type(c).__name__ for c in tr.callbacks]
    assert names.index("GeometryMonitor") < names.index("Timer")
    assert monitor._timer_base > 0.0 and seen[0] == 0.0  # building the probes took time: not in the Timer's


class ManualAccumulation(Classifier):
    """Manual optimisation accumulating over 2 batches by hand: the optimizer steps at every 2nd batch, and
    Lightning logs ``self.log`` values at every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        loss = self._loss(batch)
        self.manual_backward(loss / 2)
        if (batch_idx + 1) % 2 == 0:
            opt.step()
            opt.zero_grad()
        self.log("loss", loss)


def test_manual_accumulation_logs_on_the_loss_axis(tmp_path: Path) -> None:
    """global_step advances at every 2nd of 8 batches; values are logged on Lightning's axis, which counts every
    batch under manual optimisation: the weights after 2, 4, 6, 8 batches at 2, 4, 6, 8."""
    L.seed_everything(0)
    monitor = GeometryMonitor(every_n_steps=1, every_n_epochs=None, at_start=False, probes=["train"], probe_size=4,
                              measures=["dimension"], tensorboard_extras=False)
    tr = trainer(tmp_path, monitor, max_epochs=1)
    tr.fit(ManualAccumulation(), **loaders(train=8, val=None, batch=1))
    acc = events(tr)
    assert tr.global_step == 4 and steps(acc, "loss") == list(range(8))
    assert steps(acc, "geometry/train/batch_functional_dimension") == [2, 4, 6, 8]


def test_one_monitor_fitted_in_two_trainers_logs_each_run_from_its_start(tmp_path: Path) -> None:
    """Nothing of the first fit (logging step, last measured steps, the run's pace) carries into the second."""
    monitor = GeometryMonitor(every_n_steps=2, every_n_epochs=None, at_start=False, probes=["train"], probe_size=4,
                              measures=["dimension"], tensorboard_extras=False)
    logged = []
    for run in range(2):
        L.seed_everything(0)
        tr = trainer(tmp_path / str(run), monitor, max_epochs=1)
        tr.fit(Classifier(), **loaders(train=8, val=None, batch=1))
        logged.append(steps(events(tr), "geometry/train/batch_functional_dimension"))
    assert logged == [[2, 4, 6, 8], [2, 4, 6, 8]]


def test_step_zero_asked_for_under_a_budget_is_skipped_with_a_warning(tmp_path: Path) -> None:
    """A budget cannot pay for a point before the run's length is known: at_start=True with max_overhead gives no
    step 0 and says so once; without at_start, a budget schedules no step 0 (and no warning about it)."""
    for at_start in (True, None):
        L.seed_everything(0)
        monitor = GeometryMonitor(every_n_steps=4, at_start=at_start, max_overhead=0.9, probes=["train"],
                                  probe_size=4, measures=["dimension"], tensorboard_extras=False)
        tr = trainer(tmp_path / str(at_start), monitor, max_epochs=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tr.fit(Classifier(), **loaders(train=8, val=None, batch=1))
        skips = [str(w.message) for w in caught if "to stay within max_overhead" in str(w.message)]
        acc, key = events(tr), "geometry/train/batch_functional_dimension"
        assert key not in acc.Tags()["scalars"] or 0 not in steps(acc, key)
        if at_start:
            assert len(skips) == 1 and skips[0].startswith("GeometryMonitor: skipped ['dimension'] at step 0")
            assert "no share before the run's length is known" in skips[0]
        else:
            assert not [m for m in skips if " at step 0 " in m]
