"""Factor forms: how the Jacobian of one parameterised layer is written from its input and the backprop signal at
its output, whatever sits between the layers.

For a layer with output z (one value per position t and unit o) and a measured output coordinate f_k(x_n), the
chain rule gives ∂f_k(x_n)/∂θ_l = Σ_t (∂f_k(x_n)/∂z_t) ∂z_t/∂θ_l, and ∂z_t/∂θ_l depends only on the layer's input.
Each form stores u (N, T, D) and the signals g (T, M, O), rows n · K + k, and is one of two kinds:

* **outer** (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``): z_t = W u_t + b, so ∂f/∂W = Σ_t g_t ⊗ u_t
  (O × D) and ∂f/∂b = Σ_t g_t. Linear: u_t the input at position t; Conv2d: the patch read by output pixel t
  (``F.unfold``, D = C_in · kh · kw); Embedding: z_t = Eᵀ e_{token_t}, the one-hot vector of the token over the
  D vocabulary entries the probe uses (other rows of E have zero columns), O = embedding_dim;
  An ``nn.LSTM`` or ``nn.GRU`` is one outer form per layer and direction (an LSTM's gates, u_t = [x_t, h_{t−1}],
  O = 4H) or two (a GRU's W_ih x_t + b_ih and W_hh h_{t−1} + b_hh, O = 3H) over its T time steps, recomputed by the
  traced pass step by step (:mod:`lightning_geomdim.core.recurrent_form`). An ``nn.MultiheadAttention``
  (self-attention) is two outer forms, its in-projection (O = 3E) and its out-projection, recomputed likewise
  (:mod:`lightning_geomdim.core.attention_form`);
* **diagonal** (``BatchNorm`` in eval mode, ``LayerNorm``, ``GroupNorm``): z_t = γ ⊙ x̂_t + β with the normalised
  input x̂ (running statistics for BatchNorm, the sample's own for LayerNorm / GroupNorm), so ∂f/∂γ = Σ_t g_t ⊙ x̂_t
  and ∂f/∂β = Σ_t g_t; u = x̂ (D = O).

Columns of one layer are ordered weight then bias, the weight as (O, D) row-major (an Embedding's as Eᵀ restricted
to the probe's vocabulary): :func:`per_sample_gradients` gives the rows, :func:`parameter_gradients` maps a row
back to the parameters' shapes (the check of :mod:`lightning_geomdim.core.factor_check`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_geomdim.core.finite_field import PrimeField
from lightning_geomdim.core.layer_kinds import FACTOR_FORMS, FACTORED_AFFINE, NORMALIZATION, RECURRENT


@dataclass(frozen=True)
class GramLayer:
    """A measured parameterised layer as the factored engines see it.

    Attributes:
        name: module name in ``named_modules()`` ("" for the root); a recurrent module's layers are named after its
            parameters, e.g. ``<name>.l0`` (LSTM) or ``<name>.ih_l0`` (GRU) (:mod:`.recurrent_form`).
        module: the layer (one of :data:`~lightning_geomdim.core.layer_kinds.FACTOR_FORMS`; an LSTM or GRU for
            each of its layers).
        weight_names, bias_names: the measured parameters behind the weight columns and the bias columns
            (``<name>.weight`` / ``<name>.bias``, or none; an LSTM layer's weight is [W_ih | W_hh] and its two biases
            b_ih, b_hh are two copies of the same columns).
        positions: T, positions the layer is applied at per sample (Linear / LayerNorm / Embedding: product of the
            middle dimensions, 1 for (N, features) inputs; Conv2d / BatchNorm / GroupNorm: the spatial size; LSTM /
            GRU: the time steps).
        features: length of a weight row: in_features; C_in / groups · kh · kw; the probe's vocabulary size for an
            Embedding; 1 for a diagonal layer, whose weight has one entry per unit.
        units: O, out_features, out_channels, embedding_dim, or the entries of a normalisation's weight.
        diagonal: a normalisation's affine map, z = γ ⊙ x̂ + β (module docstring).
        groups: a grouped convolution's groups G: unit o reads only the inputs of its group, so u (N, T, G·D)
            and the weight's rows are block-diagonal (depthwise convolutions: G = C_in).
        vocabulary: Embedding: the token ids the probe uses, sorted, int64 (the columns of u).
    """

    name: str
    module: nn.Module
    weight_names: tuple[str, ...]
    bias_names: tuple[str, ...]
    positions: int
    features: int
    units: int
    diagonal: bool = False
    groups: int = 1
    vocabulary: Tensor | None = field(default=None, compare=False)

    @property
    def weight(self) -> bool:
        """The weight is among the measured parameters."""
        return bool(self.weight_names)

    @property
    def bias(self) -> bool:
        """A bias exists and is measured."""
        return bool(self.bias_names)

    @property
    def num_params(self) -> int:
        """Measured scalar parameters of the layer with nonzero columns."""
        return self.units * (self.features * self.weight + len(self.bias_names))

    @property
    def input_width(self) -> int:
        """Entries of u per position: D (G · D for a grouped convolution), or O for a diagonal layer."""
        return self.units if self.diagonal else self.features * self.groups


@dataclass(frozen=True)
class LayerFactors:
    """Per-layer factors in float64: ``inputs`` u (N, T, D) and ``signals`` (T, M, O), rows n · K + k."""

    layer: GramLayer
    inputs: Tensor
    signals: Tensor


def conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric zero padding of ``conv`` as two ints, or None when ``F.unfold`` cannot express it."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            return None
        return (total[0] // 2, total[1] // 2)
    return (int(conv.padding[0]), int(conv.padding[1]))


def _channels_first(module: nn.Module) -> bool:
    """The units are dim 1 of the output (convolutions, BatchNorm, GroupNorm), not the last dims."""
    return isinstance(module, (nn.Conv2d, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))


def form_problem(
    name: str, module: nn.Module, *, kinds: tuple[type[nn.Module], ...] = FACTOR_FORMS, grouped: bool = True,
) -> str | None:
    """Why ``module`` (which owns measured parameters) has no factor form among ``kinds`` (with grouped
    convolutions when ``grouped``), or None."""
    label = f"module {name or '<root>'!r} ({type(module).__name__})"
    if not isinstance(module, kinds):
        listed = ", ".join(f"nn.{k.__name__}" for k in kinds)
        return f"{label} has parameters; the factored engines differentiate only {listed} by formula"
    base = next(k for k in kinds if isinstance(module, k))
    if type(module).forward is not base.forward or (
        isinstance(module, nn.Conv2d) and type(module)._conv_forward is not nn.Conv2d._conv_forward
    ):
        return f"{label} overrides forward"
    if isinstance(module, nn.MultiheadAttention):
        return _attention_problem(label, module)
    if isinstance(module, RECURRENT):
        from lightning_geomdim.core.recurrent_form import recurrent_problem  # it imports GramLayer from here

        return recurrent_problem(label, module)  # type: ignore[arg-type]
    own = {n for n, _ in module.named_parameters(recurse=False)}
    if not own <= {"weight", "bias"} or next(module.children(), None) is not None:
        return f"{label} has parameters {sorted(own)} or submodules (a reparametrisation?)"
    if isinstance(module, FACTORED_AFFINE) and "weight" not in own:
        return f"{label} has no weight parameter (a reparametrisation?)"
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{label} has forward hooks, which may change its input or output"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 and not grouped:
            return f"{label} has groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return f"{label} has padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
        if conv_padding(module) is None:
            return f"{label} has asymmetric 'same' padding"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return f"{label} has max_norm={module.max_norm} (it renormalises rows in place)"
    if isinstance(module, NORMALIZATION[:3]) and module.running_var is None:
        return f"{label} has no running statistics: it normalises with batch statistics, which mix samples"
    return None


def _attention_problem(label: str, module: nn.MultiheadAttention) -> str | None:
    """Why the ``nn.MultiheadAttention`` ``module`` has no factor form (whatever its call), or None."""
    if not module._qkv_same_embed_dim:
        return (f"{label} has kdim={module.kdim}, vdim={module.vdim}, embed_dim={module.embed_dim}: separate q, k, v "
                "projection weights; the factor form covers one packed in_proj_weight (kdim = vdim = embed_dim)")
    if module.bias_k is not None or module.add_zero_attn:
        return (f"{label} has add_bias_kv={module.bias_k is not None}, add_zero_attn={module.add_zero_attn}: the "
                "factor form covers neither (construct it with add_bias_kv=False, add_zero_attn=False)")
    if module.training and module.dropout > 0:
        return f"{label} is in training mode with dropout={module.dropout} (random masks); measure in eval mode"
    own = {n for n, _ in module.named_parameters(recurse=False)}
    proj = module.out_proj
    if (not own <= {"in_proj_weight", "in_proj_bias"} or [c for _, c in module.named_children()] != [proj]
            or {n for n, _ in proj.named_parameters()} - {"weight", "bias"} or next(proj.children(), None)):
        return f"{label} has parameters {sorted(own)} or submodules besides out_proj (a reparametrisation?)"
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{label} has forward hooks, which may change its input or output"
    return None


def layer_of(name: str, module: nn.Module, inp: Tensor, out: Tensor, selected: set[str]) -> GramLayer | None:
    """The layer as the engines see it, from one call's input and output; None when no parameter is measured."""
    prefix = f"{name}." if name else ""
    weight = (prefix + "weight",) if prefix + "weight" in selected else ()
    bias = (prefix + "bias",) if getattr(module, "bias", None) is not None and prefix + "bias" in selected else ()
    if not (weight or bias):
        return None
    n = inp.shape[0]
    if isinstance(module, nn.Linear):
        return GramLayer(name, module, weight, bias, inp[0].numel() // module.in_features, module.in_features,
                         module.out_features)
    if isinstance(module, nn.Conv2d):
        per_group = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        return GramLayer(name, module, weight, bias, out.shape[2] * out.shape[3], per_group, module.out_channels,
                         groups=module.groups)
    if isinstance(module, nn.Embedding):
        vocabulary = torch.unique(inp)
        if module.padding_idx is not None:  # the padding row gets no gradient
            vocabulary = vocabulary[vocabulary != module.padding_idx]
        return GramLayer(name, module, weight, (), inp[0].numel(), int(vocabulary.numel()), module.embedding_dim,
                         vocabulary=vocabulary)
    units = out.shape[1] if _channels_first(module) else math.prod(module.normalized_shape)  # type: ignore[arg-type]
    return GramLayer(name, module, weight, bias, out.numel() // (n * units), 1, units, diagonal=True)


def _normalized(layer: GramLayer, h: Tensor, buffers: Mapping[str, Tensor]) -> Tensor:
    """x̂, the normalisation's input before its affine map, float64, shape of ``h``."""
    m = layer.module
    if isinstance(m, nn.LayerNorm):
        return F.layer_norm(h, m.normalized_shape, eps=m.eps)
    if isinstance(m, nn.GroupNorm):
        return F.group_norm(h, m.num_groups, eps=m.eps)
    prefix = f"{layer.name}." if layer.name else ""
    mean, var = buffers[prefix + "running_mean"], buffers[prefix + "running_var"]
    shape = (1, -1, *([1] * (h.dim() - 2)))
    return (h - mean.to(h).reshape(shape)) / torch.sqrt(var.to(h).reshape(shape) + m.eps)  # type: ignore[operator]


def _per_position(z: Tensor, layer: GramLayer) -> Tensor:
    """An output-shaped tensor (B, *z) as (B, T, O): units last, positions in the middle."""
    if _channels_first(layer.module):
        return z.reshape(z.shape[0], layer.units, -1).transpose(1, 2)
    return z.reshape(z.shape[0], -1, layer.units)


def factors_of(
    layer: GramLayer, h: Tensor, g: Tensor, n: int, k: int, buffers: Mapping[str, Tensor] | None = None, *,
    normalized: bool = False,
) -> LayerFactors:
    """u (N, T, D) and signals (T, N·K, O), float64, from the layer's input ``h`` (floating, or an Embedding's token
    ids) and the signals ``g`` (K, N, *z) at its output; ``buffers``: the model's buffers by name (a BatchNorm's
    running statistics). ``normalized``: a diagonal layer's ``h`` is already x̂ (the exact engine's residues)."""
    m = layer.module
    h = h.to(torch.float64) if h.is_floating_point() else h
    g = g.to(torch.float64)
    if isinstance(m, nn.Conv2d):
        u = F.unfold(h, m.kernel_size, dilation=m.dilation, padding=conv_padding(m), stride=m.stride).transpose(1, 2)
    elif isinstance(m, nn.Embedding):
        assert layer.vocabulary is not None
        tokens = h.reshape(n, -1)
        slot = torch.searchsorted(layer.vocabulary, tokens).clamp_max(max(layer.features - 1, 0))
        hit = layer.vocabulary[slot] == tokens if layer.features else torch.zeros_like(tokens, dtype=torch.bool)
        u = torch.zeros((n, tokens.shape[1], layer.features), dtype=torch.float64, device=h.device)
        if layer.features:
            u.scatter_(2, slot[..., None], hit[..., None].to(torch.float64))
    elif layer.diagonal:
        u = _per_position(h if normalized else _normalized(layer, h, buffers or {}), layer)
    else:
        u = h.reshape(n, -1, layer.features)
    sig = _per_position(g.reshape(k * n, *g.shape[2:]), layer).reshape(k, n, layer.positions, layer.units)
    # (K, N, T, O) -> (T, N, K, O) -> (T, M, O): row n·K + k, as in vec f(X)
    sig = sig.permute(2, 1, 0, 3).reshape(layer.positions, n * k, layer.units)
    return LayerFactors(layer, u.contiguous(), sig.contiguous())


def per_sample_gradients(
    layer: GramLayer, sig: Tensor, u: Tensor, field: PrimeField | None = None, units: slice = slice(None),
) -> Tensor:
    """The weight's rows of J for the ``units`` slice: Σ_t g_t ⊗ u_t, shape (N, K, O', D), or for a diagonal layer
    Σ_t g_t ⊙ u_t, shape (N, K, O'). ``sig`` (T, N, K, O), ``u`` (N, T, D); exact mod p with ``field``. A grouped
    convolution's slice must cover whole groups."""
    sig = sig[..., units]
    if layer.diagonal:
        u, spec = u[..., units], "tnko,nto->nko"
    elif layer.groups > 1:  # unit o of group g: Σ_t g_t[o] u_t[g]
        per = layer.units // layer.groups
        first, last, _ = units.indices(layer.units)
        t, n = u.shape[1], u.shape[0]
        u = u.view(n, t, layer.groups, layer.features)[:, :, first // per : -(-last // per)]
        sig = sig.reshape(*sig.shape[:3], -1, per)
        spec = "tnkgo,ntgd->nkgod"
    else:
        spec = "tnko,ntd->nkod"
    if field is None:
        out = torch.einsum(spec, sig, u)
        return out.flatten(2, 3) if layer.groups > 1 and not layer.diagonal else out
    out = None
    for start in range(0, sig.shape[0], field.max_inner):
        stop = start + field.max_inner
        part = torch.einsum(spec, sig[start:stop], u[:, start:stop])
        out = part if out is None else out.add_(part)
        field.reduce_(out)
    assert out is not None
    return out.flatten(2, 3) if layer.groups > 1 and not layer.diagonal else out


def position_sum(sig: Tensor, field: PrimeField | None) -> Tensor:
    """s = Σ_t g_t: ``sig`` (T, M, O) → (M, O)."""
    return sig.sum(0) if field is None else field.sum(sig, 0)


def jacobian_rows(factors: Sequence[LayerFactors], samples: slice, k: int, field: PrimeField | None = None) -> Tensor:
    """Rows (n, k) of J for n in ``samples``, columns grouped by layer (weight then bias), float64."""
    blocks = []
    for f in factors:
        lay = f.layer
        sig = f.signals[:, samples.start * k : samples.stop * k]  # (T, S·K, O)
        s = samples.stop - samples.start
        if lay.weight:
            g = sig.view(lay.positions, s, k, lay.units)
            blocks.append(per_sample_gradients(lay, g, f.inputs[samples], field).reshape(s * k, -1))
        if lay.bias:
            blocks.extend([position_sum(sig, field)] * len(lay.bias_names))
    return torch.cat(blocks, dim=1)


def summed_row(f: LayerFactors) -> Tensor:
    """Σ_n of the rows of J restricted to ``f``'s layer, for factors of one output per sample (K = 1): the layer's
    part of Jᵀ c for the cotangent c its signals carry, in the layer's column order. The samples are merged into
    the positions (Σ_n Σ_t g_{n,t} ⊗ u_{n,t} is one sample's sum over N · T positions), so no per-sample row is
    formed: on ResNet-18 those were N × 11 M values per cotangent."""
    n, t = f.inputs.shape[0], f.inputs.shape[1]
    if f.signals.shape[1] != n:
        raise ValueError(f"summed_row needs one output per sample: signals {tuple(f.signals.shape)} for {n} samples")
    merged = LayerFactors(replace(f.layer, positions=n * t), f.inputs.reshape(1, n * t, f.inputs.shape[-1]),
                          f.signals.transpose(0, 1).reshape(n * t, 1, f.signals.shape[-1]))
    return jacobian_rows([merged], slice(0, 1), 1)[0]


def parameter_gradients(layer: GramLayer, row: Tensor, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A row of J restricted to the layer (its column order, module docstring) as gradients shaped like the
    measured parameters (``params``: name → tensor, for the shapes); an Embedding's unused rows are zero."""
    out = {}
    width = layer.units * layer.features
    if layer.weight:
        weight = row[:width].reshape(layer.units, layer.features)
        if isinstance(layer.module, nn.Embedding):
            assert layer.vocabulary is not None
            (name,) = layer.weight_names
            out[name] = torch.zeros_like(params[name])
            out[name][layer.vocabulary] = weight.T
        else:  # the weight columns of each parameter in turn ([W_ih | W_hh] for an LSTM)
            start = 0
            for name in layer.weight_names:
                w = params[name]
                columns = w[0].numel()
                out[name] = weight[:, start : start + columns].reshape(w.shape)
                start += columns
    for i, name in enumerate(layer.bias_names):
        begin = width * layer.weight + i * layer.units
        out[name] = row[begin : begin + layer.units].reshape(params[name].shape)
    return out
