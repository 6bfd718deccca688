"""PrimeField arithmetic against Python integers; rank_mod_p and rank_mod_p_symmetric against python-flint's exact
rank mod p."""

from __future__ import annotations

import random
from collections.abc import Callable
from fractions import Fraction

import pytest
import torch
from torch import Tensor

import lightning_geomdim.core.symmetric_rank_mod_p as symmetric
from lightning_geomdim.core.finite_field import DEFAULT_PRIME, PrimeField
from lightning_geomdim.core.rank_mod_p import rank_mod_p
from lightning_geomdim.core.symmetric_rank_mod_p import rank_mod_p_symmetric

FIELD = PrimeField()
P = DEFAULT_PRIME
#: The largest prime below 2^24: max_inner = 127, so small matrices exercise the chunked products and the
#: reductions that rank_mod_p_symmetric delays.
BIG = PrimeField(16_777_213)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def low_rank(n: int, m: int, r: int, seed: int, field: PrimeField = FIELD) -> Tensor:
    """A residue matrix (n, m) of rank r mod p (with overwhelming probability for the default prime)."""
    if r == 0:
        return torch.zeros(n, m, dtype=torch.float64)
    g = gen(seed)
    return field.matmul(field.random((n, r), g), field.random((r, m), g))


@pytest.fixture
def flint_rank() -> Callable[[Tensor, PrimeField], int]:
    flint = pytest.importorskip("flint")

    def rank(x: Tensor, field: PrimeField = FIELD) -> int:
        n, m = x.shape
        if n == 0 or m == 0:
            return 0
        entries = [int(v) % field.p for v in x.flatten().tolist()]
        return flint.nmod_mat(n, m, entries, field.p).rank()

    return rank


def check_rank(x: Tensor, flint_rank: Callable[..., int], block_size: int, field: PrimeField = FIELD) -> int:
    """rank_mod_p(x) == the flint rank, and x is left as it was; returns the rank."""
    before = x.clone()
    got = rank_mod_p(x, field, block_size=block_size)
    assert torch.equal(x, before)
    expected = flint_rank(x, field)
    assert got == expected
    return got


# --- PrimeField -------------------------------------------------------------------------------------------------


def test_reduce_agrees_with_python_mod() -> None:
    rng = random.Random(0)
    edge = [0, 1, -1, P, -P, P // 2, P // 2 + 1, -(P // 2) - 1, 2**53 - 1, -(2**53 - 1), 2**52 + 12345]
    values = edge + [rng.randrange(-(2**53) + 1, 2**53) for _ in range(5000)]
    reduced = FIELD.reduce(torch.tensor(values, dtype=torch.float64)).tolist()
    for x, r in zip(values, reduced, strict=True):
        assert r == int(r)
        assert abs(r) <= FIELD.bound
        assert (int(r) - x) % P == 0
    x = torch.tensor(values, dtype=torch.float64)
    assert torch.equal(FIELD.reduce_(x.clone()), FIELD.reduce(x))


def _check_reduced(field: PrimeField, values: list[int]) -> None:
    """reduce and reduce_ (also on unaligned and short tensors: vectorised loops and their scalar tails)."""
    x = torch.tensor(values, dtype=torch.float64)
    assert x.tolist() == values  # the inputs are exact float64 integers
    cases = [(field.reduce(x), values), (field.reduce_(x.clone()), values)]
    cases += [(field.reduce(x[1:]), values[1:]), (field.reduce_(x[:5].clone()), values[:5])]
    for got, expected in cases:
        for v, r in zip(expected, got.tolist(), strict=True):
            assert r == int(r) and abs(r) <= field.bound
            assert (int(r) - v) % field.p == 0, (field.p, v, r)


def _near(limit: int, p: int) -> list[int]:
    """Integers of magnitude ≤ limit within a few p of it, both signs."""
    values = [limit - i for i in range(0, 3 * p, 997)] + [limit - i for i in range(3000)]
    return values + [-v for v in values]


def test_bounds_of_the_field() -> None:
    for field in (FIELD, BIG, PrimeField(3), PrimeField(4_194_217)):
        assert field.max_value == 2**53 - field.p
        assert field.max_inner * field.bound**2 + field.bound <= field.max_value
        assert (field.max_inner + 1) * field.bound**2 + field.bound > field.max_value
    assert FIELD.max_inner == 2047
    assert BIG.max_inner == 127


@pytest.mark.parametrize("p", [DEFAULT_PRIME, 4_194_217, 16_777_213])
def test_reduce_is_exact_up_to_max_value(p: int) -> None:
    field = PrimeField(p)
    _check_reduced(field, _near(field.max_value, p))


def test_reduce_near_two_to_the_53() -> None:
    # for the default prime, round(x / p) · p < 2^53 whenever |x| < 2^53 (2^53 mod p < p / 2): exact everywhere
    assert 2**53 % P < P // 2
    _check_reduced(FIELD, _near(2**53 - 1, P))


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="needs torch's fused (FMA) CPU kernels"
)
def test_reduce_near_two_to_the_53_with_fused_subtraction() -> None:
    # 2^53 mod p > p / 2: round(x / p) · p exceeds 2^53 near it; x − p · q is still exact when torch fuses it
    p = 4_194_217
    assert 2**53 % p > p // 2
    field = PrimeField(p)
    assert any(abs(round(v / p) * p) > 2**53 for v in _near(2**53 - 1, p))
    _check_reduced(field, _near(2**53 - 1, p))


@pytest.mark.parametrize("field", [FIELD, BIG], ids=["default", "big"])
@pytest.mark.parametrize("k", [0, 1, 100, 127, 128, 300])
def test_submatmul_is_exact(field: PrimeField, k: int) -> None:
    g = gen(20 + k)
    a, b, c = field.random((5, k), g), field.random((k, 7), g), field.random((5, 7), g)
    c_before = c.clone()
    got = field.submatmul(c, a, b)
    assert torch.equal(c, c_before)
    assert got.abs().max() <= field.bound
    ia, ib, ic = (([int(v) for v in row] for row in x.tolist()) for x in (a, b, c))
    ia, ib, ic = list(ia), list(ib), list(ic)
    for i in range(5):
        for j in range(7):
            exact = ic[i][j] - sum(ia[i][t] * ib[t][j] for t in range(k))
            assert (int(got[i, j]) - exact) % field.p == 0
    assert torch.equal(field.submatmul_(c, a, b), got)  # in place, same result
    batched = field.submatmul(c_before.expand(2, 5, 7), a.expand(2, 5, k), b.expand(2, k, 7))
    assert torch.equal(batched, got.expand(2, 5, 7))


def test_matmul_chunks_inner_dimension_exactly() -> None:
    g = gen(1)
    k = 5000
    assert k > FIELD.max_inner
    a, b = FIELD.random((3, k), g), FIELD.random((k, 4), g)
    got = FIELD.matmul(a, b)
    assert got.abs().max() <= FIELD.bound
    ia, ib = [[int(v) for v in row] for row in a.tolist()], [[int(v) for v in row] for row in b.tolist()]
    for i in range(3):
        for j in range(4):
            exact = sum(ia[i][t] * ib[t][j] for t in range(k))
            assert (int(got[i, j]) - exact) % P == 0


@pytest.mark.parametrize("value", [0.5, -3.0, 1 / 3, 1e-300, 2.0**-60, 0.0, 123456789.125, -(2.0**70)])
def test_from_float_is_the_dyadic_homomorphism(value: float) -> None:
    got = FIELD.from_float(torch.tensor([value], dtype=torch.float64)).item()
    assert abs(got) <= FIELD.bound
    q = Fraction(value)
    expected = q.numerator * FIELD.inverse(q.denominator % P)
    assert (int(got) - expected) % P == 0


def test_inverse() -> None:
    for v in [1, -1, 2, 3, P // 2, -(P // 2), 1234567, P + 5]:
        inv = FIELD.inverse(v)
        assert abs(inv) <= P // 2
        assert (v * inv) % P == 1
    for zero in [0, P, -2 * P]:
        with pytest.raises(ZeroDivisionError):
            FIELD.inverse(zero)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_from_float_refuses_non_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        FIELD.from_float(torch.tensor([1.0, bad]))


# --- rank_mod_p -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "m", "r", "block"),
    [
        (12, 9, 0, 4),  # zero matrix
        (15, 11, 1, 4),
        (20, 20, 3, 8),  # r < block
        (20, 20, 8, 8),  # r == block
        (40, 30, 19, 4),  # several panels
        (24, 24, 24, 4),  # full rank, square
        (40, 13, 13, 4),  # full rank, tall
        (13, 40, 13, 4),  # full rank, wide
        (50, 20, 11, 4),
        (20, 50, 11, 8),
        (10, 10, 6, 1),
        (10, 12, 7, 64),  # one panel wider than the matrix
    ],
)
def test_rank_of_low_rank_products(n: int, m: int, r: int, block: int, flint_rank: Callable[..., int]) -> None:
    assert check_rank(low_rank(n, m, r, seed=n * 1000 + m * 10 + r), flint_rank, block) == r


def test_zero_columns_in_first_panel(flint_rank: Callable[..., int]) -> None:
    x = low_rank(30, 20, 12, seed=2)
    x[:, [0, 2]] = 0
    check_rank(x, flint_rank, 4)


def test_duplicated_columns_in_a_panel(flint_rank: Callable[..., int]) -> None:
    x = FIELD.random((25, 16), gen(3))
    x[:, 1] = x[:, 0]
    x[:, 3] = FIELD.reduce(2 * x[:, 0])
    x[:, 6] = x[:, 5]
    assert check_rank(x, flint_rank, 4) == 13


def test_panel_zero_in_candidate_rows_only(flint_rank: Callable[..., int]) -> None:
    block = 4
    x = low_rank(30, 20, 10, seed=4)
    x[: 2 * block, :block] = 0  # the first panel's candidate rows are zero, the rows below are not
    assert check_rank(x, flint_rank, block) > 0
    x[2 * block :] = 0  # and now the whole first panel
    check_rank(x, flint_rank, block)


def test_candidate_rows_give_fewer_pivots_than_all_rows(flint_rank: Callable[..., int]) -> None:
    block = 4
    g = gen(5)
    x = FIELD.random((30, 12), g)
    u, v = FIELD.random((2 * block, 1), g), FIELD.random((1, block), g)
    x[: 2 * block, :block] = FIELD.matmul(u, v)  # rank 1 in the candidate rows, rank 4 below
    assert check_rank(x, flint_rank, block) == 12


def test_panels_zero_in_every_row(flint_rank: Callable[..., int]) -> None:
    x = low_rank(18, 24, 9, seed=6)
    x[:, :4] = 0
    x[:, 8:16] = 0
    check_rank(x, flint_rank, 4)


def test_wide_matrix_with_leading_zero_columns(flint_rank: Callable[..., int]) -> None:
    x = torch.zeros(20, 3000, dtype=torch.float64)
    x[:, 1500] = FIELD.random((20,), gen(13))
    x[15:, -1] = 1.0  # nonzero only below the candidate rows
    assert check_rank(x, flint_rank, 4) == 2


def test_zero_rows(flint_rank: Callable[..., int]) -> None:
    x = low_rank(30, 25, 15, seed=7)
    x[::3] = 0
    x[:10] = 0
    check_rank(x, flint_rank, 4)


@pytest.mark.parametrize("p", [3, 5, 7, 101])
@pytest.mark.parametrize("seed", range(4))
def test_random_matrices_mod_small_primes(p: int, seed: int, flint_rank: Callable[..., int]) -> None:
    # many accidental zeros and dependencies: every branch of the pivot search
    field = PrimeField(p)
    g = gen(100 * p + seed)
    n, m = 20 + 7 * seed, 33 - 5 * seed
    x = field.reduce_(torch.randint(0, p, (n, m), generator=g).to(torch.float64))
    x[:, torch.randint(0, m, (m // 3,), generator=g)] = 0
    check_rank(x, flint_rank, 1 + seed * 2, field)


def test_symmetric_gram(flint_rank: Callable[..., int]) -> None:
    x = FIELD.random((80, 30), gen(8))
    assert check_rank(FIELD.matmul(x, x.T), flint_rank, 8) == 30


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_empty(shape: tuple[int, int]) -> None:
    assert rank_mod_p(torch.zeros(shape, dtype=torch.float64), FIELD) == 0


def test_one_by_one() -> None:
    assert rank_mod_p(torch.zeros(1, 1, dtype=torch.float64), FIELD) == 0
    assert rank_mod_p(torch.full((1, 1), -5.0, dtype=torch.float64), FIELD) == 1


@pytest.mark.parametrize("bound", [0, 1, 5, 9, 10, 11, 100])
def test_upper_bound_stops_early(bound: int) -> None:
    x = low_rank(30, 26, 10, seed=9)
    before = x.clone()
    assert rank_mod_p(x, FIELD, block_size=4, upper_bound=bound) == min(10, bound)
    assert torch.equal(x, before)


def test_large_matrix_blas_path(flint_rank: Callable[..., int]) -> None:
    assert check_rank(low_rank(600, 600, 450, seed=10), flint_rank, 64) == 450


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="matrix"):
        rank_mod_p(torch.zeros(3, dtype=torch.float64), FIELD)
    with pytest.raises(ValueError, match="block_size"):
        rank_mod_p(torch.zeros(3, 3, dtype=torch.float64), FIELD, block_size=0)


def test_rank_of_product_with_long_inner_dimension(flint_rank: Callable[..., int]) -> None:
    # the product of random n × k and k × n residue matrices has rank k, also when k exceeds max_inner (chunked
    # products); with p ≈ 2^24, max_inner = 127 (same structure as 5400 × 3780 · 3780 × 5400 with the default prime,
    # which rank_mod_p and flint both give rank 3780)
    g = gen(30)
    x, y = BIG.random((300, 200), g), BIG.random((200, 300), g)
    assert flint_rank(x, BIG) == flint_rank(y, BIG) == 200
    assert check_rank(BIG.matmul(x, y), flint_rank, 64, BIG) == 200
    assert check_rank(BIG.matmul(x, y), flint_rank, 256, BIG) == 200
    assert check_symmetric_rank(BIG.matmul(x, x.T), flint_rank, 64, BIG) == 200


# --- rank_mod_p_symmetric ---------------------------------------------------------------------------------------


def symmetric_low_rank(n: int, r: int, seed: int, field: PrimeField = FIELD) -> Tensor:
    """X D Xᵀ for random residues X (n, r) and a random nonzero diagonal D: rank r mod p (overwhelmingly)."""
    if r == 0:
        return torch.zeros(n, n, dtype=torch.float64)
    g = gen(seed)
    x, d = field.random((n, r), g), field.random((r,), g)
    return field.matmul(field.mul(x, d), x.T)


def check_symmetric_rank(x: Tensor, flint_rank: Callable[..., int], block_size: int, field: PrimeField = FIELD) -> int:
    """rank_mod_p_symmetric(x) == the flint rank, and x is left as it was; the same from the lower triangle
    alone (upper one zeros), in place (``overwrite=True``) or not; returns the rank."""
    assert torch.equal(x, x.T)
    before = x.clone()
    got = rank_mod_p_symmetric(x, field, block_size=block_size)
    assert torch.equal(x, before)
    assert got == flint_rank(x, field)
    lower = x.tril()
    assert rank_mod_p_symmetric(lower, field, block_size=block_size) == got
    assert torch.equal(lower, x.tril())
    assert rank_mod_p_symmetric(lower, field, block_size=block_size, overwrite=True) == got
    return got


@pytest.mark.parametrize(
    ("n", "r", "block"),
    [
        (12, 0, 4),  # zero matrix
        (15, 1, 4),
        (20, 3, 8),  # r < block
        (20, 8, 8),  # r == block
        (40, 19, 4),  # several panels
        (24, 24, 4),  # full rank
        (30, 30, 8),
        (50, 37, 8),
        (45, 20, 20),  # sub-blocks of sweeps 8, 8, 4 in a panel
        (33, 33, 3),
        (10, 6, 1),
        (10, 7, 64),  # one panel wider than the matrix
    ],
)
def test_symmetric_rank_of_low_rank_products(n: int, r: int, block: int, flint_rank: Callable[..., int]) -> None:
    assert check_symmetric_rank(symmetric_low_rank(n, r, seed=n * 100 + r), flint_rank, block) == r


def test_sweep_gives_the_inverse() -> None:
    flint = pytest.importorskip("flint")
    p = P
    x = FIELD.random((6, 6), gen(40))
    a = FIELD.reduce_(x + x.T)
    m = [[int(v) % p for v in row] for row in a.tolist()]
    assert symmetric._sweep_ints(m, p, 6) == list(range(6))  # every leading principal minor is nonzero here
    inverse = flint.nmod_mat(6, 6, [int(v) % p for v in a.flatten().tolist()], p).inv()
    assert [[(-v) % p for v in row] for row in m] == [[int(inverse[i, j]) for j in range(6)] for i in range(6)]
    # the blocked sweep of a panel: pivots and W = T[R, R]⁻¹, with a zero diagonal entry skipped
    b = symmetric_low_rank(20, 20, seed=41)
    b[2, 2] = 0.0
    pivots, w = symmetric._principal_pivots(b, FIELD, 20)
    assert 2 not in pivots[:1] and len(pivots) >= 18
    index = torch.tensor(pivots)
    product = FIELD.matmul(w, b[index][:, index])
    assert torch.equal(product, torch.eye(len(pivots), dtype=torch.float64))


def _hyperbolic(k: int) -> Tensor:
    """The direct sum of k blocks [[0, 1], [1, 0]]: rank 2k, zero diagonal."""
    a = torch.zeros(2 * k, 2 * k, dtype=torch.float64)
    a[torch.arange(0, 2 * k, 2), torch.arange(1, 2 * k, 2)] = 1.0
    return a + a.T


def test_symmetric_zero_diagonal(flint_rank: Callable[..., int]) -> None:
    assert check_symmetric_rank(_hyperbolic(1), flint_rank, 4) == 2
    assert check_symmetric_rank(_hyperbolic(6), flint_rank, 4) == 12  # no principal pivot at all
    # zero-diagonal candidates first, nonzero diagonal entries further on: swapped into the candidates
    a = torch.block_diag(_hyperbolic(5), symmetric_low_rank(14, 9, seed=42))
    assert check_symmetric_rank(a, flint_rank, 4) == 19
    # the same after a first panel: in the working copy, unreduced
    first = symmetric_low_rank(4, 4, seed=53)
    a = torch.block_diag(first, _hyperbolic(2), symmetric_low_rank(6, 6, seed=54))
    assert check_symmetric_rank(a, flint_rank, 4) == 14
    assert check_symmetric_rank(torch.block_diag(first, _hyperbolic(3)), flint_rank, 4) == 10
    # random symmetric with a zero diagonal
    x = FIELD.random((30, 30), gen(43))
    a = FIELD.reduce_(x + x.T).fill_diagonal_(0.0)
    check_symmetric_rank(a, flint_rank, 8)
    # a zero diagonal entry among the candidates, its row nonzero: it stays a candidate
    a = symmetric_low_rank(24, 24, seed=44)
    a[0, 0] = a[5, 5] = 0.0
    assert check_symmetric_rank(a, flint_rank, 8) == 24


def test_symmetric_gram_of_isotropic_rows(flint_rank: Callable[..., int]) -> None:
    # X Xᵀ with every row of X isotropic mod p (x · x ≡ 0): a zero diagonal, and zero Schur diagonals
    i = 1_530_975  # √−1 mod p
    assert (i * i + 1) % P == 0
    y = FIELD.random((30, 10), gen(45))
    yy = FIELD.sum(FIELD.mul(y, y), 1)  # y · y
    half = FIELD.inverse(2)
    s = FIELD.mul(FIELD.reduce(1 - yy), torch.full_like(yy, half))  # s² − s'² = −y · y with s − s' = 1
    s_ = FIELD.reduce(s - 1)
    x = torch.cat([y, s[:, None], FIELD.mul(s_, torch.full_like(s_, i))[:, None]], dim=1)
    gram = FIELD.matmul(x, x.T)
    assert not gram.diagonal().any()
    assert check_symmetric_rank(gram, flint_rank, 4) == 12
    assert check_symmetric_rank(gram, flint_rank, 8) == 12


def test_symmetric_zero_and_duplicated_rows(flint_rank: Callable[..., int]) -> None:
    a = symmetric_low_rank(30, 20, seed=46)
    a[:6], a[:, :6] = 0.0, 0.0  # zero rows and columns at the front
    a[::4], a[:, ::4] = 0.0, 0.0
    check_symmetric_rank(a, flint_rank, 4)
    a[:20], a[:, :20] = 0.0, 0.0  # more than a panel of them
    check_symmetric_rank(a, flint_rank, 8)
    g = gen(47)
    x, d = FIELD.random((20, 20), g), FIELD.random((20,), g)
    x[3], x[5], x[11] = x[1], FIELD.reduce(2 * x[0]), x[1]  # duplicated (and proportional) rows and columns
    assert check_symmetric_rank(FIELD.matmul(FIELD.mul(x, d), x.T), flint_rank, 4) == 17


@pytest.mark.parametrize("p", [3, 5, 7, 101])
@pytest.mark.parametrize("seed", range(4))
def test_symmetric_random_mod_small_primes(p: int, seed: int, flint_rank: Callable[..., int]) -> None:
    # many accidental zeros on the diagonal and dependencies: every branch of the pivot search
    field = PrimeField(p)
    g = gen(200 * p + seed)
    n = 15 + 6 * seed
    x = torch.randint(0, p, (n, n), generator=g).to(torch.float64)
    a = field.reduce_(x + x.T)
    if seed % 2:
        a.fill_diagonal_(0.0)
    zero = torch.randint(0, n, (n // 4,), generator=g)
    a[:, zero], a[zero] = 0.0, 0.0
    check_symmetric_rank(a, flint_rank, 1 + seed * 3, field)


@pytest.mark.parametrize(("n", "r", "block"), [(200, 200, 32), (200, 150, 64), (260, 255, 127), (150, 90, 300)])
def test_symmetric_delayed_reductions_and_chunks(
    n: int, r: int, block: int, flint_rank: Callable[..., int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # p ≈ 2^24: the trailing matrix must be reduced every few steps; tiny chunks of rows: many chunks
    a = symmetric_low_rank(n, r, seed=n + r, field=BIG)
    assert check_symmetric_rank(a, flint_rank, block, BIG) == r
    monkeypatch.setitem(symmetric._SYMMETRIC_CHUNK, "cpu", 64)
    assert check_symmetric_rank(a, flint_rank, block, BIG) == r


def test_symmetric_large_matrix(flint_rank: Callable[..., int]) -> None:
    assert check_symmetric_rank(symmetric_low_rank(600, 450, seed=48), flint_rank, 64) == 450
    x = FIELD.random((500, 500), gen(49))
    assert check_symmetric_rank(FIELD.reduce_(x + x.T), flint_rank, 256) == 500


def test_symmetric_empty_and_one_by_one() -> None:
    assert rank_mod_p_symmetric(torch.zeros(0, 0, dtype=torch.float64), FIELD) == 0
    assert rank_mod_p_symmetric(torch.zeros(1, 1, dtype=torch.float64), FIELD) == 0
    assert rank_mod_p_symmetric(torch.full((1, 1), -5.0, dtype=torch.float64), FIELD) == 1


@pytest.mark.parametrize("bound", [0, 1, 5, 8, 9, 10, 11, 100])
def test_symmetric_upper_bound_stops_early(bound: int) -> None:
    x = symmetric_low_rank(30, 10, seed=50)
    before = x.clone()
    assert rank_mod_p_symmetric(x, FIELD, block_size=4, upper_bound=bound) == min(10, bound)
    assert rank_mod_p_symmetric(x, FIELD, block_size=16, upper_bound=bound) == min(10, bound)
    assert torch.equal(x, before)
    assert rank_mod_p_symmetric(_hyperbolic(8), FIELD, block_size=4, upper_bound=bound) == min(16, bound)


def test_symmetric_bad_arguments() -> None:
    with pytest.raises(ValueError, match="square"):
        rank_mod_p_symmetric(torch.zeros(3, 4, dtype=torch.float64), FIELD)
    with pytest.raises(ValueError, match="float64"):
        rank_mod_p_symmetric(torch.zeros(3, 3), FIELD)
    with pytest.raises(ValueError, match="block_size"):
        rank_mod_p_symmetric(torch.zeros(3, 3, dtype=torch.float64), FIELD, block_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_symmetric_cuda_matches_cpu() -> None:
    for a in [symmetric_low_rank(300, 170, seed=51), symmetric_low_rank(64, 64, seed=52), _hyperbolic(20)]:
        before = a.clone()
        on_gpu = a.cuda()
        assert rank_mod_p_symmetric(on_gpu, FIELD, block_size=16) == rank_mod_p_symmetric(a, FIELD, block_size=16)
        assert torch.equal(on_gpu.cpu(), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    for x in [low_rank(300, 250, 170, seed=11), low_rank(64, 64, 64, seed=12)]:
        x[:16, :8] = 0
        before = x.clone()
        on_gpu = x.cuda()
        assert rank_mod_p(on_gpu, FIELD, block_size=16) == rank_mod_p(x, FIELD, block_size=16)
        assert torch.equal(on_gpu.cpu(), before)
