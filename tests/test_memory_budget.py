"""GeometryMonitor() on a ResNet-style CNN with BatchNorm stays within its memory budget.

The dense-Jacobian engine (then the only one for BatchNorm) used to backpropagate all M rows of J at once: on a 10k-
parameter ResNet-style CNN with 64 probe images of 32 × 32 that is about 32 GB, and the training process was killed
by the kernel. Now each engine batches as many rows as fit the budget. The run happens in a fresh process so that
its high-water mark (``ru_maxrss``) measures this training alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

BUDGET = 300 * 1024**2


def SequentialClassifier(*layers: Any) -> Any:
    """A LightningModule around ``nn.Sequential(*layers)``: cross-entropy, SGD (lr 0.1)."""
    import lightning as L
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Classifier()

SCRIPT = textwrap.dedent(
    """
    import json, math, resource, sys, warnings
    import lightning as L
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset
    from lightning.pytorch.loggers import CSVLogger
    from lightning_geomdim import GeometryMonitor


    def block(c):
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                             nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))


    class ResNet(L.LightningModule):
        def __init__(self, c=8):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                      nn.MaxPool2d(2))
            self.b1, self.b2, self.head = block(c), block(c), nn.Linear(c, 10)

        def forward(self, x):
            h = self.stem(x)
            h = F.relu(h + self.b1(h))
            h = F.relu(h + self.b2(h))
            return self.head(h.mean((2, 3)))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)


    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g))
    model = ResNet()
    trainer = L.Trainer(max_steps=2, logger=CSVLogger(sys.argv[1]), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[GeometryMonitor(max_overhead=None)])  # defaults but the time budget (2 steps)
    model(data.tensors[0][:32]).sum().backward()  # the training's own buffers, before the high-water mark
    model.zero_grad(set_to_none=True)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(data, batch_size=32))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import csv, pathlib
    with open(next(pathlib.Path(sys.argv[1]).rglob("metrics.csv"))) as f:
        logged = {k: float(v) for row in csv.DictReader(f) for k, v in row.items() if v and k != "step"}
    from lightning_geomdim.core.probe_trace import ProbeTrace
    activations = ProbeTrace.of(model, data.tensors[0], grad=False).activation_numel  # A of a 64-image probe
    print(json.dumps({"baseline": baseline, "peak": peak, "logged": logged, "all_rows": 640 * activations * 8,
                      "warnings": [str(w.message) for w in caught if "GeometryMonitor" in str(w.message)]}))
    """
)


def test_resnet_style_cnn_at_defaults_stays_within_the_memory_budget(tmp_path: Path) -> None:
    env = {**os.environ, "GEOMDIM_MAX_MEMORY_BYTES": str(BUDGET)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    grown = out["peak"] - out["baseline"]
    print(f"high-water mark grew by {grown / 1024**2:.0f} MiB during fit; budget {BUDGET / 1024**2:.0f} MiB; all "
          f"rows of J at once would hold about {out['all_rows'] / 1024**2:.0f} MiB")
    assert grown <= BUDGET, (grown, out["warnings"])
    assert out["all_rows"] > 3 * BUDGET  # the 640 rows of J backpropagated at once would not have fitted
    rows = [k for k in out["logged"] if k.endswith("/numerical_rank")]
    assert rows, out  # a floating-point engine measured the probes (BatchNorm, residual sums: not the exact engine)
    assert all(out["logged"][k] > 0 for k in rows)


def test_a_refusal_names_only_remedies_the_monitor_accepts(tmp_path: Path) -> None:
    """The core's remedies name its own arguments (chunk_size, method, lanczos_basis, trace_samples); through the
    monitor they are phrased with its arguments, those it lacks are left out, and the Gram engine is not
    suggested for a model it cannot measure (PReLU)."""
    import warnings

    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_geomdim import GeometryMonitor, batch_functional_dimension
    from lightning_geomdim.core.errors import MemoryBudgetError

    def Net() -> L.LightningModule:
        # PReLU's slopes have no factor form: the dense Jacobian, whose remedies must not suggest the Gram engine
        return SequentialClassifier(nn.Linear(6, 256), nn.PReLU(256), nn.ReLU(), nn.Linear(256, 3))

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    # the budget is below flatness at its smallest trace sketch and Lanczos basis (fit_memory)
    monitor = GeometryMonitor(probes=["train"], measures=["dimension", "flatness"], max_memory_bytes=1_200_000,
                              max_overhead=None, probe_size=32,  # a size given: refused, not shrunk
                              flatness_flat_dimension=False)  # P = 2,819: Lanczos, whose remedies name the most
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(max_steps=1, logger=CSVLogger(str(tmp_path)), enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor]).fit(
            Net(), DataLoader(data, batch_size=16))
    refusals = [str(w.message) for w in caught if "memory budget is" in str(w.message)]
    assert len(refusals) == 2, refusals  # the dimension (dense Jacobian) and flatness
    for text in refusals:
        remedies = text.split("memory budget is", 1)[1]  # what follows the amounts: the ways out
        for foreign in ("chunk_size", "lanczos_basis", "method=", "engine='gram'", " trace_samples"):
            assert foreign not in remedies, (foreign, text)
        assert "max_memory_bytes=" in remedies
    assert any("flatness_trace_samples" in text for text in refusals)
    # refused from one sample, before the pass over the probe (which would fit: about 0.8 MB)
    assert all("estimated from one sample" in text for text in refusals)
    # the core alone keeps its own arguments
    try:
        batch_functional_dimension(nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 3)), data.tensors[0],
                                   engine="jacrev", max_memory_bytes=20_000)
    except MemoryBudgetError as err:
        assert "engine='gram' (it applies to this model)" in str(err) and "params=[...]" in str(err)
    else:
        raise AssertionError("the dense Jacobian was not refused")


@pytest.mark.parametrize("measure", ["exact", "gram", "jacrev", "flatness"])
def test_a_refusal_names_the_largest_probe_that_fits(measure: str) -> None:
    """"use a probe of at most m samples": m samples are measured within the same budget, m + 1 are refused."""
    import re

    import torch
    import torch.nn.functional as F
    from torch import nn

    from lightning_geomdim import batch_functional_dimension, flatness
    from lightning_geomdim.core.errors import MemoryBudgetError

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 4))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 6, generator=g), torch.randint(0, 4, (200,), generator=g)

    def run(n: int, budget: int) -> None:
        if measure == "flatness":
            flatness(net, F.cross_entropy, x[:n], y[:n], method="lanczos", max_memory_bytes=budget)
        else:
            batch_functional_dimension(net, x[:n], engine=measure, max_memory_bytes=budget)

    budget = {"exact": 400_000, "gram": 400_000, "jacrev": 2_000_000, "flatness": 3_300_000}[measure]
    with pytest.raises(MemoryBudgetError, match="the largest that fits") as refused:
        run(200, budget)
    largest = int(re.search(r"at most ([\d,]+) samples", str(refused.value)).group(1).replace(",", ""))
    assert 1 <= largest < 200, str(refused.value)
    run(largest, budget)  # fits
    with pytest.raises(MemoryBudgetError):
        run(largest + 1, budget)


def test_a_refusal_says_when_no_probe_size_fits() -> None:
    """Flatness' Lanczos and Hutch++ vectors (165 · P values) do not shrink with the probe."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from lightning_geomdim import flatness
    from lightning_geomdim.core.errors import MemoryBudgetError

    net = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 4))
    x, y = torch.randn(50, 6), torch.randint(0, 4, (50,))
    with pytest.raises(MemoryBudgetError, match="even a probe of one sample does not fit; lower lanczos_basis"):
        flatness(net, F.cross_entropy, x, y, method="lanczos", max_memory_bytes=1_300_000)


def test_a_probe_too_large_is_refused_from_one_sample_before_the_pass_over_it(tmp_path: Path) -> None:
    """The monitor traces the probe's first sample, scales the estimates to the probe and refuses before the
    forward pass over the whole probe: the network never runs on it, and the message gives the size that fits."""
    import sys
    import warnings

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from lightning_geomdim import GeometryMonitor

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from count_passes import Classifier

    model = Classifier()
    monitor = GeometryMonitor(probes=["train"], probe_size=32, max_memory_bytes=20_000, tensorboard_extras=False,
                              max_overhead=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(max_steps=1, logger=CSVLogger(str(tmp_path)), enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[monitor]).fit(model)
    refusals = [str(w.message) for w in caught if "estimated from one sample" in str(w.message)]
    assert refusals and all("the traced pass on 32 samples" in m for m in refusals), refusals
    assert "use a probe of at most" in refusals[0]
    assert model.net.probe_passes == 0 and model.net.float64_passes >= 1  # only one-sample passes ran


def test_a_default_size_probe_keeps_the_samples_that_fit_and_a_given_size_is_refused(tmp_path: Path) -> None:
    """The default probe of 64 samples would not fit a budget that 32 samples fit: it keeps its first ones, the
    most that fit (one warning), and the dimension is measured on them, equal to the core's on those samples; with
    ``probe_size=64`` given, the same budget refuses the traced pass instead."""
    import warnings

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from lightning_geomdim import GeometryMonitor, batch_functional_dimension
    from lightning_geomdim.core.preflight import dimension_bytes, trace_bytes
    from lightning_geomdim.core.probe_trace import ProbeTrace

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from count_passes import Classifier

    x = next(iter(Classifier().train_dataloader().dataset.tensors))  # the 64 training inputs
    one = ProbeTrace.of(Classifier(), x[:1], grad=False)
    def need(n: int) -> int:  # the traced pass and the dimension with the monitor's settings
        return max(trace_bytes(one, n, factors=True),
                   dimension_bytes(one, n, engine="auto", spectrum=True, logit_differences=True))

    budget = (need(32) + need(33)) // 2  # 32 samples fit, 33 do not
    runs = {}
    for name, size in (("default", None), ("given", 64)):
        L.seed_everything(0)
        model = Classifier()
        monitor = GeometryMonitor(probes=["train"], probe_size=size, measures=["dimension"], max_overhead=None,
                                  max_memory_bytes=budget, tensorboard_extras=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            L.Trainer(max_steps=1, logger=CSVLogger(str(tmp_path / name)), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor]).fit(model)
        runs[name] = (model, monitor, [str(w.message) for w in caught if "GeometryMonitor" in str(w.message)])

    model, monitor, messages = runs["default"]
    kept = [m for m in messages if "keeps its first" in m]
    assert len(kept) == 1 and "probe 'train' keeps its first 32 of 64 samples" in kept[0], messages
    assert "probe_size=..." in kept[0] and not [m for m in messages if " failed" in m], messages
    probe = monitor.probes["train"]
    assert probe.num_samples == 32 and probe.y.shape == (32,)
    rows = {r["step"]: float(r["geometry/train/batch_functional_dimension"]) for r in _csv(tmp_path / "default")
            if r.get("geometry/train/batch_functional_dimension")}
    assert rows["1"] == batch_functional_dimension(model, probe.x).rank  # the weights after the one step

    _, given, messages = runs["given"]
    assert given.probes["train"].num_samples == 64
    refused = [m for m in messages if "dimension on probe 'train' failed" in m]
    assert refused and "use a probe of at most 32 samples" in refused[0], messages


def _csv(root: Path) -> list[dict[str, str]]:
    import csv

    with open(next(root.rglob("metrics.csv"))) as f:
        return list(csv.DictReader(f))


def test_a_default_size_probe_of_many_outputs_per_sample_keeps_within_the_row_budget(tmp_path: Path) -> None:
    """600 outputs per sample (a language model's per-token outputs in miniature): the default probe keeps
    4096 // 600 = 6 samples, with one warning; ``probe_size=64`` given keeps all 64."""
    import warnings

    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_geomdim import GeometryMonitor
    from lightning_geomdim.callback.probe_spec import DEFAULT_MAX_ROWS

    def Wide() -> L.LightningModule:
        return SequentialClassifier(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 600))

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(128, 6, generator=g), torch.randint(0, 600, (128,), generator=g))
    kept = {}
    for name, size in (("default", None), ("given", 64)):
        monitor = GeometryMonitor(probes=["train"], probe_size=size, measures=["alignment"], max_overhead=None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            L.Trainer(max_steps=1, logger=CSVLogger(str(tmp_path / name)), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[monitor]).fit(Wide(), DataLoader(data, batch_size=32))
        notes = [str(w.message) for w in caught if "keeps its first" in str(w.message)]
        kept[name] = (monitor.probes["train"].num_samples, notes)
    assert DEFAULT_MAX_ROWS // 600 == 6
    assert kept["default"][0] == 6 and len(kept["default"][1]) == 1
    assert "each sample has 600 outputs" in kept["default"][1][0] and "4,096 rows of J" in kept["default"][1][0]
    assert kept["given"] == (64, [])


def test_a_default_size_probe_is_fitted_once_to_every_measure_planned_on_it(tmp_path: Path) -> None:
    """Flatness at every step, the dimension at every 3rd, a budget that 32 samples fit for the dimension: the
    probe shrinks once, at the first measurement, for both measures (not again when the dimension comes due)."""
    import warnings

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from lightning_geomdim import GeometryMonitor
    from lightning_geomdim.core.preflight import dimension_bytes, trace_bytes
    from lightning_geomdim.core.probe_trace import ProbeTrace

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from count_passes import Classifier

    x = next(iter(Classifier().train_dataloader().dataset.tensors))
    one = ProbeTrace.of(Classifier(), x[:1], grad=False)

    def need(n: int) -> int:
        return max(trace_bytes(one, n, factors=True),
                   dimension_bytes(one, n, engine="auto", spectrum=True, logit_differences=True))

    sizes: list[int] = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            sizes.append(monitor.probes["train"].num_samples)

    L.seed_everything(0)
    monitor = GeometryMonitor(probes=["train"], measures=["dimension", "flatness"], max_overhead=None,
                              at_start=False, max_memory_bytes=(need(32) + need(33)) // 2, tensorboard_extras=False,
                              schedules={"dimension": {"every_n_steps": 3, "every_n_epochs": None},
                                         "flatness": {"every_n_steps": 1, "every_n_epochs": None}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(max_steps=4, logger=CSVLogger(str(tmp_path)), enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[monitor, Spy()]).fit(Classifier())
    shrinks = [str(w.message) for w in caught if "keeps its first" in str(w.message)]
    assert len(shrinks) == 1 and sizes == [32, 32, 32, 32], (shrinks, sizes)
