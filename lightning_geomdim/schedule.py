"""When to measure: step/epoch intervals, log-spaced steps, step 0, one schedule per measure.

Events come from three training hooks: ``"start"`` (before the first optimizer step), ``"step"`` (after an
optimizer step, at the new ``trainer.global_step``) and ``"epoch"`` (end of a training epoch). Every
measurement is logged at ``trainer.global_step``, and a measure is taken at most once per global step (two
rules firing at the same step, or several batches sharing a step under gradient accumulation, give one
point). :meth:`MeasurementClock.due` is the whole gate; nothing else decides when to measure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lightning.pytorch.utilities.exceptions import MisconfigurationException

Event = Literal["start", "step", "epoch"]
EVENTS: tuple[str, ...] = ("start", "step", "epoch")


def is_log_spaced(step: int, per_decade: int) -> bool:
    """Whether ``step`` ≥ 1 is one of the log-spaced steps round(10^(k / per_decade)), k = 0, 1, 2, ...

    ``per_decade`` = 10 gives 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 63, 79, 100, 126, ...:
    dense while the geometry changes fast, about ``per_decade`` points per factor of 10 later on.
    """
    if step < 1:
        return False
    k = round(per_decade * math.log10(step))
    return any(round(10 ** (j / per_decade)) == step for j in (k - 1, k, k + 1) if j >= 0)


def log_spaced_steps(per_decade: int, max_step: int) -> list[int]:
    """All log-spaced steps in [1, max_step], increasing (see :func:`is_log_spaced`)."""
    return [s for s in range(1, max_step + 1) if is_log_spaced(s, per_decade)]


@dataclass(frozen=True)
class Schedule:
    """When one measure is taken.

    Attributes:
        every_n_steps: after every n-th optimizer step (global steps n, 2n, ...); ``None`` for never.
        every_n_epochs: at the end of every n-th training epoch; ``None`` for never.
        log_spaced: points per decade of global steps (see :func:`is_log_spaced`); ``None`` for never.
        at_start: at global step 0, before the first optimizer step (not again when resuming).
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = 1
    log_spaced: int | None = None
    at_start: bool = True

    def __post_init__(self) -> None:
        for name in ("every_n_steps", "every_n_epochs", "log_spaced"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MisconfigurationException(
                    f"{name}={value!r} is invalid: pass a positive integer, or None to disable this rule"
                )
        if not isinstance(self.at_start, bool):
            raise MisconfigurationException(f"at_start={self.at_start!r} is invalid: pass True or False")

    @staticmethod
    def from_config(config: Schedule | Mapping[str, Any], base: Schedule | None = None) -> Schedule:
        """A schedule from a dict of fields (unset fields taken from ``base``), as written in YAML."""
        if isinstance(config, Schedule):
            return config
        if not isinstance(config, Mapping):
            raise MisconfigurationException(
                f"a schedule must be a dict such as {{'every_n_epochs': 5}}, got {type(config).__name__}"
            )
        fields = set(Schedule.__dataclass_fields__)
        unknown = sorted(set(config) - fields)
        if unknown:
            raise MisconfigurationException(
                f"unknown schedule keys {unknown}: use only {sorted(fields)}, e.g. {{'every_n_epochs': 5}}"
            )
        return Schedule(**{**asdict(base or Schedule()), **dict(config)})

    def due(self, event: Event, step: int, epoch: int) -> bool:
        """Whether this schedule fires at ``event``; ``epoch`` is the 0-based epoch that just ran."""
        if event == "start":
            return self.at_start and step == 0
        if event == "step":
            by_interval = self.every_n_steps is not None and step % self.every_n_steps == 0
            by_log = self.log_spaced is not None and is_log_spaced(step, self.log_spaced)
            return step >= 1 and (by_interval or by_log)
        if event == "epoch":
            return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0
        raise ValueError(f"unknown event {event!r}: one of {EVENTS}")


@dataclass
class MeasurementClock:
    """The schedule of each measure and the last global step at which each was taken (checkpointed)."""

    schedules: dict[str, Schedule]
    last_step: dict[str, int] = field(default_factory=dict)

    def due(self, event: Event, step: int, epoch: int) -> list[str]:
        """Measures to take now: their schedule fires and they were not yet taken at this global step."""
        return [m for m, s in self.schedules.items() if s.due(event, step, epoch) and self.last_step.get(m) != step]

    def mark(self, measures: Iterable[str], step: int) -> None:
        """Record that ``measures`` were taken (or attempted) at global step ``step``."""
        for m in measures:
            self.last_step[m] = step

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": dict(self.last_step)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_step = {str(k): int(v) for k, v in state.get("last_step", {}).items()}
