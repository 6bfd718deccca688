"""Memory estimates from one sample, before the forward pass over the whole probe.

The memory of every measure grows with the probe's N samples: the traced pass holds A values of activations (A ∝ N)
with their autograd graph and, for the Gram engine, a copy of the measured layers' inputs and a zero δ of their
outputs; the dimension engines hold a d × d Gram (d = min(M, P), M ∝ N) or an M × P Jacobian; flatness holds
Hessian-vector products of A values each. :func:`estimate_bytes` reads them off a one-sample trace (no autograd)
scaled to N, with the engines' own formulas, so that a probe too large is refused before the big work.
"""

from __future__ import annotations

import torch

from lightning_geomdim.core.dimension import select_engine, select_float_engine
from lightning_geomdim.core.errors import NotApplicableError
from lightning_geomdim.core.flatness import DEFAULT_LANCZOS_ITERATIONS
from lightning_geomdim.core.flatness_memory import fitted_sizes, memory_estimate
from lightning_geomdim.core.gram_plan import gram_bytes
from lightning_geomdim.core.hessian import use_dense_hessian
from lightning_geomdim.core.jacobian import jacobian_bytes, vjp_row_bytes
from lightning_geomdim.core.probe_trace import ProbeTrace
from lightning_geomdim.core.structure import gram_plan
from lightning_geomdim.core.symmetries import find_symmetries

#: Values the traced pass holds per activation value: the value itself and the graph's saved tensors (an upper
#: estimate: an elementwise op saves its input, a matmul its operands); with the Gram factors, 2 more.
TRACE_VALUES_PER_ACTIVATION = 2


def trace_bytes(one: ProbeTrace, n: int, *, factors: bool) -> int:
    """The traced pass over n samples like ``one``'s: activations, graph, factors and θ (bytes)."""
    itemsize = torch.empty((), dtype=one.fm.dtype).element_size()
    per_value = TRACE_VALUES_PER_ACTIVATION + (2 if factors else 0)
    return (per_value * one.activation_numel * n + one.fm.num_params) * itemsize


def dimension_bytes(one: ProbeTrace, n: int, *, engine: str, spectrum: bool, logit_differences: bool) -> int:
    """The least memory :func:`~lightning_geomdim.batch_functional_dimension` needs on n samples like ``one``'s
    (one output coordinate backpropagated at a time), with the engine it would choose."""
    fm = one.fm
    itemsize = torch.empty((), dtype=fm.dtype).element_size()
    fm.logit_head = find_symmetries(one).softmax_head if logit_differences else None
    try:
        resolved, program = select_engine(engine, one)
        needed = 0
        if program is not None:
            needed = gram_bytes(program.plan.on_samples(n).with_cheaper_side(), 8, chunk_size=1, copies=1)
        if spectrum or program is None:
            float_engine = select_float_engine(resolved, one) if program is None else "gram"
            if float_engine == "gram":
                needed = max(needed, gram_bytes(gram_plan(one).on_samples(n), itemsize, chunk_size=1))
            else:
                rows = one.measured_output(fm.logit_head).numel() * n
                needed = max(needed, jacobian_bytes(rows, fm.num_params, fm.dtype)
                             + vjp_row_bytes(one.activation_numel * n, fm.dtype))
        return needed
    except NotApplicableError:
        return 0  # the measure will refuse for another reason, with its own message
    finally:
        fm.logit_head = None


def flatness_bytes(one: ProbeTrace, n: int, *, top_k: int, trace_samples: int, fit_within: int | None = None) -> int:
    """The memory :func:`~lightning_geomdim.flatness` needs at its defaults on n samples like ``one``'s; with
    ``fit_within`` (a budget), after ``fit_memory`` shrank its trace sketch and Lanczos basis to fit it."""
    p = one.fm.num_params
    method = "dense" if use_dense_hessian(p, DEFAULT_LANCZOS_ITERATIONS + trace_samples) else "lanczos"
    itemsize = torch.empty((), dtype=one.fm.dtype).element_size()

    def needed(samples: int, basis: int | None) -> int:
        return memory_estimate(
            method, p, one.activation_numel * n, itemsize, top_k=top_k, lanczos_iterations=DEFAULT_LANCZOS_ITERATIONS,
            lanczos_basis=basis, trace_samples=samples, trace_method="hutch++", chunk_size=1,
            return_eigenvectors=False,
        )[0]

    if fit_within is not None and method == "lanczos":
        fitted = fitted_sizes(needed, fit_within, trace_samples=trace_samples, basis=None, top_k=top_k, minimum=3)
        if fitted is not None:
            return needed(*fitted)
    return needed(trace_samples, None)
