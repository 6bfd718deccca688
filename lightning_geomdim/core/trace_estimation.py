"""Trace of a symmetric linear operator from matrix-vector products: Hutchinson and Hutch++.

The operator A (d × d) is given as ``matmat``: a function mapping a (d, n) block of vectors to A times it,
shape (d, n). Probes are Rademacher vectors (entries ±1) drawn from a caller's ``torch.Generator``, never
from the global RNG.

* Hutchinson (1989): tr A ≈ (1/n) Σ zᵢᵀ A zᵢ, unbiased; one probe has variance 2(‖A‖_F² − Σ A_ii²), so the
  standard error is √(2(‖A‖_F² − Σ A_ii²) / n). Cost: n matvecs.
* Hutch++ (Meyer, Musco, Musco, Woodruff 2021): with m matvecs, k = ⌊m/3⌋ sketch vectors S,
  Q = orth(A S), then tr A ≈ tr(Qᵀ A Q) + Hutchinson on (I − QQᵀ) A (I − QQᵀ) with m − 2k probes.
  Unbiased; the low-rank part is exact, so the error is that of Hutchinson on the deflated operator,
  whose Frobenius norm is at most ‖A‖_F (and much less when the spectrum decays): standard error
  ≤ √(2 / (m − 2k)) · ‖A‖_F. When k ≥ d the sketch spans the whole space and the trace is exact.

The reported ``std_error`` is the sample standard deviation of the Hutchinson terms over √n (conditional
on the sketch for Hutch++); it is an estimate, not a bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Matmat = Callable[[Tensor], Tensor]
"""A symmetric operator applied to a block of column vectors: (d, n) → (d, n)."""


@dataclass(frozen=True)
class TraceEstimate:
    """An estimate of tr A.

    Attributes:
        value: the estimate.
        std_error: estimated standard error (sample std of the stochastic terms / √n); 0.0 when exact,
            ``nan`` when fewer than two stochastic terms were drawn.
        num_matvecs: products with A spent (the cost).
        exact: the value is exact up to round-off (Hutch++ sketch spanning the whole space).
    """

    value: float
    std_error: float
    num_matvecs: int
    exact: bool = False


def rademacher(
    dim: int, num: int, *, generator: torch.Generator, dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """A (dim, num) block of independent ±1 entries drawn from ``generator`` (on its device, then moved)."""
    bits = torch.randint(0, 2, (dim, num), generator=generator, device=generator.device)
    return (bits.to(dtype=dtype) * 2 - 1).to(device=device or generator.device)


def _stochastic_part(terms: Tensor) -> tuple[float, float]:
    n = terms.numel()
    mean = float(terms.mean())
    std_error = float(terms.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan
    return mean, std_error


def hutchinson(
    matmat: Matmat, dim: int, num_probes: int, *, generator: torch.Generator, dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate of tr A with ``num_probes`` Rademacher probes (cost: ``num_probes`` matvecs).

    Args:
        matmat: (dim, n) → (dim, n), A times a block of vectors, A symmetric.
        dim: d, the size of A.
        num_probes: n ≥ 1.
        generator: source of the probes (the global RNG is never used).
        dtype, device: of the probes (the dtype and device ``matmat`` expects).

    Memory: about 3 · ``num_probes`` vectors of length d (probes, products, their elementwise product).
    """
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}: pass a positive number of probes")
    z = rademacher(dim, num_probes, generator=generator, dtype=dtype, device=device)
    terms = (z * matmat(z)).sum(dim=0)
    value, std_error = _stochastic_part(terms)
    return TraceEstimate(value, std_error, num_probes)


def hutch_plus_plus(
    matmat: Matmat, dim: int, num_matvecs: int, *, generator: torch.Generator, dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutch++ estimate of tr A with a budget of ``num_matvecs`` (≥ 3) products with A.

    k = min(⌊m/3⌋, d) sketch vectors, k products for A Q, and m − 2k Rademacher probes on the deflated
    operator (none when k = d: then Q spans R^d and the result is exact, costing 2d matvecs).
    Memory: about max(3k, k + 4(m − 2k)) vectors of length d besides what ``matmat`` holds (Q, the probes,
    their deflated copies and their products).

    Args:
        matmat: (dim, n) → (dim, n), A times a block of vectors, A symmetric.
        dim: d, the size of A.
        num_matvecs: m, the total budget of products with A.
        generator: source of the sketch and the probes (the global RNG is never used).
        dtype, device: of the probes (the dtype and device ``matmat`` expects).
    """
    if num_matvecs < 3:
        raise ValueError(
            f"Hutch++ needs at least 3 matvecs (one sketch vector, its product, one probe), got {num_matvecs}: "
            "raise the number of trace samples or use Hutchinson"
        )
    k = min(num_matvecs // 3, dim)
    # (d, k), orthonormal columns even when A S is rank-deficient; the sketch S is freed once A S is formed
    q, _ = torch.linalg.qr(matmat(rademacher(dim, k, generator=generator, dtype=dtype, device=device)))
    low_rank = float(torch.trace(q.T @ matmat(q)))
    if k == dim:
        return TraceEstimate(low_rank, 0.0, 2 * k, exact=True)
    num_probes = num_matvecs - 2 * k
    g = rademacher(dim, num_probes, generator=generator, dtype=dtype, device=device)
    g = g - q @ (q.T @ g)
    terms = (g * matmat(g)).sum(dim=0)
    mean, std_error = _stochastic_part(terms)
    return TraceEstimate(low_rank + mean, std_error, num_matvecs)
