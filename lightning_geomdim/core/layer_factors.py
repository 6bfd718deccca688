"""Per-layer factors of the Jacobian: each measured layer's inputs U (N, T, D) and backprop signals
g = ∂f_k(x_n)/∂z_l (T, M, O), from one :class:`~lightning_geomdim.core.probe_trace.ProbeTrace` (formulas in
:mod:`lightning_geomdim.core.gram`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_geomdim.core.errors import NotApplicableError
from lightning_geomdim.core.gram_plan import GramLayer, GramPlan
from lightning_geomdim.core.interrupt import checkpoint
from lightning_geomdim.core.probe_trace import ProbeTrace
from lightning_geomdim.core.structure import conv_padding


@dataclass(frozen=True)
class LayerFactors:
    """Per-layer factors in float64: ``inputs`` U (N, T, D) and ``signals`` (T, M, O), rows n · K + k."""

    layer: GramLayer
    inputs: Tensor
    signals: Tensor


def layer_factors(trace: ProbeTrace, plan: GramPlan, *, chunk_size: int | None = None) -> list[LayerFactors]:
    """Layer inputs (recorded by the trace) and backprop signals g = ∂f_k(x_n)/∂z_l (one batched backward per k).

    The trace added a zero δ requiring grad to each measured layer's output z, so that ∂f/∂δ = ∂f/∂z even when a
    later in-place activation overwrites z. The K cotangents (e_k for every sample) are backpropagated
    ``chunk_size`` at a time (default all) with ``is_grads_batched``, keeping the trace's graph.
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
            parts = torch.autograd.grad(out, [deltas[nm] for nm in names], grad_outputs=cot, retain_graph=True,
                                        is_grads_batched=True, allow_unused=True)
            for i, (nm, g) in enumerate(zip(names, parts, strict=True)):
                grads[i].append(torch.zeros((stop - start, *deltas[nm].shape), dtype=out.dtype, device=out.device)
                                if g is None else g)
    else:  # no measured layer reaches the output
        grads = [[torch.zeros((k, *deltas[nm].shape), dtype=out.dtype, device=out.device)] for nm in names]
    del out
    deltas.clear()
    factors = {}
    for nm, chunks in zip(names, grads, strict=True):
        g = torch.cat(chunks, dim=0).to(torch.float64)  # (K, N, *z)
        factors[nm] = unify(modules[nm], trace.layer_inputs[nm].to(torch.float64), g, n, k)
        chunks.clear()
    return [factors[layer.name] for layer in plan.layers]


def unify(layer: GramLayer, h: Tensor, g: Tensor, n: int, k: int) -> LayerFactors:
    """U (N, T, D) and signals (T, N·K, O) for a Linear or Conv2d layer."""
    m = layer.module
    if isinstance(m, nn.Linear):
        u = h.reshape(n, -1, layer.features)
        sig = g.reshape(k, n, -1, layer.units)
    else:
        assert isinstance(m, nn.Conv2d)
        pad = conv_padding(m)
        assert pad is not None
        u = F.unfold(h, m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride).transpose(1, 2)
        sig = g.reshape(k, n, layer.units, -1).transpose(2, 3)
    # (K, N, T, O) -> (T, N, K, O) -> (T, M, O): row n·K + k, as in vec f(X)
    sig = sig.permute(2, 1, 0, 3).reshape(layer.positions, n * k, layer.units)
    return LayerFactors(layer, u.contiguous(), sig.contiguous())
