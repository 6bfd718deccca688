"""The exact engine: the batch functional dimension of a piecewise-linear network, without a tolerance.

With the activation patterns D of the network on the probe X fixed (ReLU masks, LeakyReLU slopes, ReLU6 /
Hardtanh clamps, max-pooling argmax), every entry of J = ∂ vec f_θ(X) / ∂θ is a polynomial in θ whose
coefficients are made of the float64 numbers of X (and of the frozen parameters). Its *generic* rank over θ is
the batch functional dimension (BFD) for almost every θ with those patterns, and the local dimension of the image
set {f_θ'(X) : θ' near θ} (Bona-Pellissier, Malgouyres, Bachoc, arXiv 2402.08269; ``docs/science.md``).

The engine computes that rank exactly, by evaluation at a random point modulo a prime p:

1. one traced float forward pass records the patterns and checks the structure (the module-by-module conditions
   of :func:`~lightning_geomdim.core.structure.check_structure`, plus: every parameter-free module is piecewise
   linear or linear);
2. the network is re-run in GF(p) with the patterns fixed, at random nonzero residues for the measured
   parameters (exact zeros of θ stay zero: pruned weights), the exact images of X and of the frozen parameters
   (:meth:`~lightning_geomdim.core.finite_field.PrimeField.from_float`), and backpropagated once per output
   coordinate class, giving the per-layer factors of the Gram engine as residues;
3. the Gram matrix J Jᵀ (or Jᵀ J) is assembled from them exactly mod p by the Gram engine's own code, and its
   rank over GF(p) is computed by blocked symmetric elimination with sweeps
   (:func:`~lightning_geomdim.core.symmetric_rank_mod_p.rank_mod_p_symmetric`).

Why it is right. rank(J Jᵀ) = rank J over the formally real field R(θ) (vᵀJJᵀv is a sum of squares), so a
nonzero r × r minor of the Gram exists, a polynomial of degree ≤ 2(L − 1)·r in θ for L affine layers. Reduction
mod p maps minors to minors, so the rank found is never above the true one; it is equal unless the random point
is a root of that minor, probability ≤ 2(L − 1)·r / p (Schwartz–Zippel), or every coefficient of the minor is
divisible by p. Each draw uses another prime and fresh residues; the result is the maximum over ``draws`` (≥ 2)
draws, except that a draw reaching the proven upper bound min(rows, P − hidden neurons) is already exact.
:attr:`ExactRank.failure_bound` is Π_i min(1, 2(L − 1)·bound / p_i) (0 when the bound was reached). For the
paper's MLP at N = 600 (L = 4, bound 5,400): 7.7e-3 per draw with p ≈ 4.2e6, 6e-5 for two.

Softmax / log-softmax heads are measured on their logit differences (same row space; see
:meth:`~lightning_geomdim.core.functional_model.FunctionalModel.measured_output`).

Supported: ``nn.Linear``, ``nn.Conv2d`` (groups = 1) and ``BatchNorm`` in eval mode (an affine map with constant
running statistics, whose γ, β are layers of the factored Gram) with ReLU, LeakyReLU, ReLU6, Hardtanh, Identity,
dropout (eval), max / average / adaptive pooling, Flatten / Unflatten, a final Softmax / LogSoftmax, and between
modules the functional code of residual networks: sums of two tensors (``out += identity``), ``flatten`` / ``view``
/ ``reshape`` that keep the samples apart, ``relu`` (:func:`~lightning_geomdim.core.structure.check_structure`).
So torchvision's ResNets are measured exactly. Anything else (GELU, tanh, LayerNorm, products, attention) raises
:class:`~lightning_geomdim.core.errors.NotApplicableError` with the reason; ``engine="auto"`` then falls back to a
floating-point engine.

Cost: one float forward pass, then per draw a forward and ``K`` batched backward passes in float64 residues, the
Gram assembly (as the Gram engine's, with a reduction after each product) and about d³/3 flops of symmetric
elimination for d = min(rows, P) — no eigendecomposition. Peak memory: one d × d float64 matrix (the Gram mod
p, eliminated in place) plus the Gram engine's per-layer factors (:func:`~lightning_geomdim.core.gram.gram_bytes` with
``copies=1``): 4.9 GiB for the paper's MLP on 2,848 inputs (d = 25,632).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_geomdim.core.blocks import block_size
from lightning_geomdim.core.exact_program import (
    Affine,
    ChannelAffine,
    Diagonal,
    ExactProgram,
    PlaneLinear,
    Step,
    exact_program,
    residue_of_constant,
)
from lightning_geomdim.core.factor_forms import LayerFactors, factors_of
from lightning_geomdim.core.finite_field import DEFAULT_PRIME, PrimeField, _is_prime
from lightning_geomdim.core.functional_model import FunctionalModel
from lightning_geomdim.core.gram import block_part, gram_from_factors
from lightning_geomdim.core.gram_plan import FACTOR_REMEDIES, GramPlan, gram_bytes
from lightning_geomdim.core.interrupt import checkpoint
from lightning_geomdim.core.memory import rows_at_once
from lightning_geomdim.core.probe_trace import ProbeTrace
from lightning_geomdim.core.symmetric_rank_mod_p import rank_mod_p_symmetric

#: The draws' primes: the largest primes below 2^22, one per draw.
PRIMES: tuple[int, ...] = tuple(q for q in range(DEFAULT_PRIME, DEFAULT_PRIME - 2000, -1) if _is_prime(q))[:8]


@dataclass(frozen=True)
class ExactRank:
    """The exact batch functional dimension and how it was obtained.

    Attributes:
        rank: the generic rank of J with the activation patterns fixed: max over the draws.
        ranks: the rank over GF(p_i) of each draw that ranked the whole J, in order.
        primes: the prime of each draw (more than ``ranks`` when draws continued for the blocks).
        failure_bound: an upper bound on the probability that ``rank`` is below the true value (module doc).
        blocks: block name → the exact rank of J restricted to the block's columns (``blocks=``), max over the
            same draws; its own failure bound in ``block_failure_bounds`` (the formula above with the block's
            bound min(rows, P_b); 0 when a draw reached it).
    """

    rank: int
    ranks: tuple[int, ...]
    primes: tuple[int, ...]
    failure_bound: float
    blocks: dict[str, int] = field(default_factory=dict)
    block_failure_bounds: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- one draw


def _field_steps(program: ExactProgram, field: PrimeField) -> list[Step | None]:
    """The program's float constants (slopes, clamps, pooling weights) as residues of ``field``."""
    steps: list[Step | None] = []
    for step in program.steps:
        if isinstance(step, Diagonal):
            offset = None if step.offset is None else _constants(field, step.offset)
            step = Diagonal(_constants(field, step.slope), offset)
        elif isinstance(step, PlaneLinear):
            step = PlaneLinear(_constants(field, step.matrix), step.in_shape, step.out_shape, step.dims)
        elif isinstance(step, ChannelAffine):
            step = ChannelAffine(step.name, field.from_float(step.mean), field.from_float(step.scale), step.affine)
        steps.append(step)
    return steps


def _constants(field: PrimeField, values: Tensor) -> Tensor:
    distinct, index = torch.unique(values, return_inverse=True)
    table = torch.tensor([residue_of_constant(field, v) for v in distinct.tolist()], dtype=torch.float64,
                         device=values.device)
    return table[index]


def _parameters(fm: FunctionalModel, field: PrimeField, generator: torch.Generator) -> dict[str, Tensor]:
    """Random nonzero residues for the measured parameters (zeros kept), exact images of the frozen ones."""
    theta = {}
    for name, value in fm.params.items():
        draw = field.random(tuple(value.shape), generator, device=value.device)
        theta[name] = draw.masked_fill_(value == 0, 0.0)
    for name, value in fm.frozen.items():
        if value.is_floating_point():
            theta[name] = field.from_float(value)
    return theta


def _seeds(shape: tuple[int, ...], head: bool, device: torch.device) -> Tensor:
    """Cotangents (K, *shape) at the measured tensor: e_k, or for a softmax head the logit differences'
    e_(…, c) − e_(…, C−1) for c < C − 1 (rows in the order of ``z[..., :-1] − z[..., -1:]``)."""
    if not head:
        size = math.prod(shape)
        return torch.eye(size, dtype=torch.float64, device=device).reshape(size, *shape)
    rows = (*shape[:-1], shape[-1] - 1)
    size = math.prod(rows)
    eye = torch.eye(size, dtype=torch.float64, device=device).reshape(size, *rows)
    return torch.cat([eye, -eye.sum(-1, keepdim=True)], dim=-1)


def _draw(
    fm: FunctionalModel, program: ExactProgram, field: PrimeField, generator: torch.Generator, chunk_size: int | None,
) -> list[LayerFactors]:
    """The per-layer factors of J mod p at one random point (residues, float64), in the plan's layer order."""
    steps = _field_steps(program, field)
    theta = _parameters(fm, field, generator)
    n = program.plan.num_samples
    values: list[Tensor | None] = [None] * len(steps)
    inputs: dict[int, Tensor] = {}
    x0 = field.from_float(program.probe)
    measured_layers = {layer.name for layer in program.plan.layers}
    for i, step in enumerate(steps):
        checkpoint()  # between layers: a layer of ResNet-18 over GF(p) takes a fraction of a second
        xs = [x0 if src < 0 else values[src] for src in program.sources[i]]
        if step is None:
            continue
        x = xs[0] if len(xs) == 1 else tuple(xs)
        if isinstance(step, (Affine, ChannelAffine)) and step.name in measured_layers:
            inputs[i] = step.factor_input(field, x)
        values[i] = step.forward(field, x, theta)
    measured = x0 if program.measured < 0 else values[program.measured]
    assert measured is not None
    seeds = _seeds(tuple(measured.shape[1:]), program.head, measured.device)
    k = seeds.shape[0]
    step_k = k if chunk_size is None else max(1, min(int(chunk_size), k))
    signals: dict[int, list[Tensor]] = {i: [] for i in inputs}
    for start in range(0, k, step_k):
        checkpoint()
        chunk = seeds[start : start + step_k]
        grads: dict[int, Tensor] = {}
        if program.measured >= 0:
            grads[program.measured] = chunk[:, None].expand(chunk.shape[0], n, *chunk.shape[1:])
        for i in reversed(range(len(steps))):
            checkpoint()
            g = grads.pop(i, None)
            step = steps[i]
            if i in inputs:
                out_shape = values[i].shape  # type: ignore[union-attr]
                signals[i].append(torch.zeros(chunk.shape[0], *out_shape, dtype=torch.float64, device=x0.device)
                                  if g is None else g)
            if g is None or step is None:
                continue
            sources = program.sources[i]
            g_in = step.backward(field, g, theta)
            for src, part in zip(sources, g_in if len(sources) > 1 else (g_in,), strict=True):
                if src >= 0:
                    grads[src] = part if src not in grads else field.reduce_(grads[src] + part)
    del values
    by_name = {steps[i].name: i for i in inputs}  # type: ignore[union-attr]
    factors = []
    for layer in program.plan.layers:
        checkpoint()
        i = by_name[layer.name]
        factors.append(factors_of(layer, inputs[i], torch.cat(signals.pop(i), dim=0), n, k, normalized=True))
    return factors


def _rank(factors: Sequence[LayerFactors], plan: GramPlan, field: PrimeField, upper_bound: int) -> int:
    """The rank over GF(p) of J restricted to ``plan``'s layers: its Gram's lower triangle, eliminated in place."""
    gram = gram_from_factors(factors, plan, lower_only=True, field=field)
    return rank_mod_p_symmetric(gram, field, upper_bound=upper_bound, overwrite=True)


def exact_rank(
    trace: ProbeTrace, *, upper_bound: int, program: ExactProgram | None = None,
    seed: int = 0, draws: int = 2, chunk_size: int | None = None, budget: int | None = None,
    blocks: Mapping[str, Sequence[str]] | None = None,
) -> ExactRank:
    """The exact batch functional dimension of the traced model on its probe (method and guarantees in the module
    doc).

    Args:
        upper_bound: a proven bound on the rank (min(rows, P − hidden neurons)): a draw reaching it stops (with
            ``blocks``, once every block reached its own bound min(rows, P_b) too; later draws rank only the
            blocks that did not).
        program: :func:`exact_program` of the same trace, when already built.
        seed: seeds the private generator of the random residues; the global RNG is not used.
        draws: independent evaluations (each with its own prime), at least 2; the maximum is returned.
        chunk_size: output coordinate classes backpropagated at once (bounds the backward's memory); default as
            many as fit ``budget``.
        budget: memory budget in bytes, checked before anything is allocated.
        blocks: block name → parameter names: also the exact rank of J restricted to each block's columns, from the
            same draws' factors (one Gram of size min(rows, P_b) each, after the whole one is freed).

    Raises:
        NotApplicableError: the engine does not apply (see :func:`exact_program`).
        MemoryBudgetError: the estimate exceeds ``budget``.
        ValueError: ``draws`` < 2 or more than the available primes.
    """
    if not 2 <= draws <= len(PRIMES):
        raise ValueError(f"draws={draws!r} must be between 2 and {len(PRIMES)}")
    if program is None:
        program = exact_program(trace)
    plan = program.plan
    chunk = rows_at_once(  # output coordinates backpropagated at once: all that fit the budget next to the Gram
        plan.outputs_per_sample, chunk_size, fixed=gram_bytes(plan, 8, chunk_size=0, copies=1),
        per_row=plan.activation_numel * 8, budget=budget,
        what=f"the {plan.size} × {plan.size} Gram matrix of J mod p (M = {plan.num_outputs}, P = "
        f"{plan.num_params}) with its per-layer factors, eliminated in place (engine='exact')",
        remedies=FACTOR_REMEDIES,
        by_samples=(plan.num_samples,
                    lambda n: gram_bytes(plan.on_samples(n).with_cheaper_side(), 8, chunk_size=1, copies=1)),
    )
    generator = torch.Generator().manual_seed(int(seed))
    rows = plan.num_samples * plan.outputs_per_sample
    bounds = {name: min(rows, block_size(trace.fm.params, names)) for name, names in (blocks or {}).items()}
    ranks: list[int] = []
    primes: list[int] = []
    best = dict.fromkeys(bounds, 0)  # each block's rank, max over the draws so far
    for p in PRIMES[:draws]:
        checkpoint()
        field = PrimeField(p)
        factors = _draw(trace.fm, program, field, generator, chunk)
        if not ranks or ranks[-1] < upper_bound:  # a rank that reached its bound is exact: a draw for the blocks
            ranks.append(_rank(factors, plan, field, upper_bound))  # does not rank the whole J again
        primes.append(p)
        for name, names in (blocks or {}).items():
            if best[name] >= bounds[name]:  # reached its bound: exact
                continue
            checkpoint()
            part = block_part(factors, plan, names)  # None: the block's layers did not run, zero columns
            if part is not None:
                best[name] = max(best[name], _rank(part[0], part[1].with_cheaper_side(), field, bounds[name]))
        del factors
        if ranks[-1] >= upper_bound and all(best[name] >= bound for name, bound in bounds.items()):
            break
    degree = 2 * max(program.depth - 1, 0)

    def failure(rank: int, bound: int) -> float:
        return 0.0 if rank >= bound or degree == 0 else math.prod(min(1.0, degree * bound / p) for p in primes)

    rank = max(ranks)
    return ExactRank(rank, tuple(ranks), tuple(primes), failure(rank, upper_bound), best,
                     {name: failure(best[name], bounds[name]) for name in best})
