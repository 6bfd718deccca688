"""Per-layer factors of the Jacobian: each measured layer's inputs U (N, T, D) and backprop signals
g = ∂f_k(x_n)/∂z_l (T, M, O), from one :class:`~lightning_geomdim.core.probe_trace.ProbeTrace` (the forms in
:mod:`lightning_geomdim.core.factor_forms`, the Gram in :mod:`lightning_geomdim.core.gram`)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_geomdim.core.errors import NotApplicableError
from lightning_geomdim.core.factor_forms import LayerFactors, factors_of
from lightning_geomdim.core.gram_plan import GramPlan
from lightning_geomdim.core.interrupt import checkpoint
from lightning_geomdim.core.probe_trace import ProbeTrace


def layer_factors(trace: ProbeTrace, plan: GramPlan, *, chunk_size: int | None = None) -> list[LayerFactors]:
    """Layer inputs (recorded by the trace) and backprop signals g = ∂f_k(x_n)/∂z_l (one batched backward per k).

    The trace added a zero δ requiring grad to each measured layer's output z, so that ∂f/∂δ = ∂f/∂z even when a
    later in-place activation overwrites z. The K cotangents (e_k for every sample) are backpropagated
    ``chunk_size`` at a time (default all) by :meth:`ProbeTrace.vjp`, keeping the trace's graph.
    """
    if not trace.factors:
        raise ValueError("the trace was recorded without the per-layer factors: record it with "
                         "ProbeTrace.of(..., factors=True)")
    modules = {layer.name: layer for layer in plan.layers}
    out = trace.measured_output(trace.fm.logit_head)
    deltas = {name: trace.deltas[name] for name in modules if name in trace.deltas}
    n, k = plan.num_samples, plan.outputs_per_sample
    if out.shape[0] != n or out.numel() != n * k or set(deltas) != set(modules):
        raise NotApplicableError(
            "the traced pass does not match the plan (a measured layer's output was not recorded, or the output "
            "has another size): use engine='jacrev'"
        )
    names = list(deltas)
    grads: list[list[Tensor]] = [[] for _ in names]
    step = k if chunk_size is None else max(1, min(int(chunk_size), k))
    if out.requires_grad:
        eye = torch.eye(k, dtype=out.dtype, device=out.device)
        for start in range(0, k, step):
            checkpoint()
            stop = min(start + step, k)
            cot = eye[start:stop].reshape(stop - start, 1, *out.shape[1:]).expand(stop - start, *out.shape)
            for i, g in enumerate(trace.vjp(out, [deltas[nm] for nm in names], cot)):
                grads[i].append(g)
    else:  # no measured layer reaches the output
        grads = [[torch.zeros((k, *deltas[nm].shape), dtype=out.dtype, device=out.device)] for nm in names]
    del out
    deltas.clear()
    factors = {}
    for nm, chunks in zip(names, grads, strict=True):
        g = torch.cat(chunks, dim=0).to(torch.float64)  # (K, N, *z)
        factors[nm] = factors_of(modules[nm], trace.layer_inputs[nm], g, n, k, trace.fm.frozen)
        chunks.clear()
    return [factors[layer.name] for layer in plan.layers]
