"""When to measure: step/epoch intervals, log-spaced steps, step 0, one schedule per measure.

Events come from three training hooks: ``"start"`` (before the first optimizer step), ``"step"`` (after an
optimizer step, at the new ``trainer.global_step``) and ``"epoch"`` (end of a training epoch). Every
measurement is logged at ``trainer.global_step``, and a measure is taken at most once per global step (two
rules firing at the same step, or several batches sharing a step under gradient accumulation, give one
point). :meth:`MeasurementSchedule.due` says what the schedules ask for; :meth:`.overhead_budget.OverheadBudget.select`
then keeps those the time budget allows (all of them with ``max_overhead=None``). Nothing else decides when to measure.

**Cost**: on the monitor's default schedule (every epoch) at most about 5 % of the training's wall time is spent
measuring (``max_overhead="auto"`` → 0.05), each measure getting an equal share. A measure's first point waits until
the run's length is known (from ``max_epochs`` / ``max_steps`` and the pace after the first batch) and may take its
share of the budget over the whole projected run (at most 2 s more than the run has earned; :mod:`.overhead_budget`);
later points are taken while their cost (the duration of the previous measurement) fits in the share earned so far.
A measure that runs past its allowance is stopped and logs nothing, with one warning, so a run too short for a
measure never pays for it. The point at step 0 is therefore taken only without a budget (a written schedule, or
``max_overhead=None``; ``benchmarks/bench_callback.py`` measures the MNIST example). **A schedule you write is the
schedule that runs**: with any of ``every_n_steps``, ``every_n_epochs``, ``log_spaced``, ``at_epochs`` or
``schedules`` given, every scheduled point is taken, unless you also pass a ``max_overhead`` fraction.
``max_overhead=None`` takes every scheduled point.

Part of the Lightning layer: Lightning gives ``MisconfigurationException``, the error of a bad schedule.
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
        at_epochs: at the end of these training epochs, counted from 1 (``(40, 80, 280, 680)``: after the 40th,
            ...), besides the other rules; ``None`` for none.
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = 1
    log_spaced: int | None = None
    at_start: bool = True
    at_epochs: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.at_epochs is not None:
            epochs = self.at_epochs
            if isinstance(epochs, (str, bytes, int)) or not all(
                isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in epochs
            ):
                raise MisconfigurationException(
                    f"at_epochs={epochs!r} is invalid: pass a list of positive epoch counts, e.g. [40, 80, 280]"
                )
            object.__setattr__(self, "at_epochs", tuple(sorted(set(epochs))))
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

    def due(self, event: Event, step: int, epoch: int, since: int | None = None) -> bool:
        """Whether this schedule fires at ``event``; ``epoch`` is the 0-based epoch that just ran.

        ``since``: for a ``"step"`` event, the global step of the previous one. The schedule fires when one of its
        steps lies in (``since``, ``step``], so a step that the counter jumped over (two optimizers advance
        ``global_step`` by 2 per batch) is measured at the next step rather than never. Default ``step − 1``.
        """
        if event == "start":
            return self.at_start and step == 0
        if event == "step":
            first = max(1, step if since is None else since + 1)
            return any(self._step_rule(s) for s in range(first, step + 1))
        if event == "epoch":
            listed = self.at_epochs is not None and epoch + 1 in self.at_epochs
            return listed or (self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0)
        raise ValueError(f"unknown event {event!r}: one of {EVENTS}")

    def _step_rule(self, step: int) -> bool:
        by_interval = self.every_n_steps is not None and step % self.every_n_steps == 0
        return by_interval or (self.log_spaced is not None and is_log_spaced(step, self.log_spaced))


@dataclass
class MeasurementSchedule:
    """The schedule of each measure, the last global step at which each was taken and the logging step
    (checkpointed).

    ``stepped`` counts training batches as Lightning counts the step it logs ``self.log`` values at: under automatic
    optimisation the batches that advanced ``global_step`` (one per batch however many optimizers step, none for
    batches that accumulate gradients), under manual optimisation every batch (``every_batch``). Values are logged at
    it, so that they line up with the loss, where ``global_step`` counts every optimizer's steps. A run starts it
    from ``global_step`` unless it was restored from a checkpoint (:meth:`load_state_dict`): a monitor fitted again
    in a new Trainer starts afresh.
    """

    schedules: dict[str, Schedule]
    last_step: dict[str, int] = field(default_factory=dict)
    stepped: int | None = None
    _seen: int | None = field(default=None, repr=False)  # global step of the previous "step"/"start" event
    _restored: bool = field(default=False, repr=False)  # state loaded from a checkpoint since the last start

    def due(self, event: Event, step: int, epoch: int, every_batch: bool = False) -> list[str]:
        """Measures to take now: their schedule fires and they were not yet taken at this global step. Scheduled
        steps that ``global_step`` jumped over since the previous step event fire now (see :meth:`Schedule.due`).
        ``every_batch``: manual optimisation, where Lightning's logging step counts every batch."""
        if event == "start" and not self._restored:  # a new run, not a resumed one: nothing of a previous fit
            self.last_step, self.stepped, self._seen = {}, None, None
        self._restored = self._restored and event != "start"
        since = self._seen if event == "step" and self._seen is not None and self._seen < step else None
        if self.stepped is None or (event == "step" and (since is not None or every_batch)):
            self.stepped = step if self.stepped is None else self.stepped + 1
        if event in ("step", "start"):
            self._seen = step
        if event == "step" and not any(s.every_n_steps or s.log_spaced for s in self.schedules.values()):
            return []  # the default schedule: nothing fires between epochs (the check at every batch stays cheap)
        return [
            m for m, s in self.schedules.items() if s.due(event, step, epoch, since) and self.last_step.get(m) != step
        ]

    def mark(self, measures: Iterable[str], step: int) -> None:
        """Record that ``measures`` were taken (or attempted) at global step ``step``."""
        for m in measures:
            self.last_step[m] = step

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": dict(self.last_step), "stepped": self.stepped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_step = {str(k): int(v) for k, v in state.get("last_step", {}).items()}
        self.stepped = None if state.get("stepped") is None else int(state["stepped"])
        self._restored = True
