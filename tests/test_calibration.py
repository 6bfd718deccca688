"""A first point is estimated from the measure on the first eighth of its first probe before it is taken; one
estimated past its time allowance is not begun (its estimate becomes its cost)."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_schedule import FakeTimer, paced

from lightning_geomdim.callback.calibration import CALIBRATION_FRACTION, calibrate_first_points
from lightning_geomdim.callback.error_policy import ErrorPolicy
from lightning_geomdim.callback.overhead_budget import OverheadBudget
from lightning_geomdim.callback.probes import Probe


def probe(name: str, samples: int = 64) -> Probe:
    return Probe(name=name, source="train", x=torch.randn(samples, 3), y=torch.zeros(samples), state={})


def taker(clock: FakeTimer, budget: OverheadBudget, per_sample: dict[str, float], seen: list) -> object:
    """The measure on a probe as the monitor times it: ``per_sample`` seconds for each of its samples."""

    def take(p: Probe, measure: str, policy: ErrorPolicy) -> None:
        seen.append((p.name, measure, p.num_samples))
        budget.remaining(measure)  # the monitor's timed block asks first: this measurement's allowance is fixed
        with budget.measuring(measure):
            clock.now += per_sample[measure] * p.num_samples

    return take


def test_a_first_point_estimated_past_its_allowance_is_not_begun() -> None:
    clock = FakeTimer()
    budget = paced(clock, (5.0, 0.05), (5.0, 0.1))   # projected run 100 s: first points may take 2 s
    steps = [(probe("train"), ["dimension", "flatness"]), (probe("random"), ["dimension"])]
    assert budget.select(["dimension", "flatness"]) == ["dimension", "flatness"]
    seen: list = []
    policy = ErrorPolicy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # dimension: 8 samples in 0.16 s → 2 probes × 64 samples ≈ 2.56 s > 2 − 0.16
        calibrate_first_points(steps, budget, policy, taker(clock, budget, {"dimension": 0.02, "flatness": 0.01},
                                                             seen))
    assert seen == [("train", "dimension", 64 // CALIBRATION_FRACTION)]  # flatness: not estimated (ESTIMATED)
    assert budget.stopped == {"dimension"}
    assert budget.cost_s["dimension"] == pytest.approx(0.16 + 2.56)  # what it took and its estimate
    assert budget.spent_s == pytest.approx({"dimension": 0.16})
    assert budget.remaining("flatness") == pytest.approx(2.0)  # taken as it is
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "dimension was not begun: on 8 of its 64 samples it took 0.16 s" in messages[0]
    assert "would take about 2.56 s, past its time allowance of 2 s" in messages[0]


def test_only_first_points_of_large_enough_probes_are_estimated() -> None:
    clock = FakeTimer()
    budget = paced(clock, (5.0, 0.05), (5.0, 0.1))
    budget.cost_s["dimension"] = 0.1                   # a dimension with a cost: no estimate
    assert budget.select(["dimension"]) == ["dimension"]
    seen: list = []
    take = taker(clock, budget, {"dimension": 0.001}, seen)
    calibrate_first_points([(probe("train"), ["dimension"])], budget, ErrorPolicy(), take)
    assert seen == []
    del budget.cost_s["dimension"]
    assert budget.select(["dimension"]) == ["dimension"]
    calibrate_first_points([(probe("train", CALIBRATION_FRACTION - 1), ["dimension"])], budget, ErrorPolicy(), take)
    assert seen == []                                  # 7 samples: no eighth to take
    calibrate_first_points([(None, ["alignment"]), (probe("train"), ["dimension", "flatness"])], budget,
                           ErrorPolicy(), take)
    assert seen == [("train", "dimension", 8)] and budget.stopped == set()
    unlimited = OverheadBudget(None, measures=("dimension",))
    unlimited.start()
    assert unlimited.select(["dimension"]) == ["dimension"] and not unlimited.first_point("dimension")
