"""The monitor under several processes: which strategies, and what the processes agree on.

Single-device strategies and DDP (``strategy="ddp"`` and its spawn/fork variants) are supported. Under DDP every
process measures the whole probe with its own copy of the (identical) weights and the loggers write from rank 0
only, so each value is logged once and equals a single-process run's bit for bit. The processes communicate only in
hooks that all of them run: at train start they take rank 0's probes (the same unless the dataset draws random
augmentations); before each scheduled measurement they take rank 0's choice of what fits in the time budget
(:func:`from_rank_zero`) and agree on the memory budget (:func:`agreed_memory_budget`), so they skip (or, with
``on_error="raise"``, all raise on) the same measures. Measuring itself involves no collective (unless
``distributed_gram``), so a measure that fails on one process cannot leave the others waiting. Sharded strategies
(FSDP, DeepSpeed, model parallel), whose processes hold only shards of the parameters, are refused at setup
(:func:`check_strategy`).
"""

from __future__ import annotations

import os
from typing import TypeVar

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_geomdim.core.memory import memory_budget

T = TypeVar("T")


def check_strategy(strategy: Strategy) -> None:
    """Refuse strategies whose processes do not each hold every parameter in full.

    Raises:
        MisconfigurationException: FSDP, DeepSpeed, model parallel, or any strategy that is neither a single
            device nor DDP; the message names the strategy and what to use instead.
    """
    sharded = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)  # DeepSpeedStrategy is a DDPStrategy
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(strategy, sharded):
        raise MisconfigurationException(
            f"GeometryMonitor does not support the {type(strategy).__name__} strategy yet: it measures full, "
            "unsharded parameters, which sharded strategies (FSDP, DeepSpeed, model parallel) do not hold. "
            "Use a single device or strategy='ddp', or remove the GeometryMonitor callback"
        )


def agreed_memory_budget(trainer: Trainer, max_memory_bytes: int | None) -> int | None:
    """The memory budget of every measure: ``max_memory_bytes`` for one process, else the smallest over the processes.

    Each process measures the same thing, so with on_error="raise" they must refuse the same measures: a
    process that raised alone would leave the others waiting in their next collective (NCCL: until its
    timeout). The default, half the available memory, is split among the processes of a node that share the
    CPU memory (accelerator="cpu"). Called at each measurement (every process takes part: the schedule is rank
    0's), so that it counts the memory the model, optimizer and training batches hold by then.
    """
    if trainer.world_size <= 1:
        return max_memory_bytes
    device = trainer.strategy.root_device
    budget = memory_budget(device, max_memory_bytes)
    default = max_memory_bytes is None and not os.environ.get("GEOMDIM_MAX_MEMORY_BYTES")
    if default and device.type == "cpu":
        budget //= max(1, trainer.num_devices)
    agreed = trainer.strategy.reduce(torch.tensor(budget, dtype=torch.int64, device=device), reduce_op="min")
    return int(agreed)


def from_rank_zero(trainer: Trainer, obj: T) -> T:
    """Rank 0's ``obj`` on every process (``obj`` itself for one process); every process must call it."""
    if trainer.world_size > 1:
        return trainer.strategy.broadcast(obj, src=0)
    return obj

