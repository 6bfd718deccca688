"""What the monitor does when a measure fails: the ``on_error`` policy, and one warning per cause.

A measure that fails (NaN/inf parameters or outputs, a probe over the memory budget, a forward that raises, an
output that is not a tensor without ``output_fn``) warns with the reason and the remedy and logs NaN under its
keys, and training continues; the next measurement starts afresh. ``on_error="raise"`` stops the run instead
with a :class:`~lightning_geomdim.core.errors.GeometryError`. A measure that does not apply to the model
(:class:`~lightning_geomdim.core.errors.NotApplicableError`: linear regions and alignment without ``nn.ReLU`` /
``nn.LeakyReLU`` modules) warns once and logs nothing. Every warning is given once per cause, not once per
measured point, and from rank 0 only.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Hashable
from typing import Literal

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_geomdim.core.errors import GeometryError, MeasurementInterrupted, MemoryBudgetError, NotApplicableError

OnError = Literal["warn", "raise"]
ON_ERROR: tuple[str, ...] = ("warn", "raise")


#: The core functions' arguments that GeometryMonitor exposes, by its name for them: a memory refusal's remedies are
#: phrased with these, and those needing another argument (``chunk_size``, ``method``, ``lanczos_basis``) left out.
MONITOR_ARGUMENTS = {
    "params": "params", "engine": "engine", "trace_samples": "flatness_trace_samples", "measures": "measures",
    "max_memory_bytes": "max_memory_bytes",
}


def primary_key(measure: str, probe: str) -> str:
    """The key logged as NaN for a measure that failed before any of its keys was known."""
    return {
        "dimension": f"geometry/{probe}/batch_functional_dimension",
        "linear_regions": f"geometry/{probe}/linear_regions",
        "flatness": "geometry/flatness/max_eigenvalue",
        "alignment": "geometry/alignment/num_clusters",
    }[measure]


class ErrorPolicy:
    """Run measures under the ``on_error`` policy, and warn once per cause.

    Attributes:
        on_error: ``"warn"`` (warn, log NaN, go on) or ``"raise"``.
        failures: ``(measure, probe)`` → the exception, for the measurement in progress only (:meth:`clear` drops
            them: their tracebacks hold the measurement's tensors alive).
        known_keys: the keys each ``(measure, probe)`` logged when it last succeeded: those logged as NaN on failure.
        warned: the causes already warned about.
        not_applicable: the measures found not applicable to the model (a property of its modules).
    """

    def __init__(self, on_error: OnError = "warn") -> None:
        self.on_error = on_error
        self.failures: dict[tuple[str, str], Exception] = {}
        self.known_keys: dict[tuple[str, str], set[str]] = {}
        self.warned: set[Hashable] = set()
        self.not_applicable: set[str] = set()

    def clear(self) -> None:
        self.failures = {}

    def warn_once(
        self, cause: Hashable, message: str | Callable[[], str], category: type[Warning] = UserWarning
    ) -> None:
        """Warn about ``cause`` the first time only; ``message`` may be a callable, called only then."""
        if cause not in self.warned:
            self.warned.add(cause)
            rank_zero_warn(message() if callable(message) else message, category=category)

    def attempt(self, measure: str, probe: str, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
        """Run one measure; on failure warn and return NaN for its keys, or raise when on_error="raise"."""
        known = self.known_keys.setdefault((measure, probe), set())
        try:
            values = fn()
        except MeasurementInterrupted:  # the trainer is stopping: not a failure of the measure
            raise
        except NotApplicableError as err:
            # a property of the model: one warning, whatever the probe
            self.not_applicable.add(measure)
            self.warn_once(("not applicable", measure),
                           f"GeometryMonitor: {measure} is not applicable, so it is not logged: {err}")
            return {}
        except Exception as err:
            # the traceback's frames hold the measure's locals (the probe's graph, Grams): drop them, keep the error
            traceback.clear_frames(err.__traceback__)
            if isinstance(err, MemoryBudgetError):  # remedies in the monitor's own arguments
                err = err.rephrased(MONITOR_ARGUMENTS)
            self.failures[(measure, probe)] = err
            where = measure if measure == probe else f"{measure} on probe {probe!r}"
            if self.on_error == "raise":
                raise GeometryError(f"GeometryMonitor: {where} failed: {type(err).__name__}: {err}") from err
            self.warn_once(
                ("failed", measure, probe, type(err).__name__),
                f"GeometryMonitor: {where} failed and is logged as NaN ({type(err).__name__}: {err}). Training "
                "continues (later failures of this kind are logged as NaN without a warning); pass "
                "on_error='raise' to stop on such errors",
                category=RuntimeWarning,
            )
            return dict.fromkeys(sorted(known or {primary_key(measure, probe)}), math.nan)
        known.update(values)
        return values
