"""The time budget of the measurements: ``max_overhead`` of the training's wall time, shared equally among the
measures (:class:`OverheadBudget`). The schedules say when a measure is due (:mod:`.schedule`); the budget says
whether it is taken, and how long it may run (its allowance, enforced by
:func:`~lightning_geomdim.core.interrupt.time_limit`).

Part of the Lightning layer: Lightning gives ``MisconfigurationException``, the error of a bad ``max_overhead``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException

#: Most seconds a measure's first point may take (its cost is unknown then): a projection of the run's length made
#: early can be wrong (early stopping, a slow first epoch), so the point borrows at most this much from the future.
FIRST_POINT_SECONDS = 2.0
#: A later point is taken once its share has room for this many times its last cost, and may take that long: a point
#: taken as soon as its share covered exactly its last cost was stopped by any slowdown of the machine (one of three
#: ResNet-18 alignment points in a 2-minute run, wasting its time). The room is not spent when unused, so in a long
#: run the points come as often as without it.
COST_MARGIN = 1.5
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
    duration of its previous measurement, with room for a slower machine (:data:`COST_MARGIN`), still fits in its
    share, ``spent_s[m] + COST_MARGIN · cost_s[m] ≤ (max_overhead · other_s − shared) / len(measures)``, and in what
    all measures together have left (:meth:`headroom`), so that one that ran past its share (to its next chunk of
    work) leaves the others less.

    A first point, whose cost is unknown, is paid from the share of the whole run, projected from the fraction of
    the training done (:meth:`observe`, :func:`.progress.training_progress`) at the pace since the first observation
    (after the first batch, so that its warm-up is not taken for the pace of the run), the shared seconds projected
    alike, or from ``other_s`` while no projection exists. It is tried once that share, less what the measure spent,
    is at least :data:`MIN_POINT_SECONDS`, and may take it (at most :data:`FIRST_POINT_SECONDS` more than the run
    has earned so far); the monitor first estimates it on an eighth of its probe and does not begin one estimated
    past that (:mod:`.calibration`, :meth:`first_point`). A measurement that runs past its :meth:`allowance` is
    stopped at its next chunk of work and logs nothing (:meth:`overran`); it counts twice the time it ran as its
    cost, so it is retried only once the share earned covers :data:`COST_MARGIN` times that. So a run of T seconds
    spends at most about ``max_overhead · T`` measuring, and each measure gets points in inverse proportion to its
    cost (none, with a warning, when one point costs more than its share of the run: ResNet-18 on 2 CPU cores in a
    2-minute run). With
    ``max_overhead=None`` every scheduled measure is taken, without time limit. The account is checkpointed, so a
    resumed run keeps it.

    Attributes:
        max_overhead: largest ratio of measuring time to the other wall time, > 0; ``None`` for no limit.
        measures: the measures that share the budget (none: one budget for all).
        measuring_s: seconds spent measuring so far, in all.
        other_s: seconds of the run outside measurements so far (up to the last :meth:`select` or measurement).
        spent_s: seconds spent so far on each measure.
        cost_s: the duration of each measure's last measurement, in seconds: the sum of its :meth:`measuring`
            blocks since the last :meth:`select` (one block per probe, when a measure is taken probe by probe); for a
            point that was stopped, or not begun, what it would need (:meth:`overran`).
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
    _first: set[str] = field(default_factory=set, repr=False)  # chosen at the last select without a cost

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
        share less what it spent, at most the :meth:`headroom` (:meth:`select` checked both cover
        :data:`COST_MARGIN` times its counted cost; it may always take that cost); for a first point, its share of
        the projected run less what it spent, at most the projected headroom, of which it borrows at most
        :data:`FIRST_POINT_SECONDS` beyond what the run has earned so far (so a first point at the end of a run may
        take its whole share); no limit without ``max_overhead``."""
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
        once the budget allows :data:`COST_MARGIN` times that (the allowance triples until a point completes; the
        time lost stays within the budget), or ``needed``, the least it would take, when known (stopped before a
        step estimated to overrun). Its other probes are left out of this measurement. A first point that the
        measures before it in this measurement left (almost) no allowance stays a first point (no cost is learnt
        from it)."""
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
            if cost is not None and spent + COST_MARGIN * cost <= share and COST_MARGIN * cost <= room:
                chosen.append(m)
                room -= COST_MARGIN * cost
            elif cost is None and min(whole - spent, whole_room) >= MIN_POINT_SECONDS:
                chosen.append(m)
        self._quiet_until = None if chosen else self._next_fit()
        self._first = {m for m in chosen if m not in self.cost_s}
        return chosen

    def first_point(self, measure: str) -> bool:
        """Whether ``measure`` was chosen at the last :meth:`select` without a known cost (its first point)."""
        return measure in self._first

    def _next_fit(self) -> float | None:
        """The least ``other_s`` at which some measure could fit again, when every measure has a cost (the shared
        seconds only grow, so none fits before); ``None`` when one has none (a first point to come)."""
        if self.max_overhead is None or not self.measures or any(m not in self.cost_s for m in self.measures):
            return None
        shared, spent, n = self._shared(), sum(self.spent_s.values()), len(self.measures)
        return min(max(n * (self.spent_s.get(m, 0.0) + COST_MARGIN * self.cost_s[m]), COST_MARGIN * self.cost_s[m]
                       + spent) + shared for m in self.measures) / self.max_overhead

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

    def over_time_warning(self, measure: str, what: str) -> str:
        """The warning that ``measure`` was not taken this time, ``what`` saying how it was stopped."""
        return (
            f"GeometryMonitor: {measure} was {what} (max_overhead={self.max_overhead}: a measure's first point may "
            f"take its share of the budget over the whole run, at most {FIRST_POINT_SECONDS:g} s, a later one its "
            "share so far); nothing is logged for it this time. It is retried once the run has trained long enough "
            "for that (no further warning); pass max_overhead=None or a schedule (every_n_epochs=...) to take every "
            "point whatever it costs, a larger max_overhead, or smaller probes"
        )

    def skip_warning(self, skipped: Sequence[str], step: int) -> str:
        """The warning that ``skipped`` were skipped at ``step`` to stay within the budget."""
        whole = self.share(projected=True)
        costs = ", ".join(
            f"{m} needs about {self.cost_s[m]:.2f} s a point" if m in self.cost_s else
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
