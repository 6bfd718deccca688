"""Exceptions raised by lightning_geomdim.

Every message names the problem and the fix. The classes also derive from the built-in exception a
caller would expect (``ValueError``, ``MemoryError``) so generic handlers keep working.
"""

from __future__ import annotations


class GeometryError(Exception):
    """Base class of the errors raised by lightning_geomdim."""


class ProbeError(GeometryError, ValueError):
    """The probe batch cannot be evaluated by the model (empty, wrong shape, wrong type)."""


class NonFiniteError(GeometryError, FloatingPointError):
    """Parameters or outputs contain NaN or inf, so no rank or curvature is meaningful."""


class MemoryBudgetError(GeometryError, MemoryError):
    """The computation would need more memory than the budget allows; raised before allocating."""


class NotApplicableError(GeometryError, ValueError):
    """The measure is not defined for this model (e.g. linear regions of a network without ReLUs)."""
