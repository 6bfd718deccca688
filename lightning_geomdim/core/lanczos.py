"""Largest eigenvalues of a symmetric linear operator: restarted Lanczos that finds repeated eigenvalues.

The operator A (d × d, symmetric) is given as ``matvec``: a (d,) vector → A times it, shape (d,). The k largest
algebraic eigenvalues are reported (a Hessian may have negative eigenvalues away from a minimum).

**One run** is Lanczos from one start vector q: an orthonormal basis Q_j of the Krylov space
span{q, Aq, …, A^{j−1}q}, every new vector orthogonalised against the basis twice (classical Gram-Schmidt
twice: "twice is enough"), and the projection T_j = Q_jᵀ A Q_j, whose eigenvalues (Ritz values) converge to
the extreme eigenvalues of A. T_j is kept as the dense matrix of the Gram-Schmidt coefficients (tridiagonal up
to round-off), so that a thick restart (below) needs no special case. A Ritz pair (θ, y = Q_j s) has residual
‖A y − θ y‖ = β_j |s_j|, β_j the norm of the next Lanczos vector before normalisation.

**Repeated eigenvalues.** The Krylov space of one vector holds one direction per *distinct* eigenvalue of A:
if λ has multiplicity m, a single run finds it once, with a tiny residual, and would call it converged while
reporting the next eigenvalues in place of the m − 1 other copies. So every run ends with a check: the run's
converged top Ritz pairs are *locked* (kept as eigenpairs, and every later vector is orthogonalised against
them: Lanczos on A restricted to their orthogonal complement), then a new run starts from a fresh random
vector orthogonal to them. That vector has a component along every missed copy, so the new run's largest
Ritz value converges to the largest eigenvalue of A not yet locked; if that is above the k-th locked value (a
missed copy, or an eigenvalue the first run's start vector hardly saw), the run's top pairs are locked in
turn and another check run follows; if it is not, the k locked values are the top k with their
multiplicities, and the result is ``converged``. An eigenvalue of multiplicity m among the top k costs up to
m + 1 runs (fewer when round-off brings a copy into a run); a simple top-k spectrum two runs, the check run
converging on the (k+1)-th eigenvalue. Measured, in matvecs against ``scipy.sparse.linalg.eigsh`` (ARPACK,
``which="LA"``, default tolerance) on the same dense Hessians: a linear model whose top eigenvalue has
multiplicity 10, k = 5: 136 (eigsh 182); an MLP's last layer (multiplicity 5), k = 5: 50 (46); MLPs with
simple spectra, k = 1: 42 and 60 (31 and 51), k = 5: 85 and 99 (49 and 111).

**What ``converged`` cannot promise.** Like every Krylov method (ARPACK included), the check relies on the
random start vector: an eigenvector whose component in it is negligible (near round-off) would be missed. For
a Gaussian start vector that has probability zero in exact arithmetic and is vanishingly unlikely in floating
point; it is not a deterministic guarantee.

**Stopping rule of a run.** The run's Ritz pairs that belong to the overall top k (locked values and the
run's Ritz values together), and the run's largest Ritz pair, all have residual ≤ ``tol`` · max|θ|; or the
Krylov space became invariant (β ≤ ``tol`` · max|θ|, common for low-rank Hessians of small networks: every
Ritz value of the run is then exact to ``tol``). Each reported value is within its residual of an
eigenvalue of A (and typically within residual² / gap).

**Memory.** The basis of a run holds at most ``max_basis`` vectors (default :func:`default_basis_size`, 40 for
small k): when it is full, the run is *thick-restarted* (Wu & Simon 2000): the basis is compressed, in place,
to the Ritz vectors of the largest half of the Ritz values (always including the wanted ones) and the
iteration continues from the pending Lanczos vector, so the projection stays exact and no product is wasted.
Besides what ``matvec`` holds, the peak is :func:`lanczos_vectors` (basis + 2k locked / merged Ritz vectors + 4
temporaries) vectors of length d; it does not grow with ``max_iterations``. The Ritz vectors of a finished run
are formed in place in its basis.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

Matvec = Callable[[Tensor], Tensor]
"""A symmetric operator applied to one vector: (d,) → (d,)."""

#: Columns of the basis updated at once when it is compressed in place (bounds the temporary of a restart).
_RESTART_COLUMNS = 1 << 16


@dataclass(frozen=True)
class LanczosResult:
    """Top-k eigenvalue estimates of a symmetric operator.

    Attributes:
        eigenvalues: shape (k,), float64, the k largest Ritz values, descending, repeated eigenvalues once per
            copy.
        residuals: shape (k,), float64, ‖A v − θ v‖ of each Ritz pair (a bound on its distance to an eigenvalue).
        eigenvectors: shape (d, k), dtype of the iteration, orthonormal Ritz vectors (column i matches
            ``eigenvalues[i]``).
        num_matvecs: products with A spent (the cost; one per iteration).
        converged: every residual ≤ ``tol`` · max|θ| (or the Krylov spaces spanned R^d: exact), *and* a run
            from a random start vector orthogonal to the k Ritz vectors found no eigenvalue above the k-th
            (to ``tol``): no copy of a repeated eigenvalue is missing. False when ``max_iterations`` ran out
            before both held.
        num_runs: Lanczos runs from a fresh random start vector (≥ 2 when converged, unless R^d was spanned).
    """

    eigenvalues: Tensor
    residuals: Tensor
    eigenvectors: Tensor
    num_matvecs: int
    converged: bool
    num_runs: int = 1


def default_tolerance(dtype: torch.dtype) -> float:
    """√eps(dtype): 1.5e-8 for float64, 3.5e-4 for float32 (relative residual of a converged Ritz pair)."""
    return float(torch.finfo(dtype).eps) ** 0.5


def default_basis_size(k: int) -> int:
    """Vectors kept by a run before it thick-restarts: max(40, 2k + 20)."""
    return max(40, 2 * k + 20)


def lanczos_vectors(dim: int, *, k: int, max_iterations: int, max_basis: int | None = None) -> int:
    """Peak number of length-``dim`` vectors :func:`lanczos` allocates: basis m + 2k + 4.

    m = min(``max_basis`` (default :func:`default_basis_size`), ``max_iterations``, d); 2k for the locked Ritz
    vectors and those of the run being locked; 4 for q, A q, the pending vector and a temporary.
    """
    basis = min(default_basis_size(k) if max_basis is None else max_basis, max_iterations, dim)
    return basis + 2 * k + 4


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the body with one intra-op CPU thread (restored after).

    For small dense eigendecompositions: LAPACK's ``syevd`` on a 40 × 40 matrix took 0.12 ms with 1 thread and
    11 ms with 2 (325 × 325: 5 ms against 3.6 s) on a 2-core machine shared with other busy processes, the
    OpenMP threads waiting for each other; a small matrix gains nothing from threads anyway.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _orthogonalise(w: Tensor, *bases: Tensor) -> Tensor:
    """w minus its projections on the rows of each basis, twice (the coefficients are discarded)."""
    for _ in range(2):
        for basis in bases:
            if basis.shape[0]:
                w = w - basis.T @ (basis @ w)
    return w


def lanczos(
    matvec: Matvec, dim: int, *, k: int = 1, max_iterations: int = 100, tol: float | None = None,
    generator: torch.Generator, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
    max_basis: int | None = None,
) -> LanczosResult:
    """The ``k`` largest eigenvalues of a symmetric d × d operator given by ``matvec``, with multiplicities.

    Args:
        matvec: (d,) → (d,), A times a vector, A symmetric; called once per iteration.
        dim: d.
        k: number of eigenvalues, 1 ≤ k ≤ d.
        max_iterations: at most this many matvecs over all runs, ≥ k.
        tol: relative residual for convergence; default :func:`default_tolerance` of ``dtype``.
        generator: source of the start vectors (the global RNG is never used).
        dtype, device: of the basis vectors (the dtype and device ``matvec`` expects).
        max_basis: vectors a run keeps before a thick restart, ≥ k + 2 (default :func:`default_basis_size`).

    Returns:
        A :class:`LanczosResult`. Cost: ``num_matvecs`` ≤ ``max_iterations`` products with A, plus
        O(m (m + k) d) per step for the reorthogonalisation and an m × m eigendecomposition per step.
        Memory: :func:`lanczos_vectors` vectors of length d (the basis is allocated up front), plus what
        ``matvec`` holds.
    """
    if not 1 <= k <= dim:
        raise ValueError(f"k must be between 1 and the operator size {dim}, got k={k}")
    if max_iterations < k:
        raise ValueError(f"max_iterations ({max_iterations}) must be at least k ({k}): raise max_iterations")
    basis_size = default_basis_size(k) if max_basis is None else int(max_basis)
    if basis_size < min(k + 2, dim):
        raise ValueError(f"max_basis ({basis_size}) must be at least k + 2 = {k + 2}: raise max_basis")
    tol = default_tolerance(dtype) if tol is None else float(tol)
    device = device or generator.device
    m = min(basis_size, max_iterations, dim)
    basis = torch.zeros(m, dim, dtype=dtype, device=device)
    # locked eigenpairs, at most k, values descending: (values, residuals, vectors as rows)
    found = (torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64),
             torch.zeros(0, dim, dtype=dtype, device=device))
    matvecs, runs, converged = 0, 0, False
    while matvecs < max_iterations and not converged:
        locked = found[2]
        basis[0] = _start_vector(dim, locked, generator=generator, dtype=dtype, device=device)
        runs += 1
        t = torch.zeros(m, m, dtype=torch.float64)  # T = Qᵀ A Q of the run, from the Gram-Schmidt coefficients
        n = 1  # basis[:n] holds the run's vectors; basis[n - 1] is the next one to multiply
        while True:
            w = matvec(basis[n - 1])
            matvecs += 1
            column = torch.zeros(n, dtype=dtype, device=device)
            for _ in range(2):  # classical Gram-Schmidt twice, against the run's basis and the locked vectors
                h = basis[:n] @ w
                column += h
                w = w - basis[:n].T @ h
                if locked.shape[0]:
                    w = w - locked.T @ (locked @ w)
            column = column.to(torch.float64).cpu()
            t[:n, n - 1] = column
            t[n - 1, :n] = column
            beta = float(torch.linalg.vector_norm(w))
            with one_thread():
                theta, s = torch.linalg.eigh(t[:n, :n])  # ascending Ritz values, their coefficient vectors
            residuals = beta * s[n - 1].abs()
            scale = float(torch.cat([found[0], theta]).abs().max())
            spanned = locked.shape[0] + n >= dim  # with the locked vectors, the run's basis spans R^d
            if spanned:
                residuals = torch.zeros_like(residuals)
            watched = theta >= _kth_largest(torch.cat([found[0], theta]), k)  # the run's share of the top k
            watched[-1] = True  # and its largest Ritz value: the check for missed eigenvalues
            done = spanned or beta <= tol * scale or bool((residuals[watched] <= tol * scale).all())
            if done or matvecs >= max_iterations:
                break
            if n == m:  # thick restart: keep the Ritz vectors of the largest Ritz values, continue from w
                keep = min(max(int(watched.sum()) + 2, m // 2), m - 1)
                _compress(basis, s[:, -keep:], n)
                t.zero_()
                t[torch.arange(keep), torch.arange(keep)] = theta[-keep:]
                n = keep
            basis[n] = w / beta
            n += 1
        if not done:  # out of iterations inside a run: the best top k of the locked and the run's pairs
            pick = torch.arange(max(0, n - k), n)
        else:
            # lock the run's pairs that enter the top k above the k-th locked value; none: nothing was missed
            above = theta > _kth_largest(found[0], k) + tol * scale
            pick = torch.nonzero(above & watched if not spanned else above).flatten()
            converged = pick.numel() == 0 or spanned
        if pick.numel():  # the picked Ritz vectors, into the basis rows the next run overwrites anyway
            _compress(basis, s[:, pick], n)
            found = _merge(found, (theta[pick], residuals[pick], basis[: pick.numel()]), k)
    values, residuals, vectors = found
    return LanczosResult(
        eigenvalues=values, residuals=residuals, eigenvectors=vectors.T.contiguous(), num_matvecs=matvecs,
        converged=converged,
        num_runs=runs,
    )


def _kth_largest(values: Tensor, k: int) -> float:
    return float(values.topk(k).values[-1]) if values.numel() >= k else -math.inf


def _compress(basis: Tensor, coefficients: Tensor, n: int) -> None:
    """basis[:c] ← coefficientsᵀ basis[:n] in place (c = columns of ``coefficients``), a block of columns at a time."""
    c = coefficients.shape[1]
    mix = coefficients.T.to(dtype=basis.dtype, device=basis.device)
    for start in range(0, basis.shape[1], _RESTART_COLUMNS):
        block = basis[:n, start : start + _RESTART_COLUMNS]
        basis[:c, start : start + _RESTART_COLUMNS] = mix @ block


def _merge(
    old: tuple[Tensor, Tensor, Tensor], new: tuple[Tensor, Tensor, Tensor], k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The top k of two sets of (values, residuals, row vectors), sorted by value, descending (vectors copied)."""
    values = torch.cat([old[0], new[0]])
    order = values.argsort(descending=True)[:k]
    vectors = torch.empty(order.numel(), old[2].shape[1], dtype=old[2].dtype, device=old[2].device)
    for row, index in enumerate(order.tolist()):
        source = old[2] if index < old[2].shape[0] else new[2]
        vectors[row] = source[index if index < old[2].shape[0] else index - old[2].shape[0]]
    return values[order], torch.cat([old[1], new[1]])[order], vectors


def _start_vector(
    dim: int, basis: Tensor, *, generator: torch.Generator, dtype: torch.dtype, device: torch.device | str,
) -> Tensor:
    """A unit Gaussian vector from ``generator``, orthogonal to the rows of ``basis``."""
    for _ in range(3):
        v = torch.randn(dim, generator=generator, device=generator.device, dtype=torch.float64)
        v = _orthogonalise(v.to(dtype=dtype, device=device), basis)
        norm = float(torch.linalg.vector_norm(v))
        if norm > 1e-3:
            return v / norm
    raise RuntimeError("Lanczos could not draw a start vector orthogonal to its basis; the space is exhausted")
