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

Ranks over GF(p): :mod:`.rank_mod_p` (any matrix) and :mod:`.symmetric_rank_mod_p` (symmetric matrices).
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
