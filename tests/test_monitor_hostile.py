"""Models and inputs we never saw, through the GeometryMonitor in real Trainer runs (CPU, tiny, no mocks): smooth
and functional activations, BatchNorm, NaN/inf parameters and outputs, probes too large for the memory budget, token
ids, dict inputs, several outputs. Each gives a clear message, logs nothing invented, and never stops training.
(The measures themselves on such models are tested in test_hostile_models.py.)"""

from __future__ import annotations

import copy
import csv
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import dense_jacobian, numpy_rank
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_geomdim import GeometryMonitor, batch_functional_dimension, flatness
from lightning_geomdim.callback.probes import ProbeSpec, random_probe

IN, CLASSES = 4, 3


class Module(L.LightningModule):
    """Wraps any network; ``loss_of(output, y)`` and ``inputs_of(batch)`` adapt it to the batch format."""

    def __init__(
        self, net: nn.Module, inputs_of: Callable[[Any], Any] = lambda b: b[0],
        targets_of: Callable[[Any], Any] = lambda b: b[1], output_of: Callable[[Any], Any] = lambda out: out,
    ) -> None:
        super().__init__()
        self.net = net
        self.inputs_of, self.targets_of, self.output_of = inputs_of, targets_of, output_of

    def forward(self, x: Any) -> Any:
        return self.net(**x) if isinstance(x, dict) else self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.output_of(self(self.inputs_of(batch))), self.targets_of(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path: Path, model: L.LightningModule, data: Dataset, monitor: GeometryMonitor, *, logger: str = "csv",
        max_steps: int = 4, callbacks: list[Callback] | None = None) -> tuple[L.Trainer, list[warnings.WarningMessage]]:
    lg = CSVLogger(tmp_path, name="csv") if logger == "csv" else TensorBoardLogger(tmp_path, name="tb")
    trainer = L.Trainer(
        max_steps=max_steps, logger=lg, callbacks=[*(callbacks or []), monitor], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1, accelerator="cpu",
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(data, batch_size=8))
    assert trainer.global_step == max_steps  # training always went on to the end
    return trainer, record


def logged(trainer: L.Trainer) -> dict[str, list[tuple[int, float]]]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in rows[0] if k.startswith("geometry/")]
    return {k: [(int(r["step"]), float(r[k])) for r in rows if r[k] != ""] for k in keys}


def messages(record: list[warnings.WarningMessage], pattern: str) -> list[str]:
    return [str(w.message) for w in record if re.search(pattern, str(w.message))]


def classification(n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, IN, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


def dense_rank(net: nn.Module, x: torch.Tensor) -> int:
    return numpy_rank(dense_jacobian(net, x))


# ---------------------------------------------------------------- activations


def test_gelu_dimension_is_logged_and_regions_alignment_are_not_applicable_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN, 6), nn.GELU(), nn.Linear(6, CLASSES))
    monitor = GeometryMonitor(max_overhead=None, every_n_steps=2, probes=["train", "random"], probe_size=8)
    trainer, record = fit(tmp_path, Module(net), classification(), monitor, logger="tb")
    # one warning per measure, not per probe or per measurement
    assert len(messages(record, "not applicable")) == 2
    assert messages(record, r"linear_regions is not applicable.*no nn.ReLU / nn.LeakyReLU module")
    assert messages(record, r"alignment is not applicable.*no nn.ReLU / nn.LeakyReLU module")
    # alignment is dropped after its first attempt: no longer scheduled, its share of a budget goes to the others
    assert monitor.measures == ("dimension", "flatness") and set(monitor._schedule.schedules) == set(monitor.measures)
    assert tuple(monitor._time.measures) == monitor.measures
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert not [t for t in tags if "linear_regions" in t or "alignment" in t]  # nothing invented
    assert [e.step for e in acc.Scalars("geometry/train/numerical_rank")] == [0, 2, 4]
    assert [e.step for e in acc.Scalars("geometry/flatness/max_eigenvalue")] == [0, 2, 4]
    x = monitor.probes["train"].x
    assert acc.Scalars("geometry/train/numerical_rank")[-1].value == dense_rank(net, x)
    assert acc.Scalars("geometry/train/num_hidden_neurons")[-1].value == 0
    # the custom-scalars layout has no chart of linear regions either
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    titles = [c.title for cat in layout.category for c in cat.chart]
    assert titles and not [t for t in titles if "regions" in t]


class FunctionalRelu(nn.Module):
    """ReLU called as a function: invisible to module hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(IN, 6), nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_functional_relu_dimension_is_exact_bound_loose_regions_not_applicable(tmp_path: Path) -> None:
    """Documented behaviour: the dimension is exact; the hidden-neuron symmetry is not recognised, so the bound
    is min(M, P); linear regions and alignment are not applicable (the message says to use nn.ReLU modules)."""
    torch.manual_seed(1)
    net = FunctionalRelu()
    monitor = GeometryMonitor(max_overhead=None, every_n_steps=2, probes=["train"], probe_size=8)
    trainer, record = fit(tmp_path, Module(net), classification(), monitor)
    assert len(messages(record, r"not applicable.*functional relu calls are not seen")) == 2
    values = logged(trainer)
    assert values["geometry/train/numerical_rank"][-1][1] == dense_rank(net, monitor.probes["train"].x)
    assert values["geometry/train/upper_bound"][-1][1] == min(8 * CLASSES, 51)
    assert values["geometry/train/num_hidden_neurons"][-1][1] == 0
    assert not [k for k in values if "linear_regions" in k or "alignment" in k]


def test_batchnorm_model_is_measured_in_eval_mode(tmp_path: Path) -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(IN, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, CLASSES))
    monitor = GeometryMonitor(max_overhead=None, every_n_steps=2, probes=["train"], probe_size=8,
                              measures=["dimension"])
    trainer, _ = fit(tmp_path, Module(net), classification(), monitor)
    assert net.training  # training mode restored
    x = monitor.probes["train"].x
    values = logged(trainer)

    def stable_rank(jac: torch.Tensor) -> float:
        sv = torch.linalg.svdvals(jac)
        return float((sv**2).sum() / sv[0] ** 2)

    eval_jac = dense_jacobian(net, x)  # a float64 copy evaluated in eval mode: per-sample, running statistics
    train_copy = copy.deepcopy(net).double().train()
    names = [n for n, _ in train_copy.named_parameters()]

    def batch_stats(*ps: torch.Tensor) -> torch.Tensor:  # the train-mode function mixes the samples
        return torch.func.functional_call(train_copy, dict(zip(names, ps, strict=True)), (x.double(),)).reshape(-1)

    blocks = torch.autograd.functional.jacobian(batch_stats, tuple(p.detach() for p in train_copy.parameters()))
    train_jac = torch.cat([b.reshape(blocks[0].shape[0], -1) for b in blocks], dim=1)
    logged_stable_rank = values["geometry/train/stable_rank"][-1][1]
    assert logged_stable_rank == pytest.approx(stable_rank(eval_jac), rel=1e-9)
    assert logged_stable_rank != pytest.approx(stable_rank(train_jac), rel=1e-3)
    assert values["geometry/train/numerical_rank"][-1][1] == numpy_rank(eval_jac)


# ---------------------------------------------------------------- NaN / inf


class Poison(Callback):
    """Before the monitor: breaks the model at one step (after its optimizer step), repairs it before the next
    batch, as a user's NaN guard reloading good weights would. Training itself never sees the damage."""

    def __init__(self, at_step: int, what: str) -> None:
        self.at_step, self.what, self.saved = at_step, what, None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.at_step:
            target = pl_module.net[0].weight if self.what == "nan_parameter" else pl_module.net.scale
            self.saved = (target, target.detach().clone())
            with torch.no_grad():
                target.view(-1)[0] = math.nan if self.what == "nan_parameter" else math.inf

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.saved is not None:
            with torch.no_grad():
                self.saved[0].copy_(self.saved[1])
            self.saved = None


class Scaled(nn.Sequential):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


@pytest.mark.parametrize(("what", "reason"), [
    ("nan_parameter", r"parameters \['net.0.weight'\] contain NaN or inf"),
    ("inf_output", r"model outputs on the probe batch contain NaN or inf"),
])
def test_non_finite_model_is_skipped_with_a_warning_nan_logged_and_measured_again_after_recovery(
    tmp_path: Path, what: str, reason: str
) -> None:
    torch.manual_seed(3)
    net = Scaled(nn.Linear(IN, 6), nn.ReLU(), nn.Linear(6, CLASSES))
    monitor = GeometryMonitor(max_overhead=None, every_n_steps=1, probes=["train"], probe_size=8)
    trainer, record = fit(tmp_path, Module(net), classification(), monitor, callbacks=[Poison(2, what)])
    failed = messages(record, "failed and is logged as NaN")
    for measure in ("dimension on probe 'train'", "linear_regions on probe 'train'", "flatness", "alignment"):
        found = [m for m in failed if m.startswith(f"GeometryMonitor: {measure} failed") and re.search(reason, m)]
        assert found, measure
    assert len(failed) == 4  # one per measure, at step 2 only
    values = logged(trainer)
    assert len(values) >= 20
    for key, points in values.items():
        assert [s for s, _ in points] == [0, 1, 2, 3, 4], key
        assert all(math.isnan(v) for s, v in points if s == 2), key
        assert all(math.isfinite(v) or v == math.inf for s, v in points if s != 2), key  # inf: spectral gap
    x, y = monitor.probes["train"].x, monitor.probes["train"].y
    assert values["geometry/train/numerical_rank"][-1][1] == dense_rank(net, x)
    res = flatness(net, nn.functional.cross_entropy, x, y)
    assert values["geometry/flatness/max_eigenvalue"][-1][1] == res.max_eigenvalue


# ---------------------------------------------------------------- memory budget


def test_probe_too_large_for_the_budget_is_refused_with_numbers_and_remedy(tmp_path: Path) -> None:
    """J J^T of 600 samples x 10 outputs against P = 5,005 parameters: the Gram engine needs a 5,005 x 5,005
    float64 matrix (0.19 GiB) > the 0.05 GiB budget. Refused before allocating; linear regions, which need little
    memory, are still logged; training goes on."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(100, 45), nn.ReLU(), nn.Linear(45, 10))
    g = torch.Generator().manual_seed(4)
    data = TensorDataset(torch.randn(600, 100, generator=g), torch.randint(0, 10, (600,), generator=g))
    budget = 50 * 2**20
    monitor = GeometryMonitor(max_overhead=None, every_n_steps=2, probes=["train"], probe_size=600,
                              measures=["dimension", "flatness"],
                              max_memory_bytes=budget)
    trainer, record = fit(tmp_path, Module(net), data, monitor)
    # flatness does not recompute that dimension (for flat_dimension): the curvature is measured, flat_dimension NaN
    skipped = messages(record, r"geometry/flatness/flat_dimension is logged as NaN because the batch functional")
    assert len(skipped) == 1 and "probe 'train'" in skipped[0]  # one warning per cause, not per point
    failed = messages(record, "dimension on probe 'train' failed and is logged as NaN")
    assert len(failed) == 1  # the same failure at steps 0, 2, 4: warned once, NaN logged each time
    points = logged(trainer)["geometry/train/batch_functional_dimension"]
    assert [s for s, _ in points] == [0, 2, 4] and all(math.isnan(v) for _, v in points)
    match = re.search(r"needs about (\d+\.\d\d) MiB but the memory budget is 50\.00 MiB: use a probe of at most "
                      r"(\d+) samples \(the largest that fits; now 600\)", failed[0])
    assert match, failed[0]
    assert "MemoryBudgetError" in failed[0] and "max_memory_bytes" in failed[0]
    assert float(match.group(1)) >= 0.19 * 1024 and 0 < int(match.group(2)) < 600
    values = logged(trainer)
    assert all(math.isnan(v) for _, v in values["geometry/train/batch_functional_dimension"])
    assert [s for s, v in values["geometry/flatness/max_eigenvalue"] if math.isfinite(v)] == [0, 2, 4]
    assert [s for s, v in values["geometry/flatness/flat_dimension"] if math.isnan(v)] == [0, 2, 4]
    assert [s for s, _ in values["geometry/train/linear_regions"]] == [0, 2, 4]
    assert all(1 <= v <= 600 for _, v in values["geometry/train/linear_regions"])


# ---------------------------------------------------------------- inputs and outputs


class Tokens(nn.Module):
    def __init__(self, vocabulary: int = 7) -> None:
        super().__init__()
        self.emb, self.act, self.head = nn.Embedding(vocabulary, 3), nn.ReLU(), nn.Linear(3, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.emb(tokens).mean(dim=1)))


def token_data() -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randint(0, 7, (32, 5), generator=g), torch.randint(0, CLASSES, (32,), generator=g))


def test_token_ids_default_probes_leave_out_random_with_one_warning(tmp_path: Path) -> None:
    torch.manual_seed(5)
    net = Tokens()
    monitor = GeometryMonitor(max_overhead=None, every_n_steps=2, probe_size=8)  # default probes: train, random
    trainer, record = fit(tmp_path, Module(net), token_data(), monitor)
    assert list(monitor.probes) == ["train"]
    left_out = messages(record, "random probe")
    assert len(left_out) == 1 and "torch.int64" in left_out[0] and "'high'" in left_out[0]
    tokens = monitor.probes["train"].x
    assert tokens.dtype == torch.int64
    values = logged(trainer)
    assert values["geometry/train/numerical_rank"][-1][1] == batch_functional_dimension(net, tokens).rank
    assert values["geometry/train/num_params"][-1][1] == 7 * 3 + 3 * CLASSES + CLASSES
    assert [s for s, _ in values["geometry/flatness/max_eigenvalue"]] == [0, 2, 4]


def test_token_ids_random_probe_with_a_vocabulary_draws_uniform_ids(tmp_path: Path) -> None:
    torch.manual_seed(5)
    net = Tokens()
    monitor = GeometryMonitor(max_overhead=None, every_n_steps=2,
                              probes=["train", {"name": "random", "source": "random", "high": 7, "size": 40}],
                              measures=["dimension"], probe_size=8)
    trainer, _ = fit(tmp_path, Module(net), token_data(), monitor)
    ids = monitor.probes["random"].x
    assert ids.dtype == torch.int64 and ids.shape == (40, 5) and int(ids.min()) == 0 and int(ids.max()) == 6
    saved = monitor.state_dict()["probes"]["random"]
    assert saved["high"] == 7 and saved["dtype"] == "int64"
    # what a resumed run rebuilds from the checkpoint, whatever its own seed
    assert torch.equal(random_probe(ProbeSpec.parse("random", 8), None, 99, saved).x, ids)
    values = logged(trainer)
    assert values["geometry/random/numerical_rank"][-1][1] == batch_functional_dimension(net, ids).rank


def test_token_ids_random_probe_without_a_vocabulary_is_refused(tmp_path: Path) -> None:
    monitor = GeometryMonitor(max_overhead=None, probes=["train", "random"], probe_size=8, measures=["dimension"])
    with pytest.raises(MisconfigurationException, match=r"random probe 'random'.*torch.int64.*'high'"):
        fit(tmp_path, Module(Tokens()), token_data(), monitor, max_steps=1)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.head = nn.Linear(IN + 2, 5), nn.ReLU(), nn.Linear(5, CLASSES)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.a(torch.cat([image, extra], dim=1))))


class DictData(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(6)
        self.image, self.extra = torch.randn(32, IN, generator=g), torch.randn(32, 2, generator=g)
        self.label = torch.randint(0, CLASSES, (32,), generator=g)

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.image[i], "extra": self.extra[i], "label": self.label[i]}


def test_dict_batches_with_keyword_inputs(tmp_path: Path) -> None:
    torch.manual_seed(6)
    net = TwoInputs()
    model = Module(net, inputs_of=lambda b: {"image": b["image"], "extra": b["extra"]}, targets_of=lambda b: b["label"])
    monitor = GeometryMonitor(max_overhead=None, every_n_steps=2, probe_size=8, module="net",
                              input_fn=lambda b: {"image": b["image"], "extra": b["extra"]})
    trainer, record = fit(tmp_path, model, DictData(), monitor)
    assert list(monitor.probes) == ["train"]  # the default random probe cannot imitate a dict: left out
    assert len(messages(record, r"random probe.*dict")) == 1
    x = monitor.probes["train"].x
    assert set(x) == {"image", "extra"} and x["image"].shape == (8, IN) and monitor.probes["train"].y.shape == (8,)
    values = logged(trainer)
    assert values["geometry/train/numerical_rank"][-1][1] == batch_functional_dimension(net, x).rank
    assert values["geometry/train/linear_regions"][-1][1] >= 1
    assert [s for s, _ in values["geometry/flatness/max_eigenvalue"]] == [0, 2, 4]
    assert [s for s, _ in values["geometry/alignment/a/num_clusters"]] == [0, 2, 4]


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.act = nn.Linear(IN, 6), nn.ReLU()
        self.logits, self.aux = nn.Linear(6, CLASSES), nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.act(self.body(x))
        return self.logits(h), self.aux(h)


def test_multiple_outputs_default_to_the_first_item_or_need_output_fn(tmp_path: Path) -> None:
    torch.manual_seed(7)
    net = TwoHeads()
    monitor = GeometryMonitor(max_overhead=None, every_n_steps=2, probes=["train"], probe_size=8,
                              output_fn=lambda out: out[0])
    trainer, record = fit(tmp_path, Module(net, output_of=lambda out: out[0]), classification(), monitor)
    # nothing failed; the one note: 8 samples × 3 outputs are fewer rows than P − hidden (the bound binds)
    assert [m for m in messages(record, "GeometryMonitor") if "too small for it to show" not in m] == []
    x, y = monitor.probes["train"].x, monitor.probes["train"].y
    values = logged(trainer)
    res = batch_functional_dimension(net, x, output_fn=lambda out: out[0])
    assert values["geometry/train/batch_functional_dimension"][-1][1] == res.rank
    assert values["geometry/train/num_outputs"][-1][1] == 8 * CLASSES
    assert values["geometry/flatness/max_eigenvalue"][-1][1] == flatness(
        net, nn.functional.cross_entropy, x, y, output_fn=lambda out: out[0]).max_eigenvalue
    assert values["geometry/alignment/net.body/num_neurons"][-1][1] == 6

    # without output_fn: the first item of the tuple is measured, one warning says so, and the values are the same
    monitor = GeometryMonitor(max_overhead=None, every_n_steps=2, probes=["train"], probe_size=8)
    trainer, record = fit(tmp_path / "plain", Module(net, output_of=lambda out: out[0]), classification(), monitor)
    assert len(messages(record, "the model returns a tuple: measuring its first item")) == 1
    assert logged(trainer)["geometry/train/batch_functional_dimension"][-1][1] == res.rank

    # a dict of two tensors without "logits": every measure warns with the remedy, logs NaN, and training goes on
    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = net

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            first, second = self.heads(x)
            return {"first": first, "second": second}

    monitor = GeometryMonitor(max_overhead=None, every_n_steps=2, probes=["train"], probe_size=8)
    trainer, record = fit(tmp_path / "dict", Module(Named(), output_of=lambda out: out["first"]), classification(),
                          monitor)
    failed = messages(record, "failed and is logged as NaN")
    assert len(failed) == 4 and all("pass GeometryMonitor(output_fn=...)" in m for m in failed)  # 4 causes, once each
    assert all(math.isnan(v) for points in logged(trainer).values() for _, v in points)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"probes": [{"source": "train", "high": 5}]}, "only for source='random'"),
    ({"probes": [{"source": "random", "high": 0}]}, "low < high"),
    ({"probes": [{"source": "random", "low": 2, "high": 2}]}, "low < high"),
    ({"probes": [{"source": "random", "high": 5.0}]}, "must be integers"),
    ({"max_memory_bytes": 0}, "max_memory_bytes"),
    ({"max_memory_bytes": 1.5e9}, "max_memory_bytes"),
])
def test_invalid_token_ranges_and_budgets_are_refused_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        GeometryMonitor(**kwargs)


def test_random_probe_high_on_floating_inputs_is_refused(tmp_path: Path) -> None:
    monitor = GeometryMonitor(max_overhead=None, probes=["train", {"source": "random", "high": 5}], probe_size=8,
                              measures=["dimension"])
    with pytest.raises(MisconfigurationException, match=r"'high' is for integer inputs.*torch.float32"):
        fit(tmp_path, Module(nn.Linear(IN, CLASSES)), classification(), monitor, max_steps=1)


def test_cosine_heatmap_of_a_wide_layer_is_averaged_down() -> None:
    from lightning_geomdim.callback.tensorboard import MAX_HEATMAP_PIXELS, cosine_heatmap

    n = 2 * MAX_HEATMAP_PIXELS + 50
    cos = torch.zeros(n, n)
    cos[: n // 2, : n // 2] = 1.0  # one aligned block of half the neurons
    cos[-1, -1] = math.nan
    img = cosine_heatmap(cos)
    assert img.shape == (3, MAX_HEATMAP_PIXELS, MAX_HEATMAP_PIXELS) and img.dtype == torch.float32
    assert img[:, 10, 10].tolist() == [1, 0, 0] and img[:, -10, 10].tolist() == [1, 1, 1]  # red block, white rest
    assert img[:, -1, -1].tolist() == [0.5, 0.5, 0.5]
