"""PrimeField arithmetic against Python integers, and rank_mod_p against python-flint's exact rank mod p."""

from __future__ import annotations

import random
from collections.abc import Callable
from fractions import Fraction

import pytest
import torch
from torch import Tensor

from lightning_geomdim.finite_field import DEFAULT_PRIME, PrimeField, rank_mod_p

FIELD = PrimeField()
P = DEFAULT_PRIME


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    for x in [low_rank(300, 250, 170, seed=11), low_rank(64, 64, 64, seed=12)]:
        x[:16, :8] = 0
        before = x.clone()
        on_gpu = x.cuda()
        assert rank_mod_p(on_gpu, FIELD, block_size=16) == rank_mod_p(x, FIELD, block_size=16)
        assert torch.equal(on_gpu.cpu(), before)
