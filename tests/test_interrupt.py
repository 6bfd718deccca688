"""A measurement stops between two chunks of work when its caller asks: SIGTERM ends a monitored run at once."""

from __future__ import annotations

import csv
import os
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_geomdim import GeometryMonitor, batch_functional_dimension, flatness
from lightning_geomdim.core.errors import MeasurementInterrupted
from lightning_geomdim.core.interrupt import checkpoint, interruptible


def data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 48), nn.Tanh(), nn.Linear(48, 3))


def test_checkpoints_raise_once_the_check_is_true_and_do_nothing_without_one() -> None:
    checkpoint()  # no check installed
    asked = []

    def after_three() -> bool:
        asked.append(1)
        return len(asked) > 3

    x, y = data()
    with interruptible(after_three), pytest.raises(MeasurementInterrupted):
        flatness(net(), F.cross_entropy, x, y, method="lanczos", trace_samples=30)
    assert len(asked) == 4  # three Hessian-vector products ran, the fourth was refused
    asked.clear()
    with interruptible(after_three), pytest.raises(MeasurementInterrupted):
        batch_functional_dimension(net(), x, engine="jacrev", chunk_size=1)  # 96 rows, one backward each
    assert len(asked) == 4
    assert batch_functional_dimension(net(), x, engine="jacrev", chunk_size=1).rank > 0  # the check is gone


class SelfTerminating(L.LightningModule):
    """Sends itself SIGTERM the first time the monitor evaluates it (the float64 probe pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 3))
        self.sent = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float64 and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return self.net(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_sigterm_during_a_measurement_ends_the_run_at_the_next_chunk(tmp_path: Path) -> None:
    """Lightning answers SIGTERM after the batch; the monitor's measurement in that batch end hook (P = 643, 96
    rows of J, Lanczos + Hutch++ flatness: many chunks) must stop at its next chunk instead of finishing."""
    model = SelfTerminating()
    monitor = GeometryMonitor(probes=["train"], probe_size=32, every_n_steps=1, engine="jacrev",
                              tensorboard_extras=False)
    trainer = L.Trainer(max_steps=5, logger=CSVLogger(str(tmp_path)), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor])
    x, y = data()
    start = time.perf_counter()
    with pytest.raises(SIGTERMException):
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    elapsed = time.perf_counter() - start
    assert model.sent and trainer.global_step == 1  # stopped at the end of the first batch, in the step-0 measurement
    files = list(Path(tmp_path).rglob("metrics.csv"))
    logged = {k for f in files for row in csv.DictReader(f.open()) for k, v in row.items() if v} if files else set()
    assert not any(k.startswith("geometry/") for k in logged), logged  # nothing measured after the signal
    print(f"run ended {elapsed:.2f} s after fit started")


def test_a_step_that_would_overrun_the_time_limit_is_not_begun() -> None:
    """checkpoint(flops=...) under a time limit stops before an uninterruptible step estimated to end past the
    limit (at this machine's measured rate), saying how long it would take; small steps, SIGTERM-only checks and no
    check at all are unaffected."""
    from lightning_geomdim.core.errors import MeasurementOverTime
    from lightning_geomdim.core.interrupt import eigh_flops, machine_flops, time_limit

    rate = machine_flops()
    assert 1e7 < rate < 1e13  # flops per second of a 256 × 256 eigendecomposition on a CPU
    checkpoint(flops=1e18)  # no check installed: nothing happens
    with interruptible(lambda: False):
        checkpoint(flops=1e18)  # a check without a time limit does not look ahead
    with time_limit(3600.0):
        checkpoint(flops=1e7)  # below AHEAD_MIN_FLOPS, and within an hour anyway
        with pytest.raises(MeasurementOverTime, match="cannot be interrupted, estimated at") as err:
            checkpoint(flops=eigh_flops(10**6))  # a 10⁶ × 10⁶ eigendecomposition: years
    assert err.value.needed is not None and err.value.needed > 3600.0


def test_a_gram_too_large_for_its_allowance_stops_before_its_eigendecomposition() -> None:
    """The Gram engine under a time limit shorter than its eigendecomposition's estimate stops before it."""
    from lightning_geomdim.core.errors import MeasurementOverTime
    from lightning_geomdim.core.interrupt import eigh_flops, machine_flops, time_limit

    x, _ = data(64)
    model = nn.Sequential(nn.Linear(6, 48), nn.Tanh(), nn.Linear(48, 40))  # M = 2,560 rows, P = 2,296: d = 2,296
    torch.manual_seed(0)
    limit = 0.5 * eigh_flops(2296) / machine_flops()  # half the estimate of the eigendecomposition alone
    start = time.perf_counter()
    with time_limit(limit), pytest.raises(MeasurementOverTime, match="cannot be interrupted"):
        batch_functional_dimension(model, x, engine="gram")
    assert time.perf_counter() - start < limit + 5.0  # it did not run the estimated step


def test_the_traced_pass_stops_between_modules_and_leaves_the_model_as_it_was() -> None:
    """A time limit reached inside the probe's forward pass stops it at the next module (not after the whole pass):
    the model's hooks, mode and parameters are as before, and a later pass works."""
    from lightning_geomdim.core.errors import MeasurementOverTime
    from lightning_geomdim.core.interrupt import time_limit
    from lightning_geomdim.core.probe_trace import ProbeTrace

    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(20)]).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    model[5].register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(MeasurementOverTime), time_limit(0.0):
        ProbeTrace.of(model, torch.randn(8, 16))
    assert calls == [] and model.training  # stopped at the first module, mode restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert len(model[0]._forward_hooks) == 0 and len(model[5]._forward_hooks) == 1  # only the user's hook is left
    assert ProbeTrace.of(model, torch.randn(8, 16)).output.shape == (8, 16)


def test_a_traces_first_vjp_batches_a_few_cotangents_and_announces_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first call on a trace times one plain backward and a batch of TRIAL, announced to the time limit (a
    batched backward cannot be interrupted: batching all the others ran 9.3 s past a 1 s allowance on ResNet-18);
    the rows equal one backward per cotangent."""
    from lightning_geomdim.core import backward

    torch.manual_seed(0)
    model = net().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    out = model(x)
    params = list(model.parameters())
    cotangents = torch.randn(7, *out.shape, dtype=torch.float64)
    reference = [torch.stack([torch.autograd.grad(out, p, c, retain_graph=True)[0] for c in cotangents])
                 for p in params]
    batches, announced = [], []
    real_grad, real_checkpoint = torch.autograd.grad, backward.checkpoint

    def grad(*args: object, **kwargs: object) -> object:
        if kwargs.get("is_grads_batched"):
            batches.append(len(args[2]))  # type: ignore[arg-type]
        return real_grad(*args, **kwargs)

    def spy(flops: float = 0.0) -> None:
        announced.append(flops)
        real_checkpoint(flops)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    monkeypatch.setattr(backward, "checkpoint", spy)
    memo: dict = {}
    rows = backward.vjp(out, params, cotangents, memo=memo, model="net")
    for got, want in zip(rows, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert batches[0] == backward.TRIAL and memo["vjp"] in ("batched", "loop") and memo["vjp_pace"] > 0
    if memo["vjp"] == "batched":
        assert batches[1:] == [len(cotangents) - 1 - backward.TRIAL]
    else:
        assert batches[1:] == []
    # the plain backward, then the trial at TRIAL_SLOWDOWN × its time (the first positive announcement)
    assert announced[:2] == [0.0, 0.0] and announced[2] > 0  # no forward time in this memo: nothing to estimate
    memo = {"forward_s": 1.0}
    announced.clear()
    backward.vjp(out, params, cotangents[:2], memo=memo, model="net")
    assert announced[0] == pytest.approx(backward.BACKWARD_PER_FORWARD * backward.machine_flops())
