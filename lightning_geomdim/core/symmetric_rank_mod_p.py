"""The rank of a symmetric matrix over GF(p), exact, by blocked elimination with principal (diagonal) pivots.

:func:`rank_mod_p_symmetric` takes an (n, n) float64 tensor of centred residues of a
:class:`~lightning_geomdim.core.finite_field.PrimeField`, on any device, reads only its lower triangle and returns
its rank mod p (an int), with about half the flops of :func:`~lightning_geomdim.core.rank_mod_p.rank_mod_p` (which
finishes the elimination when no principal pivot is left, e.g. on [[0, 1], [1, 0]]).

Exact because every product and partial sum of residues stays below 2^53: the pivots of a sub-block are swept in
Python integers; every torch product has an inner dimension ≤ ``max_inner``; the trailing symmetric Schur
complement, updated in place, grows by ≤ |R| · bound² per step and is reduced before it could exceed ``max_value``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_geomdim.core.finite_field import PrimeField
from lightning_geomdim.core.interrupt import checkpoint
from lightning_geomdim.core.rank_mod_p import rank_mod_p

#: Principal pivots of a panel are sought by sweeping sub-blocks of this many candidates with Python integers,
#: each applied to the rest of the panel as one block sweep (BLAS-3): a few torch calls per sub-block, not per pivot.
_SWEEP_LEAF = 8

#: Elements of the Schur complement updated per chunk of rows in :func:`rank_mod_p_symmetric` (product and, every
#: few panels, a reduction; at the first step a copy of the input); other devices: a bound on the chunk.
_SYMMETRIC_CHUNK = {"cpu": 2**20}
_SYMMETRIC_CHUNK_DEFAULT = 2**24


def rank_mod_p_symmetric(
    a: Tensor, field: PrimeField, *, block_size: int = 256, upper_bound: int | None = None, overwrite: bool = False,
) -> int:
    """Rank over GF(p) of the symmetric matrix ``a``, exact, with about half the flops of :func:`rank_mod_p`.

    Blocked symmetric elimination with principal (diagonal) pivots. For the trailing symmetric matrix T (at first
    ``a``), the candidates are its first w = min(``block_size``, size) indices. The SWEEP operator (Goodnight's
    convention: sweeping k with d = B[k, k] ≠ 0 sets B[k, k] ← −1/d, B[i, k] ← B[i, k]/d, B[k, j] ← B[k, j]/d,
    B[i, j] ← B[i, j] − B[i, k] B[k, j]/d) is applied greedily to B = T[:w, :w]: candidate k is swept when its
    current diagonal (the diagonal of T's Schur complement after the pivots already swept) is nonzero. Sweeping a
    set R gives B[R, R] = −T[R, R]⁻¹, so the sweep yields at once a principal pivot set R (T[R, R] invertible) and
    W = T[R, R]⁻¹. The candidates are swept by sub-blocks of ``_SWEEP_LEAF``, each swept in Python integers and then
    applied to the rest of B as one block sweep (B ← B − B[:, P] H⁻¹ B[P, :] by BLAS).

    Then rank(T) = |R| + rank(S) for the Schur complement on the other indices O, S = T[O, O] − T[O, R] · (W ·
    T[R, O]), symmetric. The candidates that were not swept stay in O, first (they are candidates again at the next
    step: their diagonal may have become nonzero), except those whose row of S is zero (they add nothing). Only the
    lower triangle of S is computed (chunks of rows, the columns up to the chunk's last row), in place in one working
    copy of ``a``: every step reads only the lower triangle of T, so nothing is transposed or copied to the upper
    one. The products are exact (inner dimension |R| ≤ ``max_inner``) and S is left unreduced while its entries stay
    within ``max_value`` (an entry grows by at most |R| · bound² per step): the trailing matrix is reduced only
    every few steps (7 with the default prime and block 256).

    When no candidate has a nonzero diagonal: the elimination stops if T is zero; else, if some diagonal entry of
    T is nonzero, such indices are swapped into the candidates (a symmetric permutation of T) and the step is
    retried; else (T ≠ 0 with a zero diagonal, e.g. [[0, 1], [1, 0]]) the general :func:`rank_mod_p` finishes on
    T. The result depends neither on the order nor on chance. It also stops when T is empty or the rank reaches
    ``upper_bound``.

    Cost for an n × n matrix of full rank: about n³/3 + ``block_size`` · n² flops in BLAS (the lower triangles of
    T[O, R] · Y, and Y = W · T[R, O]), O(n · ``block_size``²) flops of block sweeps in BLAS, O(n³ / ``block_size``)
    elementwise operations (a reduction every few steps), O(n · ``_SWEEP_LEAF``²) Python integer operations, and one
    host synchronisation per sub-block of candidates. Memory: one n × n working matrix (besides ``a``; none with
    ``overwrite=True``) and O(n · ``block_size``). Deterministic.

    Args:
        a: (n, n) symmetric float64 tensor of centred residues of ``field``, on any device; not modified unless
            ``overwrite``. Its symmetry is not checked: only its lower triangle is read (the upper one may hold
            anything finite, e.g. zeros).
        field: the prime field.
        block_size: the panel width (at most ``field.max_inner`` is used).
        upper_bound: if given, stop once the rank reaches it: the result is then min(rank, ``upper_bound``).
        overwrite: use ``a`` itself as the working matrix (its contents are destroyed): saves the n × n copy.

    Returns:
        The rank of ``a`` mod p (or min(rank, ``upper_bound``)).

    Raises:
        ValueError: ``a`` is not a square float64 matrix, or ``block_size`` < 1.
    """
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.dtype != torch.float64:
        raise ValueError(f"rank_mod_p_symmetric needs a square float64 matrix, got {a.dtype} {tuple(a.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be positive")
    n = a.shape[0]
    limit = n if upper_bound is None else max(0, min(n, upper_bound))
    width = min(block_size, field.max_inner)
    rank = 0
    # T: only its lower triangle is meaningful, |T| ≤ magnitude; ``a`` is read only, then T is a view of ``work``
    t, magnitude = a, field.bound
    work: Tensor | None = a if overwrite else None
    while rank < limit and t.shape[0]:
        checkpoint()
        w = min(width, t.shape[0])
        block = t[:w, :w].tril()
        if magnitude > field.bound:
            field.reduce_(block)
        block.add_(block.tril(-1).T)  # the candidates' block, symmetric and reduced
        pivots, inverse = _principal_pivots(block, field, limit - rank)
        if pivots:
            rank += len(pivots)
            if rank < limit:
                if work is None:  # zeros: the upper triangle, never meaningful, holds only finite numbers
                    work = torch.zeros_like(a)
                target = work[n - t.shape[0] :, n - t.shape[0] :]  # where T is, or T itself
                t, magnitude = _symmetric_schur(t, target, magnitude, block, pivots, inverse, width, field)
            continue
        # every candidate has a zero diagonal: make T full and reduced, in ``work`` (a copy of ``a`` if need be)
        if t is a and not overwrite:
            work = t = a.clone()
        _symmetrize_(t, field, reduce=magnitude > field.bound)
        magnitude = field.bound
        nonzero = (t.diagonal() != 0).nonzero().flatten()
        if nonzero.numel():  # swap indices with a nonzero diagonal into the candidates
            _swap_to_front_(t, nonzero[:w])
            continue
        if bool(t.any()):  # T ≠ 0 with a zero diagonal: no principal pivot
            rank += rank_mod_p(t, field, block_size=block_size, upper_bound=limit - rank)
        break
    return min(rank, limit)


def _sweep_ints(m: list[list[int]], p: int, most: int) -> list[int]:
    """Greedy sweep, in place, of the symmetric matrix ``m`` of integers mod p (entries in [0, p)).

    Sweeps k = 0, 1, … in order when m[k][k] ≠ 0 mod p (at most ``most`` of them); returns the swept indices.
    Afterwards m[P][P] = −(original m[P][P])⁻¹ mod p for the swept set P.
    """
    swept: list[int] = []
    for k in range(len(m)):
        if len(swept) == most:
            break
        d = m[k][k] % p
        if not d:
            continue
        d_inv = pow(d, -1, p)
        row = [x * d_inv % p for x in m[k]]  # m[k, j] / d
        for i, mi in enumerate(m):
            if i == k:
                continue
            f = mi[k]
            if f:
                mi[:] = [(x - f * y) % p for x, y in zip(mi, row, strict=True)]
                mi[k] = f * d_inv % p
        row[k] = -d_inv % p
        m[k] = row
        swept.append(k)
    return swept


def _principal_pivots(block: Tensor, field: PrimeField, most: int) -> tuple[list[int], Tensor]:
    """Greedy principal pivots R (at most ``most``, ascending) of the symmetric residue matrix ``block`` (w × w, not
    modified) by the SWEEP operator in candidate order, and W = block[R, R]⁻¹ (reduced).

    Sub-blocks K of ``_SWEEP_LEAF`` candidates: their current entries are swept in Python integers (pivots P ⊂ K,
    H⁻¹ for H = B[P, P]), then the block sweep on P is applied to all of B: B ← B − B[:, P] H⁻¹ B[P, :], then
    B[:, P] ← B[:, P] H⁻¹, B[P, :] its transpose, B[P, P] ← −H⁻¹. B is reduced only where read (its entries grow by
    ≤ |P| · bound² per sub-block, so stay within bound + w · bound² ≤ ``max_value``).
    """
    p = field.p
    b = block.clone()
    pivots: list[int] = []
    for k0 in range(0, b.shape[0], _SWEEP_LEAF):
        if len(pivots) == most:
            break
        k1 = min(k0 + _SWEEP_LEAF, b.shape[0])
        columns = field.reduce(b[:, k0:k1])  # B[:, K], current
        sub = [[int(x) % p for x in row] for row in columns[k0:k1].tolist()]
        local = _sweep_ints(sub, p, most - len(pivots))
        if not local:
            continue
        h_inv = torch.tensor(
            [[float(field._center(-sub[i][j] % p)) for j in local] for i in local], dtype=b.dtype, device=b.device
        )
        whole = len(local) == k1 - k0
        if not whole:
            columns = columns.index_select(1, torch.tensor(local, dtype=torch.long, device=b.device))
        x = field.matmul(columns, h_inv)  # B[:, P] H⁻¹
        b.addmm_(x, columns.T, alpha=-1)
        if whole:
            b[:, k0:k1] = x
            b[k0:k1] = x.T
            b[k0:k1, k0:k1] = h_inv.neg_()
        else:
            index = torch.tensor([k0 + i for i in local], dtype=torch.long, device=b.device)
            b.index_copy_(1, index, x)
            b.index_copy_(0, index, x.T)
            b[index.unsqueeze(1), index] = h_inv.neg_()
        pivots += [k0 + i for i in local]
    index = torch.tensor(pivots, dtype=torch.long, device=b.device)
    return pivots, field.reduce_(b.index_select(0, index).index_select(1, index).neg_())


def _symmetric_schur(
    t: Tensor,
    target: Tensor,
    magnitude: int,
    block: Tensor,
    pivots: list[int],
    inverse: Tensor,
    width: int,
    field: PrimeField,
) -> tuple[Tensor, int]:
    """The lower triangle of S = T[O, O] − T[O, R] · (W · T[R, O]), written into ``target``; returns S (a view of
    ``target``) and the bound on its entries.

    T: lower triangle meaningful, |T| ≤ ``magnitude``; ``target``: same shape as T, T itself or a tensor that does
    not overlap it; ``block``: T[:w, :w] symmetric and reduced; R = ``pivots`` ⊂ [0, w), W = ``inverse`` =
    T[R, R]⁻¹. O: the candidates not in R whose row of S is nonzero, then the indices w … end of T; S is
    target[w − e:, w − e:] for e such candidates. S is reduced only when the next step could exceed ``max_value``
    otherwise (entries grow by ≤ |R| · bound² per step, ≤ ``width`` · bound² at the next).
    """
    device = t.device
    w, r = block.shape[0], len(pivots)
    tail = t.shape[0] - w
    pivot_set = set(pivots)
    extras = [i for i in range(w) if i not in pivot_set]
    r_index = torch.tensor(pivots, dtype=torch.long, device=device)
    e_index = torch.tensor(extras, dtype=torch.long, device=device)
    below = t[w:, :w]  # T[tail, candidates], in the lower triangle; read before ``target`` is written
    left = below.clone() if r == w else below.index_select(1, r_index)  # T[tail, R]
    reduce_t = magnitude > field.bound
    if reduce_t:
        field.reduce_(left)
    square = field.bound * field.bound
    grown = magnitude + r * square
    reduce = grown + width * square > field.max_value
    if extras:  # S[tail, extras] and S[extras, extras], then keep the extras whose row of S is nonzero
        a_extras = block.index_select(0, e_index).index_select(1, r_index)  # T[extras, R]
        y_extras = field.matmul(inverse, a_extras.T)
        # exact then reduced: |T| + r · bound² ≤ max_value
        s_tail = field.submatmul_(below.index_select(1, e_index), left, y_extras)
        s_extras = field.submatmul_(block.index_select(0, e_index).index_select(1, e_index), a_extras, y_extras)
        keep = (s_tail.any(dim=0) | s_extras.any(dim=0)).nonzero().flatten()
        e = keep.numel()
        if e:
            target[w:, w - e : w] = s_tail.index_select(1, keep)
            target[w - e : w, w - e : w] = s_extras.index_select(0, keep).index_select(1, keep)
        del s_tail, s_extras
    else:
        e = 0
    y = field.matmul(inverse, left.T)  # W · T[R, tail], (r, tail)
    chunk = _SYMMETRIC_CHUNK.get(device.type, _SYMMETRIC_CHUNK_DEFAULT)
    in_place = target.data_ptr() == t.data_ptr()
    r0 = 0
    while r0 < tail:  # rows of the tail, lower triangle: S[r0:r1, :r1]
        rows = max(8, int((math.sqrt(r0 * r0 + 4 * chunk) - r0) / 2))  # rows · (r0 + rows) ≈ chunk
        r1 = min(tail, r0 + rows)
        part = target[w + r0 : w + r1, w : w + r1]
        if not in_place:  # the first step: copy from ``a``, whose upper triangle is not read
            part.copy_(t[w + r0 : w + r1, w : w + r1])
            part[:, r0:].tril_()
        part.addmm_(left[r0:r1], y[:, :r1], alpha=-1)
        if reduce:
            field.reduce_(part)
        r0 = r1
    return target[w - e :, w - e :], (field.bound if reduce else grown)


def _symmetrize_(t: Tensor, field: PrimeField, *, reduce: bool) -> Tensor:
    """Makes ``t`` (lower triangle meaningful) full and symmetric in place, reduced when ``reduce``."""
    n = t.shape[0]
    step = max(1, _SYMMETRIC_CHUNK.get(t.device.type, _SYMMETRIC_CHUNK_DEFAULT) // max(1, n))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        rows = t[r0:r1, :r1]
        rows[:, r0:].tril_()
        if reduce:
            field.reduce_(rows)
        diagonal = rows[:, r0:]
        diagonal.add_(diagonal.tril(-1).T)
        t[:r0, r0:r1] = rows[:, :r0].T
    return t


def _swap_to_front_(t: Tensor, indices: Tensor) -> None:
    """Swaps, in the full symmetric ``t`` (in place), the indices 0, 1, … with ``indices`` (ascending, not among
    0 … len(indices) − 1 unless in place already): a symmetric permutation."""
    k = indices.numel()
    front = torch.arange(k, device=t.device)
    moved = front != indices
    front, indices = front[moved], indices[moved]
    source = torch.cat([indices, front])
    destination = torch.cat([front, indices])
    t.index_copy_(0, destination, t.index_select(0, source))
    t.index_copy_(1, destination, t.index_select(1, source))
