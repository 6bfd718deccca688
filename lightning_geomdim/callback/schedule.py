"""When to measure: step/epoch intervals, log-spaced steps, step 0, one schedule per measure.

Events come from three training hooks: ``"start"`` (before the first optimizer step), ``"step"`` (after an
optimizer step, at the new ``trainer.global_step``) and ``"epoch"`` (end of a training epoch). Every
measurement is logged at ``trainer.global_step``, and a measure is taken at most once per global step (two
rules firing at the same step, or several batches sharing a step under gradient accumulation, give one
point). :meth:`MeasurementSchedule.due` says what the schedules ask for; :meth:`OverheadBudget.select` then keeps
those the time budget allows (all of them with ``max_overhead=None``). Nothing else decides when to measure.

**Cost**: on the monitor's default schedule (every epoch) at most about 5 % of the training's wall time is spent
measuring (``max_overhead="auto"`` → 0.05), each measure getting an equal share. A measure's first point waits until
the run's length is known (from ``max_epochs`` / ``max_steps`` and the pace after the first batch) and may take its
share of the budget over the whole projected run (at most :data:`FIRST_POINT_SECONDS` more than the run has earned);
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

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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


#: Most seconds a measure's first point may take (its cost is unknown then): a projection of the run's length made
#: early can be wrong (early stopping, a slow first epoch), so the point borrows at most this much from the future.
FIRST_POINT_SECONDS = 2.0
#: Fewest seconds worth trying a first point in: a share smaller than this waits for the run to earn more.
MIN_POINT_SECONDS = 0.05


@dataclass
class OverheadBudget:
    """Keep the time spent measuring within ``max_overhead`` times the rest of the run's wall time.

    The run's wall time is split in two: seconds spent measuring (inside :meth:`measuring`) and every other
    second since :meth:`start` (training steps, validation, data loading, other callbacks). The budget,
    ``max_overhead · other_s`` less the measuring time that belongs to no measure (building probes, writing
    scalars; a measure's TensorBoard images are its own), is shared equally among the ``measures``, so that a
    cheap measure cannot starve an expensive one: a scheduled measure is taken when its estimated cost, the
    duration of its previous measurement, still fits in its share, ``spent_s[m] + cost_s[m] ≤ (max_overhead ·
    other_s − shared) / len(measures)``, and in what all measures together have left (:meth:`headroom`), so that
    one that ran past its share (to its next chunk of work) leaves the others less.

    A first point, whose cost is unknown, is paid from the share of the whole run, projected from the fraction of
    the training done (:meth:`observe`, :func:`.progress.training_progress`) at the pace since the first observation
    (after the first batch, so that its warm-up is not taken for the pace of the run), the shared seconds projected
    alike, or from ``other_s`` while no projection exists. It is tried once that share, less what the measure spent,
    is at least :data:`MIN_POINT_SECONDS`, and may take it (at most :data:`FIRST_POINT_SECONDS` more than the run
    has earned so far). A measurement that runs past its :meth:`allowance` is stopped at its next chunk of work and
    logs nothing (:meth:`overran`); it counts twice the time it ran as its cost, so it is retried only once the
    share earned covers that. So a run of T seconds spends at most about ``max_overhead · T`` measuring, and each
    measure gets points in inverse proportion to its cost (none, with a warning, when one point costs more than its
    share of the run: ResNet-18 on 2 CPU cores in a 2-minute run). With ``max_overhead=None`` every scheduled
    measure is taken, without time limit. The account is checkpointed, so a resumed run keeps it.

    Attributes:
        max_overhead: largest ratio of measuring time to the other wall time, > 0; ``None`` for no limit.
        measures: the measures that share the budget (none: one budget for all).
        measuring_s: seconds spent measuring so far, in all.
        other_s: seconds of the run outside measurements so far (up to the last :meth:`select` or measurement).
        spent_s: seconds spent so far on each measure.
        cost_s: the duration of each measure's last measurement, in seconds: the sum of its :meth:`measuring`
            blocks since the last :meth:`select` (one block per probe, when a measure is taken probe by probe).
        timer: the time source, in seconds (``time.perf_counter``).
        progress: the fraction of the training done, in (0, 1], when the run's length is known (:meth:`observe`);
            ``None`` while unknown (before the first batch, or a run without ``max_epochs`` / ``max_steps``).
    """

    max_overhead: float | None = 0.05
    measures: Sequence[str] = ()
    measuring_s: float = 0.0
    other_s: float = 0.0
    spent_s: dict[str, float] = field(default_factory=dict)
    cost_s: dict[str, float] = field(default_factory=dict)
    timer: Callable[[], float] = time.perf_counter
    progress: float | None = None
    _anchor: tuple[float, float, float] | None = field(default=None, repr=False)  # other_s, progress, shared
    _mark: float | None = field(default=None, repr=False)
    _taken: set[str] = field(default_factory=set, repr=False)  # the measures timed since the last select
    _limits: dict[str, float] = field(default_factory=dict, repr=False)  # allowances of this measurement
    stopped: set[str] = field(default_factory=set, repr=False)  # measures stopped at their allowance since select
    _quiet_until: float | None = field(default=None, repr=False)  # other_s before which no measure fits (quiet)
    _starved: set[str] = field(default_factory=set, repr=False)  # first points the others left no headroom

    def __post_init__(self) -> None:
        value = self.max_overhead
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                                  or not math.isfinite(value)):
            raise MisconfigurationException(
                f"max_overhead={value!r} is invalid: pass the largest fraction of the training's wall time the "
                "monitor may spend measuring (e.g. 0.05), or None to take every scheduled measurement"
            )

    def start(self) -> None:
        """Start counting the run's time (at train start; a resumed run adds to the checkpointed totals); the pace
        of the run is measured afresh."""
        self._mark = self.timer()
        self.progress, self._anchor, self._quiet_until = None, None, None

    def _advance(self) -> float:
        now = self.timer()
        if self._mark is not None:
            self.other_s += now - self._mark
        self._mark = now
        return now

    @property
    def anchored(self) -> bool:
        """Whether the pace of the run is anchored (:meth:`observe` saw a known progress once)."""
        return self._anchor is not None

    def observe(self, progress: float | None) -> None:
        """Record the fraction of the training done now (``None``: unknown); the first known one anchors the pace."""
        self._advance()
        self.progress = progress
        if progress and self._anchor is None:
            self._anchor = (self.other_s, progress, self._shared())

    def projected_other_s(self) -> float | None:
        """The run's other seconds at its end: ``other_s`` plus the rest of the training at the pace since the
        anchor; ``None`` until the progress has moved past the anchor."""
        if self.progress is None or self._anchor is None or self.progress <= self._anchor[1]:
            return None
        pace = (self.other_s - self._anchor[0]) / (self.progress - self._anchor[1])
        return self.other_s + pace * max(0.0, 1.0 - self.progress)

    def _shared(self) -> float:
        """Measuring seconds of no measure: probes, hooks, logs."""
        return self.measuring_s - sum(self.spent_s.values())

    def share(self, projected: bool = False) -> float:
        """Seconds each measure may have spent by now, (max_overhead · other_s − shared) / number of measures; with
        ``projected``, over the whole run (:meth:`projected_other_s`, when there is one), the shared seconds also
        projected at their pace since the anchor (the hooks of every batch to come)."""
        if self.max_overhead is None:
            return math.inf
        shared, other = self._shared(), self.other_s
        whole = self.projected_other_s() if projected else None
        if whole is not None and self._anchor is not None and self.progress is not None:
            shared += max(0.0, (shared - self._anchor[2]) / (self.progress - self._anchor[1])) * (1.0 - self.progress)
            other = whole
        return (self.max_overhead * other - shared) / max(1, len(self.measures))

    def headroom(self, projected: bool = False) -> float:
        """Seconds all measures together may still spend, by now (or over the whole run, with ``projected``):
        their shares less what they spent. A measure that ran past its share (a stopped point runs to its next
        chunk of work) leaves the others less, so the run as a whole keeps to ``max_overhead`` (give or take the
        point in progress). A dropped measure's seconds still count."""
        if self.max_overhead is None:
            return math.inf
        return self.share(projected) * max(1, len(self.measures)) - sum(self.spent_s.values())

    def allowance(self, measure: str) -> float:
        """Seconds ``measure`` may still run at this measurement before it is stopped (:func:`.time_limit`): its
        share less what it spent, at most the :meth:`headroom` (:meth:`select` checked both cover its counted cost,
        which it may always take); for a first point, its share of the projected run less what it spent, at most the
        projected headroom, of which it borrows at most :data:`FIRST_POINT_SECONDS` beyond what the run has earned so
        far (so a first point at the end of a run may take its whole share); no limit without ``max_overhead``."""
        if self.max_overhead is None:
            return math.inf
        spent = self.spent_s.get(measure, 0.0)
        if measure not in self.cost_s:
            return max(0.0, min(self.share(projected=True) - spent, max(FIRST_POINT_SECONDS, self.share() - spent),
                                self.headroom(projected=True)))
        return max(min(self.share() - spent, self.headroom()), self.cost_s[measure])

    def share_among(self, measures: Sequence[str]) -> None:
        """Share the budget among ``measures`` from now on (one was dropped: its spent seconds still count)."""
        self.measures, self._quiet_until = tuple(measures), None

    def remaining(self, measure: str) -> float:
        """Seconds left of ``measure``'s :meth:`allowance` at this measurement: the allowance (fixed at its first
        call) less what the measure's own blocks took since :meth:`select` (one per probe; the other measures'
        blocks between them are theirs)."""
        if measure not in self._limits:
            self._limits[measure] = self.allowance(measure)
            if measure not in self.cost_s and self.headroom(projected=True) < MIN_POINT_SECONDS:
                self._starved.add(measure)
        used = self.cost_s.get(measure, 0.0) if measure in self._taken else 0.0
        return max(0.0, self._limits[measure] - used)

    def allowed(self, measure: str) -> float:
        """``measure``'s whole allowance at this measurement (:meth:`remaining` fixes it), for messages."""
        return self._limits.get(measure, math.nan)

    def overran(self, measure: str, needed: float | None = None) -> None:
        """``measure`` was stopped at its allowance: count twice the time it ran as its cost, so that it is retried
        once the budget allows that much (the allowance doubles until a point completes; the time lost stays
        within the budget), or ``needed``, the least it would take, when known (stopped before a step estimated
        to overrun). Its other probes are left out of this measurement. A first point that the measures before it
        in this measurement left (almost) no allowance stays a first point (no cost is learnt from it)."""
        ran = self.cost_s.get(measure, FIRST_POINT_SECONDS)
        self.stopped.add(measure)
        if measure in self._starved:  # a first point left no allowance by the measures before it: still one
            self.cost_s.pop(measure, None)
            return
        self.cost_s[measure] = 2 * ran if needed is None else max(needed, 2 * ran)

    def select(self, due: Sequence[str]) -> list[str]:
        """The measures of ``due`` (in order) that fit in their share of the budget now; starts a measurement."""
        self._advance()
        self._taken, self._limits, self.stopped, self._starved = set(), {}, set(), set()
        if self.max_overhead is None:
            return list(due)
        share, whole = self.share(), self.share(projected=True)
        room, whole_room = self.headroom(), self.headroom(projected=True)
        chosen = []
        for m in due:
            spent, cost = self.spent_s.get(m, 0.0), self.cost_s.get(m)
            if cost is not None and spent + cost <= share and cost <= room:
                chosen.append(m)
                room -= cost
            elif cost is None and min(whole - spent, whole_room) >= MIN_POINT_SECONDS:
                chosen.append(m)
        self._quiet_until = None if chosen else self._next_fit()
        return chosen

    def _next_fit(self) -> float | None:
        """The least ``other_s`` at which some measure could fit again, when every measure has a cost (the shared
        seconds only grow, so none fits before); ``None`` when one has none (a first point to come)."""
        if self.max_overhead is None or not self.measures or any(m not in self.cost_s for m in self.measures):
            return None
        shared, spent, n = self._shared(), sum(self.spent_s.values()), len(self.measures)
        return min(max(n * (self.spent_s.get(m, 0.0) + self.cost_s[m]), self.cost_s[m] + spent) + shared
                   for m in self.measures) / self.max_overhead

    def quiet(self) -> bool:
        """Whether :meth:`select` would choose nothing now, known from one comparison: after a selection that chose
        nothing, until the run's other seconds reach the least at which some measure could fit. The monitor's
        check at every epoch then costs a comparison (on a run of 2 ms batches it cost 1 % of the wall time)."""
        return self._quiet_until is not None and self.other_s < self._quiet_until

    def waiting(self, measures: Sequence[str]) -> list[str]:
        """Those of ``measures`` not yet tried while the run's length is unknown: they wait for it (no warning)."""
        return [m for m in measures if m not in self.cost_s and self.projected_other_s() is None]

    @contextlib.contextmanager
    def measuring(self, measure: str | None = None) -> Iterator[None]:
        """Count the time of the block as measuring time: ``measure``'s (its cost), or shared when ``None``."""
        begin = self._advance()
        try:
            yield
        finally:
            end = self.timer()
            self.measuring_s += end - begin
            if measure is not None:
                self.cost_s[measure] = end - begin + (self.cost_s[measure] if measure in self._taken else 0.0)
                self._taken.add(measure)
                self.spent_s[measure] = self.spent_s.get(measure, 0.0) + end - begin
            self._mark = end

    def skip_warning(self, skipped: Sequence[str], step: int) -> str:
        """The warning that ``skipped`` were skipped at ``step`` to stay within the budget."""
        whole = self.share(projected=True)
        costs = ", ".join(
            f"{m} took {self.cost_s[m]:.2f} s last time" if m in self.cost_s else
            f"{m} has no share before the run's length is known" if self.projected_other_s() is None else
            f"{m}'s share of the whole run is {max(0.0, whole - self.spent_s.get(m, 0.0)):.2f} s, too little to try a "
            "point" for m in skipped)
        return (
            f"GeometryMonitor: skipped {list(skipped)} at step {step} to stay within max_overhead={self.max_overhead} "
            f"of the training's wall time (measuring so far: {self.measuring_s:.1f} s against {self.other_s:.1f} s "
            f"of the rest; {costs}). Points are taken as the budget allows from now on (no further "
            "warning); pass max_overhead=None to take every scheduled point, a larger fraction, or a sparser "
            "schedule / smaller probes"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"measuring_s": self.measuring_s, "other_s": self.other_s, "spent_s": dict(self.spent_s),
                "cost_s": dict(self.cost_s)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.measuring_s = float(state.get("measuring_s", 0.0))
        self.other_s = float(state.get("other_s", 0.0))
        self.spent_s = {str(k): float(v) for k, v in state.get("spent_s", {}).items()}
        self.cost_s = {str(k): float(v) for k, v in state.get("cost_s", {}).items()}
