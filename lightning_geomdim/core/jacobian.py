"""The dense Jacobian engine: J = ∂ vec f_θ(X) / ∂θ from the graph of one traced pass, then its SVD.

Rows of J are vector-Jacobian products through the :class:`~lightning_geomdim.core.probe_trace.ProbeTrace`'s
graph, ``chunk_size`` of them at once as one batched backward (``is_grads_batched``, vmap over the backward).
A model whose backward cannot be batched (an op without a batching rule, an old-style ``autograd.Function``)
falls back, with a warning, to one backward per output coordinate: M backward passes, same result, slower.
Memory: about 3 · M · P · itemsize bytes for J (J, the rows of a chunk, the SVD's working copy) plus, per row
of a chunk, the backward's intermediates, about A values of the forward pass (A = ``activation_numel``; measured
0.84–1.09 · A · itemsize per row on a ResNet-style CNN). :func:`jacobian_spectra` batches as many rows as fit
the memory budget, so a convolutional network whose activations dwarf J is measured in several chunks rather
than killed for memory (batching all M = 640 rows of a 10k-parameter ResNet-style CNN on 64 images of 32 × 32
would need about 32 GB).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_geomdim.core.errors import Remedy
from lightning_geomdim.core.interrupt import checkpoint, svd_flops
from lightning_geomdim.core.memory import VJP_BYTES_PER_ACTIVATION, rows_at_once
from lightning_geomdim.core.probe_trace import ProbeTrace
from lightning_geomdim.core.rank import Spectrum


def jacobian_bytes(num_outputs: int, num_params: int, dtype: torch.dtype) -> int:
    """Memory of J in :func:`jacobian_spectra` (J, a chunk of its rows, the SVD's copy), in bytes."""
    return 3 * num_outputs * num_params * torch.empty((), dtype=dtype).element_size()


def vjp_row_bytes(activations: int, dtype: torch.dtype) -> int:
    """Memory one row of a batched backward holds, for a forward pass of ``activations`` values, in bytes."""
    return int(VJP_BYTES_PER_ACTIVATION * activations * torch.empty((), dtype=dtype).element_size())


def jacobian_matrix(trace: ProbeTrace, *, chunk_size: int | None = None) -> Tensor:
    """The dense Jacobian, shape (M, P), dtype ``fm.dtype``; columns in the order of ``fm.params``.

    Rows follow ``vec(f_θ(X))`` (row-major flattening of the output), so row n·K + k is ∂f_k(x_n)/∂θ
    for an (N, K) output; for a softmax head (``fm.logit_head``) the rows of its logit differences.
    """
    out = trace.measured_output(trace.fm.logit_head).reshape(-1)
    m, theta = out.numel(), trace.theta
    jac = torch.zeros((m, theta.numel()), dtype=theta.dtype, device=theta.device)
    if not out.requires_grad:
        return jac
    step = m if chunk_size is None else max(1, min(int(chunk_size), m))
    for start in range(0, m, step):
        checkpoint()
        stop = min(start + step, m)
        cotangents = torch.zeros((stop - start, m), dtype=out.dtype, device=out.device)
        cotangents[:, start:stop].fill_diagonal_(1.0)
        (jac[start:stop],) = trace.vjp(out, [theta], cotangents)
        del cotangents
    return jac


def jacobian_spectra(
    trace: ProbeTrace, num_outputs: int, *, chunk_size: int | None = None, budget: int,
    alternatives: Sequence[Remedy] = (), blocks: Mapping[str, Sequence[str]] | None = None,
) -> tuple[Spectrum, dict[str, Spectrum]]:
    """Singular values of the dense Jacobian (exact SVD, the finest resolution: ~eps · max(M, P) · σ_max), and of
    its columns of each block (block name → parameter names, :mod:`lightning_geomdim.core.blocks`).

    ``chunk_size``: rows of J computed by one batched backward; default the most that fit ``budget`` next to J
    (each holds about :data:`~lightning_geomdim.core.memory.VJP_BYTES_PER_ACTIVATION` × A values of the
    forward pass).

    ``alternatives``: further remedies the caller knows apply (e.g. another engine), for the refusal's message.

    Raises:
        MemoryBudgetError: before allocating, when J with one row at a time (or ``chunk_size`` rows) exceeds
            ``budget``.
    """
    fm = trace.fm
    num_params = fm.num_params
    n = trace.inputs.num_samples

    def needed(samples: int) -> int:  # J on ``samples`` samples of the probe, one row at a time
        rows, values = -(-num_outputs * samples // n), -(-trace.activation_numel * samples // n)
        return jacobian_bytes(rows, num_params, fm.dtype) + vjp_row_bytes(values, fm.dtype)

    chunk = rows_at_once(
        num_outputs, chunk_size, fixed=jacobian_bytes(num_outputs, num_params, fm.dtype),
        per_row=vjp_row_bytes(trace.activation_numel, fm.dtype), budget=budget,
        by_samples=(n, needed),
        what=f"the dense {num_outputs} × {num_params} Jacobian (engine='jacrev') with its batched backward",
        remedies=(Remedy("use a smaller probe (fewer samples)"), *alternatives,
                  Remedy("a subset of parameters via {arg}=[...]", "params")),
    )
    jac = jacobian_matrix(trace, chunk_size=chunk)
    checkpoint(flops=svd_flops(*jac.shape))  # one LAPACK call: under a time limit, not begun if it would overrun
    whole = Spectrum(torch.linalg.svdvals(jac).to(torch.float64), fm.dtype, from_gram=False)
    offsets, start = {}, 0
    for name, p in fm.params.items():
        offsets[name] = (start, start + p.numel())
        start += p.numel()
    parts = {}
    for block, names in (blocks or {}).items():
        columns = torch.cat([torch.arange(*offsets[n], device=jac.device) for n in names])
        checkpoint(flops=svd_flops(jac.shape[0], columns.numel()))
        parts[block] = Spectrum(torch.linalg.svdvals(jac[:, columns]).to(torch.float64), fm.dtype, from_gram=False)
    del jac
    return whole, parts
