"""The measurement schedule: intervals, log-spaced steps, step 0, per-measure schedules, dedupe, state."""

from __future__ import annotations

import itertools
import math

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_geomdim.callback.overhead_budget import COST_MARGIN, FIRST_POINT_SECONDS, OverheadBudget
from lightning_geomdim.callback.progress import training_progress
from lightning_geomdim.callback.schedule import MeasurementSchedule, Schedule, is_log_spaced, log_spaced_steps
from lightning_geomdim.core.errors import MeasurementInterrupted, MeasurementOverTime
from lightning_geomdim.core.interrupt import checkpoint, interruptible, time_limit


def test_log_spaced_steps_are_rounded_powers_of_ten() -> None:
    assert log_spaced_steps(10, 130) == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 63, 79, 100, 126]
    assert log_spaced_steps(1, 10_000) == [1, 10, 100, 1000, 10_000]
    assert log_spaced_steps(4, 20) == [1, 2, 3, 6, 10, 18]
    # the explicit definition, for many densities and a long range
    for d in (1, 2, 3, 5, 7, 10, 20):
        expected = sorted({round(10 ** (k / d)) for k in range(0, 4 * d + 1)} & set(range(1, 10_001)))
        assert log_spaced_steps(d, 10_000) == expected
    assert not is_log_spaced(0, 10) and not is_log_spaced(-3, 10)


def test_log_spacing_is_dense_early_and_sparse_later() -> None:
    steps = log_spaced_steps(10, 100_000)
    assert steps[:5] == [1, 2, 3, 4, 5]
    # about per_decade points per factor of 10 once past the first decade
    for lo in (100, 1000, 10_000):
        assert len([s for s in steps if lo <= s < 10 * lo]) == 10
    assert math.isclose(steps[-2] / steps[-3], 10 ** 0.1, rel_tol=1e-3)


def test_due_per_event() -> None:
    s = Schedule(every_n_steps=3, every_n_epochs=2, log_spaced=None, at_start=True)
    assert s.due("start", step=0, epoch=0)
    assert not s.due("start", step=12, epoch=3)  # resuming: no second "step 0"
    assert [k for k in range(0, 10) if s.due("step", step=k, epoch=0)] == [3, 6, 9]
    assert [e for e in range(6) if s.due("epoch", step=0, epoch=e)] == [1, 3, 5]
    off = Schedule(every_n_steps=None, every_n_epochs=None, at_start=False)
    assert not any(off.due(ev, step=k, epoch=k) for ev in ("start", "step", "epoch") for k in range(20))
    logs = Schedule(every_n_epochs=None, log_spaced=4, at_start=False)
    assert [k for k in range(25) if logs.due("step", step=k, epoch=0)] == [1, 2, 3, 6, 10, 18]
    with pytest.raises(ValueError, match="unknown event"):
        s.due("batch", step=1, epoch=0)  # type: ignore[arg-type]
    # the authors' epochs, counted from 1, alone or besides an interval
    listed = Schedule(every_n_epochs=None, at_epochs=[280, 40, 80, 680, 40])  # type: ignore[arg-type]
    assert listed.at_epochs == (40, 80, 280, 680)
    assert [e + 1 for e in range(700) if listed.due("epoch", step=0, epoch=e)] == [40, 80, 280, 680]
    both = Schedule(every_n_epochs=300, at_epochs=(40,))
    assert [e + 1 for e in range(700) if both.due("epoch", step=0, epoch=e)] == [40, 300, 600]


@pytest.mark.parametrize(
    "kwargs", [{"every_n_steps": 0}, {"every_n_epochs": -1}, {"log_spaced": 2.5}, {"every_n_steps": True},
               {"at_start": "yes"}, {"at_epochs": [0, 4]}, {"at_epochs": 5}, {"at_epochs": [2.5]}],
)
def test_invalid_schedules_are_refused(kwargs: dict) -> None:
    with pytest.raises(MisconfigurationException, match="invalid"):
        Schedule(**kwargs)


def test_from_config_overrides_the_base() -> None:
    base = Schedule(every_n_steps=5, every_n_epochs=1, log_spaced=None, at_start=True)
    s = Schedule.from_config({"every_n_epochs": 3, "at_start": False}, base)
    assert s == Schedule(every_n_steps=5, every_n_epochs=3, log_spaced=None, at_start=False)
    assert Schedule.from_config({}, base) == base
    with pytest.raises(MisconfigurationException, match="unknown schedule keys"):
        Schedule.from_config({"every_n_batches": 3}, base)
    with pytest.raises(MisconfigurationException, match="must be a dict"):
        Schedule.from_config(3, base)  # type: ignore[arg-type]


def test_schedule_dedupes_steps_and_keeps_per_measure_schedules() -> None:
    schedule = MeasurementSchedule({
        "dimension": Schedule(every_n_steps=2, every_n_epochs=1),
        "flatness": Schedule(every_n_steps=None, every_n_epochs=2, at_start=False),
    })
    assert schedule.due("start", step=0, epoch=0) == ["dimension"]
    schedule.mark(["dimension"], 0)
    assert schedule.due("step", step=2, epoch=0) == ["dimension"]
    schedule.mark(["dimension"], 2)
    # the epoch ends at step 2: dimension already measured there, flatness not due in epoch 0
    assert schedule.due("epoch", step=2, epoch=0) == []
    # gradient accumulation: several batches end at the same global step
    assert schedule.due("step", step=2, epoch=0) == []
    assert schedule.due("epoch", step=5, epoch=1) == ["dimension", "flatness"]
    schedule.mark(["dimension", "flatness"], 5)

    restored = MeasurementSchedule({"dimension": Schedule(), "flatness": Schedule()})
    restored.load_state_dict(schedule.state_dict())
    assert restored.last_step == {"dimension": 5, "flatness": 5}
    assert restored.due("epoch", step=5, epoch=1) == []


class FakeTimer:
    """A time source that only moves when the test moves it: the budget's arithmetic, exactly."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def paced(clock: FakeTimer, *observed: tuple[float, float], max_overhead: float = 0.05) -> OverheadBudget:
    """A budget of two measures started now, then observing each (seconds later, fraction of the run done)."""
    budget = OverheadBudget(max_overhead, measures=("dimension", "flatness"), timer=clock)
    budget.start()
    for seconds, progress in observed:
        clock.now += seconds
        budget.observe(progress)
    return budget


def measure(budget: OverheadBudget, clock: FakeTimer, name: str | None, seconds: float) -> None:
    with budget.measuring(name):
        clock.now += seconds


def test_overhead_budget_shares_the_budget_among_the_measures() -> None:
    clock = FakeTimer()
    budget = OverheadBudget(0.1, measures=("dimension", "flatness"), timer=clock)
    budget.start()
    assert budget.select(["dimension", "flatness"]) == []  # first points wait for the run's length to be known
    assert budget.waiting(["dimension", "flatness"]) == ["dimension", "flatness"]
    clock.now = 0.5
    budget.observe(0.01)                               # the first batch (its warm-up) anchors the pace
    assert budget.select(["dimension"]) == [] and budget.projected_other_s() is None  # share 0.025 s so far
    clock.now = 10.0
    budget.observe(0.2)                                # 9.5 s for 19 %: 10 + 50 · 0.8 = 50 s in all
    assert budget.projected_other_s() == pytest.approx(50.0)  # each measure's share of the run: 0.1 · 50 / 2
    assert budget.select(["dimension", "flatness"]) == ["dimension", "flatness"]  # first points: costs unknown
    assert budget.allowance("dimension") == FIRST_POINT_SECONDS                   # 2.5 s, at most 2 s
    measure(budget, clock, "dimension", 2.0)
    measure(budget, clock, "flatness", 1.0)
    measure(budget, clock, None, 1.0)                 # writing the logs: measuring time of no measure
    clock.now += 36.0
    # other 46 s: each measure may have spent (0.1 · 46 − 1) / 2 = 1.8 s; dimension 2 + 2, flatness 1 + 1
    assert budget.select(["dimension", "flatness"]) == []
    assert (budget.measuring_s, budget.other_s, budget.share()) == (4.0, 46.0, pytest.approx(1.8))
    clock.now += 4.0                                  # share 2.0 ≥ 1 + 1, but not with room for a slower point
    assert budget.select(["dimension", "flatness"]) == [] and COST_MARGIN == 1.5
    clock.now += 10.0
    assert budget.select(["dimension", "flatness"]) == ["flatness"]  # share 2.5: 1 + 1.5 · 1 fits, 2 + 1.5 · 2 not
    assert budget.allowance("flatness") == pytest.approx(1.5)
    measure(budget, clock, "flatness", 1.5)
    assert budget.spent_s == {"dimension": 2.0, "flatness": 2.5} and budget.cost_s["flatness"] == 1.5

    state = budget.state_dict()
    assert state == {"measuring_s": 5.5, "other_s": 60.0, "spent_s": {"dimension": 2.0, "flatness": 2.5},
                     "cost_s": {"dimension": 2.0, "flatness": 1.5}}
    resumed = OverheadBudget(0.2, measures=("dimension", "flatness"), timer=FakeTimer())
    resumed.load_state_dict(state)
    resumed.start()                                   # the account goes on: (0.2 · 60 − 1) / 2 = 5.5 ≥ 2 + 1.5 · 2
    assert resumed.select(["dimension"]) == ["dimension"] and resumed.other_s == 60.0


def test_overhead_budget_cheap_measures_do_not_starve_expensive_ones() -> None:
    """Epochs of 13 ms, all three measures due every epoch, costs 60 ms / 390 ms / 10 ms: each measure gets
    points in inverse proportion to its cost, and the whole stays within the budget plus the first points."""
    clock, costs = FakeTimer(), {"dimension": 0.06, "flatness": 0.39, "alignment": 0.01}
    budget = OverheadBudget(0.05, measures=tuple(costs), timer=clock)
    budget.start()
    points = dict.fromkeys(costs, 0)
    for epoch in range(100_000):
        clock.now += 0.013
        budget.observe((epoch + 1) / 100_000)
        for name in budget.select(list(costs)):
            points[name] += 1
            measure(budget, clock, name, costs[name])
    assert min(points.values()) > 50
    for name, cost in costs.items():  # each measure spent its share, ≈ 0.05 · 1300 s / 3
        assert points[name] * cost == pytest.approx(0.05 * budget.other_s / 3, rel=0.02), name
    assert budget.measuring_s <= 0.05 * budget.other_s + sum(costs.values())


def test_quiet_means_select_would_choose_nothing() -> None:
    """After a selection that chose nothing, the budget knows without selecting until when nothing can fit (the
    monitor's check at every epoch is then one comparison); it is never quiet when a measure would fit."""
    clock, costs = FakeTimer(), {"dimension": 0.06, "flatness": 0.39, "alignment": 0.01}
    budget = OverheadBudget(0.05, measures=tuple(costs), timer=clock)
    budget.start()
    quiet = 0
    for epoch in range(20_000):
        clock.now += 0.013
        budget.observe((epoch + 1) / 20_000)
        with budget.measuring():
            clock.now += 0.0001                          # the hook's own time: shared seconds grow
            was_quiet = budget.quiet()
            chosen = budget.select(list(costs))
        assert not (was_quiet and chosen), epoch
        quiet += was_quiet
        for name in chosen:
            measure(budget, clock, name, costs[name])
    assert quiet > 15_000                                # most epochs: nothing fits, and it is known at once
    assert not OverheadBudget(0.05, measures=("dimension",)).quiet()  # no cost yet: a first point to come


def test_overhead_budget_none_takes_everything_and_bad_values_are_refused() -> None:
    budget = OverheadBudget(None, cost_s={"dimension": 1e9})
    budget.start()
    assert budget.select(["dimension", "alignment"]) == ["dimension", "alignment"]
    for bad in (0, -0.1, math.inf, math.nan, True, "0.1"):
        with pytest.raises(MisconfigurationException, match="max_overhead"):
            OverheadBudget(bad)  # type: ignore[arg-type]


def test_a_measure_taken_probe_by_probe_costs_the_sum_of_its_blocks() -> None:
    """The monitor times the dimension once per probe: its cost is the sum of its blocks since the last select."""
    clock = FakeTimer()
    budget = OverheadBudget(0.1, measures=("dimension", "flatness"), timer=clock)
    budget.start()
    budget.select(["dimension", "flatness"])
    measure(budget, clock, "dimension", 2.0)   # probe "train"
    measure(budget, clock, "flatness", 1.0)    # on "train" too
    measure(budget, clock, "dimension", 3.0)   # probe "random"
    assert budget.cost_s == {"dimension": 5.0, "flatness": 1.0} and budget.spent_s == budget.cost_s
    clock.now += 100.0
    budget.select(["dimension"])               # a new measurement: costs start afresh
    measure(budget, clock, "dimension", 4.0)
    assert budget.cost_s == {"dimension": 4.0, "flatness": 1.0} and budget.spent_s["dimension"] == 9.0


def test_a_measures_allowance_counts_only_its_own_blocks() -> None:
    """Taken probe by probe, a measure's allowance is spent by its own blocks only: the other measures' blocks
    between them (flatness on the first probe, before the dimension on the second) are theirs. A GRU's dimension
    was stopped on its second probe at "-0.566 s" because flatness had spent its clock."""
    clock = FakeTimer()
    budget = paced(clock, (5.0, 0.05), (5.0, 0.1))     # projected run 100 s: first points may take 2 s
    assert budget.select(["dimension", "flatness"]) == ["dimension", "flatness"]
    assert budget.remaining("dimension") == pytest.approx(2.0)
    measure(budget, clock, "dimension", 0.5)          # probe "train"
    measure(budget, clock, "flatness", 1.9)
    assert budget.remaining("dimension") == pytest.approx(1.5) and budget.allowed("dimension") == 2.0
    measure(budget, clock, "dimension", 1.6)          # probe "random": past what was left
    assert budget.remaining("dimension") == 0.0
    with pytest.raises(MeasurementOverTime, match="stopped at its time allowance of 2 s"), time_limit(
            0.0, timer=clock, allowance=2.0):
        clock.now += 0.01
        checkpoint()


def test_a_stop_before_an_uninterruptible_step_counts_the_earlier_probes() -> None:
    """Stopped on its second probe before a step estimated to overrun, a measure needs its earlier probes' time too:
    counting only the last probe's block set its cost too low, and every retry stopped at the same step (a review's
    simulation: 320 attempts, no point)."""
    from lightning_geomdim.core.interrupt import machine_flops

    clock = FakeTimer()
    budget = OverheadBudget(0.05, measures=("dimension",), timer=clock, cost_s={"dimension": 40.0})
    budget.start()
    clock.now = 2000.0
    budget.observe(0.5)
    assert budget.select(["dimension"]) == ["dimension"] and budget.remaining("dimension") == pytest.approx(100.0)
    measure(budget, clock, "dimension", 30.0)                       # probe "train"
    left = budget.remaining("dimension")
    with pytest.raises(MeasurementOverTime) as stop, budget.measuring("dimension"), time_limit(
            left, timer=clock, allowance=budget.allowed("dimension")):
        clock.now += 1.0                                             # probe "random", then a 100-second step
        checkpoint(flops=100.0 * machine_flops())
    assert stop.value.needed == pytest.approx(131.0, rel=1e-6)
    budget.overran("dimension", stop.value.needed)
    assert budget.cost_s["dimension"] == pytest.approx(131.0, rel=1e-6)


def test_a_first_point_left_no_allowance_stays_a_first_point() -> None:
    clock = FakeTimer()
    budget = paced(clock, (5.0, 0.05), (5.0, 0.1))     # projected run 100 s: 2.5 s each, 5 s in all
    assert budget.select(["dimension", "flatness"]) == ["dimension", "flatness"]
    measure(budget, clock, "dimension", 5.2)           # ran past its share: nothing left for flatness
    assert budget.remaining("flatness") == 0.0
    with pytest.raises(MeasurementOverTime), budget.measuring("flatness"), time_limit(0.0, timer=clock):
        clock.now += 0.001
        checkpoint()
    budget.overran("flatness")
    assert "flatness" not in budget.cost_s and budget.stopped == {"flatness"}  # not "a 2 ms measure"


def test_a_point_is_stopped_at_its_allowance_and_retried_with_twice_the_time() -> None:
    """The first point of a measure may take its share of the projected run, at most FIRST_POINT_SECONDS; one stopped
    there counts twice what it ran, is retried when the budget allows that, with what is left of its share: the
    allowance doubles until a point fits, and the time lost is counted in the budget (never more than the share)."""
    clock = FakeTimer()
    budget = OverheadBudget(0.05, measures=("dimension",), timer=clock)
    budget.start()
    clock.now = 5.0
    budget.observe(0.05)
    clock.now = 10.0
    budget.observe(0.1)                                # projected run 100 s: share 5 s, allowance at most 2 s
    assert budget.select(["dimension"]) == ["dimension"]
    assert budget.allowance("dimension") == FIRST_POINT_SECONDS == budget.remaining("dimension")
    with pytest.raises(MeasurementOverTime), budget.measuring("dimension"), time_limit(
            budget.remaining("dimension"), timer=clock):
        clock.now += FIRST_POINT_SECONDS + 0.5  # the engine reaches its next chunk of work after 2.5 s
        checkpoint()
    budget.overran("dimension")
    assert budget.stopped == {"dimension"} and budget.cost_s["dimension"] == 2 * 2.5
    clock.now += 10.0
    assert budget.select(["dimension"]) == [] and budget.stopped == set()  # share 1 s < 2.5 + 1.5 · 5
    clock.now += 180.0                                                     # share 10 s ≥ 2.5 + 1.5 · 5: retried
    assert budget.select(["dimension"]) == ["dimension"]
    assert budget.allowance("dimension") == 10 - 2.5 == COST_MARGIN * budget.cost_s["dimension"]  # its share's rest
    assert OverheadBudget(None).allowance("dimension") == math.inf


def test_a_measure_past_its_share_leaves_the_others_less() -> None:
    """A point runs to its next chunk of work past its allowance: the run as a whole still keeps to max_overhead,
    because the others are taken only from what all measures together have left (their headroom)."""
    clock = FakeTimer()
    budget = OverheadBudget(0.1, measures=("dimension", "flatness"), timer=clock)
    budget.start()
    budget.select(["dimension", "flatness"])
    measure(budget, clock, "flatness", 2.0)
    measure(budget, clock, "dimension", 8.0)         # ran far past its share, e.g. an uninterruptible step
    clock.now += 100.0                               # other 100 s: shares 5 s each, 10 s in all, 10 s spent
    budget.observe(None)
    assert budget.share() == pytest.approx(5.0) and budget.headroom() == pytest.approx(0.0)
    assert budget.select(["flatness"]) == []         # its own share has room (2 + 2 ≤ 5), the run has none
    clock.now += 20.0                                # shares 6 s: 12 s in all, 2 s left, < 1.5 · 2
    assert budget.select(["flatness", "dimension"]) == []
    clock.now += 20.0                                # shares 7 s: 14 s in all, 4 s left
    assert budget.select(["flatness", "dimension"]) == ["flatness"]
    assert budget.allowance("flatness") == pytest.approx(4.0)  # its share has 7 − 2 left, the run only 4
    measure(budget, clock, "flatness", 2.0)
    assert budget.measuring_s <= 0.1 * budget.other_s
    budget.share_among(["flatness"])                 # dimension dropped: its 8 s still count
    assert budget.headroom() == pytest.approx(0.1 * budget.other_s - budget.measuring_s)
    assert OverheadBudget(None).headroom() == math.inf


def test_a_later_point_slower_than_the_last_is_not_stopped() -> None:
    """A point is taken once its share has room for COST_MARGIN times its last cost: one 40 % slower (a loaded
    machine) completes within its allowance, where one taken at exactly its last cost would have been stopped."""
    clock = FakeTimer()
    budget = OverheadBudget(0.05, measures=("alignment",), timer=clock, cost_s={"alignment": 0.5})
    budget.start()
    waited = 0
    while not budget.select(["alignment"]):
        clock.now += 0.5
        waited += 1
    assert budget.share() == pytest.approx(0.75) and waited == 30   # 0.05 · 15 s: room for 1.5 × 0.5 s
    with budget.measuring("alignment"), time_limit(budget.remaining("alignment"), timer=clock):
        clock.now += 0.7
        checkpoint()                                 # 0.7 s < 0.75 s: not stopped
    assert budget.cost_s["alignment"] == pytest.approx(0.7) and budget.stopped == set()


def test_a_first_point_waits_for_a_share_of_the_run_and_never_takes_more() -> None:
    """Without the run's length a first point waits until the share earned reaches MIN_POINT_SECONDS; with it, a
    share of the whole run below that is never tried (the warning's case), and a small one bounds the allowance."""
    clock = FakeTimer()
    budget = OverheadBudget(0.05, measures=("dimension", "flatness"), timer=clock)
    budget.start()
    clock.now = 1.9                                    # unknown length: share 0.05 · 1.9 / 2 < 0.05
    assert budget.select(["dimension"]) == [] and budget.waiting(["dimension"]) == ["dimension"]
    clock.now = 2.1                                    # share 0.0525 ≥ 0.05: tried with what the run has earned
    assert budget.select(["dimension"]) == ["dimension"]
    assert budget.allowance("dimension") == pytest.approx(0.0525)
    short = paced(clock, (0.25, 0.25), (0.25, 0.5))    # a 1-second run: share 0.025 s, never tried, not waiting
    assert short.select(["flatness"]) == [] and short.waiting(["flatness"]) == []
    assert "flatness's share of the whole run is 0.03 s" in short.skip_warning(["flatness"], 3)
    clock.now += 1.5
    short.observe(0.75)                                # slower: 2 + 3.5 · 0.25 = 2.875 s, share 0.072 s
    assert short.select(["flatness"]) == ["flatness"]
    assert short.allowance("flatness") == pytest.approx(0.05 * 2.875 / 2)


def test_time_limit_keeps_the_enclosing_check() -> None:
    clock, stop = FakeTimer(), [False]
    with interruptible(lambda: stop[0]), time_limit(1.0, timer=clock):
        checkpoint()                       # within the limit, no SIGTERM
        stop[0] = True
        with pytest.raises(MeasurementInterrupted) as info:
            checkpoint()
        assert not isinstance(info.value, MeasurementOverTime)  # SIGTERM, not the time limit
    with time_limit(math.inf):
        clock.now += 1e9
        checkpoint()                       # no limit


class ProgressRecorder(L.Callback):
    """Records training_progress at each hook the monitor measures at."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float | None]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen.append(("start", training_progress(trainer, "start")))

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.seen.append(("step", training_progress(trainer, "step", args[-1])))  # type: ignore[arg-type]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen.append(("epoch", training_progress(trainer, "epoch")))
        trainer.should_stop = trainer.should_stop or trainer.max_epochs == -1  # end an endless run after one epoch


def test_a_wall_time_bound_counts_the_measurements_in_the_wall_time() -> None:
    """``max_time`` bounds the wall time, measurements included: the fraction is of the other seconds, those to come
    at least the remaining wall time less what the budget lets the measurements take."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer

    timer = Timer(duration={"minutes": 2})
    timer.time_elapsed = lambda *args: 60.0  # type: ignore[method-assign]
    timer.time_remaining = lambda *args: 60.0  # type: ignore[method-assign]
    trainer = SimpleNamespace(callbacks=[timer], max_epochs=-1, num_training_batches=math.inf, max_steps=-1,
                              global_step=0, current_epoch=0)
    assert training_progress(trainer, "step", 0) == pytest.approx(0.5)
    done = training_progress(trainer, "step", 0, measuring_s=3.0, max_overhead=0.05)
    assert done == pytest.approx(57 / (57 + 60 / 1.05))
    # the budget's projection from there: 57 s of other seconds so far, ≈ 114.1 s in all, not 120 s
    assert 57 / done == pytest.approx(57 + 60 / 1.05)


@pytest.mark.parametrize(("limits", "expected"), [
    ({"max_epochs": 2}, [("start", None), ("step", 1 / 6), ("step", 2 / 6), ("step", 3 / 6), ("epoch", 0.5),
                         ("step", 4 / 6), ("step", 5 / 6), ("step", 1.0), ("epoch", 1.0)]),
    ({"max_epochs": 10, "max_steps": 4}, [("start", None), ("step", 0.25), ("step", 0.5), ("step", 0.75),
                                          ("epoch", 0.75), ("step", 1.0), ("epoch", 1.0)]),  # max_steps ends first
    ({"max_epochs": -1, "max_steps": -1}, None),  # an endless run: no length known
    ({"max_time": {"hours": 1}}, "timer"),  # max_time: the fraction of the hour elapsed (max_epochs is then -1)
])
def test_training_progress_follows_a_real_trainer(tmp_path, limits: dict, expected: list | None) -> None:
    recorder = ProgressRecorder()
    trainer = L.Trainer(default_root_dir=tmp_path, limit_train_batches=3, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder], **limits)
    trainer.fit(BoringModel())
    if expected == "timer":  # seconds of an hour: small, positive, increasing; one epoch, then stopped
        fractions = [p for e, p in recorder.seen if e != "start"]
        assert recorder.seen[0] == ("start", None) and len(fractions) == 4
        assert all(0 < a < b < 1e-2 for a, b in itertools.pairwise(fractions))
        return
    if expected is None:
        assert len(recorder.seen) == 5 and {p for _, p in recorder.seen} == {None}
        return
    assert [(e, pytest.approx(p) if p else p) for e, p in recorder.seen] == expected


def test_a_first_points_share_counts_the_shared_time_still_to_come() -> None:
    """The hooks of every batch to come are measuring time too: the whole-run share subtracts the shared seconds
    projected at their pace since the anchor, as the other seconds are projected."""
    clock = FakeTimer()
    budget = OverheadBudget(0.1, measures=("dimension", "flatness"), timer=clock)
    budget.start()
    clock.now = 1.0
    budget.observe(0.1)                  # anchor: 1 s of training, no shared time yet
    measure(budget, clock, None, 0.02)   # 0.02 s of hooks over the next 10 % of the run
    clock.now = 1.82
    budget.observe(0.2)
    assert budget.projected_other_s() == pytest.approx(1.8 + 8.0 * 0.8)  # 8.2 s of training in all
    # shared: 0.02 s so far + 0.2 s per unit of progress x 0.8 to come = 0.18 s
    assert budget.share(projected=True) == pytest.approx((0.1 * 8.2 - 0.18) / 2)


def test_a_first_point_at_the_end_of_a_run_may_take_its_whole_share() -> None:
    """A first point borrows at most FIRST_POINT_SECONDS beyond what the run has earned: early in a long run that is
    2 s, at the end of a one-epoch run (the only event) its whole share."""
    clock = FakeTimer()
    # the first batch anchors the pace; the end of the only epoch of an hour: share 0.05 · 3600 / 2 = 90 s
    budget = paced(clock, (10.0, 0.01), (3590.0, 1.0))
    assert budget.select(["dimension"]) == ["dimension"]
    assert budget.allowance("dimension") == pytest.approx(90.0)
    early = paced(clock, (10.0, 0.01), (36.0, 0.02))  # 1 % more in 36 s: an hour in all, 0.9 s earned so far
    assert early.allowance("dimension") == FIRST_POINT_SECONDS
