"""The rank of a matrix over GF(p), exact, by blocked right-looking Gaussian elimination.

:func:`rank_mod_p` takes an (n, m) float64 tensor of centred residues of a
:class:`~lightning_geomdim.core.finite_field.PrimeField`, on any device, and returns its rank mod p (an int).

Exact because every product and partial sum of residues stays below 2^53: the panel elimination subtracts one
product of two residues from another (≤ 2 · bound²) before reducing; the Schur complement T − T[·, C] · Y is formed
raw and reduced once while |C| ≤ ``max_inner`` (then |entry| ≤ bound + |C| · bound² ≤ ``max_value``), and by the
chunked :meth:`~lightning_geomdim.core.finite_field.PrimeField.matmul` beyond.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_geomdim.core.finite_field import PrimeField

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
    symmetric matrix, :func:`~lightning_geomdim.core.symmetric_rank_mod_p.rank_mod_p_symmetric` does about half the
    work. When these rows give no pivot, the elimination stops if T is zero, else drops T's leading zero columns or,
    if its first column is nonzero, examines every row of the panel. It also stops when T is empty or the rank
    reaches ``upper_bound``.

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
        pivot_columns = part.index_select(1, c_index)
        # one reduction per entry: |T − T[·, C] · Y| ≤ bound + |C| · bound² when |C| ≤ max_inner
        product = pivot_columns @ y if len(cols) <= field.max_inner else field.matmul(pivot_columns, y)
        torch.sub(part[:, :width].index_select(1, left), product[:, :w], out=target[:, :w])
        torch.sub(part[:, width:], product[:, w:], out=target[:, w:])
        del product, pivot_columns
        field.reduce_(target)
    return out
