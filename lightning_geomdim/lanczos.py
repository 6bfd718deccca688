"""Largest eigenvalues of a symmetric linear operator by Lanczos with full reorthogonalisation.

The operator A (d × d, symmetric) is given as ``matvec``: a (d,) vector → A times it, shape (d,).
Lanczos builds an orthonormal basis Q_j of the Krylov space span{q, Aq, …, A^{j−1}q} and the tridiagonal
T_j = Q_jᵀ A Q_j; the eigenvalues of T_j (Ritz values) converge to the extreme eigenvalues of A, much faster
than power iteration, and the largest algebraic ones are reported (a Hessian may have negative eigenvalues
away from a minimum).

Every new vector is reorthogonalised against the whole basis, twice (classical Gram-Schmidt twice: "twice
is enough"), so no spurious copies of converged eigenvalues appear; memory is (j + 1) · d values.

Stopping rule: the residual of a Ritz pair (θ, Q s) is ‖A Q s − θ Q s‖ = β_j |s_j|; the iteration stops when
the top-k residuals are all ≤ ``tol`` · max|θ|. Then each reported value is within its residual of an
eigenvalue of A (and typically within residual² / gap).

Repeated eigenvalues: the Krylov space of one vector holds one direction per distinct eigenvalue. When it
becomes invariant (β ≤ ``tol`` · max|θ|, common for low-rank Hessians of small networks) the iteration
restarts from a fresh random vector orthogonal to the basis (T becomes block-diagonal), as long as the
finished block reached into the top k, so copies of repeated eigenvalues are found. Before the Krylov space
is exhausted, an eigenvalue of multiplicity > 1 may be reported once: the limit of every single-vector
method, irrelevant for generic Hessians.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Matvec = Callable[[Tensor], Tensor]
"""A symmetric operator applied to one vector: (d,) → (d,)."""


@dataclass(frozen=True)
class LanczosResult:
    """Top-k eigenvalue estimates of a symmetric operator.

    Attributes:
        eigenvalues: shape (k,), float64, the k largest Ritz values, descending.
        residuals: shape (k,), float64, ‖A v − θ v‖ of each Ritz pair (a bound on its distance to an eigenvalue).
        eigenvectors: shape (d, k), dtype of the iteration, unit Ritz vectors (columns match ``eigenvalues``).
        num_matvecs: products with A spent (the cost; one per iteration).
        converged: every residual ≤ ``tol`` · max|θ|, or the whole space was spanned (exact).
    """

    eigenvalues: Tensor
    residuals: Tensor
    eigenvectors: Tensor
    num_matvecs: int
    converged: bool


def default_tolerance(dtype: torch.dtype) -> float:
    """√eps(dtype): 1.5e-8 for float64, 3.5e-4 for float32 (relative residual of a converged Ritz pair)."""
    return float(torch.finfo(dtype).eps) ** 0.5


def _orthogonalise(w: Tensor, basis: Tensor) -> Tensor:
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def lanczos(
    matvec: Matvec, dim: int, *, k: int = 1, max_iterations: int = 100, tol: float | None = None,
    generator: torch.Generator, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
) -> LanczosResult:
    """The ``k`` largest eigenvalues of a symmetric d × d operator given by ``matvec``.

    Args:
        matvec: (d,) → (d,), A times a vector, A symmetric; called once per iteration.
        dim: d.
        k: number of eigenvalues, 1 ≤ k ≤ d.
        max_iterations: at most this many matvecs (capped at d, where the result is exact).
        tol: relative residual for convergence; default :func:`default_tolerance` of ``dtype``.
        generator: source of the start vector(s) (the global RNG is never used).
        dtype, device: of the basis vectors (the dtype and device ``matvec`` expects).

    Returns:
        A :class:`LanczosResult`. Cost: ``num_matvecs`` ≤ min(max_iterations, d) products with A, plus
        O(j² d) for the reorthogonalisation and an eigendecomposition of the j × j tridiagonal per step.
        Memory: the basis, min(max_iterations, d) · d values allocated up front, plus k + 4 vectors of
        length d (Ritz vectors, q, w, temporaries) and what ``matvec`` holds.
    """
    if not 1 <= k <= dim:
        raise ValueError(f"k must be between 1 and the operator size {dim}, got k={k}")
    if max_iterations < k:
        raise ValueError(f"max_iterations ({max_iterations}) must be at least k ({k}): raise max_iterations")
    tol = default_tolerance(dtype) if tol is None else float(tol)
    device = device or generator.device
    steps = min(max_iterations, dim)
    basis = torch.zeros(steps, dim, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples basis[j] and basis[j + 1]; 0.0 separates restarted blocks
    block_alphas: list[float] = []  # the current block (Krylov space of the latest start vector)
    block_betas: list[float] = []
    finished: list[Tensor] = []  # Ritz values of blocks that ended in an invariant subspace (exact to tol)
    q = _start_vector(dim, basis[:0], generator=generator, dtype=dtype, device=device)
    beta, converged = 0.0, False
    for j in range(steps):
        basis[j] = q
        w = matvec(q)
        alpha = float(q @ w)
        w = _orthogonalise(w, basis[: j + 1])  # removes α q and β q_{j−1} too, and the round-off drift
        beta = float(torch.linalg.vector_norm(w))
        alphas.append(alpha)
        block_alphas.append(alpha)
        theta, s = _ritz(block_alphas, block_betas)
        values = torch.cat([*finished, theta])
        scale = float(values.abs().max())
        if j + 1 == dim:  # the basis spans R^d: T is A in that basis
            converged = True
            break
        if beta <= tol * scale:
            # Invariant subspace: all its Ritz values are converged, but copies of repeated eigenvalues lie
            # outside it. Restart orthogonally to the basis while the block reached into the top k: a later
            # block only finds further copies of eigenvalues this block found.
            reaches_top = bool(theta.max() > _kth_largest(finished, k) + tol * scale)
            finished.append(theta)
            if not reaches_top and values.numel() >= k:
                converged = True
                break
            betas.append(0.0)
            block_alphas, block_betas = [], []
            q = _start_vector(dim, basis[: j + 1], generator=generator, dtype=dtype, device=device)
            continue
        if values.numel() >= k:
            # the block's Ritz pairs among the overall top k, and its largest one, must have converged
            watched = theta >= _kth_largest([values], k)
            watched[-1] = True
            if bool((beta * s[-1, watched].abs() <= tol * scale).all()):
                converged = True
                break
        betas.append(beta)
        block_betas.append(beta)
        q = w / beta
    used = len(alphas)
    theta, s = _ritz(alphas, betas)
    top = slice(-k, None)
    vectors = basis[:used].T @ s[:, top].to(dtype=dtype, device=device)
    return LanczosResult(
        eigenvalues=theta[top].flip(0),
        residuals=(beta * s[-1, top].abs()).flip(0),
        eigenvectors=vectors.flip(1),
        num_matvecs=used,
        converged=converged,
    )


def _kth_largest(values: list[Tensor], k: int) -> float:
    flat = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    return float(flat.topk(k).values[-1]) if flat.numel() >= k else -math.inf


def _ritz(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of the j × j tridiagonal T (float64): ascending θ, eigenvectors as columns."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)


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
