"""Memory budget: refuse a computation before allocating it, with the numbers and the remedies.

The budget is, in order: the ``max_memory_bytes`` argument of a measure; the environment variable
``GEOMDIM_MAX_MEMORY_BYTES``; otherwise half of the memory currently available on the device (CPU:
``MemAvailable`` of ``/proc/meminfo``; CUDA: free memory reported by ``torch.cuda.mem_get_info``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from lightning_geomdim.core.errors import MemoryBudgetError, Remedy

_FALLBACK_BYTES = 8 * 1024**3


def available_bytes(device: torch.device) -> int:
    """Memory currently available on ``device`` (best effort; 8 GiB when it cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _FALLBACK_BYTES


def memory_budget(device: torch.device, max_memory_bytes: int | None = None) -> int:
    """The budget in bytes (rule in the module docstring)."""
    if max_memory_bytes is not None:
        return int(max_memory_bytes)
    env = os.environ.get("GEOMDIM_MAX_MEMORY_BYTES")
    if env:
        return int(float(env))
    return available_bytes(device) // 2


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it ≥ 1 (B, KiB, MiB, GiB, TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


#: A probe's size N and the bytes a computation needs on n samples of it (increasing in n).
BySamples = tuple[int, Callable[[int], int]]


def check_memory(
    needed: int, budget: int, *, what: str, remedies: Sequence[Remedy], by_samples: BySamples | None = None,
) -> None:
    """Raise :class:`MemoryBudgetError` when ``needed`` bytes exceed ``budget``.

    ``by_samples``: (N, bytes needed on n samples): the refusal then says the largest probe that fits, in place of
    "a smaller probe".
    """
    if needed <= budget:
        return
    if by_samples is not None:
        n, need = by_samples
        largest = largest_fitting(n, need, budget)
        samples = f"{largest:,} sample" + ("s" if largest != 1 else "")
        fits = (Remedy(f"use a probe of at most {samples} (the largest that fits; now {n:,})")
                if largest else Remedy("even a probe of one sample does not fit"))
        remedies = (fits, *(r for r in remedies if "smaller probe" not in r.text))
    raise MemoryBudgetError(what, format_bytes(needed), format_bytes(budget), remedies)


def largest_fitting(n: int, need: Callable[[int], int], budget: int) -> int:
    """The largest m < n with ``need(m) <= budget`` (0 when none), by bisection: ``need`` increases with m."""
    low, high = 0, n - 1  # need(low) fits (0: by convention), the answer is in [low, high]
    while low < high:
        mid = (low + high + 1) // 2
        if need(mid) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


#: Bytes one vector-Jacobian product of a batched backward holds, per value of the forward pass (A) and byte of
#: the dtype: measured 0.84–1.09 on a ResNet-style CNN with BatchNorm (``is_grads_batched``, 1 to 64 rows at
#: once, A = 6.2M), bounded here by 1.5.
VJP_BYTES_PER_ACTIVATION = 1.5


def rows_at_once(
    rows: int, chunk_size: int | None, *, fixed: int, per_row: int, budget: int | None, what: str,
    remedies: Sequence[Remedy], by_samples: BySamples | None = None,
) -> int:
    """How many vector-Jacobian products one batched backward computes: ``chunk_size`` when given, else the most of
    ``rows`` for which ``fixed + chunk · per_row`` bytes fit ``budget`` (all of them without a budget).

    Raises:
        MemoryBudgetError: the given ``chunk_size``, or a single row, does not fit (the message says how much).
    """
    if chunk_size is not None:
        chunk = max(1, min(int(chunk_size), rows))
    elif budget is None:
        chunk = rows
    else:
        chunk = max(1, min(rows, (budget - fixed) // max(per_row, 1)))
    if budget is not None:
        check_memory(fixed + chunk * per_row, budget, what=what, remedies=remedies, by_samples=by_samples)
    return max(1, chunk)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (``torch.OutOfMemoryError``, or the CPU allocator's RuntimeError):
    a fallback that catches RuntimeError must re-raise these rather than retry another way."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)
