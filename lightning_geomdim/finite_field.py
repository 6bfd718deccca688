"""Exact arithmetic in the prime field GF(p), on float64 tensors, so that BLAS does the work.

A residue is stored as a float64 holding an integer r ≡ x (mod p) with |r| ≤ ``bound`` ≈ p / 2 (centred
residues: products are four times smaller than with 0 … p − 1). Every float64 integer of magnitude below
2^53 is exact, and so is every sum or product of such integers whose result stays below 2^53, whatever the
order of summation (fused multiply-adds included): a matrix product of residues is exact as long as its inner
dimension is at most ``max_inner = (2^53 − bound) / bound²``. :meth:`PrimeField.matmul` splits longer inner
dimensions into chunks and reduces after each, so CPU and CUDA BLAS compute exact products mod p.

The default prime p = 4,194,301 (the largest prime below 2^22) allows inner dimensions of 2,047 between
reductions.

Real numbers enter the field through :meth:`PrimeField.from_float`: a finite float64 is a dyadic rational
m · 2^e, and Z[1/2] → GF(p) (m · 2^e ↦ m · (2^e mod p)) is a ring homomorphism for odd p. A polynomial
matrix whose coefficients are float64 numbers therefore maps to GF(p) by a homomorphism: every minor of the
image is the image of a minor, so a rank computed mod p never exceeds the rank over the reals.
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
        self.max_inner = (_EXACT - self.bound) // (self.bound * self.bound)
        self._inv_p = 1.0 / p

    def __repr__(self) -> str:
        return f"PrimeField(p={self.p})"

    def reduce(self, x: Tensor) -> Tensor:
        """Centred residues of the float64 integers ``x`` (|x| < 2^53), a new tensor, same shape."""
        q = torch.round(x * self._inv_p)
        return x - q * self.p

    def reduce_(self, x: Tensor) -> Tensor:
        """In-place :meth:`reduce`."""
        q = torch.round(x * self._inv_p)
        return x.sub_(q.mul_(self.p))

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

    def sum(self, x: Tensor, dim: int) -> Tensor:
        """Σ along ``dim`` mod p, exact (chunks of ``_EXACT / bound`` terms between reductions)."""
        step = max(1, (_EXACT - self.bound) // self.bound)
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
        """The centred residue of a Python integer (or a rational's numerator/denominator pair via :meth:`inverse`)."""
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
    products (:meth:`PrimeField.matmul`) and T[R, C]⁻¹ by Gauss–Jordan. When these rows give no pivot, the
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
        product = field.matmul(part.index_select(1, c_index), y)
        torch.sub(part[:, :width].index_select(1, left), product[:, :w], out=target[:, :w])
        torch.sub(part[:, width:], product[:, w:], out=target[:, w:])
        del product
        field.reduce_(target)
    return out
