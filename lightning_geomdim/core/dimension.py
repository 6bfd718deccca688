"""Batch functional dimension: rank of J = ∂ vec f_θ(X) / ∂θ on a probe batch X, for almost every θ.

It is the local dimension of {f_θ'(X)} near θ (Bona-Pellissier, Malgouyres, Bachoc, arXiv 2402.08269); it is
invariant under neuron permutations and positive rescalings and bounded by min(M, P − hidden neurons) for ReLU
networks. Three engines: "exact" (:mod:`lightning_geomdim.core.exact`, the dimension itself for
piecewise-linear networks) and the floating-point "gram" (:mod:`lightning_geomdim.core.gram`) and "jacrev"
(:mod:`lightning_geomdim.core.jacobian`), whose numerical rank (:mod:`lightning_geomdim.core.rank`) depends on
a tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lightning_geomdim.core.agreement import agreed
from lightning_geomdim.core.blocks import Blocks, BlockSpectrum, block_size, resolve_blocks
from lightning_geomdim.core.errors import NotApplicableError, Remedy
from lightning_geomdim.core.exact import exact_rank
from lightning_geomdim.core.exact_program import ExactProgram, exact_program
from lightning_geomdim.core.functional_model import OutputFn
from lightning_geomdim.core.gram import gram_spectra
from lightning_geomdim.core.jacobian import jacobian_spectra
from lightning_geomdim.core.memory import memory_budget
from lightning_geomdim.core.probe_trace import ProbeTrace, traced
from lightning_geomdim.core.rank import NumericalSpectrum, Spectrum, numerical_spectrum
from lightning_geomdim.core.structure import gram_unsupported_reason
from lightning_geomdim.core.symmetries import find_symmetries

Engine = Literal["auto", "exact", "gram", "jacrev"]
ENGINES = ("auto", "exact", "gram", "jacrev")
FLOAT_ENGINES = ("gram", "jacrev")


@dataclass(frozen=True)
class DimensionResult:
    """The batch functional dimension, its bounds, and (optionally) a floating-point spectrum beside it.

    Attributes:
        rank: with ``engine == "exact"`` the batch functional dimension, exact (the generic rank of J with
            the activation patterns fixed, see :mod:`lightning_geomdim.core.exact`); with a floating-point engine
            ("gram", "jacrev": models that are not piecewise linear, or when asked) the numerical rank of
            ``spectrum``, an estimate that depends on its tolerance.
        engine: "exact", "gram" or "jacrev": what produced ``rank``.
        num_outputs: M = N · K, the entries of the model's output on the probe.
        num_rows: rows of the measured Jacobian: M, or N·(K − 1) for a softmax head (its logit differences).
        num_params: P, columns of J.
        num_hidden_neurons: hidden units with a recognised positive-rescaling symmetry (0 if none).
        upper_bound: min(num_rows, P − hidden neurons), a proven bound on the dimension.
        spectrum: the floating-point spectrum and its numerical rank (``spectrum=True``, or a float engine);
            None otherwise.
        exact_ranks: the rank of each modular draw (exact engine; empty otherwise).
        failure_bound: exact engine: a bound on the probability that ``rank`` is below the true dimension
            (0 when it reached ``upper_bound``); nan for floating-point engines, whose error is not bounded.
        blocks: block name → the numerical rank of J restricted to the block's columns (``blocks=``; computed
            with the floating-point spectrum, :mod:`lightning_geomdim.core.blocks`).
        block_dimensions: exact engine with ``blocks=`` and ``spectrum=True``: block name → the exact rank of J
            restricted to the block's columns (the same draws; no tolerance), with ``block_failure_bounds`` as
            ``failure_bound``.
    """

    rank: int
    engine: str
    num_outputs: int
    num_rows: int
    num_params: int
    num_hidden_neurons: int
    upper_bound: int
    spectrum: NumericalSpectrum | None = None
    exact_ranks: tuple[int, ...] = ()
    failure_bound: float = math.nan
    blocks: dict[str, BlockSpectrum] = field(default_factory=dict)
    block_dimensions: dict[str, int] = field(default_factory=dict)
    block_failure_bounds: dict[str, float] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """``rank`` is the exact batch functional dimension (not a numerical rank)."""
        return self.engine == "exact"

    @property
    def parameter_bound(self) -> int:
        """P − hidden neurons: the bound that no probe, however large, can exceed."""
        return self.num_params - self.num_hidden_neurons

    @property
    def saturated(self) -> bool:
        """The rank equals the probe's row count, which is below P − hidden neurons: the probe is too small for
        the dimension to be anything but its row bound, so the value says nothing beyond "no degeneracy"."""
        return self.rank >= self.upper_bound and self.num_rows < self.parameter_bound


def select_engine(engine: str, trace: ProbeTrace) -> tuple[str, ExactProgram | None]:
    """Resolve ``engine``: "auto" is "exact" where it applies (piecewise-linear networks), else the float engine
    of :func:`select_float_engine`. Returns the engine and, for "exact", its traced program.

    Raises:
        ValueError: unknown ``engine``.
        NotApplicableError: ``engine="exact"`` or ``"gram"`` on a model it cannot measure (the message says why).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {ENGINES}")
    if engine in ("auto", "exact"):
        try:
            return "exact", exact_program(trace)
        except NotApplicableError:
            if engine == "exact":
                raise
    return select_float_engine(engine, trace), None


def select_float_engine(engine: str, trace: ProbeTrace) -> str:
    """The floating-point engine: "gram" when it is exact for this model and probe, else "jacrev" (for
    ``engine`` "auto" or "exact"); ``engine`` itself when it is "gram" or "jacrev".

    Raises:
        NotApplicableError: ``engine="gram"`` on a model the Gram engine cannot measure exactly.
    """
    if engine == "jacrev":
        return "jacrev"
    reason = gram_unsupported_reason(trace)
    if reason is None:
        return "gram"
    if engine == "gram":
        raise NotApplicableError(reason)
    return "jacrev"


def compute_spectrum(
    engine: str, trace: ProbeTrace, num_rows: int, *, chunk_size: int | None, budget: int, distributed: bool = False,
    blocks: dict[str, list[str]] | None = None,
) -> tuple[Spectrum, dict[str, Spectrum]]:
    """Run the floating-point ``engine`` ("gram" or "jacrev"): the singular values of J and of each block's columns
    (block name → parameter names)."""
    if engine == "gram":
        return gram_spectra(trace, num_rows, chunk_size=chunk_size, budget=budget, distributed=distributed,
                            blocks=blocks)
    # suggest the Gram engine only where it runs (not for cross-attention, an LSTM with a projection, ...)
    gram = () if gram_unsupported_reason(trace) else (Remedy("{arg}='gram' (it applies to this model)", "engine"),)
    return jacobian_spectra(trace, num_rows, chunk_size=chunk_size, budget=budget, alternatives=gram, blocks=blocks)


def batch_functional_dimension(
    model: nn.Module,
    x: Any,
    *,
    output_fn: OutputFn | None = None,
    params: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float64,
    engine: Engine = "auto",
    spectrum: bool = False,
    logit_differences: bool = True,
    rtol: float | None = None,
    seed: int = 0,
    draws: int = 2,
    chunk_size: int | None = None,
    max_memory_bytes: int | None = None,
    distributed: bool = False,
    trace: ProbeTrace | None = None,
    blocks: Blocks = None,
) -> DimensionResult:
    """Batch functional dimension of ``model`` on the probe batch ``x``: rank ∂ vec f_θ(x) / ∂θ.

    Two different numbers can be asked for, and the result says which one ``rank`` is:

    * the **batch functional dimension** (``engine="exact"``, the default wherever it applies): for a
      piecewise-linear network (ReLU, LeakyReLU, max pooling, ...) the rank of J is determined by the activation
      patterns on ``x`` for almost every θ; the exact engine computes that generic rank by modular arithmetic,
      with no tolerance (:mod:`lightning_geomdim.core.exact`);
    * a **numerical rank** (``spectrum=True``, or a floating-point engine): the number of singular values of the
      floating-point J above a tolerance, reported with that tolerance and the engine's resolution. It is not the
      dimension: σ below the resolution are lost (the Gram engine resolves σ only down to ~2e-6·σ_max on the
      paper's MLP), and rows scaled by saturated probabilities vanish. On the MNIST example after 680 epochs
      (600 training images, softmax output) the dimension is 5400 while the float Gram engine on the softmax
      output counted 1450 and a dense SVD 3482: the median non-maximal probability was 4e-10. Softmax heads are
      therefore always measured on their logit differences (the same row space in exact arithmetic).

    Args:
        model: any ``nn.Module``; evaluated in eval mode (BatchNorm uses its running statistics, Dropout
            is off). Its mode, dtype, device, ``requires_grad`` flags, grads and the global RNG are left
            exactly as they were.
        x: probe batch: a Tensor of shape (N, ...), a tuple of tensors (positional inputs) or a dict
            (keyword inputs). Floating inputs are cast to ``dtype``; integer inputs (token ids) are kept.
        output_fn: maps the model's raw output (tuple, dict, ...) to the tensor to measure; any shape
            (N, ...) is flattened to M = numel values.
        params: names (as in ``named_parameters()``) of the parameters θ; default every parameter with
            ``requires_grad``.
        dtype: computation dtype of the forward pass (patterns) and of the float J, float64 by default
            whatever the model's dtype: a float32 Jacobian with a float64 tolerance over-counts the rank.
        engine: "auto" (default): "exact" where it applies, else a floating-point engine ("gram" where
            exact in floating point, else "jacrev"). "exact": the batch functional dimension of a
            piecewise-linear network of Linear/Conv2d layers (conditions in :mod:`lightning_geomdim.core.exact`);
            peak memory ≈ 8·min(rows, P)² bytes plus per-layer factors. "gram": J Jᵀ or Jᵀ J from per-layer
            factors, σ = √λ of its float64 eigenvalues (:mod:`lightning_geomdim.core.gram`). "jacrev": the dense
            M × P Jacobian and its SVD: any differentiable model, the finest floating-point resolution, about
            3·M·P·8 bytes and a much slower SVD. ``DimensionResult.engine`` says which ran.
        spectrum: also compute the floating-point spectrum (``DimensionResult.spectrum``: σ, numerical rank,
            tolerance, resolution, gap, stable and effective rank) with the float engine that "auto" would
            pick. Costs a float Gram and its eigendecomposition (O(d³) for d = min(rows, P), several times the
            exact engine's elimination) or a dense SVD. Always on for a floating-point engine.
        logit_differences: measure a softmax / log-softmax head (the last module, over the last dimension) on the
            differences of its input logits, N·(K − 1) rows with the same row space as the softmax output's J in
            exact arithmetic. ``False`` measures the softmax output itself, which only a floating-point engine
            can do (its numerical rank collapses when the probabilities saturate; "auto" then picks one).
        rtol: relative tolerance of the numerical rank; default the engine's resolution, ``σ_max · max(M, P)
            · eps(dtype)`` for an SVD, ``σ_max · max(max(M, P) · eps(dtype), sqrt(max(M, P) · eps64))`` for a
            Gram (see :mod:`lightning_geomdim.core.rank`). With ``rtol``: ``rtol · σ_max``. No effect on the exact
            engine's rank.
        seed: seeds the exact engine's random evaluation points (the global RNG is never used).
        draws: the exact engine's independent evaluations (≥ 2; one suffices when it reaches the bound).
        chunk_size: number of VJPs computed at once by one batched backward (each holds about the forward pass's
            values): rows of J for jacrev, output coordinates per sample for gram and exact. Default: as many as
            fit ``max_memory_bytes`` next to the engine's matrices (a convolutional network's are then computed in
            several chunks instead of exhausting the memory).
        max_memory_bytes: memory budget; default half the available memory (see
            :mod:`lightning_geomdim.core.memory`).
        distributed: with the Gram engine and an initialised ``torch.distributed`` process group, divide the
            Gram accumulation among the processes and all-reduce it (see
            :func:`lightning_geomdim.core.gram.gram_matrix`). A collective: every process must call it, with the
            same model, probe and arguments. Ignored by the other engines and without a process group.
        blocks: also the numerical rank of J restricted to blocks of parameters (``DimensionResult.blocks``), from
            the floating-point spectrum's factors or dense J (so with ``spectrum=True`` or a float engine):
            "auto" for the blocks :func:`~lightning_geomdim.core.blocks.parameter_blocks` finds in the module tree
            that have at most as many parameters as J has rows (the others' rank is their row bound), or a dict
            block name → module names. Each costs a Gram (or SVD) of size min(rows, P_b). With the exact engine also
            their exact ranks (``DimensionResult.block_dimensions``, from the same draws: one Gram mod p each; the
            draws go on until each block's rank reaches its bound min(rows, P_b), at most ``draws``).
        trace: a :class:`~lightning_geomdim.core.probe_trace.ProbeTrace` of ``model`` on ``x`` already recorded
            (with these ``params``, ``dtype`` and ``output_fn``), shared with the other measures of a step; ``x`` is
            then not read again. Default: record one.

    Returns:
        A :class:`DimensionResult`.

    Raises:
        ValueError: no trainable parameters, unknown names in ``params``, unknown ``engine``, ``draws`` < 2.
        NotApplicableError: ``engine="exact"`` or ``"gram"`` on a model it cannot measure.
        ProbeError: empty probe, unsupported type, or the model's forward fails on it (chained).
        NonFiniteError: NaN/inf in the parameters or outputs.
        MemoryBudgetError: the engine would exceed the memory budget (raised before allocating).

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> res = batch_functional_dimension(net, torch.randn(16, 3, generator=torch.Generator().manual_seed(0)))
        >>> res.engine, res.num_params, res.num_hidden_neurons, res.upper_bound
        ('exact', 26, 4, 22)
        >>> res.rank <= res.upper_bound
        True
    """
    with traced(model, x, trace, params=params, dtype=dtype, output_fn=output_fn, differentiable=True,
                factors=True) as trace:
        try:
            fm, out = trace.fm, trace.output  # a failure's frames are cleared by the monitor (graph freed)
            num_outputs, num_params = out.numel(), fm.num_params
            symmetries = find_symmetries(trace)
            fm.logit_head = symmetries.softmax_head if logit_differences else None
            num_rows = num_outputs - num_outputs // out.shape[-1] if fm.logit_head is not None else num_outputs
            upper_bound = symmetries.upper_bound(trace.inputs.num_samples, tuple(out.shape), num_params)
            budget = memory_budget(fm.device, max_memory_bytes)
            resolved, program = select_engine(engine, trace)
            # blocks come with the float spectrum (and then their exact ranks too): spectrum=False keeps its cost
            chosen = resolve_blocks(blocks, model, list(fm.params), num_rows) if spectrum or program is None else {}
            exact = None
            if program is not None:  # agreed: a distributed Gram may follow (:mod:`.agreement`)
                exact = agreed(lambda: exact_rank(trace, upper_bound=upper_bound, program=program, seed=seed,
                                                  draws=draws, chunk_size=chunk_size, budget=budget, blocks=chosen),
                               distributed, fm.device)
                del program
            numerical, parts = None, {}
            if spectrum or exact is None:
                # the exact engine applies only where the Gram engine's structural conditions hold: no second check
                float_engine = select_float_engine(resolved, trace) if exact is None else "gram"
                raw, raw_parts = compute_spectrum(float_engine, trace, num_rows, chunk_size=chunk_size, budget=budget,
                                                  distributed=distributed, blocks=chosen)
                numerical = numerical_spectrum(raw, num_rows, num_params, engine=float_engine, rtol=rtol)
                for name, sv in raw_parts.items():
                    p_block = block_size(fm.params, chosen[name])
                    parts[name] = BlockSpectrum(p_block, min(num_rows, p_block), numerical_spectrum(
                        sv, num_rows, p_block, engine=float_engine, rtol=rtol))
        finally:
            trace.fm.logit_head = None
    return DimensionResult(
        rank=exact.rank if exact is not None else numerical.numerical_rank,  # type: ignore[union-attr]
        engine="exact" if exact is not None else numerical.engine,  # type: ignore[union-attr]
        num_outputs=num_outputs, num_rows=num_rows, num_params=num_params,
        num_hidden_neurons=symmetries.num_hidden_neurons, upper_bound=upper_bound, spectrum=numerical,
        exact_ranks=exact.ranks if exact is not None else (),
        failure_bound=exact.failure_bound if exact is not None else math.nan, blocks=parts,
        block_dimensions=exact.blocks if exact is not None else {},
        block_failure_bounds=exact.block_failure_bounds if exact is not None else {},
    )
