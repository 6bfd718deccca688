"""GeometryMonitor under real DDP: ``strategy="ddp"``, two CPU processes (gloo), launched the way Lightning
launches scripts (the script re-executes itself once per extra rank), so each run is a subprocess with a timeout:
a deadlock fails the test instead of hanging it. No mocks.

What is shown: the run ends; both ranks hold the same probes; every geometry key has exactly one point per
measured step in TensorBoard and CSV (written by rank 0 only); the logged values equal, bit for bit, those of a
single-process run of the monitor on the same probes and the same weights; a fatal measure (on_error="raise")
ends the whole job, also when only one rank's memory budget refuses it.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_geomdim import batch_functional_dimension
from lightning_geomdim.callback.probes import probe_seed, select_indices

TIMEOUT_S = 240  # a healthy run takes ~10-25 s on 2 busy CPU cores; a deadlock would never end

SCRIPT = r'''
"""DDP / single-process run of the GeometryMonitor; argv: out_dir, JSON config."""
import hashlib
import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_geomdim import GeometryMonitor

out, cfg = sys.argv[1], json.loads(sys.argv[2])
rank_env = os.environ.get("LOCAL_RANK", "0")
if cfg.get("budget_rank0") is not None:  # only rank 0 is short of memory (rank 1 inherits rank 0's environment)
    if rank_env == "0":
        os.environ["GEOMDIM_MAX_MEMORY_BYTES"] = str(cfg["budget_rank0"])
    else:
        os.environ.pop("GEOMDIM_MAX_MEMORY_BYTES", None)


class Classifier(L.LightningModule):
    def __init__(self, lr, fail_in_eval=False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
        self.lr, self.fail_in_eval = lr, fail_in_eval

    def forward(self, x):
        if self.fail_in_eval and not self.training:
            raise RuntimeError("this forward refuses to run in eval mode")
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Recorder(Callback):
    """After the monitor: the weights it measured at each step (every rank, to check DDP keeps them equal) and the
    steps at which this process measured the dimension (read from the monitor's checkpointed clock)."""

    def __init__(self, monitor):
        self.weights, self.measured, self.monitor = {}, [], monitor

    def on_train_start(self, trainer, pl_module):
        step = trainer.global_step
        self.weights[step] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        if self.monitor.state_dict()["clock"]["last_step"].get("dimension") == step:
            self.measured.append(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.on_train_start(trainer, pl_module)


class Augmented(TensorDataset):
    """Adds noise drawn from the global RNG, as random augmentations do."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x + 0.1 * torch.randn(x.shape), y


g = torch.Generator().manual_seed(0)
x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
torch.manual_seed(0)
model = Classifier(lr=cfg.get("lr", 0.1), fail_in_eval=cfg.get("fail_in_eval", False))
probes = ["train", "val", "random"]
if cfg.get("reference"):  # the probes a DDP run measured, as tensor probes under the same names
    model.load_state_dict(torch.load(cfg["reference"])["weights"])
    probes = [{"name": k, "x": v["x"], "y": v["y"]} for k, v in torch.load(cfg["reference"])["probes"].items()]
local_rank = int(os.environ.get("LOCAL_RANK", "0"))
max_overhead = cfg.get("max_overhead_by_rank", [None, None])[local_rank]
monitor = GeometryMonitor(max_overhead=max_overhead, every_n_steps=1, every_n_epochs=None, probes=probes, probe_size=7,
                          flatness_top_k=2, on_error=cfg.get("on_error", "warn"),
                          measures=cfg.get("measures", ("dimension", "flatness", "alignment")),
                          distributed_gram=cfg.get("distributed_gram", False))
torch.manual_seed(local_rank)  # unseeded processes: each its own augmentations
recorder = Recorder(monitor)
trainer = L.Trainer(
    strategy="ddp" if cfg["devices"] > 1 else "auto", accelerator="cpu", devices=cfg["devices"],
    max_epochs=cfg.get("max_epochs", 2), max_steps=cfg.get("max_steps", -1), limit_train_batches=2,
    logger=[TensorBoardLogger(out, name="tb", version=0), CSVLogger(out, name="csv", version=0)],
    callbacks=[monitor, recorder], enable_progress_bar=False, enable_model_summary=False,
    enable_checkpointing=False, num_sanity_val_steps=0,
)
trainer.fit(model, DataLoader(Augmented(x, y), batch_size=4, shuffle=True),
            DataLoader(TensorDataset(x[:10], y[:10]), batch_size=4))
rank = trainer.global_rank


def digest(t):
    return hashlib.sha256(t.numpy().tobytes()).hexdigest() if t is not None else None


with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({
        "rank": rank, "world_size": trainer.world_size, "monitor": monitor.state_dict(), "measured": recorder.measured,
        "x": {k: digest(p.x) for k, p in monitor.probes.items()},
        "y": {k: digest(p.y) for k, p in monitor.probes.items()},
    }, f)
torch.save({"weights": recorder.weights, "probes": {k: {"x": p.x, "y": p.y} for k, p in monitor.probes.items()}},
           os.path.join(out, f"rank{rank}.pt"))
'''


def run_script(tmp_path: Path, name: str, **cfg: Any) -> tuple[Path, subprocess.CompletedProcess]:
    """Run the script as Lightning runs user scripts; kill its whole process group on timeout."""
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    out = tmp_path / name
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    env.pop("GEOMDIM_MAX_MEMORY_BYTES", None)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), json.dumps(cfg)], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and the rank it launched, nothing else
        stdout, stderr = proc.communicate()
        pytest.fail(f"the {name} run did not finish within {TIMEOUT_S} s (deadlock?)\n{stderr[-3000:]}")
    return out, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every geometry scalar of the run's TensorBoard events: tag -> [(step, value)]."""
    acc = EventAccumulator(str(out / "tb" / "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if t.startswith("geometry/")}


def csv_points(out: Path) -> dict[str, list[tuple[int, float]]]:
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in rows[0] if k.startswith("geometry/")]
    return {k: [(int(r["step"]), float(r[k])) for r in rows if r[k] != ""] for k in keys}


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_ddp_two_processes_agree_log_once_and_equal_a_single_process_run(tmp_path: Path) -> None:
    out, proc = run_script(tmp_path, "ddp", devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # both ranks took part and hold the same probes (indices, seeds, bytes)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world_size"] == 2
    for key in ("monitor", "x", "y", "measured"):
        if key == "monitor":  # the time budget's account is each process's own wall time
            ranks[0][key].pop("overhead"), ranks[1][key].pop("overhead")
        assert ranks[0][key] == ranks[1][key], key
    assert ranks[0]["measured"] == [0, 1, 2, 3, 4]
    assert ranks[0]["monitor"]["probes"]["train"]["indices"] == select_indices(32, 7, probe_seed(0, "train"))
    assert ranks[0]["monitor"]["probes"]["val"]["indices"] == select_indices(10, 7, probe_seed(0, "val"))

    # rank 0 alone writes: one TensorBoard file; every key has one point per measured step, in both loggers
    assert len(glob.glob(str(out / "**" / "events.out.tfevents.*"), recursive=True)) == 1
    tb, table = scalars(out), csv_points(out)
    assert len(tb) >= 40 and set(tb) == set(table)
    for key, points in tb.items():
        assert [s for s, _ in points] == [0, 1, 2, 3, 4], key
        assert [s for s, _ in table[key]] == [0, 1, 2, 3, 4], key
        assert all(same(v, float(torch.tensor(c, dtype=torch.float32))) for (_, v), (_, c) in
                   zip(points, table[key], strict=True)), key

    # DDP kept the weights equal on both ranks; the logged dimension is that of the weights on the whole probe
    saved = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    for step in range(5):
        for name, w in saved[0]["weights"][step].items():
            assert torch.equal(w, saved[1]["weights"][step][name])
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    for step in range(5):
        net.load_state_dict({k.removeprefix("net."): v for k, v in saved[0]["weights"][step].items()})
        res = batch_functional_dimension(net, saved[0]["probes"]["train"]["x"], spectrum=True)
        assert table["geometry/train/batch_functional_dimension"][step][1] == res.rank
        assert table["geometry/train/stable_rank"][step][1] == pytest.approx(res.spectrum.stable_rank, rel=1e-12)
    assert len(set(table["geometry/flatness/max_eigenvalue"][i][1] for i in range(5))) == 5  # the weights moved

    # a single-process run on the same probes and the final weights (lr=0, measured at step 0) logs exactly the
    # DDP run's last values
    torch.save({"weights": saved[0]["weights"][4], "probes": saved[0]["probes"]}, tmp_path / "final.pt")
    single, proc1 = run_script(tmp_path, "single", devices=1, lr=0.0, max_steps=1, reference=str(tmp_path / "final.pt"))
    assert proc1.returncode == 0, proc1.stderr[-3000:]
    reference = csv_points(single)
    assert set(reference) == set(table)
    differ = {k: (table[k][-1][1], reference[k][0][1]) for k in table if not same(table[k][-1][1], reference[k][0][1])}
    assert not differ


def test_ddp_distributed_gram_equals_the_single_process_dimension(tmp_path: Path) -> None:
    """distributed_gram=True: the two processes split the Gram accumulation and all-reduce it; the logged
    dimension equals the single-process core measure on the same weights and probe."""
    out, proc = run_script(tmp_path, "ddp_gram", devices=2, distributed_gram=True, measures=["dimension"],
                           max_epochs=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = csv_points(out)
    saved = torch.load(out / "rank0.pt")
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    steps = [s for s, _ in table["geometry/train/batch_functional_dimension"]]
    assert steps == [0, 1, 2]
    for i, step in enumerate(steps):
        net.load_state_dict({k.removeprefix("net."): v for k, v in saved["weights"][step].items()})
        for probe in ("train", "val"):
            res = batch_functional_dimension(net, saved["probes"][probe]["x"], engine="gram")
            assert table[f"geometry/{probe}/batch_functional_dimension"][i][1] == res.rank
            assert table[f"geometry/{probe}/stable_rank"][i][1] == pytest.approx(res.spectrum.stable_rank, rel=1e-6)


def test_ddp_rank_zero_decides_what_the_time_budget_allows(tmp_path: Path) -> None:
    """Rank 0 has no time budget, rank 1 almost none: rank 1 follows rank 0's choices (a broadcast that every rank
    joins, whatever its own setting), so both measure every scheduled step; alone rank 1 would measure none."""
    out, proc = run_script(tmp_path, "overhead", devices=2, max_overhead_by_rank=[None, 1e-9],
                           measures=["dimension"], max_epochs=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["measured"] == ranks[1]["measured"] == [0, 1, 2]
    assert [s for s, _ in csv_points(out)["geometry/train/batch_functional_dimension"]] == [0, 1, 2]
    # alone, the same tiny budget affords no point, not even a first one
    single, proc1 = run_script(tmp_path, "overhead_single", devices=1, max_overhead_by_rank=[1e-9],
                               measures=["dimension"], max_epochs=1)
    assert proc1.returncode == 0, proc1.stderr[-3000:]
    assert json.loads((single / "rank0.json").read_text())["measured"] == []
    assert "GeometryMonitor: skipped ['dimension'] at step 2 to stay within max_overhead=1e-09" in proc1.stderr


def test_ddp_on_error_raise_ends_the_whole_job(tmp_path: Path) -> None:
    """A measure that fails on every rank with on_error="raise": both ranks raise, the job ends (no hang)."""
    out, proc = run_script(tmp_path, "raise", devices=2, fail_in_eval=True, on_error="raise")
    assert proc.returncode != 0
    assert "GeometryError: GeometryMonitor: dimension on probe 'train' failed" in proc.stderr
    assert "refuses to run in eval mode" in proc.stderr
    assert not (out / "rank0.json").exists() and not (out / "rank1.json").exists()


def test_ddp_one_rank_short_of_memory_ends_the_whole_job_with_on_error_raise(tmp_path: Path) -> None:
    """Rank 0 alone has a tiny budget (GEOMDIM_MAX_MEMORY_BYTES): the ranks agree on the smallest budget at
    setup, so both refuse the same measure and raise together instead of one rank waiting for the other."""
    _, proc = run_script(tmp_path, "budget", devices=2, on_error="raise", budget_rank0=1000)
    assert proc.returncode != 0
    for rank in ("[rank0]", "[rank1]"):
        assert f"{rank}: lightning_geomdim.core.errors.GeometryError: GeometryMonitor: dimension on probe 'train' " \
               "failed: MemoryBudgetError" in proc.stderr, rank
    assert "Connection closed by peer" not in proc.stderr  # rank 1 refused by itself, it did not lose rank 0


# ---------------------------------------------------------------- sharded strategies are refused at setup

SHARDED_MESSAGE = (
    r"GeometryMonitor does not support the {} strategy yet: it measures full, unsharded parameters, which sharded "
    r"strategies \(FSDP, DeepSpeed, model parallel\) do not hold. Use a single device or strategy='ddp'"
)


def test_model_parallel_strategy_is_refused_at_setup_of_a_real_run(tmp_path: Path) -> None:
    """ModelParallelStrategy runs on CPU (gloo, one process): the monitor stops the run before any step."""
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_geomdim import GeometryMonitor

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    initialized = torch.distributed.is_initialized()
    trainer = L.Trainer(strategy=ModelParallelStrategy(), accelerator="cpu", devices=1, max_steps=2,
                        callbacks=[GeometryMonitor(probe_size=4)], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=4)
    try:
        with pytest.raises(MisconfigurationException, match=SHARDED_MESSAGE.format("ModelParallelStrategy")):
            trainer.fit(Net(), data)
    finally:
        if torch.distributed.is_initialized() and not initialized:
            torch.distributed.destroy_process_group()  # the group this test's run created
    assert trainer.global_step == 0


def test_fsdp_and_deepspeed_strategies_are_refused() -> None:
    """Lightning refuses FSDP on CPU before any callback runs, and DeepSpeed is not installed here, so the
    monitor's setup check is called directly on the strategy objects. DeepSpeedStrategy cannot be constructed
    without DeepSpeed: the instance is made without its __init__, which is all an isinstance check needs (it
    derives from DDPStrategy, which the monitor supports, so the check must name it explicitly)."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_geomdim.callback.distributed import check_strategy

    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    assert isinstance(deepspeed, DDPStrategy)
    for strategy in (FSDPStrategy(), deepspeed):
        with pytest.raises(MisconfigurationException, match=SHARDED_MESSAGE.format(type(strategy).__name__)):
            check_strategy(strategy)
    check_strategy(DDPStrategy())
    check_strategy(SingleDeviceStrategy(torch.device("cpu")))
