"""Saddle-to-saddle dynamics: a small-initialisation shallow ReLU student learning a ReLU teacher.

A one-hidden-layer ReLU network started very close to zero (all parameters N(0, init_scale²)) and trained by
full-batch gradient descent on a squared loss learns the teacher's units one after another: the loss sits on
plateaus (the student lingers near saddle points) and drops between them. The teacher's units have output
weights of very different sizes, which separates the stages. GeometryMonitor measures the exact batch functional
dimension every few steps; what a real run showed (README.md, "Saddle-to-saddle"): it falls from its bound through
the first plateau and the first drop, and jumps up only during the second drop. Run it with::

    python examples/teacher_student.py fit --config configs/saddle_to_saddle.yaml
    tensorboard --logdir lightning_logs
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def teacher_task(
    num_samples: int, input_dim: int, output_weights: Sequence[float], *, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Gaussian inputs and a ReLU teacher's outputs: (x, y, teacher directions).

    The teacher is f*(x) = Σ_j a_j relu(⟨w_j, x⟩) with orthonormal w_j (one per entry a_j of ``output_weights``)
    and no biases. Returns x float32 (num_samples, input_dim) ~ N(0, I), y float32 (num_samples, 1) and the
    directions float32 (len(output_weights), input_dim). Draws only from ``generator``.
    """
    k = len(output_weights)
    if not 1 <= k <= input_dim:
        raise ValueError(f"the teacher needs 1 to input_dim={input_dim} units, got {k} output weights")
    x = torch.randn(num_samples, input_dim, generator=generator)
    directions = torch.linalg.qr(torch.randn(input_dim, input_dim, generator=generator))[0][:k]
    a = torch.tensor([float(v) for v in output_weights])
    y = (torch.relu(x @ directions.T) @ a)[:, None]
    return x, y, directions


class ShallowReLURegressor(L.LightningModule):
    """Student ``Linear(input_dim, width) → ReLU → Linear(width, 1)``, every parameter N(0, init_scale²).

    ``forward`` maps x float32 (N, input_dim) to (N, 1). Trained by plain SGD (full batch from the datamodule:
    gradient descent) on the mean squared error; logs ``train/loss`` and ``test/loss``.

    Args:
        input_dim: input dimension d.
        width: hidden ReLU units of the student.
        init_scale: standard deviation of every initial parameter; small values (1e-6) give long plateaus.
        lr: learning rate.
        init_seed: seed of the initialisation (a private generator; the global RNG is not used).
    """

    def __init__(self, input_dim: int = 10, width: int = 20, init_scale: float = 1e-6, lr: float = 0.05,
                 init_seed: int = 0) -> None:
        super().__init__()
        if init_scale < 0 or not lr > 0:
            raise ValueError(f"init_scale must be >= 0 and lr > 0, got init_scale={init_scale}, lr={lr}")
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(input_dim, width), nn.ReLU(), nn.Linear(width, 1))
        generator = torch.Generator().manual_seed(init_seed)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * init_scale)
        self.lr = float(lr)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/loss", F.mse_loss(self(x), y), on_step=False, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TeacherDataModule(L.LightningDataModule):
    """Regression data from a ReLU teacher (see :func:`teacher_task`): batches ``(x, y)``, float32.

    Training and test sets are independent draws of the same teacher. ``batch_size=None`` (default) gives one
    full batch per epoch: gradient descent.

    Args:
        input_dim: input dimension d.
        output_weights: the teacher's output weights a_j, one per hidden unit; very different sizes give
            well-separated plateaus.
        num_train, num_test: sample counts.
        batch_size: mini-batch size; ``None`` for full batch.
        seed: seed of the teacher and the samples.
    """

    def __init__(self, input_dim: int = 10, output_weights: Sequence[float] = (4.0, 1.0, 0.25), num_train: int = 400,
                 num_test: int = 400, batch_size: int | None = None, seed: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.input_dim, self.output_weights = input_dim, tuple(float(a) for a in output_weights)
        self.num_train, self.num_test, self.batch_size, self.seed = num_train, num_test, batch_size, seed
        self.data: dict[str, tuple[Tensor, Tensor]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            generator = torch.Generator().manual_seed(self.seed)
            x, y, _ = teacher_task(self.num_train + self.num_test, self.input_dim, self.output_weights,
                                   generator=generator)
            n = self.num_train
            self.data = {"train": (x[:n], y[:n]), "test": (x[n:], y[n:])}

    def _loader(self, split: str) -> DataLoader:
        self.setup()
        assert self.data is not None
        x, y = self.data[split]
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size or len(x), shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("test")


class TeacherStudentCLI(LightningCLI):
    """LightningCLI with the student's ``input_dim`` taken from the data's."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.input_dim", "model.input_dim")


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI on ``args`` (default ``sys.argv[1:]``)."""
    return TeacherStudentCLI(ShallowReLURegressor, TeacherDataModule, args=args,
                             save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
