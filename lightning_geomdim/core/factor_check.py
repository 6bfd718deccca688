"""One backward that decides whether the factor forms give J exactly, whatever code sits between the layers.

The float Gram engine writes row (n, k) of J from the signals ∂f_k(x_n)/∂z_l at sample n only and from the forms
of :mod:`lightning_geomdim.core.factor_forms`. That is exact when two things hold on the probe:

1. **samples do not interact**: ∂f(x_n)/∂z_l(x_n') = 0 for n' ≠ n and every measured layer l (batch statistics,
   attention or a mean over the batch dimension break it; attention over each sample's positions does not);
2. **the forms give the whole gradient**: no measured parameter also acts outside its module's forward (weight
   tying through functional code, a hook, a reparametrisation).

Both are checked with random cotangents c (a private generator; the global RNG is untouched) restricted to a set S
of samples, such that every ordered pair (n, n') is tested with n in S and n' not (:func:`sample_sets`: m sets, the
fewest with C(m, ⌊m/2⌋) ≥ N, 8 for N = 64 where the bits of the index and their complements take 12): the signals
at samples outside S must vanish (1), and Jᵀ c assembled from the forms must equal autograd's gradient with respect
to θ (2), to √eps of the computation dtype. Batched backwards of :data:`COTANGENTS_AT_ONCE` cotangents
(:meth:`~lightning_geomdim.core.probe_trace.ProbeTrace.vjp`); the result is kept on the trace. A function that
mixes two samples fails (1) for every cotangent unless it is exactly cancelled, a probability-zero event for random
cotangents.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from lightning_geomdim.core.factor_forms import factors_of, parameter_gradients, summed_row
from lightning_geomdim.core.gram_plan import GramPlan
from lightning_geomdim.core.interrupt import checkpoint
from lightning_geomdim.core.probe_trace import ProbeTrace

#: Signals outside the cotangent's samples count as an interaction above this fraction of the largest signal.
INTERACTION_TOLERANCE = 1e-10
#: Cotangents backpropagated at once by the check (each holds about one forward pass of values).
COTANGENTS_AT_ONCE = 4


def sample_sets(n: int, device: torch.device | str = "cpu") -> Tensor:
    """(m, n) bool: m sets of samples such that every ordered pair of distinct samples (i, j) has a set holding i
    and not j; one all-true set for n = 1.

    Sample i is in set b when b is in its code, the i-th ⌊m/2⌋-subset of {0, …, m − 1} in lexicographic order.
    Distinct subsets of one size never contain one another, so some b is in i's code and not in j's; m is the
    fewest with C(m, ⌊m/2⌋) ≥ n, the fewest sets that can do this (Sperner's theorem): 8 for n = 64, 11 for 256.
    """
    if n == 1:
        return torch.ones(1, 1, dtype=torch.bool, device=device)
    m = 2
    while math.comb(m, m // 2) < n:
        m += 1
    codes = itertools.islice(itertools.combinations(range(m), m // 2), n)
    sets = torch.zeros(m, n, dtype=torch.bool)
    for i, code in enumerate(codes):
        sets[list(code), i] = True
    return sets.to(device)


def factorization_problem(trace: ProbeTrace, plan: GramPlan) -> str | None:
    """Why the factor forms do not give J on this trace (module docstring), or None; computed once per trace and
    measured output (softmax head or not)."""
    key = ("factorization", id(trace.fm.logit_head))
    if key not in trace.memo:
        trace.memo[key] = _problem(trace, plan)
    return trace.memo[key]


def _problem(trace: ProbeTrace, plan: GramPlan) -> str | None:
    fm = trace.fm
    out = trace.measured_output(fm.logit_head)
    if not out.requires_grad:  # the output does not depend on θ: J = 0, nothing to factor
        return None
    n = plan.num_samples
    sets = sample_sets(n, out.device)
    generator = torch.Generator(device=out.device).manual_seed(0)
    c = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device)
    names = [layer.name for layer in plan.layers]
    deltas = [trace.deltas[name] for name in names]
    # autograd's gradient per parameter tensor, at θ's views when it may be (no flat copy to split again)
    views = trace.theta_views()
    wrt = views if views is not None else [trace.theta]
    parts = []
    for start in range(0, len(sets), COTANGENTS_AT_ONCE):  # a few rows of backward at a time (memory)
        chunk = sets[start : start + COTANGENTS_AT_ONCE]
        parts.append(trace.vjp(out, [*wrt, *deltas], c * chunk.reshape(*chunk.shape, *([1] * (out.dim() - 1)))
                               .to(out.dtype)))
    del out
    signals = [torch.cat(column) for column in list(zip(*parts, strict=True))[len(wrt):]]
    for layer, g in zip(plan.layers, signals, strict=True):
        for b, inside in enumerate(sets):
            scale = g[b].abs().max() if g[b].numel() else 0  # a layer applied at no position has no signal
            if scale > 0 and bool((~inside).any()) and g[b][~inside].abs().max() > INTERACTION_TOLERANCE * scale:
                return (f"samples interact in the forward pass: the outputs of some samples depend on the output of "
                        f"module {layer.name or '<root>'!r} ({type(layer.module).__name__}) at other samples (batch "
                        "statistics, or code that mixes the batch dimension)")
    tolerance = torch.finfo(c.dtype).eps ** 0.5
    for b in range(len(sets)):  # Jᵀ c from the forms, set by set (summed over the samples, no per-sample rows)
        checkpoint()  # the check stops between sets when the caller asks (a time limit, SIGTERM)
        grads = [g[b % COTANGENTS_AT_ONCE] for g in parts[b // COTANGENTS_AT_ONCE][: len(wrt)]]
        actual = dict(zip(fm.params, grads, strict=True)) if views is not None else fm.unflatten(grads[0])
        norms = {name: float(a.norm()) for name, a in actual.items()}
        scale = math.sqrt(sum(v * v for v in norms.values()))
        errors = {name: _ratio(v, scale, actual[name].dtype) for name, v in norms.items()}  # no form: expected 0
        for layer, g in zip(plan.layers, signals, strict=True):
            factors = factors_of(layer, trace.layer_inputs[layer.name], g[b : b + 1], n, 1, fm.frozen)
            for name, e in parameter_gradients(layer, summed_row(factors), fm.params).items():
                errors[name] = _relative_error(e, actual[name], scale)
        worst = max(errors, key=lambda name: errors[name])
        if errors[worst] > tolerance:
            return (f"the gradient of parameter {worst!r} is not what its layer's factor form gives (relative error "
                    f"{errors[worst]:.1e}): it also acts outside its module's forward (tied or functional use, a "
                    "hook or a reparametrisation)")
    return None


def _relative_error(expected: Tensor, actual: Tensor, scale: float) -> float:
    """‖expected − actual‖ relative to ``scale``, the whole gradient's norm (0 when both vanish)."""
    return _ratio(float((expected.to(actual.dtype) - actual).norm()), scale, actual.dtype)


def _ratio(diff: float, scale: float, dtype: torch.dtype) -> float:
    """``diff`` / ``scale``, 0 when ``diff`` is (``scale`` at least ``dtype``'s smallest normal number)."""
    return 0.0 if diff == 0 else diff / max(scale, torch.finfo(dtype).tiny)
