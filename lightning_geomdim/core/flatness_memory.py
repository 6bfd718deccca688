"""How much memory :func:`~lightning_geomdim.core.flatness.flatness` needs (the estimate of its docstring), and the
largest trace sketch and Lanczos basis that fit a budget when the defaults do not (P of a ResNet-18: 85 MiB per
vector of P in float64)."""

from __future__ import annotations

from collections.abc import Callable

from lightning_geomdim.core.errors import Remedy
from lightning_geomdim.core.hessian import hvp_values
from lightning_geomdim.core.lanczos import default_basis_size, lanczos_vectors
from lightning_geomdim.core.memory import format_bytes

#: The fewest trace samples and the smallest Lanczos basis above top_k that :func:`fitted_sizes` goes down to.
MIN_TRACE_SAMPLES, MIN_EXTRA_BASIS = 3, 8


def memory_estimate(
    method: str, num_params: int, activations: int, itemsize: int, *, top_k: int, lanczos_iterations: int,
    lanczos_basis: int | None, trace_samples: int, trace_method: str, chunk_size: int | None,
    return_eigenvectors: bool,
) -> tuple[int, str, tuple[Remedy, ...]]:
    """(bytes, what, remedies) for :func:`check_memory`: the peak estimate of :func:`flatness`' docstring."""
    p = num_params

    def at_once(n: int) -> int:
        return n if chunk_size is None else max(1, min(chunk_size, n))

    def size(values: int) -> str:
        return format_bytes(values * itemsize)

    head = f"flatness (method={method!r}, P = {p:,} parameters, A = {activations:,} activation values"
    if method == "dense":
        c = at_once(p)
        hessian, hvps = 3 * p * p, hvp_values(p, activations, c)
        values = 2 * p + hessian + hvps
        what = f"{head}): dense Hessian 3 × P² = {size(hessian)} + {c} HVPs at once {size(hvps)}"
        remedies = (
            Remedy("use {arg}='lanczos' (matrix-free)", "method"), Remedy("a smaller {arg}", "chunk_size"),
            Remedy("a subset of parameters via {arg}=[...]", "params"),
        )
        return values * itemsize, what, remedies
    iterations = max(lanczos_iterations, top_k)
    vectors_lanczos = lanczos_vectors(p, k=top_k, max_iterations=iterations, max_basis=lanczos_basis)
    basis = vectors_lanczos - 2 * top_k - 4
    eigen = vectors_lanczos * p + hvp_values(p, activations, 1)
    kept = top_k * p if return_eigenvectors else 0
    if trace_method == "hutch++":
        sketch = min(trace_samples // 3, p)
        probes = 0 if sketch == p else trace_samples - 2 * sketch
        vectors, c = max(3 * sketch, sketch + 4 * probes), at_once(max(sketch, probes))
    else:
        vectors, c = 3 * trace_samples, at_once(trace_samples)
    trace = vectors * p + hvp_values(p, activations, c) + kept
    values = 2 * p + max(eigen, trace)
    what = (
        f"{head}): Lanczos basis of {basis} vectors + {2 * top_k + 4} more + 1 HVP = {size(eigen)}, then the "
        f"{trace_method} trace: {vectors} vectors of P + {c} HVPs at once"
        + (f" + {top_k} eigenvectors" if kept else "") + f" = {size(trace)}"
    )
    remedies = (
        Remedy(f"lower {{arg}} (now {basis}: {size(p)} per vector)", "lanczos_basis"),
        Remedy(f"lower {{arg}} (now {trace_samples})", "trace_samples"),
        Remedy(f"a smaller {{arg}} (now {chunk_size}: each further HVP at once holds 10 P + 3 A values = "
               f"{size(10 * p + 3 * activations)})", "chunk_size"),
        Remedy("a subset of parameters via {arg}=[...]", "params"), Remedy("a smaller probe batch"),
    )
    return values * itemsize, what, remedies


def fitted_sizes(
    needed: Callable[[int, int], int], budget: int, *, trace_samples: int, basis: int | None, top_k: int,
    minimum: int,
) -> tuple[int, int] | None:
    """The largest (trace samples, Lanczos basis) with ``needed(samples, basis) <= budget``: fewer trace samples
    first (down to ``minimum``, a larger standard error, which is reported), then a smaller basis (from ``basis``,
    default :func:`~lightning_geomdim.core.lanczos.default_basis_size`, down to top_k + :data:`MIN_EXTRA_BASIS`:
    more restarts, same accuracy); None when even those do not fit."""
    basis = default_basis_size(top_k) if basis is None else basis
    if needed(trace_samples, basis) <= budget:
        return trace_samples, basis
    low, high = max(minimum, min(MIN_TRACE_SAMPLES, trace_samples)), trace_samples
    if needed(low, basis) <= budget:
        while low < high:  # the largest number of samples that fits (needed grows with the samples)
            middle = (low + high + 1) // 2
            low, high = (middle, high) if needed(middle, basis) <= budget else (low, middle - 1)
        return low, basis
    samples, small = low, min(basis, top_k + MIN_EXTRA_BASIS)
    if needed(samples, small) > budget:
        return None
    high = basis
    while small < high:
        middle = (small + high + 1) // 2
        small, high = (middle, high) if needed(samples, middle) <= budget else (small, middle - 1)
    return samples, small
