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

Exactness conditions (checked on the probe by :func:`gram_plan`; ``engine="auto"`` falls back to jacrev
when one fails, ``engine="gram"`` raises :class:`NotApplicableError`):

* one positional tensor input, no keyword inputs; no shared or tied parameters;
* every module that owns parameters (frozen or not) is a plain ``nn.Linear`` or ``nn.Conv2d`` (groups = 1,
  zero padding, no hooks), called at most once;
* every other module that runs is a parameter-free module known to act on each sample separately
  (ReLU-like and other elementwise activations, dropout in eval mode, pooling, flatten, softmax over a
  non-batch dimension, identity);
* data flows only from module to module: each module's input is the probe input or, unmodified, the
  output of an earlier module, and the measured output is a module's output (``output_fn`` may only pick
  it out of a tuple or dict). Any functional code between modules (``x + y``, ``torch.relu``,
  ``x.view``, in-place edits) is thereby detected and refused, because it could mix samples.

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

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_geomdim.core.errors import NotApplicableError
from lightning_geomdim.core.finite_field import PrimeField
from lightning_geomdim.core.functional_model import FunctionalModel, ProbeInputs
from lightning_geomdim.core.layer_kinds import ALONG_DIM, DROPOUT, FACTORED_AFFINE, PER_SAMPLE, POOLING
from lightning_geomdim.core.memory import check_memory
from lightning_geomdim.core.rank import Spectrum

Side = Literal["outputs", "params"]


@dataclass(frozen=True)
class GramLayer:
    """A measured affine layer as the engine sees it.

    Attributes:
        name: module name in ``named_modules()`` ("" for the root).
        module: the ``nn.Linear`` / ``nn.Conv2d``.
        weight: the weight is among the measured parameters.
        bias: the bias exists and is measured.
        positions: T, positions the layer is applied at per sample (Linear: product of the middle input
            dimensions, 1 for (N, in) inputs; Conv2d: output pixels Ho · Wo).
        features: D, length of the layer input at one position (in_features; C_in · kh · kw).
        units: O, out_features or out_channels.
    """

    name: str
    module: nn.Module
    weight: bool
    bias: bool
    positions: int
    features: int
    units: int

    @property
    def num_params(self) -> int:
        """Measured scalar parameters of the layer."""
        return self.units * (self.features * self.weight + self.bias)


@dataclass(frozen=True)
class GramPlan:
    """What :func:`gram_matrix` will compute, read from one traced forward pass.

    Attributes:
        layers: the measured affine layers that ran, in execution order.
        num_samples: N.
        outputs_per_sample: K (the measured output has M = N · K entries).
        num_params: P, every measured parameter (those of modules that did not run have zero columns).
        activation_numel: entries of all module outputs of the forward pass (for the backward's memory).
        outputs_per_sample: K, rows of J per sample: the measured output's entries per sample, or for a softmax
            head (``fm.logit_head``) its logit differences, K_out − K_out / C for C classes.
        forced_side: the Gram's side when set (see :meth:`with_cheaper_side`), else the smaller one.
    """

    layers: tuple[GramLayer, ...]
    num_samples: int
    outputs_per_sample: int
    num_params: int
    activation_numel: int
    forced_side: Side | None = None

    @property
    def num_outputs(self) -> int:
        """M = N · K."""
        return self.num_samples * self.outputs_per_sample

    @property
    def used_params(self) -> int:
        """Measured parameters of the layers that ran (the others have zero Jacobian columns)."""
        return sum(layer.num_params for layer in self.layers)

    @property
    def side(self) -> Side:
        """"outputs" for J Jᵀ (M × M) or "params" for Jᵀ J (P_used × P_used): ``forced_side``, else the smaller."""
        if self.forced_side is not None:
            return self.forced_side
        return "outputs" if self.num_outputs <= self.used_params else "params"

    @property
    def size(self) -> int:
        """Side length d of the Gram matrix."""
        return self.num_outputs if self.side == "outputs" else self.used_params

    def with_cheaper_side(self) -> GramPlan:
        """This plan on the side whose assembly plus ~d³/3 elimination costs fewer flops (the exact engine's rule).

        J Jᵀ is assembled from the per-layer factors in about Σ_l min(kernel, explicit) flops (at most M² times
        the layers' widths), Jᵀ J from explicit rows of J in 2·M·P_used² flops. Past the balance point M = P the
        J Jᵀ side stays cheaper while M³/3 < 2·M·P² + P³/3 (e.g. the paper's MLP on 3,200 inputs: M = 28,800,
        P = 25,720: 8.1e12 against 4.4e13 flops).
        """
        m, n, p = self.num_outputs, self.num_samples, self.used_params
        outputs = sum(min(_kernel_cost(lay, m, n), _explicit_cost(lay, m)) for lay in self.layers) + m**3 / 3
        params = 2 * m * p**2 + p**3 / 3
        return replace(self, forced_side="outputs" if outputs <= params else "params")


def gram_bytes(plan: GramPlan, itemsize: int = 8, *, chunk_size: int | None = None, copies: int = 2) -> int:
    """Peak memory estimate of :func:`gram_spectrum`, in bytes (formula in the module docstring).

    ``copies``: d × d float64 matrices alive at once: 2 for the eigensolver (the Gram and LAPACK's copy), 1 for
    the exact engine (the Gram mod p, eliminated in place).
    """
    n, m = plan.num_samples, plan.num_outputs
    factors = sum(n * lay.positions * lay.features + m * lay.positions * lay.units for lay in plan.layers)
    chunk = plan.outputs_per_sample if chunk_size is None else min(chunk_size, plan.outputs_per_sample)
    backward = chunk * plan.activation_numel * itemsize
    return 8 * copies * plan.size**2 + (8 + itemsize) * factors + backward


# --------------------------------------------------------------------------------------------- structure


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_mod

    return bool(module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric zero padding of ``conv`` as two ints, or None when ``F.unfold`` cannot express it."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            return None
        return (total[0] // 2, total[1] // 2)
    return (int(conv.padding[0]), int(conv.padding[1]))


def _affine_problem(name: str, module: nn.Module) -> str | None:
    """Why ``module`` (which owns parameters) is not a supported affine layer, or None."""
    label = f"module {name or '<root>'!r} ({type(module).__name__})"
    if not isinstance(module, FACTORED_AFFINE):
        return (f"{label} has parameters; the Gram engine differentiates only nn.Linear and nn.Conv2d by "
                "formula")
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    if type(module).forward is not base.forward or (
        base is nn.Conv2d and type(module)._conv_forward is not nn.Conv2d._conv_forward
    ):
        return f"{label} overrides forward"
    own = {n for n, _ in module.named_parameters(recurse=False)}
    if "weight" not in own or not own <= {"weight", "bias"} or next(module.children(), None) is not None:
        return f"{label} has parameters {sorted(own)} or submodules (a reparametrisation?)"
    if _has_hooks(module):
        return f"{label} has forward hooks, which may change its input or output"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"{label} has groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return f"{label} has padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
        if _conv_padding(module) is None:
            return f"{label} has asymmetric 'same' padding"
    return None


def _per_sample_problem(label: str, module: nn.Module, inp: Tensor) -> str | None:
    """Why the parameter-free ``module`` may mix samples on ``inp``, or None."""
    if type(module) not in PER_SAMPLE:
        return (f"{label} is not known to act on each sample separately (supported: Linear, Conv2d and "
                "elementwise activations, dropout, pooling, flatten, softmax)")
    if _has_hooks(module):
        return f"{label} has forward hooks"
    if isinstance(module, DROPOUT) and module.training:
        return f"{label} is in training mode (random masks); measure in eval mode"
    if isinstance(module, POOLING) and getattr(module, "return_indices", False):
        return f"{label} returns indices"
    if isinstance(module, ALONG_DIM):
        dim = module.start_dim if isinstance(module, nn.Flatten) else module.dim
        if dim is None or (inp.dim() > 0 and dim % inp.dim() == 0):
            return f"{label} acts along dim {dim}, which may be the sample dimension"
    return None


@dataclass
class _Call:
    name: str
    module: nn.Module
    input: Any
    input_version: int
    output: Any = None
    output_version: int = -1


def _traced_calls(fm: FunctionalModel, inputs: ProbeInputs) -> tuple[list[_Call], Tensor]:
    """Run ``fm`` once without autograd, recording every leaf call's input and output with tensor versions."""
    calls: list[_Call] = []
    stack: list[_Call] = []
    handles = []

    def pre(name: str, m: nn.Module, args: tuple[Any, ...]) -> None:
        inp = args[0] if len(args) == 1 else args
        call = _Call(name, m, inp, inp._version if isinstance(inp, Tensor) else -1)
        calls.append(call)
        stack.append(call)

    def post(m: nn.Module, out: Any) -> None:
        call = stack.pop()
        call.output = out
        call.output_version = out._version if isinstance(out, Tensor) else -1

    try:
        for name, sub in fm.module.named_modules():
            if next(sub.children(), None) is None or any(True for _ in sub.parameters(recurse=False)):
                handles.append(sub.register_forward_pre_hook(lambda m, a, _n=name: pre(_n, m, a)))
                handles.append(sub.register_forward_hook(lambda m, a, o: post(m, o)))
        with torch.no_grad():
            out = fm(fm.params, inputs)
    finally:
        for h in handles:
            h.remove()
    return calls, out


def gram_unsupported_reason(fm: FunctionalModel, inputs: ProbeInputs) -> str | None:
    """Why the Gram engine would not be exact for ``fm`` on ``inputs`` (None when it is)."""
    try:
        gram_plan(fm, inputs)
    except NotApplicableError as err:
        return str(err)
    return None


def gram_plan(fm: FunctionalModel, inputs: ProbeInputs) -> GramPlan:
    """Check the exactness conditions (module docstring) on one traced forward pass and plan the Gram.

    Raises:
        NotApplicableError: a condition fails; the message names the module and the alternative engine.
    """
    problem, plan, _ = check_structure(fm, inputs)
    if problem is not None:
        raise NotApplicableError(
            f"the Gram engine is not exact for this model: {problem}. Use engine='jacrev' (dense Jacobian, "
            "any differentiable model) or engine='auto', which falls back to it"
        )
    assert plan is not None
    return plan


@dataclass(frozen=True)
class TracedGraph:
    """The module calls of one traced forward pass and how data flows between them.

    Attributes:
        calls: every leaf (or parameterised) module call, in execution order, with its input and output.
        sources: for each call, the index of the call whose output is its input; -1 for the probe input.
        output: index of the call whose output is the measured output.
    """

    calls: tuple[_Call, ...]
    sources: tuple[int, ...]
    output: int


def check_structure(
    fm: FunctionalModel, inputs: ProbeInputs,
) -> tuple[str | None, GramPlan | None, TracedGraph | None]:
    """Check the structural conditions of the module docstring on one traced forward pass: (None, plan, graph)
    when they hold, else (the reason, None, None), for each engine to phrase its own refusal."""
    none = None, None
    module = fm.module
    if inputs.kwargs or len(inputs.args) != 1 or not isinstance(inputs.args[0], Tensor):
        return "the probe is not a single positional tensor", *none
    probe = inputs.args[0]
    n = inputs.num_samples
    if _global_hooks():
        return "global module forward hooks are registered", *none
    named = list(module.named_parameters(remove_duplicate=False))
    if len(named) != len(dict(module.named_parameters())):
        return "some parameters are shared (tied) between modules", *none
    storages = [p.untyped_storage().data_ptr() for _, p in named if p.numel() > 0]
    if len(storages) != len(set(storages)):
        return "some parameters share storage (tied or views of one tensor)", *none
    for name, sub in module.named_modules():
        if any(True for _ in sub.parameters(recurse=False)):
            problem = _affine_problem(name, sub)
            if problem is not None:
                return problem, *none

    probe_version = probe._version
    calls, out = _traced_calls(fm, inputs)
    produced: dict[int, int] = {}  # id(tensor) -> index of the latest call that output it (kept alive by calls)
    sources: list[int] = []
    seen_affine: set[str] = set()
    layers: list[GramLayer] = []
    selected = set(fm.params)
    activation_numel = 0
    for index, call in enumerate(calls):
        label = f"module {call.name or '<root>'!r} ({type(call.module).__name__})"
        inp = call.input
        if not isinstance(inp, Tensor) or inp.dim() == 0 or inp.shape[0] != n:
            return f"{label} is not called on one tensor of {n} samples", *none
        src = produced.get(id(inp))
        from_probe = inp is probe and call.input_version == probe_version
        if not from_probe and (src is None or calls[src].output_version != call.input_version):
            return (f"the input of {label} is computed outside modules (functional code, or an in-place "
                    "change, between modules)"), *none
        if not isinstance(call.output, Tensor) or call.output.dim() == 0 or call.output.shape[0] != n:
            return f"{label} does not return one tensor of {n} samples", *none
        activation_numel += call.output.numel()
        if isinstance(call.module, FACTORED_AFFINE):
            if call.name in seen_affine:
                return f"{label} is called more than once (shared weights)", *none
            seen_affine.add(call.name)
            if isinstance(call.module, nn.Conv2d) and inp.dim() != 4:
                return f"{label} is called on a {inp.dim()}-d input (only batched (N, C, H, W) inputs)", *none
            layer = _layer(call, selected)
            if layer is not None:
                layers.append(layer)
        else:
            problem = _per_sample_problem(label, call.module, inp)
            if problem is not None:
                return problem, *none
        sources.append(-1 if from_probe else src)
        produced[id(call.output)] = index
    last = produced.get(id(out))
    if last is None or calls[last].output_version != out._version:
        return ("the measured output is not a module's output (functional code after the last module, or an "
                "output_fn that computes rather than selects)"), *none
    if out.dim() == 0 or out.shape[0] != n:
        return f"the measured output has shape {tuple(out.shape)}, not ({n}, ...)", *none
    per_sample = out.numel() // n
    if fm.logit_head is not None:  # softmax head: the logit differences, C − 1 of every C classes
        per_sample -= per_sample // out.shape[-1]
    plan = GramPlan(
        layers=tuple(layers), num_samples=n, outputs_per_sample=per_sample, num_params=fm.num_params,
        activation_numel=activation_numel,
    )
    return None, plan, TracedGraph(tuple(calls), tuple(sources), last)


def _layer(call: _Call, selected: set[str]) -> GramLayer | None:
    m = call.module
    prefix = f"{call.name}." if call.name else ""
    weight = prefix + "weight" in selected
    bias = m.bias is not None and prefix + "bias" in selected
    if not (weight or bias):
        return None
    out = call.output
    if isinstance(m, nn.Linear):
        return GramLayer(call.name, m, weight, bias, positions=call.input[0].numel() // m.in_features,
                         features=m.in_features, units=m.out_features)
    return GramLayer(call.name, m, weight, bias, positions=out.shape[2] * out.shape[3],
                     features=m.in_channels * m.kernel_size[0] * m.kernel_size[1], units=m.out_channels)


# --------------------------------------------------------------------------------------------- factors


@dataclass(frozen=True)
class LayerFactors:
    """Per-layer factors in float64: ``inputs`` U (N, T, D) and ``signals`` (T, M, O), rows n · K + k."""

    layer: GramLayer
    inputs: Tensor
    signals: Tensor


def layer_factors(
    fm: FunctionalModel, inputs: ProbeInputs, plan: GramPlan, *, chunk_size: int | None = None,
) -> list[LayerFactors]:
    """Layer inputs (traced forward) and backprop signals g = ∂f_k(x_n)/∂z_l (one batched backward per k).

    Each measured layer's output z is replaced by z + δ with δ = 0 requiring grad, so that ∂f/∂δ = ∂f/∂z even
    when a later in-place activation overwrites z. The K cotangents (e_k for every sample) are backpropagated
    ``chunk_size`` at a time (default all) with ``is_grads_batched``.
    """
    modules = {layer.name: layer for layer in plan.layers}
    recorded: dict[str, Tensor] = {}
    deltas: dict[str, Tensor] = {}
    handles = []

    def hook(name: str, args: tuple[Any, ...], out: Tensor) -> Tensor:
        recorded[name] = args[0].detach().clone()  # a later in-place op must not change the saved input
        delta = torch.zeros_like(out, requires_grad=True)
        deltas[name] = delta
        return out + delta

    try:
        for name, sub in fm.module.named_modules():
            if name in modules:
                handles.append(sub.register_forward_hook(lambda m, a, o, _n=name: hook(_n, a, o)))
        with torch.enable_grad():
            out = fm.measured_output(fm.params, inputs)
    finally:
        for h in handles:
            h.remove()
    n, k = plan.num_samples, plan.outputs_per_sample
    if out.shape[0] != n or out.numel() != n * k or set(deltas) != set(modules):
        raise NotApplicableError(
            "the model's forward differs between two passes on the same probe (data-dependent structure): "
            "use engine='jacrev'"
        )
    names = list(deltas)
    grads: list[list[Tensor]] = [[] for _ in names]
    step = k if chunk_size is None else max(1, min(int(chunk_size), k))
    if out.requires_grad:
        eye = torch.eye(k, dtype=out.dtype, device=out.device)
        for start in range(0, k, step):
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
        factors[nm] = _unify(modules[nm], recorded.pop(nm).to(torch.float64), g, n, k)
        chunks.clear()
    return [factors[layer.name] for layer in plan.layers]


def _unify(layer: GramLayer, h: Tensor, g: Tensor, n: int, k: int) -> LayerFactors:
    """U (N, T, D) and signals (T, N·K, O) for a Linear or Conv2d layer."""
    m = layer.module
    if isinstance(m, nn.Linear):
        u = h.reshape(n, -1, layer.features)
        sig = g.reshape(k, n, -1, layer.units)
    else:
        assert isinstance(m, nn.Conv2d)
        pad = _conv_padding(m)
        assert pad is not None
        u = F.unfold(h, m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride).transpose(1, 2)
        sig = g.reshape(k, n, layer.units, -1).transpose(2, 3)
    # (K, N, T, O) -> (T, N, K, O) -> (T, M, O): row n·K + k, as in vec f(X)
    sig = sig.permute(2, 1, 0, 3).reshape(layer.positions, n * k, layer.units)
    return LayerFactors(layer, u.contiguous(), sig.contiguous())


# --------------------------------------------------------------------------------------------- Gram


def _kernel_cost(lay: GramLayer, m: int, n: int) -> float:
    t = lay.positions
    return t * t * (m * m * (lay.units + 1) + n * n * lay.features)


def _explicit_cost(lay: GramLayer, m: int) -> float:
    return m * lay.positions * lay.units * lay.features + m * m * lay.units * (lay.features + 1)


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


def _per_sample_gradients(sig: Tensor, u: Tensor, field: PrimeField | None) -> Tensor:
    """A(n, k) = Σ_t g_t u_tᵀ: ``sig`` (T, N, K, O), ``u`` (N, T, D) → (N, K, O, D); exact mod p with ``field``."""
    if field is None:
        return torch.einsum("tnko,ntd->nkod", sig, u)
    out = None
    for start in range(0, sig.shape[0], field.max_inner):
        stop = start + field.max_inner
        part = torch.einsum("tnko,ntd->nkod", sig[start:stop], u[:, start:stop])
        out = part if out is None else out.add_(part)
        field.reduce_(out)
    assert out is not None
    return out


def _position_sum(sig: Tensor, field: PrimeField | None) -> Tensor:
    """s = Σ_t g_t: ``sig`` (T, M, O) → (M, O)."""
    return sig.sum(0) if field is None else field.sum(sig, 0)


def _add_output_gram(
    gram: Tensor, f: LayerFactors, n: int, k: int, *, lower: bool, buffer: Tensor, field: PrimeField | None = None,
) -> None:
    """gram (M × M, rows n·K + k) += this layer's block J_l J_lᵀ (formulas in the module docstring)."""
    lay, u, sig = f.layer, f.inputs, f.signals
    m = n * k
    if not lay.weight:  # bias only: s sᵀ with s = Σ_t g_t
        s = _position_sum(sig, field)
        _accumulate(gram, s, s, group=k, lower=lower, field=field)
        return
    if _kernel_cost(lay, m, n) <= _explicit_cost(lay, m):
        for p in range(lay.positions):
            for q in range(lay.positions):
                # c[n, n'] = ⟨u(x_n)_p, u(x_n')_q⟩ (+ 1 for the bias)
                c = u[:, p] @ u[:, q].T if field is None else field.matmul(u[:, p], u[:, q].T)
                if lay.bias:
                    c += 1.0
                # ⟨g(n,k)_p, g(n',k')_q⟩ · c[n, n']
                _accumulate(gram, sig[p], sig[q], group=k, scale=c, lower=lower, buffer=buffer, field=field)
        return
    # per-sample weight gradients A(n,k) = Σ_t g_t u_tᵀ, in chunks of output units to bound memory
    sig_nk = sig.view(lay.positions, n, k, lay.units)
    step = max(1, min(lay.units, (m * m) // max(m * lay.features, 1)))
    for start in range(0, lay.units, step):
        a = _per_sample_gradients(sig_nk[..., start : start + step], u, field).reshape(m, -1)
        _accumulate(gram, a, a, group=k, lower=lower, field=field)
        del a
    if lay.bias:
        s = _position_sum(sig, field)
        _accumulate(gram, s, s, group=k, lower=lower, field=field)


def _jacobian_rows(factors: Sequence[LayerFactors], samples: slice, k: int, field: PrimeField | None = None) -> Tensor:
    """Rows (n, k) of J for n in ``samples``, columns grouped by layer (weight then bias), float64."""
    blocks = []
    for f in factors:
        lay = f.layer
        sig = f.signals[:, samples.start * k : samples.stop * k]  # (T, S·K, O)
        s = samples.stop - samples.start
        if lay.weight:
            g = sig.view(lay.positions, s, k, lay.units)
            blocks.append(_per_sample_gradients(g, f.inputs[samples], field).reshape(s * k, -1))
        if lay.bias:
            blocks.append(_position_sum(sig, field))
    return torch.cat(blocks, dim=1)


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
        costs = [min(_kernel_cost(f.layer, m, n), _explicit_cost(f.layer, m)) for f in factors]
        for i in _balanced_share(costs, index, count):
            _add_output_gram(gram, factors[i], n, k, lower=lower_only, buffer=buffer, field=field)
    else:
        # Jᵀ J = Σ over chunks of samples of J_Sᵀ J_S; chunks of about d rows keep J_S no larger than the Gram
        per_chunk = max(1, d // max(k, 1))
        starts = list(range(0, n, per_chunk))
        for start in starts[index::count]:
            rows = _jacobian_rows(factors, slice(start, min(start + per_chunk, n)), k, field)
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


def _process_share(distributed: bool) -> tuple[int, int]:
    """(rank, world size) when ``distributed`` and a process group is initialised, else (0, 1)."""
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gram_matrix(
    fm: FunctionalModel, inputs: ProbeInputs, *, chunk_size: int | None = None, budget: int | None = None,
    lower_only: bool = False, distributed: bool = False,
) -> tuple[Tensor, GramPlan]:
    """J Jᵀ or Jᵀ J (whichever is smaller, ``plan.side``), float64, and the plan it was built from.

    ``lower_only``: fill only the lower triangle (see :func:`gram_from_factors`).

    ``distributed``: when a ``torch.distributed`` process group is initialised, each of the W processes
    accumulates 1/W of the terms (its share of the layers for J Jᵀ, of the sample chunks for Jᵀ J) and one
    ``all_reduce(SUM)`` gives every process the whole matrix. Collective: every process of the group must
    call it with the same model and probe. The per-layer factors (one forward, K backwards) are computed by
    every process; the accumulation, which dominates for large probes, is divided.

    Raises:
        NotApplicableError: the engine is not exact for this model (see :func:`gram_plan`).
        MemoryBudgetError: before allocating, when :func:`gram_bytes` exceeds ``budget``.
    """
    plan = gram_plan(fm, inputs)
    if budget is not None:
        needed = gram_bytes(plan, torch.empty((), dtype=fm.dtype).element_size(), chunk_size=chunk_size)
        check_memory(
            needed, budget,
            what=f"the {plan.size} × {plan.size} Gram matrix of J (M = {plan.num_outputs}, P = "
            f"{plan.num_params}) with its per-layer factors (engine='gram')",
            remedies="use a smaller probe (fewer samples), measure fewer layers via params=[...], or a smaller "
            "chunk_size (output coordinates backpropagated at once)",
        )
    factors = layer_factors(fm, inputs, plan, chunk_size=chunk_size)
    share = _process_share(distributed)
    gram = gram_from_factors(factors, plan, lower_only=lower_only, share=share)
    del factors
    if share[1] > 1:
        torch.distributed.all_reduce(gram, op=torch.distributed.ReduceOp.SUM)
    return gram, plan


def gram_spectrum(
    fm: FunctionalModel, inputs: ProbeInputs, num_outputs: int, *, chunk_size: int | None = None, budget: int,
    distributed: bool = False,
) -> Spectrum:
    """Singular values of J as √max(λ, 0) of its Gram's eigenvalues: shape (min(M, P),), float64, descending.

    Raises:
        NotApplicableError: the engine is not exact for this model (see :func:`gram_plan`).
        MemoryBudgetError: before allocating, when :func:`gram_bytes` exceeds ``budget``.
    """
    gram, plan = gram_matrix(fm, inputs, chunk_size=chunk_size, budget=budget, lower_only=True,
                             distributed=distributed)
    if num_outputs != plan.num_outputs:
        raise NotApplicableError(
            f"the Gram engine saw {plan.num_outputs} outputs but the probe has {num_outputs}: use engine='jacrev'"
        )
    eig = torch.linalg.eigvalsh(gram, UPLO="L") if gram.numel() else gram.new_zeros(0)
    del gram
    sv = eig.clamp_min(0).sqrt().flip(0)
    total = min(num_outputs, fm.num_params)
    if sv.numel() < total:  # parameters of modules that never ran: zero columns, zero singular values
        sv = torch.cat([sv, sv.new_zeros(total - sv.numel())])
    return Spectrum(sv.cpu(), fm.dtype, from_gram=True)
