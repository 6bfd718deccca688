"""Cooperative interruption of long measurements.

A caller that must be able to stop a measurement (the callback, when the trainer receives SIGTERM, or when a
measurement uses up its share of the time budget) installs a check with :func:`interruptible` or
:func:`time_limit`; the engines call :func:`checkpoint` between chunks of work (batched backward passes,
Hessian-vector products, exact draws, elimination panels, Gram blocks), and it raises
:class:`~lightning_geomdim.core.errors.MeasurementInterrupted` once the check is true. Without a check installed a
checkpoint costs one context-variable read.

A step that cannot be interrupted once started (a dense eigendecomposition or SVD: one LAPACK call, minutes for a
30,000 × 30,000 Gram) is announced with :func:`checkpoint`'s ``flops``: under a time limit, the measurement stops
*before* it when it would not finish within the limit at this machine's rate (:func:`machine_flops`, measured once
on a small eigendecomposition, which overestimates the time of a large one: blocked algorithms run faster).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from lightning_geomdim.core.errors import MeasurementInterrupted, MeasurementOverTime

_CHECK: ContextVar[Callable[[float], bool] | None] = ContextVar("lightning_geomdim_interrupt_check", default=None)
_RATE: list[float] = []  # floating-point operations per second of a dense decomposition here, once measured

#: Steps announced with fewer flops than this are not checked ahead (they take milliseconds).
AHEAD_MIN_FLOPS = 1e8


def machine_flops() -> float:
    """Floating-point operations per second of a float64 symmetric eigendecomposition on this machine's CPU: the
    best of three 256 × 256 ``eigvalsh`` (≈ 4/3 · 256³ flops each), measured at the first call (a few ms)."""
    if not _RATE:
        import torch

        g = torch.Generator().manual_seed(0)
        a = torch.randn(256, 256, generator=g, dtype=torch.float64)
        a = a @ a.T
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            torch.linalg.eigvalsh(a)
            best = min(best, time.perf_counter() - start)
        _RATE.append(4 / 3 * 256**3 / max(best, 1e-6))
    return _RATE[0]


def eigh_flops(n: int) -> float:
    """Floating-point operations of the eigenvalues of an n × n symmetric matrix (tridiagonal reduction)."""
    return 4 / 3 * n**3


def svd_flops(rows: int, cols: int) -> float:
    """Floating-point operations of the singular values of a rows × cols matrix (bidiagonal reduction)."""
    small, large = sorted((rows, cols))
    return 4 * small**2 * large


@contextlib.contextmanager
def interruptible(should_stop: Callable[[], bool]) -> Iterator[None]:
    """Inside, every :func:`checkpoint` raises :class:`MeasurementInterrupted` once ``should_stop()`` is true."""
    token = _CHECK.set(lambda flops: should_stop())
    try:
        yield
    finally:
        _CHECK.reset(token)


@contextlib.contextmanager
def time_limit(
    seconds: float, timer: Callable[[], float] = time.perf_counter, *, allowance: float | None = None
) -> Iterator[None]:
    """Inside, a :func:`checkpoint` reached more than ``seconds`` after entry, or announcing a step that would end
    past that, raises :class:`MeasurementOverTime` (the enclosing check, e.g. SIGTERM's, still applies);
    ``math.inf``: no limit. ``allowance``: the whole allowance these ``seconds`` are the rest of (a measure taken
    probe by probe), for the message; default ``seconds``."""
    whole = seconds if allowance is None else allowance
    if math.isinf(seconds):
        yield
        return
    outer, end = _CHECK.get(), timer() + seconds

    def check(flops: float) -> bool:
        if outer is not None and outer(flops):
            return True
        now = timer()
        if now > end:
            raise MeasurementOverTime(f"stopped at its time allowance of {whole:.3g} s")
        ahead = flops / machine_flops() if flops >= AHEAD_MIN_FLOPS else 0.0
        if now + ahead > end:
            raise MeasurementOverTime(
                f"stopped before a step that cannot be interrupted, estimated at {ahead:.3g} s ({flops:.3g} flops at "
                f"this machine's rate), which would end past its time allowance of {whole:.3g} s",
                needed=now - (end - seconds) + (whole - seconds) + ahead)  # the earlier blocks' time too
        return False

    token = _CHECK.set(check)
    try:
        yield
    finally:
        _CHECK.reset(token)


def checkpoint(flops: float = 0.0) -> None:
    """Raise :class:`MeasurementInterrupted` when the installed check says to stop (nothing without a check);
    ``flops``: those of the uninterruptible step that follows, which a time limit checks ahead (module docstring)."""
    should_stop = _CHECK.get()
    if should_stop is not None and should_stop(flops):
        raise MeasurementInterrupted("the measurement was interrupted (the caller asked to stop)")
