"""The checks of the monitor's arguments: at construction (every argument of
:class:`~lightning_geomdim.callback.monitor.GeometryMonitor`) and at setup (the trainer and the module). Each
refusal is a ``MisconfigurationException`` that names the argument, the value and what to pass instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_geomdim.callback.error_policy import ON_ERROR
from lightning_geomdim.callback.measures import MEASURES
from lightning_geomdim.callback.overhead_budget import OverheadBudget
from lightning_geomdim.callback.probe_spec import ProbeSpec, parse_probes
from lightning_geomdim.callback.schedule import MeasurementSchedule, Schedule
from lightning_geomdim.core.dimension import ENGINES
from lightning_geomdim.core.losses import LOSSES

#: The time budget of the default schedule (see ``max_overhead``).
DEFAULT_MAX_OVERHEAD = 0.05
DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}


def check_measures(measures: Sequence[str] | str | None) -> tuple[str, ...]:
    """The measures, in order, without repeats; default all of them."""
    measures = MEASURES if measures is None else [measures] if isinstance(measures, str) else measures
    if sorted(set(measures) - set(MEASURES)) or not measures:
        raise MisconfigurationException(f"measures={list(measures)} is invalid: choose among {MEASURES}")
    return tuple(dict.fromkeys(measures))


def schedules_and_budget(
    measures: Sequence[str], schedules: Mapping[str, Mapping[str, Any]] | None, max_overhead: Any, **rules: Any
) -> tuple[MeasurementSchedule, OverheadBudget]:
    """The schedule of each measure (the rules ``every_n_steps`` … ``at_epochs``, overridden per measure by
    ``schedules``) and the time budget; ``max_overhead="auto"`` budgets the default schedule only."""
    written = any(rules[k] is not None for k in ("every_n_steps", "every_n_epochs", "log_spaced", "at_epochs",
                                                  "at_start"))
    schedules = dict(schedules or {})
    if max_overhead == "auto":  # the budget governs the default schedule; a schedule the user wrote runs as written
        max_overhead = None if written or schedules else DEFAULT_MAX_OVERHEAD
    # step 0 unless a budget applies: it cannot pay for a point before the run's length is known
    base = Schedule(**{**rules, "every_n_epochs": rules["every_n_epochs"] if written else 1,
                       "at_start": max_overhead is None if rules["at_start"] is None else rules["at_start"]})
    stray = sorted(set(schedules) - set(measures))
    if stray:
        raise MisconfigurationException(
            f"schedules has entries for {stray}, which are not measured: use keys among {list(measures)}"
        )
    schedule = MeasurementSchedule({m: Schedule.from_config(schedules.get(m, {}), base) for m in measures})
    return schedule, OverheadBudget(max_overhead, measures=tuple(measures))


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def check_probes(
    probes: Sequence[str | Mapping[str, Any]] | None, probe_size: int | None, **named: str | None
) -> list[ProbeSpec]:
    """The probe specifications (default train, val, random); ``named``: the arguments that name a probe."""
    if probe_size is not None and not _positive_int(probe_size):
        raise MisconfigurationException(f"probe_size={probe_size!r} must be a positive integer")
    specs = parse_probes(["train", "val", "random"] if probes is None else probes, probe_size)
    names = [s.name for s in specs]
    for arg, value in named.items():
        if value is not None and value not in names:
            raise MisconfigurationException(f"{arg}={value!r} is not one of the probes {names}")
    return specs


def check_settings(
    *, engine: str, dtype: str | torch.dtype, loss_fn: Any, on_error: str, flatness_top_k: int,
    flatness_trace_samples: int, alignment_threshold: float, max_memory_bytes: int | None, blocks: Any = None,
) -> torch.dtype:
    """Check the settings of the measures; return the computation dtype."""
    if not (blocks is None or blocks == "auto" or (isinstance(blocks, Mapping) and all(
            isinstance(v, (str, Sequence)) for v in blocks.values()))):
        raise MisconfigurationException(
            f"blocks={blocks!r} is invalid: pass 'auto', None, or a dict of block name -> module names, e.g. "
            "{'stem': ['conv1', 'bn1'], 'head': 'fc'}"
        )
    if engine not in ENGINES:
        raise MisconfigurationException(f"engine={engine!r} is invalid: choose one of {ENGINES}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise MisconfigurationException(f"dtype={dtype!r} is invalid: choose one of {list(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise MisconfigurationException(f"dtype={dtype} is invalid: use torch.float64 or torch.float32")
    if isinstance(loss_fn, str) and loss_fn not in LOSSES:
        raise MisconfigurationException(f"loss_fn={loss_fn!r} is invalid: pass a callable or one of {LOSSES}")
    if on_error not in ON_ERROR:
        raise MisconfigurationException(f"on_error={on_error!r} is invalid: choose 'warn' or 'raise'")
    for arg, value in (("flatness_top_k", flatness_top_k), ("flatness_trace_samples", flatness_trace_samples)):
        if not _positive_int(value):
            raise MisconfigurationException(f"{arg}={value!r} must be a positive integer")
    if not -1.0 <= float(alignment_threshold) < 1.0:
        raise MisconfigurationException(
            f"alignment_threshold={alignment_threshold!r} must be in [-1, 1): the cosine above which two neurons "
            "share a direction cluster, e.g. 0.99"
        )
    if max_memory_bytes is not None and not _positive_int(max_memory_bytes):
        raise MisconfigurationException(
            f"max_memory_bytes={max_memory_bytes!r} must be a positive integer (bytes), or None for half the "
            "available memory"
        )
    return dtype


def check_trainer(trainer: Trainer) -> None:
    """The monitor logs: refuse a trainer without a logger."""
    if not trainer.loggers:
        raise MisconfigurationException(
            "GeometryMonitor needs a logger, but the Trainer has none (logger=False): pass "
            "Trainer(logger=TensorBoardLogger(...)) or any other Lightning logger"
        )


def measured_module(pl_module: LightningModule, name: str | None) -> nn.Module:
    """The submodule ``name`` of ``pl_module``, or ``pl_module`` itself when ``name`` is None (it needs a forward)."""
    if name is None:
        if type(pl_module).forward is LightningModule.forward:
            raise MisconfigurationException(
                f"{type(pl_module).__name__} does not define forward(), which GeometryMonitor measures by "
                "default: pass GeometryMonitor(module='<name of the network submodule>'), e.g. module='net'"
            )
        return pl_module
    try:
        return pl_module.get_submodule(name)
    except AttributeError as err:
        names = [n for n, _ in pl_module.named_modules() if n][:8]
        raise MisconfigurationException(
            f"GeometryMonitor(module={name!r}): {type(pl_module).__name__} has no such submodule; "
            f"use a name from named_modules(), e.g. {names}"
        ) from err
