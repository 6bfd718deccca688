"""The factor form of ``nn.MultiheadAttention`` (self-attention) in the float Gram engine.

For one sample with input x (L, E) (the query, which is also the key and the value), H heads of d = E / H:

* the in-projection [q | k | v]_t = W_in x_t + b_in is an **outer** form with u_t = x_t, O = 3E (parameters
  ``<name>.in_proj_weight`` (3E, E), ``<name>.in_proj_bias`` (3E)), the layer named ``<name>``;
* per head, a_h = softmax(q_h k_hᵀ / √d + mask) v_h, mixing the L positions of the sample only;
* the out-projection y_t = W_o a_t + b_o, a_t the concatenated heads (E), is an outer form with u_t = a_t, O = E
  (``<name>.out_proj.weight``, ``<name>.out_proj.bias``), the layer named ``<name>.out_proj``.

torch reads the four parameters inside ``F.multi_head_attention_forward`` (or a fused kernel) and never calls the
``out_proj`` module, so neither pre-activation is exposed: the traced pass recomputes a measured module's call with
explicit ops giving the same values (:func:`attention_with_deltas`), adding a zero δ to [q | k | v] and to y, and
records u for both layers, batch first (N, L, ·) whatever ``batch_first`` is. Covered: ``attn_mask`` (2-D or
(N·H, L, S), bool or additive), ``key_padding_mask``, ``is_causal``, ``need_weights`` / ``average_attn_weights``,
``batch_first``, dropout in training mode (the measures run in eval mode). Refused by name
(:func:`~lightning_geomdim.core.factor_forms.form_problem`, :func:`attention_call_problem`): cross-attention (query,
key and value different tensors), separate q / k / v weights (kdim or vdim ≠ embed_dim), ``add_bias_kv``,
``add_zero_attn``, unbatched inputs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_geomdim.core.factor_forms import GramLayer

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
#: The out-projection's layer name: ``<name>.out_proj``, also the prefix of its parameters.
OUT_PROJ = "out_proj"


def bind_arguments(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The arguments of one ``nn.MultiheadAttention.forward`` call by name, defaults filled in; None when they do not
    fit its signature (the forward then raises its own error)."""
    try:
        bound = _SIGNATURE.bind(None, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "self"}


def attention_numel(module: nn.MultiheadAttention, arguments: Mapping[str, Any]) -> int:
    """Values one call holds that no leaf module outputs: q, k, v and the attention output (4 · N · L · E at
    most) and the scores and weights of every head (2 · N · H · L · S), for the traced pass's memory estimate."""
    query, key = arguments.get("query"), arguments.get("key")
    if not isinstance(query, Tensor) or not isinstance(key, Tensor) or query.dim() != 3 or key.dim() != 3:
        return 0
    other = 1 - _sample_dim(module)
    n, length, source = query.shape[_sample_dim(module)], query.shape[other], key.shape[other]
    return 4 * n * length * module.embed_dim + 2 * n * module.num_heads * length * source


def _sample_dim(module: nn.MultiheadAttention) -> int:
    return 0 if module.batch_first else 1


def attention_call_problem(label: str, module: nn.MultiheadAttention, arguments: Mapping[str, Any],
                           n: int) -> str | None:
    """Why one call (``arguments`` from :func:`bind_arguments`) has no factor form on a probe of ``n`` samples, or
    None."""
    query, key, value = arguments["query"], arguments["key"], arguments["value"]
    if query is not key or key is not value:
        return (f"{label} is called with different query, key and value tensors (cross-attention): the factor form "
                "covers self-attention, module(x, x, x)")
    if not isinstance(query, Tensor) or query.dim() != 3 or query.shape[_sample_dim(module)] != n:
        where = "(N, L, E)" if module.batch_first else "(L, N, E)"
        return f"{label} is not called on one {where} tensor of {n} samples (batch_first={module.batch_first})"
    return None


def attention_layers(name: str, module: nn.MultiheadAttention, query: Tensor, selected: set[str]) -> list[GramLayer]:
    """The in-projection (``name``) and out-projection (``name.out_proj``) layers with a measured parameter."""
    prefix = f"{name}." if name else ""
    length, e = query.shape[1 - _sample_dim(module)], module.embed_dim
    layers = []
    for layer, weight, bias, units in (
        (name, "in_proj_weight", "in_proj_bias", 3 * e),
        (prefix + OUT_PROJ, f"{OUT_PROJ}.weight", f"{OUT_PROJ}.bias", e),
    ):
        weights = (prefix + weight,) if prefix + weight in selected else ()
        biases = (prefix + bias,) if prefix + bias in selected else ()
        if weights or biases:
            owner = module if units == 3 * e else module.out_proj
            layers.append(GramLayer(layer, owner, weights, biases, length, e, units))
    return layers


def _additive(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """A bool mask (True: not attended) as 0 / −inf in ``like``'s dtype; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill_(mask, float("-inf"))
    return mask.to(like.dtype)


def _mask(module: nn.MultiheadAttention, arguments: Mapping[str, Any], scores: Tensor) -> Tensor | None:
    """The additive mask for ``scores`` (N, H, L, S), as ``F.multi_head_attention_forward`` applies it: with
    ``is_causal``, no key padding mask and no weights asked for, the causal mask replaces ``attn_mask``."""
    n, h, length, source = scores.shape
    padding = _additive(arguments["key_padding_mask"], scores)
    if arguments["is_causal"] and padding is None and not arguments["need_weights"]:
        causal = torch.ones(length, source, dtype=torch.bool, device=scores.device).tril()
        return _additive(~causal, scores)
    mask = _additive(arguments["attn_mask"], scores)
    if mask is not None and mask.dim() == 3:  # (N·H, L, S), one mask per sample and head
        mask = mask.view(n, h, length, source)
    if padding is not None:
        padding = padding.view(n, 1, 1, source)
        mask = padding if mask is None else mask + padding
    return mask


def attention_with_deltas(
    name: str, module: nn.MultiheadAttention, arguments: Mapping[str, Any], out: Any, inputs: dict[str, Tensor],
    deltas: dict[str, Tensor],
) -> Any:
    """The call ``module(**arguments)`` (its output ``out``) recomputed with explicit ops, the same values, with zero δ
    (requiring grad) added to [q | k | v] (N, L, 3E) and to the out-projection's output (N, L, E): returns the output
    ``(attn_output, attn_weights or None)`` and records, by layer name, u in ``inputs`` (``name``: the input
    (N, L, E); ``name.out_proj``: the concatenated heads (N, L, E), detached) and δ in ``deltas``. A call without a
    factor form (:func:`attention_call_problem`) is left as it is (``out``, nothing recorded): the structural check
    refuses it."""
    query = arguments["query"]
    if not (isinstance(query, Tensor) and query.dim() == 3 and query is arguments["key"] is arguments["value"]):
        return out
    x = query if module.batch_first else query.transpose(0, 1)  # (N, L, E)
    n, length, e = x.shape
    heads, d = module.num_heads, module.head_dim
    delta_in = x.new_zeros((n, length, 3 * e), requires_grad=True)
    qkv = F.linear(x, module.in_proj_weight, module.in_proj_bias) + delta_in
    q, k, v = (t.reshape(n, length, heads, d).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # (N, H, L, d)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    mask = _mask(module, arguments, scores)
    weights = (scores if mask is None else scores + mask).softmax(-1)
    if module.training and module.dropout > 0:
        weights = F.dropout(weights, module.dropout)
    a = (weights @ v).transpose(1, 2).reshape(n, length, e)
    delta_out = x.new_zeros((n, length, e), requires_grad=True)
    y = F.linear(a, module.out_proj.weight, module.out_proj.bias) + delta_out
    if not module.batch_first:
        y = y.transpose(0, 1)
    attn_weights = None
    if arguments["need_weights"]:
        attn_weights = weights.mean(1) if arguments["average_attn_weights"] else weights
    out_name = f"{name}.{OUT_PROJ}" if name else OUT_PROJ
    inputs.update({name: x.detach().clone(memory_format=torch.contiguous_format), out_name: a.detach()})
    deltas.update({name: delta_in, out_name: delta_out})
    return y, attn_weights
