"""Issue 14, "a test matrix": ``GeometryMonitor()`` at its defaults, and nothing else, in real Trainer runs of models
of every kind a user brings: Lightning's BoringModel and DemoModel, a two-optimizer GAN (manual optimisation,
unlabeled data; also one whose noise has another width than the data, so the data probes do not fit its forward),
Hugging Face style dict batches (keyword forward), tuple and dict outputs, manual optimisation, gradient
accumulation, bf16-mixed, an LSTM and a small attention model.

For each, the same model is trained from the same seed with and without the monitor (same Trainer, real CSV and
TensorBoard loggers, so the TensorBoard extras are written too). Every run finishes; the final weights and buffers
are bit-identical; the monitor's warnings hold no message twice (at most one per cause); every NaN logged is
explained by a warning that its measure failed; and something geometric is logged (a finite ``geometry/...``
value) unless warnings explain why nothing could be. Run with ``-s`` to see what each case logged. The models and
data are tiny, so the defaults (probe_size=64) stay cheap: the dataset probes hold the whole 16-sample datasets.
"""

from __future__ import annotations

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
from lightning.pytorch.demos.boring_classes import BoringModel, DemoModel, RandomDataset
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_geomdim import GeometryMonitor

N, IN, HIDDEN, CLASSES = 16, 4, 8, 3  # samples, input features, hidden units, classes
SEQ, FEAT = 5, 3  # sequence models: time steps, features per step
VOCAB = 20


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def labeled(x: torch.Tensor) -> DataLoader:
    y = torch.randint(0, CLASSES, (x.shape[0],), generator=gen())
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)


class Classifier(L.LightningModule):
    """Linear → ReLU → Linear on (N, IN); ``output`` "tensor", "tuple" (logits, hidden) or "dict" {"logits",
    "hidden"}; ``manual``: manual optimisation with one optimizer."""

    def __init__(self, output: str = "tensor", manual: bool = False) -> None:
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU()), nn.Linear(HIDDEN, CLASSES)
        self.output = output
        self.automatic_optimization = not manual

    def forward(self, x: torch.Tensor) -> Any:
        hidden = self.body(x)
        logits = self.head(hidden)
        if self.output == "tuple":
            return logits, hidden
        if self.output == "dict":
            return {"logits": logits, "hidden": hidden}
        return logits

    def logits(self, out: Any) -> torch.Tensor:
        return out[0] if isinstance(out, tuple) else out["logits"] if isinstance(out, dict) else out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        loss = F.cross_entropy(self.logits(self(x)).float(), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class GAN(L.LightningModule):
    """Generator and discriminator, two optimizers, manual optimisation, unlabeled data; ``forward`` generates
    from noise of ``latent`` features (a dataset probe's (N, data) inputs fit it only when latent == data)."""

    def __init__(self, latent: int = IN, data: int = IN) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.latent = latent
        self.generator = nn.Sequential(nn.Linear(latent, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, data))
        self.discriminator = nn.Sequential(nn.Linear(data, HIDDEN), nn.LeakyReLU(0.2), nn.Linear(HIDDEN, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        g_opt, d_opt = self.optimizers()
        fake = self(torch.randn(real.shape[0], self.latent))  # the global RNG: the monitor must leave it alone
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        d_loss = (F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
                  + F.binary_cross_entropy_with_logits(self.discriminator(fake.detach()), zeros))
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.generator.parameters(), lr=1e-2),
                torch.optim.Adam(self.discriminator.parameters(), lr=1e-2)]


class KeywordTextClassifier(L.LightningModule):
    """Hugging Face style: ``forward(input_ids, attention_mask)``, dict batches with ``labels``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.head = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class TokenDataset(Dataset):
    def __init__(self) -> None:
        g = gen()
        self.ids = torch.randint(0, VOCAB, (N, SEQ), generator=g)
        self.labels = torch.randint(0, CLASSES, (N,), generator=g)
        self.mask = (torch.rand(N, SEQ, generator=g) > 0.2).long()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class SequenceClassifier(Classifier):
    """An ``nn.LSTM`` (last step) or a ``nn.TransformerEncoderLayer`` (mean pooled) over (N, SEQ, FEAT)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "lstm":
            self.encoder: nn.Module = nn.LSTM(FEAT, HIDDEN, batch_first=True)
        else:
            self.encoder = nn.Sequential(nn.Linear(FEAT, HIDDEN), nn.TransformerEncoderLayer(
                HIDDEN, nhead=2, dim_feedforward=2 * HIDDEN, batch_first=True))
        self.kind = kind
        del self.body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "lstm":
            out, _ = self.encoder(x)
            return self.head(out[:, -1])
        return self.head(self.encoder(x).mean(1))


def features() -> torch.Tensor:
    return torch.randn(N, IN, generator=gen())


def sequences() -> torch.Tensor:
    return torch.randn(N, SEQ, FEAT, generator=gen())


# name → (model, train dataloader or None (the model's own), Trainer options)
Case = tuple[Callable[[], L.LightningModule], Callable[[], Any], dict[str, Any]]
CASES: dict[str, Case] = {
    "boring": (BoringModel, lambda: None, {"limit_train_batches": 4, "limit_val_batches": 2}),
    "demo": (DemoModel, lambda: DataLoader(RandomDataset(32, N), batch_size=4), {}),
    "gan": (GAN, lambda: DataLoader(TensorDataset(features()), batch_size=4, shuffle=True), {}),
    "gan_latent": (lambda: GAN(latent=2), lambda: DataLoader(TensorDataset(features()), batch_size=4), {}),
    "hf_dict": (KeywordTextClassifier, lambda: DataLoader(TokenDataset(), batch_size=4, shuffle=True), {}),
    "tuple_output": (lambda: Classifier("tuple"), lambda: labeled(features()), {}),
    "dict_output": (lambda: Classifier("dict"), lambda: labeled(features()), {}),
    "manual": (lambda: Classifier(manual=True), lambda: labeled(features()), {}),
    "accumulate": (Classifier, lambda: labeled(features()), {"accumulate_grad_batches": 2}),
    "bf16_mixed": (Classifier, lambda: labeled(features()), {"precision": "bf16-mixed"}),
    "lstm": (lambda: SequenceClassifier("lstm"), lambda: labeled(sequences()), {}),
    "attention": (lambda: SequenceClassifier("attention"), lambda: labeled(sequences()), {}),
}


def fit(root: Path, case: str, monitor: GeometryMonitor | None) -> tuple[L.LightningModule, L.Trainer, list[str]]:
    """One run of ``case`` with ``monitor`` (or none), logging to CSV and TensorBoard (whose extras the monitor
    writes by default); the monitor's warning messages."""
    make_model, make_loader, options = CASES[case]
    L.seed_everything(0, verbose=False)
    model, loader = make_model(), make_loader()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=2,
        logger=[CSVLogger(root, name="csv"), TensorBoardLogger(root, name="tb")],
        callbacks=[monitor] if monitor else [], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, log_every_n_steps=1, **options,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader)
    assert trainer.state.finished, trainer.state
    return model, trainer, [str(w.message) for w in caught if str(w.message).startswith("GeometryMonitor")]


def logged(trainer: L.Trainer) -> dict[str, list[tuple[int, float]]]:
    """The geometry/... values of ``metrics.csv``, key → [(step, value)]."""
    path = Path(trainer.loggers[0].log_dir) / "metrics.csv"
    if not path.exists():
        return {}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in (rows[0] if rows else {}) if k.startswith("geometry/")]
    return {k: [(int(r["step"]), float(r[k])) for r in rows if r[k] != ""] for k in keys}


def failed_measure(key: str) -> str:
    """How a warning names the measure (and probe) a logged key belongs to, as in error_policy.ErrorPolicy."""
    _, group, name = key.split("/", 2)
    if group in ("flatness", "alignment"):
        return group
    return f"{'linear_regions' if name == 'linear_regions' else 'dimension'} on probe {group!r}"


def summary(values: dict[str, list[tuple[int, float]]]) -> str:
    """The last value of the main keys, for the reader."""
    main = ("batch_functional_dimension", "numerical_rank", "linear_regions", "max_eigenvalue", "num_clusters")
    last = {k.removeprefix("geometry/"): v[-1][1] for k, v in values.items() if v and k.rsplit("/", 1)[-1] in main
            and k.count("/") == 2}
    steps = sorted({s for v in values.values() for s, _ in v})
    return f"{len(values)} keys at steps {steps}: " + ", ".join(f"{k}={v:g}" for k, v in sorted(last.items()))


@pytest.mark.parametrize("case", list(CASES))
def test_defaults_finish_stay_bit_identical_and_warn_once_per_cause(
    tmp_path: Path, case: str, one_thread: None
) -> None:
    """``GeometryMonitor()``; and the same with ``max_overhead=None``: these runs last about a second, so the
    default 5 % budget (each measure's share of the whole run, a few ms) affords no point and says so once; the
    second run measures at every scheduled point of the default schedule (step 0 and each epoch's end, after
    training steps) to show them bit-identical and warned once per cause too."""
    plain, _, _ = fit(tmp_path / "plain", case, None)
    for name, monitor in (("defaults", GeometryMonitor()), ("every point", GeometryMonitor(max_overhead=None))):
        watched, trainer, messages = fit(tmp_path / name, case, monitor)

        # the monitor is an observer: every parameter and buffer bit for bit as without it
        assert watched.state_dict().keys() == plain.state_dict().keys()
        for key, value in plain.state_dict().items():
            assert torch.equal(value, watched.state_dict()[key]), f"{case}, {name}: {key} differs with the monitor"

        # at most one warning per cause: no message twice, not even with other numbers in it (a step, a count)
        assert len(set(messages)) == len(messages), messages
        shapes = [re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", m) for m in messages]
        assert len(set(shapes)) == len(shapes), messages

        values = logged(trainer)
        print(f"\n[{case}, {name}] {summary(values)}")
        for m in messages:
            print(f"[{case}, {name}] warning: {m[:160]}")
        # every NaN is explained by a warning that its measure failed
        unexplained = sorted(
            k for k, v in values.items() if any(math.isnan(x) for _, x in v)
            and not any(m.startswith(f"GeometryMonitor: {failed_measure(k)} failed") for m in messages)
        )
        assert not unexplained, (unexplained, messages)
        # something geometric is logged, unless warnings say why nothing could be
        finite = [k for k, v in values.items() if any(math.isfinite(x) for _, x in v)]
        assert finite or any(" failed " in m or "not applicable" in m or "was stopped at its time allowance" in m
                             or "was not begun" in m or "too little to try a point" in m for m in messages), (
            values, messages)
        if name == "every point":  # step 0 and the end of both epochs
            assert len({s for v in values.values() for s, _ in v}) == 3, values
