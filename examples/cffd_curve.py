"""CFFDCurve: the computable full functional dimension's convergence curve, logged at the start and end of fit.

The CFFD of θ is the largest batch functional dimension over input batches; Bona-Pellissier, Malgouyres, Bachoc
(arXiv 2402.08269) estimate it by the dimension on n random inputs and prove that it converges fast in n. This
callback draws n Gaussian inputs for each n of ``sizes`` (a fresh batch per size, from a private generator), computes
the exact batch functional dimension of the model on them
(:func:`lightning_geomdim.computable_full_functional_dimension`, exact engine) and logs, with the global step
replaced by n so that TensorBoard draws the curve against n:

* ``cffd/<when>/batch_functional_dimension``: the exact dimension on n inputs (``<when>``: ``start`` or ``end``);
* ``cffd/<when>/upper_bound``: min(rows, P − hidden neurons) on those n inputs;
* ``cffd/<when>/parameter_bound``: P − hidden neurons, the bound no input batch can exceed.

It stops early at a size where the dimension reached P − hidden neurons. Like GeometryMonitor it only observes:
the model's state, the global RNGs and the dataloaders are left untouched.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_geomdim import computable_full_functional_dimension
from lightning_geomdim.core.cffd import gaussian_sampler


class CFFDCurve(Callback):
    """Log the exact dimension on n Gaussian N(``mean``, ``std``²) inputs against n, at fit start and/or end.

    Args:
        sizes: increasing numbers of random inputs n.
        input_shape: per-sample input shape (the MNIST example: ``[784]``).
        mean, std: of the Gaussian inputs (the paper: N(0.5, 1)).
        seed: of the private generator of the inputs (the same inputs at start and end).
        at_start, at_end: when to draw the curve.
        max_memory_bytes: memory budget of the largest size (default: the library's, half the available memory).
    """

    def __init__(
        self, sizes: Sequence[int], input_shape: Sequence[int] = (784,), mean: float = 0.5, std: float = 1.0,
        seed: int = 0, at_start: bool = True, at_end: bool = True, max_memory_bytes: int | None = None,
    ) -> None:
        sizes = [int(n) for n in sizes]
        if not sizes or min(sizes) < 1 or sorted(set(sizes)) != sizes:
            raise ValueError(f"sizes must be increasing positive integers, got {sizes}")
        self.sizes, self.input_shape = sizes, tuple(int(s) for s in input_shape)
        self.mean, self.std, self.seed = float(mean), float(std), int(seed)
        self.at_start, self.at_end, self.max_memory_bytes = at_start, at_end, max_memory_bytes

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_start and trainer.global_step == 0:
            self._curve(trainer, pl_module, "start")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end:
            self._curve(trainer, pl_module, "end")

    def _curve(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> None:
        began = time.perf_counter()
        result = computable_full_functional_dimension(
            pl_module, gaussian_sampler(self.input_shape, mean=self.mean, std=self.std), self.sizes,
            generator=torch.Generator().manual_seed(self.seed), engine="exact",
            max_memory_bytes=self.max_memory_bytes,
        )
        seconds = time.perf_counter() - began
        for n, res in zip(result.sizes, result.results, strict=True):
            metrics = {
                f"cffd/{when}/batch_functional_dimension": float(res.rank),
                f"cffd/{when}/upper_bound": float(res.upper_bound),
                f"cffd/{when}/parameter_bound": float(result.upper_bound),
            }
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=n)
        curve = ", ".join(f"{n}: {r}" for n, r in zip(result.sizes, result.ranks, strict=True))
        L.pytorch.utilities.rank_zero_info(
            f"CFFD at the {when} (global step {trainer.global_step}): exact dimension on n Gaussian inputs "
            f"{{{curve}}}, P − hidden = {result.upper_bound}, {seconds:.0f} s"
        )
