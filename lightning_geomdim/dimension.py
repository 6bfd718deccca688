"""Batch functional dimension: rank of J = ∂ vec f_θ(X) / ∂θ on a probe batch X.

See SCIENCE.md: for almost every θ this is the local dimension of {f_θ(X)} near θ; it is invariant under
neuron permutations and positive rescalings and bounded by min(M, P − hidden neurons) for ReLU networks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_geomdim.errors import NotApplicableError
from lightning_geomdim.functional_model import FunctionalModel, OutputFn, ProbeInputs, measurement_mode
from lightning_geomdim.gram import gram_spectrum, gram_unsupported_reason
from lightning_geomdim.jacobian import jacobian_spectrum
from lightning_geomdim.memory import memory_budget
from lightning_geomdim.rank import (
    Spectrum,
    effective_rank,
    numerical_rank,
    rank_tolerance,
    spectral_gap,
    stable_rank,
)
from lightning_geomdim.symmetries import find_symmetries

Engine = Literal["auto", "gram", "jacrev"]
ENGINES = ("auto", "gram", "jacrev")


@dataclass(frozen=True)
class DimensionResult:
    """The batch functional dimension and the spectrum it was read from.

    Attributes:
        rank: numerical rank of J (the batch functional dimension).
        singular_values: σ of J, shape (min(M, P),), float64, descending.
        tolerance: threshold on σ used to count the rank (see :mod:`lightning_geomdim.rank`).
        num_outputs: M = N · K, rows of J.
        num_params: P, columns of J.
        num_hidden_neurons: hidden units with a recognised positive-rescaling symmetry (0 if none).
        upper_bound: min(M, P − hidden neurons), with N·(K − 1) rows for a softmax head; min(M, P) when no
            symmetry is recognised.
        spectral_gap: σ_r / σ_{r+1}; ``inf`` at full rank, ``nan`` at rank 0.
        stable_rank: Σσ² / σ_max².
        effective_rank: exp of the entropy of σ / Σσ.
        engine: the engine that computed the spectrum ("jacrev" or "gram").
    """

    rank: int
    singular_values: Tensor
    tolerance: float
    num_outputs: int
    num_params: int
    num_hidden_neurons: int
    upper_bound: int
    spectral_gap: float
    stable_rank: float
    effective_rank: float
    engine: str = "jacrev"


def select_engine(engine: str, fm: FunctionalModel, inputs: ProbeInputs) -> str:
    """Resolve ``engine``: "auto" is "gram" when the Gram engine is exact for this model and probe, else "jacrev".

    Raises:
        ValueError: unknown ``engine``.
        NotApplicableError: ``engine="gram"`` on a model it cannot measure exactly (the message says why).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {ENGINES}")
    if engine == "jacrev":
        return "jacrev"
    reason = gram_unsupported_reason(fm, inputs)
    if reason is None:
        return "gram"
    if engine == "gram":
        raise NotApplicableError(reason)
    return "jacrev"


def compute_spectrum(
    engine: str, fm: FunctionalModel, inputs: ProbeInputs, num_outputs: int, *, chunk_size: int | None,
    budget: int, distributed: bool = False,
) -> Spectrum:
    """Run the resolved ``engine`` ("gram" or "jacrev") and return the singular values of J."""
    if engine == "gram":
        return gram_spectrum(fm, inputs, num_outputs, chunk_size=chunk_size, budget=budget, distributed=distributed)
    return jacobian_spectrum(fm, inputs, num_outputs, chunk_size=chunk_size, budget=budget)


def batch_functional_dimension(
    model: nn.Module,
    x: Any,
    *,
    output_fn: OutputFn | None = None,
    params: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    chunk_size: int | None = None,
    engine: Engine = "auto",
    max_memory_bytes: int | None = None,
    distributed: bool = False,
) -> DimensionResult:
    """Batch functional dimension of ``model`` on the probe batch ``x``: rank ∂ vec f_θ(x) / ∂θ.

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
        dtype: computation dtype of J, float64 by default whatever the model's dtype: a float32 Jacobian
            with a float64 tolerance over-counts the rank (SCIENCE.md).
        rtol: relative tolerance; default ``σ_max · max(M, P) · eps(dtype)`` (numpy's rule) for an SVD of
            J, ``σ_max · max(max(M, P) · eps(dtype), sqrt(max(M, P) · eps64))`` for σ read from the
            eigenvalues of the (float64) Gram matrix (see :mod:`lightning_geomdim.rank`). With ``rtol``:
            ``rtol · σ_max``.
        chunk_size: number of VJPs vmapped at once (bounds backward memory): rows of J for jacrev, output
            coordinates per sample for gram.
        engine: "gram" builds J Jᵀ (M × M) or Jᵀ J (P × P), whichever is smaller, from per-layer factors
            without forming J, and reads σ = √λ from its eigenvalues; exact for networks of Linear/Conv2d
            layers with per-sample activations, pooling, flatten, dropout, softmax in between (conditions in
            :mod:`lightning_geomdim.gram`); peak memory ≈ 16·min(M, P)² bytes plus per-layer factors.
            "jacrev" forms the dense M × P Jacobian and takes its exact SVD: any differentiable model, the
            finest resolution (σ down to σ_max·max(M, P)·eps instead of σ_max·sqrt(max(M, P)·eps)), but
            about 3·M·P·8 bytes and a much slower SVD. "auto" (default) picks "gram" when its conditions
            hold on this model and probe, "jacrev" otherwise; ``DimensionResult.engine`` says which ran.
        max_memory_bytes: memory budget; default half the available memory (see
            :mod:`lightning_geomdim.memory`).
        distributed: with the Gram engine and an initialised ``torch.distributed`` process group, divide the
            Gram accumulation among the processes and all-reduce it (see
            :func:`lightning_geomdim.gram.gram_matrix`). A collective: every process must call it, with the
            same model, probe and arguments. Ignored by the jacrev engine and without a process group.

    Returns:
        A :class:`DimensionResult`; ``singular_values`` is float64, shape (min(M, P),).

    Raises:
        ValueError: no trainable parameters, unknown names in ``params``, unknown ``engine``.
        NotApplicableError: ``engine="gram"`` on a model the Gram engine cannot measure exactly.
        ProbeError: empty probe, unsupported type, or the model's forward fails on it (chained).
        NonFiniteError: NaN/inf in the parameters or outputs.
        MemoryBudgetError: the engine would exceed the memory budget (raised before allocating).

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> res = batch_functional_dimension(net, torch.randn(16, 3, generator=torch.Generator().manual_seed(0)))
        >>> res.num_params, res.num_hidden_neurons, res.upper_bound
        (26, 4, 22)
        >>> res.rank <= res.upper_bound
        True
    """
    with measurement_mode(model):
        fm = FunctionalModel.from_module(model, params=params, dtype=dtype, output_fn=output_fn)
        inputs = ProbeInputs.from_batch(x, dtype=dtype, device=fm.device)
        out = fm.probe_outputs(inputs)
        num_outputs, num_params = out.numel(), fm.num_params
        symmetries = find_symmetries(fm, inputs)
        resolved = select_engine(engine, fm, inputs)
        spectrum = compute_spectrum(
            resolved, fm, inputs, num_outputs, chunk_size=chunk_size,
            budget=memory_budget(fm.device, max_memory_bytes), distributed=distributed,
        )
    return dimension_from_spectrum(
        spectrum, num_outputs=num_outputs, num_params=num_params, rtol=rtol, engine=resolved,
        num_hidden_neurons=symmetries.num_hidden_neurons,
        upper_bound=symmetries.upper_bound(inputs.num_samples, tuple(out.shape), num_params),
    )


def dimension_from_spectrum(
    spectrum: Spectrum, *, num_outputs: int, num_params: int, rtol: float | None, engine: str,
    num_hidden_neurons: int, upper_bound: int,
) -> DimensionResult:
    """Count the rank of a spectrum and gather the statistics reported with it."""
    sv = spectrum.singular_values
    sigma_max = float(sv[0]) if sv.numel() else 0.0
    tol = rank_tolerance(sigma_max, num_outputs, num_params, spectrum.dtype, rtol=rtol,
                         from_gram=spectrum.from_gram)
    rank = numerical_rank(sv, tol)
    return DimensionResult(
        rank=rank,
        singular_values=sv,
        tolerance=tol,
        num_outputs=num_outputs,
        num_params=num_params,
        num_hidden_neurons=num_hidden_neurons,
        upper_bound=upper_bound,
        spectral_gap=spectral_gap(sv, rank),
        stable_rank=stable_rank(sv),
        effective_rank=effective_rank(sv),
        engine=engine,
    )
