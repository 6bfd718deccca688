"""The dense Jacobian engine: J = ∂ vec f_θ(X) / ∂θ with ``torch.func.jacrev``, then its SVD.

Works for any model ``torch.func`` can differentiate (vmap over reverse-mode VJPs). Memory is dominated
by J itself: about 3 · M · P · itemsize bytes at peak (the per-parameter blocks, their concatenation and
the SVD's working copy). ``chunk_size`` bounds how many VJPs are vmapped at once, which bounds the
backward intermediates but not J.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jacrev

from lightning_geomdim.functional_model import FunctionalModel, ProbeInputs
from lightning_geomdim.memory import check_memory
from lightning_geomdim.rank import Spectrum


def jacobian_bytes(num_outputs: int, num_params: int, dtype: torch.dtype) -> int:
    """Peak memory estimate of :func:`jacobian_spectrum`, in bytes."""
    return 3 * num_outputs * num_params * torch.empty((), dtype=dtype).element_size()


def jacobian_matrix(fm: FunctionalModel, inputs: ProbeInputs, *, chunk_size: int | None = None) -> Tensor:
    """The dense Jacobian, shape (M, P), dtype ``fm.dtype``; columns in the order of ``fm.params``.

    Rows follow ``vec(f_θ(X))`` (row-major flattening of the output), so row n·K + k is ∂f_k(x_n)/∂θ
    for an (N, K) output.
    """

    def flat_output(params: dict[str, Tensor]) -> Tensor:
        return fm(params, inputs).reshape(-1)

    blocks = jacrev(flat_output, chunk_size=chunk_size)(fm.params)
    num_outputs = next(iter(blocks.values())).shape[0]
    return torch.cat([blocks[name].reshape(num_outputs, -1) for name in fm.params], dim=1)


def jacobian_spectrum(
    fm: FunctionalModel, inputs: ProbeInputs, num_outputs: int, *, chunk_size: int | None = None,
    budget: int,
) -> Spectrum:
    """Singular values of the dense Jacobian (exact SVD, the finest resolution: ~eps · max(M, P) · σ_max).

    Raises:
        MemoryBudgetError: before allocating, when :func:`jacobian_bytes` exceeds ``budget``.
    """
    num_params = fm.num_params
    check_memory(
        jacobian_bytes(num_outputs, num_params, fm.dtype), budget,
        what=f"the dense {num_outputs} × {num_params} Jacobian (engine='jacrev')",
        remedies="use a smaller probe (fewer samples), engine='gram' for Linear/Conv networks, or a "
        "subset of parameters via params=[...]",
    )
    jac = jacobian_matrix(fm, inputs, chunk_size=chunk_size)
    sv = torch.linalg.svdvals(jac)
    del jac
    return Spectrum(sv.to(torch.float64), fm.dtype, from_gram=False)
