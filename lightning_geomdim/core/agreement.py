"""Agreement among the processes of a ``torch.distributed`` group between two collectives.

The distributed Gram (:func:`lightning_geomdim.core.gram.gram_spectra` with ``distributed=True``) sums each
process's share of the Gram with one ``all_reduce``. A process that raised in the local work before it (a memory
budget refused on that process only, an out-of-memory error, a SIGTERM stop) would leave the others waiting in that
all-reduce, or worse, pair their next collective with an unrelated one of its own. So every piece of local work
between two collectives runs in :func:`agreed`: each process then learns, from one ``all_reduce(MAX)`` of a flag,
whether any failed, and all leave together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from lightning_geomdim.core.errors import GeometryError, MeasurementInterrupted

_T = TypeVar("_T")
_FAILED, _STOPPED = 1.0, 2.0  # flags, reduced with MAX: a stop wins, so that every process stops


def process_share(distributed: bool) -> tuple[int, int]:
    """(rank, world size) when ``distributed`` and a process group is initialised, else (0, 1)."""
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def agreed(work: Callable[[], _T], distributed: bool, device: torch.device) -> _T:
    """``work()``, local work before a collective or between two. In a process group (``distributed``) every
    process then learns whether any failed (one ``all_reduce`` of a flag on ``device``); without one, ``work()``.

    Raises:
        MeasurementInterrupted: on every process, when one was stopped (its caller asked: SIGTERM; a time
            limit), so that all leave the measurement together.
        GeometryError: on the processes that did not fail, when another one did (its own error says why); the
            process that failed raises its own error.
    """
    if process_share(distributed)[1] == 1:
        return work()
    failure: Exception | None = None
    try:
        result = work()
    except Exception as err:  # re-raised below, once the others know
        failure = err
    stopped = isinstance(failure, MeasurementInterrupted)
    flag = torch.tensor([_STOPPED if stopped else _FAILED if failure is not None else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    worst = float(flag.item())
    if worst == _STOPPED:
        if type(failure) is MeasurementInterrupted:
            raise failure
        raise MeasurementInterrupted(  # the same exception on every process, whatever each was doing
            "a process of the group was stopped during the distributed Gram: every process stops this measurement"
        ) from failure
    if failure is not None:
        raise failure
    if worst == _FAILED:
        raise GeometryError(
            "another process of the group failed in the distributed Gram (its own error says why): nothing is "
            "measured on any process this time; pass distributed=False (GeometryMonitor: distributed_gram=False) "
            "to measure each process on its own"
        )
    return result
