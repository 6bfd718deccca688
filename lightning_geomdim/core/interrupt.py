"""Cooperative interruption of long measurements.

A caller that must be able to stop a measurement (the callback, when the trainer receives SIGTERM) installs a check
with :func:`interruptible`; the engines call :func:`checkpoint` between chunks of work (batched backward passes,
Hessian-vector products, exact draws, elimination panels, Gram blocks), and it raises
:class:`~lightning_geomdim.core.errors.MeasurementInterrupted` once the check is true. Without a check installed a
checkpoint costs one context-variable read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from lightning_geomdim.core.errors import MeasurementInterrupted

_CHECK: ContextVar[Callable[[], bool] | None] = ContextVar("lightning_geomdim_interrupt_check", default=None)


@contextlib.contextmanager
def interruptible(should_stop: Callable[[], bool]) -> Iterator[None]:
    """Inside, every :func:`checkpoint` raises :class:`MeasurementInterrupted` once ``should_stop()`` is true."""
    token = _CHECK.set(should_stop)
    try:
        yield
    finally:
        _CHECK.reset(token)


def checkpoint() -> None:
    """Raise :class:`MeasurementInterrupted` when the installed check says to stop (nothing without a check)."""
    should_stop = _CHECK.get()
    if should_stop is not None and should_stop():
        raise MeasurementInterrupted("the measurement was interrupted (the caller asked to stop)")
