"""The structured Gram engine: J Jᵀ (M × M) or Jᵀ J (P × P) from per-layer factors, then its eigenvalues.

The M × P Jacobian J = ∂ vec f_θ(X) / ∂θ is never formed. For a network whose samples are processed
independently, row (n, k) of J only involves sample n; for a measured affine layer l with pre-activation
z_l = W_l u + b_l applied at positions t (t = 1 for a Linear layer on (N, in) inputs; the output pixels of a
convolution) write

* u_l(x_n)_t ∈ R^D: the layer input at position t (Linear: h_{l−1}(x_n); Conv2d: the patch of the input
  read by output pixel t, ``F.unfold``; D = C_in · kh · kw);
* g_l(n, k)_t = ∂f_k(x_n) / ∂z_l(x_n)_t ∈ R^O: the backprop signal of output coordinate k (O = out
  features / out channels). Because samples are independent, Σ_n' f_k(x_n') backpropagated once gives
  g_l(n, k) for every n at the same time: one backward per output coordinate, batched with ``vmap``.

Then ∂f_k(x_n)/∂W_l = Σ_t g_t ⊗ u_t and ∂f_k(x_n)/∂b_l = Σ_t g_t, and the Gram matrix is a sum over layers

    (J Jᵀ)[(n,k), (n',k')] = Σ_l Σ_{t,t'} ⟨g_l(n,k)_t, g_l(n',k')_t'⟩ · (⟨u_l(x_n)_t, u_l(x_n')_t'⟩ + 1).

For a Linear layer (t = 1) this is docs/science.md's (G_l G_lᵀ) ⊙ (H_l H_lᵀ + 1) with H_l H_lᵀ (N × N) repeated
over the K × K output blocks; the "+ 1" is the bias and is dropped when the bias is not measured, the
H_l H_lᵀ term when the weight is not. For a convolution the double sum over output pixels is evaluated
either as that kernel (T² products of M × O signal matrices, cheap when the feature map is small) or,
when cheaper, through the per-sample weight gradients A_l(n,k) = Σ_t g_t u_tᵀ (O × D, in chunks of
output channels) as A_l A_lᵀ, plus s sᵀ with s = Σ_t g_t for the bias. When P < M the engine builds
Jᵀ J = Σ_chunks J_Sᵀ J_S instead, from the rows J_S of a chunk of samples assembled from the same factors
(the column order does not matter for the spectrum). Parameters outside ``fm.params`` have no columns:
only the measured weights and biases contribute. Every product is accumulated in float64.

Other layers (BatchNorm in eval mode, LayerNorm, GroupNorm, Embedding, grouped convolutions, an LSTM or GRU — any
number of layers, either direction — over its time steps, ``nn.MultiheadAttention`` self-attention as its in- and
out-projections over the positions) have their own forms of u and g (:mod:`lightning_geomdim.core.factor_forms`,
:mod:`lightning_geomdim.core.recurrent_form`, :mod:`lightning_geomdim.core.attention_form`); the assembly below only
needs the explicit rows they give.

Exactness conditions (``engine="auto"`` falls back to jacrev when one fails, ``engine="gram"`` raises
:class:`NotApplicableError`):

* structural (:func:`~lightning_geomdim.core.structure.factored_plan`): every module owning a measured parameter
  has a factor form, is called once on one tensor of N samples, and no parameter is shared or tied;
* checked by one backward (:mod:`lightning_geomdim.core.factor_check`): samples do not interact, and the forms give
  autograd's whole gradient (no measured parameter acts outside its module's forward).

Anything may sit between the layers: residual sums, attention (the softmax between the projections of
``nn.MultiheadAttention`` or of Linear layers), GELU, functional code.
Frozen parameters may belong to any module (a frozen LSTM backbone under a trainable head).

Peak memory (float64, d = min(M, P_used)): 16 · d² bytes (the Gram, built by blocks of rows into its lower
triangle through a 16 MiB scratch block, and the working copy LAPACK's eigensolver makes of it), plus the
per-layer factors 8 · Σ_l (N · T_l · D_l + M · T_l · O_l) bytes (plus the same again in the computation
dtype), plus the backward intermediates of ``chunk_size`` output coordinates (≈ chunk_size × the forward
activations). :func:`gram_bytes` is checked against the memory budget before anything is allocated. For
the paper's MLP: 0.56 GiB at N = 600 (measured 566 MiB), 6.0 GiB at N = 2,000.

Tolerance: σ = √max(λ, 0) with the Gram rule of :mod:`lightning_geomdim.core.rank` (``from_gram=True``): a
float64 Gram resolves σ down to about σ_max · sqrt(max(M, P) · eps64) (~2e-6 σ_max for the paper's MLP),
a dense SVD (``engine="jacrev"``) down to σ_max · max(M, P) · eps64 (~6e-12 σ_max). Use jacrev when the
spectral gap shows singular values between those two levels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from lightning_geomdim.core.agreement import agreed, process_share
from lightning_geomdim.core.blocks import block_size
from lightning_geomdim.core.errors import NotApplicableError
from lightning_geomdim.core.factor_check import factorization_problem
from lightning_geomdim.core.factor_forms import LayerFactors, jacobian_rows, per_sample_gradients, position_sum
from lightning_geomdim.core.finite_field import PrimeField
from lightning_geomdim.core.gram_plan import FACTOR_REMEDIES, GramPlan, explicit_cost, gram_bytes, kernel_cost
from lightning_geomdim.core.interrupt import checkpoint, eigh_flops
from lightning_geomdim.core.layer_factors import layer_factors
from lightning_geomdim.core.memory import rows_at_once
from lightning_geomdim.core.probe_trace import ProbeTrace
from lightning_geomdim.core.rank import Spectrum
from lightning_geomdim.core.structure import _gram_refusal, gram_plan

#: Entries of the scratch block used to accumulate Gram rows (16 MiB in float64): large enough for efficient
#: matrix products, small enough to stay in cache and to never allocate a second d × d matrix.
_BLOCK_ENTRIES = 1 << 21


def _accumulate(
    gram: Tensor, a: Tensor, b: Tensor, *, group: int = 1, scale: Tensor | None = None, lower: bool = True,
    buffer: Tensor | None = None, field: PrimeField | None = None,
) -> None:
    """gram += (a bᵀ) ⊙ (scale ⊗ 1_{group × group}), by blocks of rows; only the lower triangle if ``lower``.

    ``a``, ``b``: (d, r); ``scale``: (d / group, d / group) or None (all ones). Rows are processed ``group`` at
    a time so that a block of rows always covers whole groups (the K outputs of a sample). With ``field``, every
    operand holds residues of GF(p) and so does the result (exact products, reduced after each operation).
    """
    d = gram.shape[0]
    groups = d // group
    per_block = max(1, _BLOCK_ENTRIES // max(d * group, 1))  # groups per block
    for g0 in range(0, groups, per_block):
        checkpoint()
        g1 = min(g0 + per_block, groups)
        r0, r1 = g0 * group, g1 * group
        c1 = r1 if lower else d
        target = gram[r0:r1, :c1]
        if field is not None:
            prod = field.matmul(a[r0:r1], b[:c1].T)
        elif scale is None:
            target.addmm_(a[r0:r1], b[:c1].T)
            continue
        else:
            assert buffer is not None
            prod = torch.mm(a[r0:r1], b[:c1].T, out=buffer[: (r1 - r0) * c1].view(r1 - r0, c1))
        if scale is not None:
            prod.view(g1 - g0, group, c1 // group, group).mul_(scale[g0:g1, : c1 // group, None].unsqueeze(1))
            if field is not None:
                field.reduce_(prod)
        target.add_(prod)
        if field is not None:
            field.reduce_(target)


def _add_output_gram(
    gram: Tensor, f: LayerFactors, n: int, k: int, *, lower: bool, buffer: Tensor, field: PrimeField | None = None,
) -> None:
    """gram (M × M, rows n·K + k) += this layer's block J_l J_lᵀ (formulas in the module docstring)."""
    lay, u, sig = f.layer, f.inputs, f.signals
    m = n * k
    copies = len(lay.bias_names)  # an LSTM layer's b_ih and b_hh: two copies of the same columns (a GRU's: 1 each)
    if not lay.weight:  # bias only: s sᵀ with s = Σ_t g_t
        s = position_sum(sig, field)
        _accumulate(gram, s, s * copies, group=k, lower=lower, field=field)
        return
    if kernel_cost(lay, m, n) <= explicit_cost(lay, m):
        for p in range(lay.positions):
            for q in range(lay.positions):
                # c[n, n'] = ⟨u(x_n)_p, u(x_n')_q⟩ (+ 1 for the bias)
                c = u[:, p] @ u[:, q].T if field is None else field.matmul(u[:, p], u[:, q].T)
                if lay.bias:
                    c += float(copies)
                # ⟨g(n,k)_p, g(n',k')_q⟩ · c[n, n']
                _accumulate(gram, sig[p], sig[q], group=k, scale=c, lower=lower, buffer=buffer, field=field)
        return
    # per-sample weight gradients A(n,k) = Σ_t g_t u_tᵀ, in chunks of output units to bound memory
    sig_nk = sig.view(lay.positions, n, k, lay.units)
    per_group = lay.units // lay.groups  # a chunk covers whole groups of a grouped convolution
    step = max(per_group, min(lay.units, (m * m) // max(m * lay.features, 1)) // per_group * per_group)
    for start in range(0, lay.units, step):
        a = per_sample_gradients(lay, sig_nk, u, field, slice(start, start + step)).reshape(m, -1)
        _accumulate(gram, a, a, group=k, lower=lower, field=field)
        del a
    if lay.bias:
        s = position_sum(sig, field)
        _accumulate(gram, s, s * copies, group=k, lower=lower, field=field)


def gram_from_factors(
    factors: Sequence[LayerFactors], plan: GramPlan, *, lower_only: bool = False, share: tuple[int, int] = (0, 1),
    field: PrimeField | None = None,
) -> Tensor:
    """The Gram matrix of J on ``plan.side``: J Jᵀ (M × M) or Jᵀ J (P_used × P_used), float64.

    With ``field``, the factors hold residues of GF(p) and the Gram is computed exactly mod p (residues).

    With ``lower_only`` only the lower triangle is filled (the upper one holds zeros): half the work, and all
    that ``torch.linalg.eigvalsh(gram, UPLO="L")`` reads.

    ``share = (index, count)``: compute only the terms of share ``index`` out of ``count``; the ``count``
    partial matrices sum to the whole. J Jᵀ = Σ_l J_l J_lᵀ is split by layers (balanced by cost), Jᵀ J =
    Σ_S J_Sᵀ J_S by chunks of samples.
    """
    index, count = share
    n, k = plan.num_samples, plan.outputs_per_sample
    device = factors[0].inputs.device if factors else torch.device("cpu")
    d = plan.size
    gram = torch.zeros((d, d), dtype=torch.float64, device=device)
    if plan.side == "outputs":
        buffer = torch.empty(min(d * d, max(_BLOCK_ENTRIES, d * k)), dtype=torch.float64, device=device)
        m = n * k
        costs = [min(kernel_cost(f.layer, m, n), explicit_cost(f.layer, m)) for f in factors]
        for i in _balanced_share(costs, index, count):
            _add_output_gram(gram, factors[i], n, k, lower=lower_only, buffer=buffer, field=field)
    else:
        # Jᵀ J = Σ over chunks of samples of J_Sᵀ J_S; chunks of about d rows keep J_S no larger than the Gram
        per_chunk = max(1, d // max(k, 1))
        starts = list(range(0, n, per_chunk))
        for start in starts[index::count]:
            rows = jacobian_rows(factors, slice(start, min(start + per_chunk, n)), k, field)
            cols = rows.T.contiguous()
            _accumulate(gram, cols, cols, lower=lower_only, field=field)
            del rows, cols
    return gram.tril_() if lower_only else gram  # blocks on the diagonal also filled some upper entries


def _balanced_share(costs: Sequence[float], index: int, count: int) -> list[int]:
    """Indices of the items of share ``index`` when items are dealt, costliest first, to the lightest share."""
    loads = [0.0] * count
    owner = {}
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        j = min(range(count), key=lambda j: (loads[j], j))
        loads[j] += costs[i]
        owner[i] = j
    return [i for i in range(len(costs)) if owner[i] == index]


def planned_factors(
    trace: ProbeTrace, *, chunk_size: int | None = None, budget: int | None = None,
) -> tuple[GramPlan, list[LayerFactors]]:
    """The Gram plan and the per-layer factors, after the checks (structure, one backward) and the memory budget.

    Raises:
        NotApplicableError: the engine is not exact for this model (:mod:`.structure`, :mod:`.factor_check`).
        MemoryBudgetError: before allocating, when :func:`gram_bytes` exceeds ``budget``.
    """
    plan = gram_plan(trace)
    problem = factorization_problem(trace, plan)
    if problem is not None:
        raise NotApplicableError(_gram_refusal(problem))
    itemsize = torch.empty((), dtype=trace.fm.dtype).element_size()
    chunk = rows_at_once(  # output coordinates backpropagated at once: all that fit the budget next to the Gram
        plan.outputs_per_sample, chunk_size, fixed=gram_bytes(plan, itemsize, chunk_size=0),
        per_row=plan.activation_numel * itemsize, budget=budget,
        what=f"the {plan.size} × {plan.size} Gram matrix of J (M = {plan.num_outputs}, P = "
        f"{plan.num_params}) with its per-layer factors (engine='gram')",
        remedies=FACTOR_REMEDIES,
        by_samples=(plan.num_samples, lambda n: gram_bytes(plan.on_samples(n), itemsize, chunk_size=1)),
    )
    return plan, layer_factors(trace, plan, chunk_size=chunk)


def _local_gram(factors: Sequence[LayerFactors], plan: GramPlan, distributed: bool) -> Tensor:
    """This process's share of the lower triangle of ``plan``'s Gram (:func:`gram_from_factors`)."""
    return gram_from_factors(factors, plan, lower_only=True, share=process_share(distributed))


def _reduced(gram: Tensor, distributed: bool) -> Tensor:
    """The sum of every process's share (one ``all_reduce``), or ``gram`` alone without a process group."""
    if process_share(distributed)[1] > 1:
        torch.distributed.all_reduce(gram, op=torch.distributed.ReduceOp.SUM)
    return gram


def _agreed_gram(
    trace: ProbeTrace, *, chunk_size: int | None, budget: int | None, distributed: bool, num_outputs: int | None = None,
) -> tuple[GramPlan, list[LayerFactors], Tensor]:
    """The plan, the per-layer factors and the lower triangle of the whole Gram, summed over the processes of a
    group; the local work before the all-reduce is agreed (:func:`.agreement.agreed`). ``num_outputs``: the rows the
    caller expects, checked against the plan's."""

    def local() -> tuple[GramPlan, list[LayerFactors], Tensor]:
        plan, factors = planned_factors(trace, chunk_size=chunk_size, budget=budget)
        if num_outputs is not None and num_outputs != plan.num_outputs:
            raise NotApplicableError(
                f"the Gram engine saw {plan.num_outputs} outputs but the probe has {num_outputs}: use engine='jacrev'"
            )
        return plan, factors, _local_gram(factors, plan, distributed)

    plan, factors, gram = agreed(local, distributed, trace.fm.device)
    return plan, factors, _reduced(gram, distributed)


def gram_matrix(
    trace: ProbeTrace, *, chunk_size: int | None = None, budget: int | None = None, lower_only: bool = False,
    distributed: bool = False,
) -> tuple[Tensor, GramPlan]:
    """J Jᵀ or Jᵀ J (whichever is smaller, ``plan.side``), float64, and the plan it was built from.

    ``lower_only``: fill only the lower triangle (see :func:`gram_from_factors`).

    ``distributed``: when a ``torch.distributed`` process group is initialised, each of the W processes
    accumulates 1/W of the terms (its share of the layers for J Jᵀ, of the sample chunks for Jᵀ J) and one
    ``all_reduce(SUM)`` gives every process the whole matrix. Collective: every process of the group must
    call it with the same model and probe. The per-layer factors (one forward, K backwards) are computed by
    every process; the accumulation, which dominates for large probes, is divided.

    Raises:
        NotApplicableError: the engine is not exact for this model (:mod:`.structure`, :mod:`.factor_check`).
        MemoryBudgetError: before allocating, when :func:`gram_bytes` exceeds ``budget``.
    """
    plan, _, gram = _agreed_gram(trace, chunk_size=chunk_size, budget=budget, distributed=distributed)
    return (gram if lower_only else gram + gram.tril(-1).T), plan


def _singular_values(gram: Tensor, total: int) -> Tensor:
    """σ = √max(λ, 0) of the Gram's eigenvalues (lower triangle read), descending, padded with zeros to ``total``
    (columns of parameters that never ran)."""
    checkpoint(flops=eigh_flops(gram.shape[0]))  # one LAPACK call: under a time limit, not begun if it would overrun
    eig = torch.linalg.eigvalsh(gram, UPLO="L") if gram.numel() else gram.new_zeros(0)
    sv = eig.clamp_min(0).sqrt().flip(0)
    return torch.cat([sv, sv.new_zeros(total - sv.numel())]) if sv.numel() < total else sv


def _agreed_values(gram: Tensor, total: int, distributed: bool, device: torch.device) -> Tensor:
    """:func:`_singular_values` of ``gram``, agreed among the processes (:func:`.agreement.agreed`)."""
    return agreed(lambda: _singular_values(gram, total), distributed, device)


def gram_spectra(
    trace: ProbeTrace, num_outputs: int, *, chunk_size: int | None = None, budget: int, distributed: bool = False,
    blocks: Mapping[str, Sequence[str]] | None = None,
) -> tuple[Spectrum, dict[str, Spectrum]]:
    """Singular values of J, and of J restricted to each block's columns (block name → parameter names;
    :mod:`lightning_geomdim.core.blocks`), from one set of per-layer factors; each Gram is freed before the next.

    Raises:
        NotApplicableError: the engine is not exact for this model (:mod:`.structure`, :mod:`.factor_check`).
        MemoryBudgetError: before allocating, when :func:`gram_bytes` exceeds ``budget``.
    """
    device = trace.fm.device
    plan, factors, gram = _agreed_gram(trace, chunk_size=chunk_size, budget=budget, distributed=distributed,
                                       num_outputs=num_outputs)
    # every step between two collectives is agreed: a process that fails in one eigendecomposition must not pair
    # the next Gram's collectives with something else
    sv = _agreed_values(gram, min(num_outputs, trace.fm.num_params), distributed, device)
    del gram  # freed before the blocks' Grams
    whole = Spectrum(sv.cpu(), trace.fm.dtype, from_gram=True)
    parts = {}
    for name, names in (blocks or {}).items():
        total = min(num_outputs, block_size(trace.fm.params, names))
        part = block_part(factors, plan, names)
        if part is None:  # the block's layers did not run (or do not reach the output): zero columns
            parts[name] = Spectrum(torch.zeros(total, dtype=torch.float64), trace.fm.dtype, from_gram=True)
            continue
        mine, sub = part
        local_part = agreed(lambda mine=mine, sub=sub: _local_gram(mine, sub, distributed), distributed, device)
        sv = _agreed_values(_reduced(local_part, distributed), total, distributed, device)
        del local_part
        parts[name] = Spectrum(sv.cpu(), trace.fm.dtype, from_gram=True)
    return whole, parts


def block_part(
    factors: Sequence[LayerFactors], plan: GramPlan, names: Sequence[str],
) -> tuple[list[LayerFactors], GramPlan] | None:
    """The factors of the layers whose parameters all belong to the block ``names`` (parameter names) and the plan
    of J restricted to their columns, on its smaller side (the exact engine takes its cheaper one); None when no
    such layer ran."""
    members = set(names)
    mine = [f for f in factors if {*f.layer.weight_names, *f.layer.bias_names} <= members]
    if not mine:
        return None
    return mine, replace(plan, layers=tuple(f.layer for f in mine), forced_side=None)
