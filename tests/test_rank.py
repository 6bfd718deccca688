"""Tolerance rules and spectrum statistics of lightning_geomdim.core.rank on explicit matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_geomdim.core.rank import (
    effective_rank,
    matrix_stable_rank,
    numerical_rank,
    rank_tolerance,
    spectral_gap,
    stable_rank,
)


def test_svd_rule_is_numpys_matrix_rank() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 7, generator=g, dtype=torch.float64) @ torch.randn(7, 60, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(a)
    tol = rank_tolerance(float(s[0]), 40, 60, torch.float64)
    assert tol == pytest.approx(float(s[0]) * 60 * np.finfo(np.float64).eps)
    assert numerical_rank(s, tol) == np.linalg.matrix_rank(a.numpy()) == 7


def test_gram_rule_thresholds_the_eigenvalues() -> None:
    tol = rank_tolerance(2.0, 10, 1000, torch.float64, from_gram=True)
    eps = np.finfo(np.float64).eps
    assert tol**2 == pytest.approx(2.0**2 * 1000 * eps)  # λ > λ_max · max(M, P) · eps


def test_gram_rule_recovers_rank_from_eigenvalues() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(30, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 80, generator=g, dtype=torch.float64)
    lam = torch.linalg.eigvalsh(a @ a.T).flip(0).clamp_min(0)
    s = lam.sqrt()
    assert numerical_rank(s, rank_tolerance(float(s[0]), 30, 80, torch.float64, from_gram=True)) == 5
    # the SVD rule applied to √λ over-counts: Gram round-off sits far above eps · σ_max
    assert numerical_rank(s, rank_tolerance(float(s[0]), 30, 80, torch.float64)) > 5


def test_rtol_and_dtype() -> None:
    assert rank_tolerance(3.0, 5, 5, torch.float64, rtol=0.5) == 1.5
    assert rank_tolerance(1.0, 5, 5, torch.float32) == pytest.approx(5 * np.finfo(np.float32).eps)
    with pytest.raises(ValueError, match="non-negative"):
        rank_tolerance(1.0, 5, 5, torch.float64, rtol=-1.0)


def test_gap_stable_and_effective_rank() -> None:
    s = torch.tensor([4.0, 2.0, 1e-20], dtype=torch.float64)
    assert spectral_gap(s, 2) == pytest.approx(2e20)
    assert spectral_gap(s, 3) == math.inf
    assert math.isnan(spectral_gap(s, 0))
    assert stable_rank(s) == pytest.approx((16 + 4) / 16)
    p = torch.tensor([4.0, 2.0]) / 6
    assert effective_rank(s) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)
    zero = torch.zeros(3, dtype=torch.float64)
    assert stable_rank(zero) == 0.0 and effective_rank(zero) == 0.0


@pytest.mark.parametrize("shape", [(7, 40), (40, 7), (12, 12), (1, 5)])
def test_matrix_stable_rank_is_the_ratio_of_numpys_singular_values(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(*shape, generator=gen, dtype=torch.float64)
    a[:, 0] *= 30.0  # a dominant direction: the ratio is far from its maximum min(m, n)
    s = np.linalg.svd(a.numpy(), compute_uv=False)
    assert matrix_stable_rank(a) == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-12)
    assert matrix_stable_rank(a.float()) == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-6)


def test_matrix_stable_rank_of_a_rank_one_zero_and_empty_matrix() -> None:
    u, v = torch.arange(1.0, 6.0, dtype=torch.float64), torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    assert matrix_stable_rank(torch.outer(u, v)) == pytest.approx(1.0, rel=1e-12)
    assert matrix_stable_rank(torch.zeros(4, 9)) == 0.0
    assert matrix_stable_rank(torch.zeros(0, 9)) == 0.0
