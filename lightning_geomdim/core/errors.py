"""Exceptions raised by lightning_geomdim.

Every message names the problem and the fix. The classes also derive from the built-in exception a
caller would expect (``ValueError``, ``MemoryError``) so generic handlers keep working.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class GeometryError(Exception):
    """Base class of the errors raised by lightning_geomdim."""


class ProbeError(GeometryError, ValueError):
    """The probe batch cannot be evaluated by the model (empty, wrong shape, wrong type)."""


class NonFiniteError(GeometryError, FloatingPointError):
    """Parameters or outputs contain NaN or inf, so no rank or curvature is meaningful."""


@dataclass(frozen=True)
class Remedy:
    """One way for a computation to need less memory: ``text``, with ``{arg}`` where the name of the argument
    that applies it goes; ``argument``: that argument's name in the core function (None: no argument needed)."""

    text: str
    argument: str | None = None

    def render(self, names: Mapping[str, str] | None = None) -> str | None:
        """The text with the argument's name (renamed by ``names`` when given; None when ``names`` lacks it)."""
        if self.argument is None:
            return self.text
        name = self.argument if names is None else names.get(self.argument)
        return None if name is None else self.text.format(arg=name)


class MemoryBudgetError(GeometryError, MemoryError):
    """The computation would need more memory than the budget allows; raised before allocating.

    Attributes:
        what: the computation and its sizes; ``needed`` / ``budget``: the two amounts, formatted.
        remedies: the ways to need less, each with the argument that applies it.
    """

    def __init__(self, what: str, needed: str, budget: str, remedies: Sequence[Remedy] = (),
                 names: Mapping[str, str] | None = None) -> None:
        self.what, self.needed, self.budget, self.remedies = what, needed, budget, tuple(remedies)
        texts = [t for t in (r.render(names) for r in self.remedies) if t is not None]
        raise_budget = (names or {}).get("max_memory_bytes", "max_memory_bytes")
        fixes = "; ".join([*texts, f"or raise the budget with {raise_budget}=... / GEOMDIM_MAX_MEMORY_BYTES"])
        super().__init__(f"{what} needs about {needed} but the memory budget is {budget}: {fixes}")

    def rephrased(self, names: Mapping[str, str]) -> MemoryBudgetError:
        """The same refusal for another interface: each remedy's argument renamed by ``names``, and the remedies
        whose argument it does not accept left out (e.g. the callback has no ``chunk_size``)."""
        return MemoryBudgetError(self.what, self.needed, self.budget, self.remedies, names)


class MeasurementInterrupted(GeometryError):
    """A measurement stopped between two chunks of work because its caller asked (:mod:`.interrupt`)."""


class MeasurementOverTime(MeasurementInterrupted):
    """A measurement stopped between two chunks of work because it used up its time allowance
    (:func:`~lightning_geomdim.core.interrupt.time_limit`), or before a step that would have overrun it.

    Attributes:
        needed: seconds the measurement would have taken at least (what it ran plus the step's estimate), when
            known; ``None`` when it was stopped at the allowance.
    """

    def __init__(self, message: str, needed: float | None = None) -> None:
        super().__init__(message)
        self.needed = needed


class NotApplicableError(GeometryError, ValueError):
    """The measure is not defined for this model (e.g. linear regions of a network without ReLUs)."""
