"""Flatness of the loss at the current parameters: Hessian top eigenvalues, trace, flat dimension.

* ``max_eigenvalue`` / ``top_eigenvalues`` (and, on request, ``eigenvectors``): largest algebraic eigenvalues of
  H = ∇²_θ L with their multiplicities, by restarted Lanczos with full reorthogonalisation on Hessian-vector
  products (:mod:`lightning_geomdim.core.lanczos`: a check run from a random vector orthogonal to the eigenvectors
  found catches copies of repeated eigenvalues, which one Krylov space cannot hold), or exactly from the dense
  H for small P (rule in :mod:`lightning_geomdim.core.hessian`: P ≤ 399 with the default budgets).
* ``trace``: tr H by Hutch++ (or Hutchinson) on Rademacher probes (:mod:`lightning_geomdim.core.trace_estimation`),
  exact on the dense path.
* ``flat_dimension``: P − batch functional dimension on x. At an interpolating minimum of a squared loss
  H = (2/N) JᵀJ, so this is the dimension of the manifold of nearby minimisers (docs/science.md). It is the
  expensive part of a call on realistic probes (one batch functional dimension, exact engine by default),
  so by default it is reported only when ``dimension=`` hands over one already computed (GeometryMonitor
  passes its dimension measure's); ``flat_dimension=True`` computes it, ``False`` never reports it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_geomdim.core.dimension import DimensionResult, batch_functional_dimension
from lightning_geomdim.core.errors import Remedy
from lightning_geomdim.core.flatness_memory import fitted_sizes, memory_estimate
from lightning_geomdim.core.functional_model import OutputFn
from lightning_geomdim.core.hessian import (
    DEFAULT_CHUNK_SIZE,
    HessianOperator,
    LossFn,
    convert_targets,
    use_dense_hessian,
)
from lightning_geomdim.core.interrupt import checkpoint, eigh_flops
from lightning_geomdim.core.lanczos import default_basis_size, default_tolerance, lanczos, one_thread
from lightning_geomdim.core.memory import check_memory, memory_budget
from lightning_geomdim.core.probe_trace import ProbeTrace, traced
from lightning_geomdim.core.trace_estimation import hutch_plus_plus, hutchinson

Method = Literal["auto", "dense", "lanczos"]
TraceMethod = Literal["hutch++", "hutchinson"]

#: Default number of HVPs spent on the trace: Hutch++ with 33 sketch vectors, 33 products, 33 probes.
DEFAULT_TRACE_SAMPLES = 99

#: Seed of the generator used when the caller passes none (results are then reproducible run to run).
DEFAULT_SEED = 0

#: Default budget of Lanczos HVPs: enough for the check run and for a top eigenvalue repeated top_k = 5 times
#: (measured: 136 HVPs for a linear model whose top eigenvalue has multiplicity 10; 42–60 for top_k = 1 on
#: MLPs). Only what convergence needs is spent; the basis memory does not grow with it.
DEFAULT_LANCZOS_ITERATIONS = 300


@dataclass(frozen=True)
class FlatnessResult:
    """Curvature of the loss at the current parameters.

    Attributes:
        max_eigenvalue: λ_max(H), the largest (algebraic) eigenvalue of the Hessian.
        top_eigenvalues: shape (top_k,), float64, the top_k largest eigenvalues, descending.
        eigenvalue_residuals: shape (top_k,), float64, ‖H v − λ v‖ of each Ritz pair (each λ is within its
            residual of a true eigenvalue); zeros on the dense path.
        trace: tr H (exact on the dense path, else the Hutch++/Hutchinson estimate).
        trace_std_error: estimated standard error of ``trace``; 0.0 when exact.
        flat_dimension: P − ``functional_dimension``, the dimension of the flat directions; ``None`` when it was
            not asked for (see the ``flat_dimension`` argument).
        functional_dimension: batch functional dimension (rank of ∂ vec f_θ(x) / ∂θ) on x (``DimensionResult.rank``
            of the given or computed dimension); ``None`` when ``flat_dimension`` is.
        num_params: P, the number of trainable parameters measured.
        loss: L(θ) on (x, y).
        num_hvps: Hessian-vector products spent (P on the dense path).
        method: "dense" or "lanczos", the path that ran.
        converged: Lanczos met its tolerance and its check run found no eigenvalue above the top_k-th, i.e. no
            copy of a repeated eigenvalue is missing (see :class:`~lightning_geomdim.core.lanczos.LanczosResult`);
            always True on the dense path.
        eigenvectors: with ``return_eigenvectors=True``, shape (P, top_k), float64, on the CPU: orthonormal
            eigenvectors (Ritz vectors on the Lanczos path, each with residual ``eigenvalue_residuals[i]``),
            column i for ``top_eigenvalues[i]``, rows ordered as the parameters (``params`` order, each
            flattened); else ``None``. Within a repeated eigenvalue any orthonormal basis of its eigenspace.
        trace_samples, lanczos_basis: the trace samples and Lanczos basis used (fewer than asked for when
            ``fit_memory`` shrank them); on the dense path P (the exact trace of all P columns) and None.
    """

    max_eigenvalue: float
    top_eigenvalues: Tensor
    eigenvalue_residuals: Tensor
    trace: float
    trace_std_error: float
    flat_dimension: int | None
    functional_dimension: int | None
    num_params: int
    loss: float
    num_hvps: int
    method: str
    converged: bool
    eigenvectors: Tensor | None = None
    trace_samples: int = DEFAULT_TRACE_SAMPLES
    lanczos_basis: int | None = None


def flatness(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    y: Any,
    *,
    top_k: int = 1,
    trace_samples: int = DEFAULT_TRACE_SAMPLES,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    method: Method = "auto",
    trace_method: TraceMethod = "hutch++",
    lanczos_iterations: int = DEFAULT_LANCZOS_ITERATIONS,
    lanczos_tol: float | None = None,
    lanczos_basis: int | None = None,
    params: Sequence[str] | None = None,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    flat_dimension: bool | None = None,
    dimension: DimensionResult | None = None,
    dimension_options: Mapping[str, Any] | None = None,
    return_eigenvectors: bool = False,
    max_memory_bytes: int | None = None,
    trace: ProbeTrace | None = None,
    fit_memory: bool = False,
) -> FlatnessResult:
    """Hessian top eigenvalues, trace and flat dimension of ``loss_fn(model(x), y)`` w.r.t. the parameters.

    Args:
        model: any ``nn.Module``, evaluated in eval mode; its mode, dtype, ``requires_grad`` flags, grads,
            parameters and the global RNG are left exactly as they were.
        loss_fn: ``loss_fn(outputs, y) -> scalar tensor``; outputs are ``model(x)`` (after ``output_fn``) in
            ``dtype``, e.g. ``torch.nn.functional.cross_entropy`` or ``mse_loss`` (mean reduction).
        x: inputs, shape (N, ...) (or a tuple/dict of tensors, as in ``batch_functional_dimension``).
        y: targets passed to ``loss_fn``: class indices (N,) int64 are kept, floating targets cast to ``dtype``.
        top_k: number of largest eigenvalues, 1 ≤ top_k ≤ P.
        trace_samples: HVPs spent on the trace on the Lanczos path (default 99: Hutch++ with 33 sketch
            vectors, 33 products and 33 probes; Hutchinson: the number of probes).
        generator: source of every random vector (Lanczos start, probes); default a fresh CPU generator
            seeded with :data:`DEFAULT_SEED`. The global RNG is never used.
        dtype: computation dtype (float64 by default).
        method: "dense" forms H (P HVPs, exact eigenvalues and trace), "lanczos" never forms it; "auto"
            picks "dense" when that costs no more HVPs than the Lanczos path may, P ≤ lanczos_iterations +
            trace_samples (399 by default), and P ≤ :data:`~lightning_geomdim.core.hessian.DENSE_HESSIAN_MAX_PARAMS`.
        trace_method: "hutch++" (default) or "hutchinson", on the Lanczos path.
        lanczos_iterations: at most this many Lanczos HVPs over all its runs (a warning is emitted when it did
            not converge); only what convergence needs is spent.
        lanczos_tol: relative residual for Lanczos convergence, default √eps(dtype).
        lanczos_basis: vectors a Lanczos run keeps before it thick-restarts (bounds its memory; default
            max(40, 2 top_k + 20), :func:`~lightning_geomdim.core.lanczos.default_basis_size`).
        params: names of the parameters θ; default every parameter with ``requires_grad``.
        output_fn: maps the model's raw output to the tensor given to ``loss_fn``.
        chunk_size: HVPs computed at once as one batched backward (dense Hessian and trace probes); default 1,
            one at a time, which was never more than 15 % slower than batching on CPU except for tiny models
            (:mod:`lightning_geomdim.core.hessian`); ``None`` batches a whole block.
        flat_dimension: report ``flat_dimension`` / ``functional_dimension``. ``None`` (default): from
            ``dimension`` when it is given (free), else not (both fields ``None``): the batch functional
            dimension is often the most expensive part of the call. ``True``: computed when ``dimension`` is not
            given. ``False``: never; ``dimension`` must then be ``None``.
        dimension: a :class:`DimensionResult` already computed for the same model, x and params (e.g. by the
            dimension measure at the same step), reused for ``flat_dimension`` instead of recomputing it.
            Without it the dimension is computed (with its own memory check) before any Hessian-vector
            product, so a probe too large for it fails early.
        dimension_options: further arguments of :func:`~lightning_geomdim.batch_functional_dimension` for that
            computation (``engine``, ``rtol``, ``seed``, ``draws``, ``distributed``), so that the flat dimension
            comes from the same dimension as the one measured elsewhere.
        return_eigenvectors: also return the top_k eigenvectors (``FlatnessResult.eigenvectors``, (P, top_k)
            float64 on the CPU; P · top_k more values in memory).
        max_memory_bytes: memory budget in bytes, of the curvature and of the functional dimension; default
            half the available memory (see :mod:`lightning_geomdim.core.memory`).
        trace: a :class:`~lightning_geomdim.core.probe_trace.ProbeTrace` of ``model`` on ``x`` already recorded
            (with these ``params``, ``dtype`` and ``output_fn``), shared with the other measures of a step: the
            gradient graph is built on its output, so ``x`` is not evaluated again. Default: record one.
        fit_memory: on the Lanczos path, when the estimate below exceeds the budget, use fewer trace samples
            (down to 3; the larger ``trace_std_error`` says so) and then a smaller Lanczos basis (more restarts)
            instead of refusing: ``FlatnessResult.trace_samples`` / ``lanczos_basis`` say what was used.

    Returns:
        A :class:`FlatnessResult`. Cost: dense path P HVPs; Lanczos path at most ``lanczos_iterations`` +
        ``trace_samples`` HVPs; plus one batch functional dimension with ``flat_dimension=True`` and no
        ``dimension``.

    Memory (checked before any HVP, after the traced forward pass that counts A, the values of a forward pass:
    :attr:`.probe_trace.ProbeTrace.activation_numel`), in values of ``dtype`` (8 bytes for float64):
    2 P (parameter copies) plus, with c = min(chunk_size, vectors in one block) HVPs at once holding
    :func:`~lightning_geomdim.core.hessian.hvp_values` = 14 P + 4 A + (c − 1)(10 P + 3 A) (the cached gradient graph
    included),

    * dense: 3 P² (identity, chunks of H, their concatenation) + HVPs of c = min(chunk_size, P);
    * Lanczos: the larger of its two phases, run one after the other:
      eigenvalues (b + 2 top_k + 4) · P, b = min(lanczos_basis, lanczos_iterations, P) the basis of a run
      (:func:`~lightning_geomdim.core.lanczos.lanczos_vectors`; it does not grow with ``lanczos_iterations``)
      + one HVP; trace: Hutch++ with m = trace_samples, s = ⌊m/3⌋ sketch and p = m − 2s probe vectors,
      max(3s, s + 4p) · P (2 m · P at most), Hutchinson 3 m · P, + c HVPs;
    * ``return_eigenvectors``: top_k · P more (the eigenvectors kept through the trace phase).

    At the defaults (basis 40, 99 trace samples, chunk_size 1) the trace phase dominates: about
    (2 + 165 + 14) P + 4 A values, ≈ 1.45 kB per parameter in float64 (36 GB at 25M parameters) plus 32 bytes
    per activation value. Lower ``trace_samples`` first.

    Raises:
        ValueError: invalid top_k, trace_samples, method, lanczos_basis; ``loss_fn`` not returning a scalar; a
            ``dimension`` with a different number of parameters, or given with ``flat_dimension=False``.
        ProbeError, NonFiniteError: as in ``batch_functional_dimension``.
        MemoryBudgetError: the estimate above, or the functional dimension, exceeds the budget; raised
            before the Hessian-vector products.

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)
        >>> res = flatness(net, torch.nn.functional.cross_entropy, x, y, top_k=2)
        >>> res.num_params, res.method, res.top_eigenvalues.shape
        (26, 'dense', torch.Size([2]))
    """
    if method not in ("auto", "dense", "lanczos"):
        raise ValueError(f"unknown method {method!r}: choose 'auto', 'dense' or 'lanczos'")
    if trace_method not in ("hutch++", "hutchinson"):
        raise ValueError(f"unknown trace_method {trace_method!r}: choose 'hutch++' or 'hutchinson'")
    minimum = 3 if trace_method == "hutch++" else 1
    if trace_samples < minimum:
        raise ValueError(f"trace_samples must be >= {minimum} for {trace_method}, got {trace_samples}")
    if flat_dimension is False and dimension is not None:
        raise ValueError(
            "dimension= was given with flat_dimension=False: pass flat_dimension=True to use it, or drop it"
        )
    flat_dimension = dimension is not None if flat_dimension is None else bool(flat_dimension)
    generator = generator if generator is not None else torch.Generator().manual_seed(DEFAULT_SEED)
    budget = memory_budget(next((p.device for p in model.parameters()), torch.device("cpu")), max_memory_bytes)

    factors = flat_dimension and dimension is None  # the dimension computed on this trace may use the Gram
    with traced(model, x, trace, params=params, dtype=dtype, output_fn=output_fn, differentiable=True,
                factors=factors) as trace:
        return _flatness(
            model, trace, loss_fn, y, top_k=top_k, trace_samples=trace_samples, generator=generator, dtype=dtype,
            method=method, trace_method=trace_method, lanczos_iterations=lanczos_iterations,
            lanczos_tol=lanczos_tol, lanczos_basis=lanczos_basis, params=params, output_fn=output_fn,
            chunk_size=chunk_size, flat_dimension=flat_dimension, dimension=dimension,
            dimension_options=dimension_options, return_eigenvectors=return_eigenvectors,
            max_memory_bytes=max_memory_bytes, budget=budget, fit_memory=fit_memory,
        )


def _flatness(
    model: nn.Module, trace: ProbeTrace, loss_fn: LossFn, y: Any, *, top_k: int, trace_samples: int,
    generator: torch.Generator, dtype: torch.dtype, method: str, trace_method: str, lanczos_iterations: int,
    lanczos_tol: float | None, lanczos_basis: int | None, params: Sequence[str] | None, output_fn: OutputFn | None,
    chunk_size: int | None, flat_dimension: bool, dimension: DimensionResult | None,
    dimension_options: Mapping[str, Any] | None, return_eigenvectors: bool, max_memory_bytes: int | None,
    budget: int, fit_memory: bool,
) -> FlatnessResult:
    """:func:`flatness` on a recorded trace (arguments checked by it)."""
    fm = trace.fm
    activations = trace.activation_numel
    op = HessianOperator(trace, loss_fn, convert_targets(y, dtype=dtype, device=fm.device), chunk_size)
    num_params = op.num_params
    if not 1 <= top_k <= num_params:
        raise ValueError(f"top_k must be between 1 and the number of parameters P={num_params}, got {top_k}")
    if lanczos_basis is not None and lanczos_basis < min(top_k + 2, num_params):
        raise ValueError(f"lanczos_basis ({lanczos_basis}) must be at least top_k + 2 = {top_k + 2}")
    if dimension is not None and dimension.num_params != num_params:
        raise ValueError(
            f"dimension was computed for P={dimension.num_params} parameters but the loss has P={num_params}: "
            "pass the DimensionResult of the same model and params, or dimension=None"
        )
    dense = use_dense_hessian(num_params, lanczos_iterations + trace_samples)
    resolved = method if method != "auto" else ("dense" if dense else "lanczos")
    def estimate(values: int, samples: int = 0, basis: int = 0) -> tuple[int, str, tuple[Remedy, ...]]:
        return memory_estimate(  # for A = ``values`` activation values, ``samples`` / ``basis`` when not 0
            resolved, num_params, values, torch.empty((), dtype=dtype).element_size(), top_k=top_k,
            lanczos_iterations=lanczos_iterations, lanczos_basis=basis or lanczos_basis,
            trace_samples=samples or trace_samples, trace_method=trace_method, chunk_size=chunk_size,
            return_eigenvectors=return_eigenvectors,
        )

    if fit_memory and resolved == "lanczos":
        fitted = fitted_sizes(lambda m, b: estimate(activations, m, b)[0], budget, trace_samples=trace_samples,
                              basis=lanczos_basis, top_k=top_k,
                              minimum=3 if trace_method == "hutch++" else 1)
        if fitted is not None:
            trace_samples, lanczos_basis = fitted
    n = trace.inputs.num_samples
    needed, what, remedies = estimate(activations)
    check_memory(needed, budget, what=what, remedies=remedies,
                 by_samples=(n, lambda m: estimate(-(-activations * m // n))[0]))
    loss = op.loss_value()
    if flat_dimension and dimension is None:  # before the HVPs: a probe too large fails before the HVPs
        dimension = batch_functional_dimension(
            model, None, output_fn=output_fn, params=params, dtype=dtype, max_memory_bytes=max_memory_bytes,
            trace=trace, **dict(dimension_options or {}),
        )
    vectors = None
    if resolved == "dense":
        h = op.dense(budget=budget)
        checkpoint(flops=eigh_flops(h.shape[0]))  # one LAPACK call: under a time limit, not begun if it would overrun
        with one_thread() if h.device.type == "cpu" else contextlib.nullcontext():  # P ≤ 2048: see one_thread
            if return_eigenvectors:
                eigenvalues, basis = torch.linalg.eigh(h)
                vectors = basis[:, -top_k:].flip(1).to(device="cpu", dtype=torch.float64)
                del basis
            else:
                eigenvalues = torch.linalg.eigvalsh(h)
        del h
        eigenvalues = eigenvalues.to(torch.float64)
        top = eigenvalues[-top_k:].flip(0)
        residuals = torch.zeros(top_k, dtype=torch.float64)
        trace, trace_std_error, converged = float(eigenvalues.sum()), 0.0, True
    else:
        result = lanczos(
            op.matvec, num_params, k=top_k, max_iterations=max(lanczos_iterations, top_k), tol=lanczos_tol,
            generator=generator, dtype=dtype, device=fm.device, max_basis=lanczos_basis,
        )
        top, residuals, converged = result.eigenvalues, result.residuals, result.converged
        spent = result.num_matvecs
        if return_eigenvectors:
            vectors = result.eigenvectors.to(device="cpu", dtype=torch.float64)
        del result
        if not converged:
            scale = float(top.abs().max())
            tol = lanczos_tol if lanczos_tol is not None else default_tolerance(dtype)
            reason = (
                "the top_k Ritz pairs converged, but the check for missed copies of repeated eigenvalues ran "
                "out of iterations" if bool((residuals <= tol * scale).all()) else
                f"largest residual {float(residuals.max()):.3g}"
            )
            warnings.warn(
                f"Lanczos did not converge in {spent} iterations ({reason}): raise "
                "lanczos_iterations for accurate eigenvalues",
                RuntimeWarning,
                stacklevel=2,
            )
        estimator = hutch_plus_plus if trace_method == "hutch++" else hutchinson
        estimate = estimator(op.matmat, num_params, trace_samples, generator=generator, dtype=dtype,
                             device=fm.device)
        trace, trace_std_error = estimate.value, estimate.std_error
    num_hvps = op.num_hvps
    op.release()

    rank = dimension.rank if dimension is not None else None
    return FlatnessResult(
        max_eigenvalue=float(top[0]),
        top_eigenvalues=top.cpu(),
        eigenvalue_residuals=residuals.cpu(),
        trace=float(trace),
        trace_std_error=float(trace_std_error),
        flat_dimension=num_params - rank if rank is not None else None,
        functional_dimension=rank,
        num_params=num_params,
        loss=loss,
        num_hvps=num_hvps,
        method=resolved,
        converged=converged,
        eigenvectors=vectors,
        trace_samples=trace_samples if resolved == "lanczos" else num_params,
        lanczos_basis=(lanczos_basis or default_basis_size(top_k)) if resolved == "lanczos" else None,
    )
