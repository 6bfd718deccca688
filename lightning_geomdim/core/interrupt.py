"""Cooperative interruption of long measurements.

A caller that must be able to stop a measurement (the callback, when the trainer receives SIGTERM, or when a
measurement uses up its share of the time budget) installs a check with :func:`interruptible` or
:func:`time_limit`; the engines call :func:`checkpoint` between chunks of work (batched backward passes,
Hessian-vector products, exact draws, elimination panels, Gram blocks), and it raises
:class:`~lightning_geomdim.core.errors.MeasurementInterrupted` once the check is true. Without a check installed a
checkpoint costs one context-variable read.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from lightning_geomdim.core.errors import MeasurementInterrupted, MeasurementOverTime

_CHECK: ContextVar[Callable[[], bool] | None] = ContextVar("lightning_geomdim_interrupt_check", default=None)


@contextlib.contextmanager
def interruptible(should_stop: Callable[[], bool]) -> Iterator[None]:
    """Inside, every :func:`checkpoint` raises :class:`MeasurementInterrupted` once ``should_stop()`` is true."""
    token = _CHECK.set(should_stop)
    try:
        yield
    finally:
        _CHECK.reset(token)


@contextlib.contextmanager
def time_limit(seconds: float, timer: Callable[[], float] = time.perf_counter) -> Iterator[None]:
    """Inside, a :func:`checkpoint` reached more than ``seconds`` after entry raises :class:`MeasurementOverTime`
    (the enclosing check, e.g. SIGTERM's, still applies); ``math.inf``: no limit."""
    if math.isinf(seconds):
        yield
        return
    outer, end = _CHECK.get(), timer() + seconds

    def check() -> bool:
        if outer is not None and outer():
            return True
        if timer() > end:
            raise MeasurementOverTime(f"stopped after {seconds:.3g} s, its time allowance")
        return False

    token = _CHECK.set(check)
    try:
        yield
    finally:
        _CHECK.reset(token)


def checkpoint() -> None:
    """Raise :class:`MeasurementInterrupted` when the installed check says to stop (nothing without a check)."""
    should_stop = _CHECK.get()
    if should_stop is not None and should_stop():
        raise MeasurementInterrupted("the measurement was interrupted (the caller asked to stop)")
