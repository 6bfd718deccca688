"""Exact arithmetic in the prime field GF(p), on float64 tensors, so that BLAS does the work.

A residue is stored as a float64 holding an integer r ≡ x (mod p) with |r| ≤ ``bound`` ≈ p / 2 (centred
residues: products are four times smaller than with 0 … p − 1). Every float64 integer of magnitude below
2^53 is exact, and so is every sum or product of such integers whose result stays below 2^53, whatever the
order of summation (fused multiply-adds included). :meth:`PrimeField.reduce` is exact on every backend for
|x| ≤ ``max_value = 2^53 − p`` (then |round(x / p) · p| < 2^53), so a matrix product of residues, plus one more
residue, can be reduced once as long as its inner dimension is at most ``max_inner = (max_value − bound) /
bound²``. :meth:`PrimeField.matmul` and :meth:`PrimeField.submatmul` split longer inner dimensions into chunks and
reduce after each, so CPU and CUDA BLAS compute exact products mod p.

The default prime p = 4,194,301 (the largest prime below 2^22) allows inner dimensions of 2,047 between
reductions.

Real numbers enter the field through :meth:`PrimeField.from_float`: a finite float64 is a dyadic rational
m · 2^e, and Z[1/2] → GF(p) (m · 2^e ↦ m · (2^e mod p)) is a ring homomorphism for odd p. A polynomial
matrix whose coefficients are float64 numbers therefore maps to GF(p) by a homomorphism: every minor of the
image is the image of a minor, so a rank computed mod p never exceeds the rank over the reals.

Ranks: :func:`rank_mod_p` (any matrix, blocked Gaussian elimination) and :func:`rank_mod_p_symmetric` (symmetric
matrices such as Gram matrices, blocked elimination with principal pivots: about half the flops).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Largest prime below 2^22.
DEFAULT_PRIME = 4_194_301
_EXACT = 2**53


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


class PrimeField:
    """GF(p) on float64 tensors of centred residues (see the module docstring).

    Args:
        p: an odd prime below 2^24 (so that a product of two residues stays exact in float64).

    Raises:
        ValueError: ``p`` is not an odd prime below 2^24.
    """

    def __init__(self, p: int = DEFAULT_PRIME) -> None:
        if not (isinstance(p, int) and 2 < p < 2**24 and _is_prime(p)):
            raise ValueError(f"p={p!r} must be an odd prime below 2^24, e.g. {DEFAULT_PRIME}")
        self.p = p
        # round(x / p) may be off by one near half-integers (x / p is rounded): |r| ≤ p/2 + a few units
        self.bound = (p - 1) // 2 + 3
        #: Largest |x| that :meth:`reduce` handles exactly on every backend: |round(x / p) · p| ≤ |x| + p/2 + 2 < 2^53.
        self.max_value = _EXACT - p
        #: Longest inner dimension of a product of residues that, plus one residue, stays within ``max_value``.
        self.max_inner = (self.max_value - self.bound) // (self.bound * self.bound)
        self._inv_p = 1.0 / p

    def __repr__(self) -> str:
        return f"PrimeField(p={self.p})"

    def reduce(self, x: Tensor) -> Tensor:
        """Centred residues (|r| ≤ ``bound``) of the float64 integers ``x``, a new tensor, same shape.

        Exact for |x| ≤ ``max_value`` on every backend, and for every |x| < 2^53 where torch fuses x − p · q into
        one rounding (its vectorised CPU kernels with FMA, CUDA): q = round(x / p) is an integer, p · q is exact
        below 2^53 and x − p · q is a small integer. Three passes, one temporary (which is returned).
        """
        q = x * self._inv_p
        q.round_()
        return torch.sub(x, q, alpha=self.p, out=q)

    def reduce_(self, x: Tensor) -> Tensor:
        """In-place :meth:`reduce` (three passes, one temporary)."""
        q = x * self._inv_p
        q.round_()
        return x.sub_(q, alpha=self.p)

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        """Elementwise product of residues (broadcasting), reduced."""
        return self.reduce_(a * b)

    def matmul(self, a: Tensor, b: Tensor) -> Tensor:
        """a @ b mod p for residue matrices (…, n, k) @ (…, k, m), exact: the inner dimension is chunked."""
        k = a.shape[-1]
        if k <= self.max_inner:
            return self.reduce_(a @ b)
        out = None
        for start in range(0, k, self.max_inner):
            part = a[..., start : start + self.max_inner] @ b[..., start : start + self.max_inner, :]
            out = part if out is None else out.add_(part)
            self.reduce_(out)
        assert out is not None
        return out

    def submatmul_(self, c: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """c ← (c − a @ b) mod p in place, for residues c (…, n, m), a (…, n, k), b (…, k, m); returns ``c``.

        Delayed reduction: c − a @ b is formed raw (BLAS ``gemm`` with β = 1, α = −1 for matrices) and reduced once
        when k ≤ ``max_inner`` (|c − a @ b| ≤ bound + k · bound² ≤ ``max_value``); longer inner dimensions are
        chunked, with one reduction per chunk.
        """
        k = a.shape[-1]
        plain = c.ndim == a.ndim == b.ndim == 2
        for start in range(0, max(k, 1), self.max_inner):
            pa, pb = a[..., start : start + self.max_inner], b[..., start : start + self.max_inner, :]
            if plain:
                c.addmm_(pa, pb, alpha=-1)
            else:
                c.sub_(pa @ pb)
            self.reduce_(c)
        return c

    def submatmul(self, c: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """(c − a @ b) mod p, a new tensor (see :meth:`submatmul_`; ``c`` is not modified)."""
        return self.submatmul_(c.clone(), a, b)

    def sum(self, x: Tensor, dim: int) -> Tensor:
        """Σ along ``dim`` mod p, exact (chunks of ``max_value / bound`` terms between reductions)."""
        step = max(1, (self.max_value - self.bound) // self.bound)
        n = x.shape[dim]
        out = None
        for start in range(0, n, step):
            part = x.narrow(dim, start, min(step, n - start)).sum(dim)
            out = part if out is None else out.add_(part)
            self.reduce_(out)
        if out is None:
            shape = list(x.shape)
            del shape[dim]
            return x.new_zeros(shape)
        return out

    def from_float(self, x: Tensor) -> Tensor:
        """The image of the real numbers ``x`` (any float dtype, finite) in GF(p): float64 residues.

        Exact: x = m · 2^e with an integer |m| < 2^53 maps to (m mod p) · (2^e mod p).

        Raises:
            ValueError: ``x`` holds NaN or inf.
        """
        x = x.to(torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("cannot map NaN or inf to GF(p): the values must be finite")
        mantissa, exponent = torch.frexp(x)  # x = mantissa · 2^exponent, 0.5 ≤ |mantissa| < 1
        m = self.reduce(torch.ldexp(mantissa, torch.tensor(53, device=x.device)))  # integer |m| < 2^53
        shift = exponent.to(torch.int64) - 53
        values, index = torch.unique(shift, return_inverse=True)
        table = torch.tensor(
            [self._center(pow(2, int(e), self.p)) for e in values.tolist()], dtype=torch.float64, device=x.device
        )
        return self.mul(m, table[index])

    def from_int(self, value: int) -> float:
        """The centred residue of a Python integer, as a float."""
        return float(self._center(value % self.p))

    def inverse(self, value: int | float) -> int:
        """The centred residue of 1 / ``value`` mod p (``value`` a nonzero residue)."""
        v = int(value) % self.p
        if v == 0:
            raise ZeroDivisionError("0 has no inverse in GF(p)")
        return self._center(pow(v, self.p - 2, self.p))

    def random(
        self, shape: tuple[int, ...], generator: torch.Generator, *, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Uniform nonzero residues of ``shape`` (float64 on ``device``), drawn from ``generator`` (a CPU one)."""
        draw = torch.randint(1, self.p, shape, generator=generator, dtype=torch.int64)
        return self.reduce_(draw.to(torch.float64)).to(device)

    def _center(self, r: int) -> int:
        return r - self.p if r > self.p // 2 else r


#: Elements of the trailing matrix updated per chunk of rows in :func:`rank_mod_p`: on CPU, a chunk small enough
#: to stay in cache through its copy, product and reductions (2^18: ~25% faster than 2^22, n = 2500, 1 thread); other
#: devices: a bound on the temporaries.
_UPDATE_CHUNK = {"cpu": 2**18}
_UPDATE_CHUNK_DEFAULT = 2**24


def rank_mod_p(a: Tensor, field: PrimeField, *, block_size: int = 256, upper_bound: int | None = None) -> int:
    """Rank of the matrix ``a`` over GF(p), exact.

    Blocked right-looking Gaussian elimination. For the trailing matrix T (at first ``a``), the pivots of its
    first ``block_size`` columns (the panel) are sought by an unblocked elimination of its first 2 · ``block_size``
    rows, giving rows R and columns C with T[R, C] invertible mod p; then rank(T) = |R| + rank(S) with the Schur
    complement S = T[rest, O] − T[rest, C] · (T[R, C]⁻¹ · T[R, O]) (O: the columns not in C), computed with exact
    products (:meth:`PrimeField.matmul`; S is formed raw and reduced once) and T[R, C]⁻¹ by Gauss–Jordan. For a
    symmetric matrix, :func:`rank_mod_p_symmetric` does about half the work. When these rows give no pivot, the
    elimination stops if T is zero, else drops T's leading zero columns or, if its first column is nonzero,
    examines every row of the panel. It also stops when T is empty or the rank reaches ``upper_bound``.

    Cost for a square n × n matrix of full rank: about (2/3) · n³ flops in BLAS, O(n³ / block_size) elementwise
    operations (copies and reductions of the trailing matrices), O(n · block_size²) elementwise operations in
    Python loops of one step per column (panel eliminations and inversions of T[R, C]), and one host
    synchronisation per panel column examined and per pivot. Deterministic.

    Args:
        a: (n, m) float64 tensor of centred residues of ``field``, on any device; not modified.
        field: the prime field.
        block_size: the panel width.
        upper_bound: if given, stop once the rank reaches it: the result is then min(rank, ``upper_bound``).
        overwrite: use ``a`` itself as the working matrix (its contents are destroyed): saves the n × n copy.

    Returns:
        The rank of ``a`` mod p (or min(rank, ``upper_bound``)).

    Raises:
        ValueError: ``a`` is not a matrix, or ``block_size`` < 1.
    """
    if a.ndim != 2:
        raise ValueError(f"rank_mod_p needs a matrix, got shape {tuple(a.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be positive")
    limit = min(a.shape) if upper_bound is None else max(0, min(*a.shape, upper_bound))
    rank = 0
    t = a  # read only: every step builds a new trailing matrix
    while rank < limit and t.shape[0] and t.shape[1]:
        width = min(block_size, t.shape[1])
        examined = min(2 * width, t.shape[0])
        rows, cols = _panel_pivots(t[:examined, :width], field, limit - rank)
        if not rows:  # no pivot in the candidate rows: is T zero, or its first columns?
            nonzero = t.any(dim=0).nonzero()
            if not nonzero.numel():
                break
            if first := int(nonzero[0]):  # drop the leading zero columns
                t = t[:, first:]
                continue
            # the first column is nonzero below the candidate rows: examine every row
            examined = t.shape[0]
            rows, cols = _panel_pivots(t[:, :width], field, limit - rank)
        rank += len(rows)
        if rank < limit:
            # every row examined: the panel's columns without a pivot are combinations of the pivot columns
            t = _schur_complement(t, rows, cols, width, examined == t.shape[0], field)
    return rank


def _panel_pivots(panel: Tensor, field: PrimeField, most: int) -> tuple[list[int], list[int]]:
    """Pivot rows and columns (at most ``most``) of an unblocked elimination of ``panel`` (not modified).

    The column j's pivot is the first row, among those not yet pivots, whose entry is nonzero after the
    elimination of the previous pivots; rows are scaled rather than divided (no inverse); one host sync per column.
    """
    work = panel.clone()
    n = work.shape[0]
    order = torch.arange(n, device=work.device)
    free = torch.ones(n, dtype=torch.bool, device=work.device)
    rows: list[int] = []
    cols: list[int] = []
    for j in range(work.shape[1]):
        if len(rows) == most:
            break
        column = work[:, j]
        r = int(torch.where(free & (column != 0), order, n).min())
        if r == n:
            continue
        rows.append(r)
        cols.append(j)
        free[r] = False
        if j + 1 < work.shape[1]:
            factors = torch.where(free, column, 0.0).unsqueeze(1)
            pivot_row = work[r, j + 1 :].clone()
            rest = work[:, j + 1 :]
            field.reduce_(rest.mul_(work[r, j]).sub_(factors * pivot_row))
    return rows, cols


def _inverse_mod_p(a: Tensor, field: PrimeField) -> Tensor:
    """a⁻¹ mod p by in-place Gauss–Jordan without pivoting (every leading minor of ``a`` must be nonzero)."""
    m = a.clone()
    for i in range(m.shape[0]):
        pinv = field.inverse(m[i, i].item())
        row = field.reduce_(m[i] * float(pinv))
        row[i] = pinv
        column = m[:, i].clone()
        column[i] = 0
        m[:, i] = 0
        field.reduce_(m.sub_(column.unsqueeze(1) * row))
        m[i] = row
    return m


def _schur_complement(
    t: Tensor, rows: list[int], cols: list[int], width: int, all_rows: bool, field: PrimeField
) -> Tensor:
    """S = T[rest, O] − T[rest, C] · (T[R, C]⁻¹ · T[R, O]) mod p (orders kept).

    R = ``rows``, C = ``cols`` (in the panel, the first ``width`` columns); rest: the rows not in R; O: the columns
    not in C, less the whole panel when ``all_rows`` (its columns without a pivot are then combinations of C).
    The rows of S are computed in chunks; rows below the last pivot row are read by slicing.
    """
    n, m = t.shape
    device = t.device
    top = max(rows) + 1
    pivots, taken = set(rows), set(cols)
    upper = torch.tensor([i for i in range(top) if i not in pivots], dtype=torch.long, device=device)
    left = torch.tensor(
        [] if all_rows else [j for j in range(width) if j not in taken], dtype=torch.long, device=device
    )
    c_index = torch.tensor(cols, dtype=torch.long, device=device)
    pivot_rows = t.index_select(0, torch.tensor(rows, dtype=torch.long, device=device))
    # the leading minors of T[R, C] (in pivot order) are nonzero: Gauss–Jordan needs no pivoting
    inverse = _inverse_mod_p(pivot_rows.index_select(1, c_index), field)
    y = field.matmul(inverse, torch.cat([pivot_rows.index_select(1, left), pivot_rows[:, width:]], dim=1))
    del pivot_rows, inverse
    w, u, size = left.numel(), upper.numel(), n - len(rows)
    out = t.new_empty(size, w + m - width)
    step = max(1, _UPDATE_CHUNK.get(device.type, _UPDATE_CHUNK_DEFAULT) // max(1, m))
    chunks = [(0, u)] if u else []
    chunks += [(start, min(start + step, size)) for start in range(u, size, step)]
    for start, stop in chunks:
        part = t.index_select(0, upper) if start < u else t[top + start - u : top + stop - u]
        target = out[start:stop]
        pivot_columns = part.index_select(1, c_index)
        # one reduction per entry: |T − T[·, C] · Y| ≤ bound + |C| · bound² when |C| ≤ max_inner
        product = pivot_columns @ y if len(cols) <= field.max_inner else field.matmul(pivot_columns, y)
        torch.sub(part[:, :width].index_select(1, left), product[:, :w], out=target[:, :w])
        torch.sub(part[:, width:], product[:, w:], out=target[:, w:])
        del product, pivot_columns
        field.reduce_(target)
    return out


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
