"""A dimension's first point, estimated before it is taken: the measure on the first eighth of its first probe.

A measure's first point has no known cost. Taken at once, a point that does not fit its time allowance is stopped
there and its time is lost: on the MNIST example (a 6-second run) the dimension's and the flatness's first points
took 2 % of the run and logged nothing. So a first point of the dimension (:data:`ESTIMATED`) is first taken on
the first ``N // CALIBRATION_FRACTION`` samples of its first probe (N samples; nothing of it is logged, and its
warnings are not shown), and the whole point is estimated as that time × N / n × the number of probes it is taken
on. Work that grows at least linearly with the samples (the forward and backward passes; a Gram's products grow
faster) makes this a lower bound; the fixed costs that dominate a small model make it an overestimate, so that
such a point waits for a larger share. A point estimated past its allowance is not begun: the estimate becomes its
cost (:meth:`.OverheadBudget.overran`), so it is tried once the budget allows that much (with its margin,
:data:`.COST_MARGIN`), with one warning.

Part of the Lightning layer.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace

from lightning_geomdim.callback.error_policy import ErrorPolicy
from lightning_geomdim.callback.overhead_budget import OverheadBudget
from lightning_geomdim.callback.probes import Probe

#: A first point is estimated from the measure on 1 / CALIBRATION_FRACTION of its first probe's samples.
CALIBRATION_FRACTION = 8
#: The measures whose first point is estimated: those whose cost shrinks with the probe. The dimension's engines grow
#: with its rows (a Gram's products faster than linearly). Flatness repeats the same number of Hessian-vector
#: products whatever the probe, so its small point costs about as much as a whole one on a small model (0.05 s on
#: MNIST), and one product on ResNet-18 cannot be interrupted for seconds (its small point ran 6 s past a 1.9 s
#: allowance); alignment costs milliseconds.
ESTIMATED = ("dimension",)


class _Quiet(ErrorPolicy):
    """The error policy of a calibration: failures give NaN, nothing is warned (the point itself will say)."""

    def warn_once(self, cause: Hashable, message: object, category: type[Warning] = UserWarning) -> None:
        self.warned.add(cause)


def calibrate_first_points(
    steps: Sequence[tuple[Probe | None, Sequence[str]]], budget: OverheadBudget, policy: ErrorPolicy,
    take: Callable[[Probe, str, ErrorPolicy], None],
) -> None:
    """Estimate each first point due in ``steps`` ((probe, measures) in the order they are taken) before it is
    taken, and stop those estimated past their allowance (module docstring).

    ``take(probe, measure, policy)``: the measure on ``probe`` as the monitor takes it (timed as the measure's time,
    within its allowance; its values discarded).
    """
    for measure in ESTIMATED:
        on = [probe for probe, measures in steps if probe is not None and measure in measures]
        if not on or not budget.first_point(measure) or measure in budget.stopped:
            continue
        samples = on[0].num_samples
        n = samples // CALIBRATION_FRACTION
        if n < 1:
            continue
        small = replace(on[0], state=dict(on[0].state), fit_memory=False)
        small.keep_first(n)
        quiet, before = _Quiet("warn"), budget.spent_s.get(measure, 0.0)
        take(small, measure, quiet)
        took = budget.spent_s.get(measure, 0.0) - before
        if measure in budget.stopped:  # even the small point ran past the allowance
            policy.warn_once(("over time", measure), budget.over_time_warning(
                measure, f"stopped at its time allowance of {budget.allowed(measure):.3g} s on a point on {n} of its "
                f"{samples} samples, taken to estimate its cost"))
            continue
        if quiet.failures or quiet.not_applicable:
            continue  # the point itself fails alike and says why
        estimate = took * samples / n * len(on)
        if estimate > budget.remaining(measure):
            budget.overran(measure, needed=took + estimate)
            policy.warn_once(("over time", measure), budget.over_time_warning(
                measure, f"not begun: on {n} of its {samples} samples it took {took:.3g} s, so a point on {len(on)} "
                f"probe(s) would take about {estimate:.3g} s, past its time allowance of "
                f"{budget.allowed(measure):.3g} s"))
