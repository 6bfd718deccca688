"""How far the training is: the fraction of the run done, from the Trainer's public limits, for the time budget's
projection of the run's length (:class:`~.overhead_budget.OverheadBudget`). Part of the Lightning layer."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.callbacks import Timer

from lightning_geomdim.callback.schedule import Event


def training_progress(
    trainer: Any, event: Event, batch_idx: int | None = None, *, measuring_s: float = 0.0,
    max_overhead: float | None = None,
) -> float | None:
    """The fraction of the training done at ``event`` (after batch ``batch_idx`` of the current epoch for a
    ``"step"``), from ``max_epochs`` and ``trainer.num_training_batches``, ``max_steps`` and ``global_step``, or
    ``max_time`` (Lightning's :class:`~lightning.pytorch.callbacks.Timer`), whichever ends the run first; ``None``
    at ``"start"`` or when none bounds the run.

    ``max_time`` bounds the wall time, measurements included, while the budget projects the other seconds: with
    ``measuring_s`` (the monitor's so far) and ``max_overhead``, the time fraction is of the other seconds, those
    to come being at least ``remaining / (1 + max_overhead)`` (the rest is the measurements the budget allows). A
    2-minute run otherwise projects 120 s of training where it has about 114 s, and lets the first points take 5 %
    of 120 s."""
    fractions = []
    for timer in (c for c in trainer.callbacks if isinstance(c, Timer)):
        remaining = timer.time_remaining()
        if event != "start" and remaining is not None:
            elapsed = max(0.0, timer.time_elapsed() - measuring_s)
            remaining = remaining / (1.0 + (max_overhead or 0.0))
            fractions.append(elapsed / max(elapsed + remaining, 1e-9))
    epochs, batches = trainer.max_epochs, trainer.num_training_batches
    if event != "start" and epochs is not None and epochs > 0 and 0 < batches < math.inf:
        done = trainer.current_epoch + (1.0 if event == "epoch" else min(1.0, ((batch_idx or 0) + 1) / batches))
        fractions.append(done / epochs)
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step > 0:
        fractions.append(trainer.global_step / trainer.max_steps)
    return min(1.0, max(fractions)) if fractions else None
