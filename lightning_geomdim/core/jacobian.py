"""The dense Jacobian engine: J = ∂ vec f_θ(X) / ∂θ with ``torch.func.jacrev``, then its SVD.

Works for any model ``torch.func`` can differentiate (vmap over reverse-mode VJPs). A model that
``torch.func`` cannot transform (e.g. an old-style ``autograd.Function`` without ``setup_context``, an op
without a batching rule) falls back, with a warning, to one plain ``torch.autograd.grad`` per output
coordinate: M backward passes, same result, slower. Memory is dominated
by J itself: about 3 · M · P · itemsize bytes at peak (the per-parameter blocks, their concatenation and
the SVD's working copy). ``chunk_size`` bounds how many VJPs are vmapped at once, which bounds the
backward intermediates but not J.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jacrev

from lightning_geomdim.core.functional_model import FunctionalModel, ProbeInputs
from lightning_geomdim.core.memory import check_memory, is_out_of_memory
from lightning_geomdim.core.rank import Spectrum


def jacobian_bytes(num_outputs: int, num_params: int, dtype: torch.dtype) -> int:
    """Peak memory estimate of :func:`jacobian_spectrum`, in bytes."""
    return 3 * num_outputs * num_params * torch.empty((), dtype=dtype).element_size()


def jacobian_matrix(fm: FunctionalModel, inputs: ProbeInputs, *, chunk_size: int | None = None) -> Tensor:
    """The dense Jacobian, shape (M, P), dtype ``fm.dtype``; columns in the order of ``fm.params``.

    Rows follow ``vec(f_θ(X))`` (row-major flattening of the output), so row n·K + k is ∂f_k(x_n)/∂θ
    for an (N, K) output; for a softmax head (``fm.logit_head``) the rows of its logit differences.
    """

    def flat_output(params: dict[str, Tensor]) -> Tensor:
        return fm.measured_output(params, inputs).reshape(-1)

    try:
        blocks = jacrev(flat_output, chunk_size=chunk_size)(fm.params)
    except RuntimeError as err:  # torch.func cannot transform this model: plain autograd, row by row
        if is_out_of_memory(err):  # out of memory is out of memory: M backward passes would not help
            raise
        warnings.warn(
            f"torch.func could not differentiate {type(fm.module).__name__} ({str(err).splitlines()[0][:160]}); "
            "computing the Jacobian with one torch.autograd.grad call per output instead (slower)",
            RuntimeWarning, stacklevel=3,
        )
        return _jacobian_by_rows(flat_output, fm.params)
    num_outputs = next(iter(blocks.values())).shape[0]
    return torch.cat([blocks[name].reshape(num_outputs, -1) for name in fm.params], dim=1)


def _jacobian_by_rows(flat_output: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor]) -> Tensor:
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    out = flat_output(leaves)
    rows = []
    for i in range(out.numel()):
        grads = torch.autograd.grad(out[i], list(leaves.values()), retain_graph=True, allow_unused=True)
        rows.append(torch.cat([
            (torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, leaves.values(), strict=True)
        ]))
    return torch.stack(rows)


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
