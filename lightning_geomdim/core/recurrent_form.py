"""The factor forms of ``nn.LSTM`` and ``nn.GRU`` in the float Gram engine.

A recurrent module of L layers and D directions (D = 2 when ``bidirectional``) runs, for each layer k and direction
d, one recurrence over the T steps of its input sequence x_t: the probe (I = input_size) for k = 0, else the previous
layer's outputs, both directions concatenated (I = D · H). Each (k, d) has its own parameters, named with the suffix
``l{k}`` (``l{k}_reverse`` for the reverse direction), and its own outer forms over its T steps:

* **LSTM**: the gates z_t = W_ih x_t + W_hh h_{t−1} + b_ih + b_hh (O = 4H, order i, f, g, o) are one outer form with
  u_t = [x_t, h_{t−1}] (D = I + H): its weight is [W_ih | W_hh] and b_ih, b_hh are two copies of the same columns.
  The layer ``<name>.l{k}[_reverse]`` holds ``<name>.{weight,bias}_{ih,hh}_l{k}[_reverse]``.
* **GRU**: the candidate n_t = tanh(a_n + r_t ⊙ c_n) gates W_hh h_{t−1} by r_t, so W_hh is not in one outer form
  with W_ih. Each (k, d) is two outer forms of O = 3H (order r, z, n): a_t = W_ih x_t + b_ih with u_t = x_t, the layer
  ``<name>.ih_l{k}[_reverse]`` (``weight_ih_…``, ``bias_ih_…``), and c_t = W_hh h_{t−1} + b_hh with u_t = h_{t−1},
  the layer ``<name>.hh_l{k}[_reverse]`` (``weight_hh_…``, ``bias_hh_…``); then
  r = σ(a_r + c_r), z = σ(a_z + c_z), n = tanh(a_n + r ⊙ c_n), h_t = (1 − z) ⊙ n + z ⊙ h_{t−1}.

Every parameter belongs to exactly one layer (at the root the names drop ``<name>.``). The fused kernels expose none
of z, a, c, so the traced pass recomputes a measured module's call step by step with explicit ops, the same values
(:func:`recurrent_with_deltas`), adding a zero δ to every form's output and recording u, batch first (N, T, ·). A
reverse direction runs over the flipped sequence; its positions t are steps in processing order for both u and δ.
Covered: ``batch_first`` either way, ``num_layers`` ≥ 1, ``bidirectional``, dropout between layers in eval mode.
Refused by name (:func:`recurrent_problem`, :func:`recurrent_call_problem`, :func:`partial_problem`): an LSTM's
``proj_size`` > 0, dropout > 0 in training mode, an initial state ``hx``, packed or unbatched inputs, an LSTM's W_ih
(or b_ih) measured without its W_hh (or b_hh).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_geomdim.core.factor_forms import GramLayer

#: Values per step, sample, layer and direction that a recomputed cell holds beside u (gates with their δ, the cell's
#: intermediates), in units of H: an estimate for the traced pass's memory (:func:`recurrent_numel`).
_CELL_VALUES = {nn.LSTM: 18, nn.GRU: 24}


def _tags(module: nn.LSTM | nn.GRU) -> list[str]:
    """The parameter suffixes of the (layer, direction) pairs in torch's order: l0, l0_reverse, l1, …"""
    directions = ("", "_reverse") if module.bidirectional else ("",)
    return [f"l{k}{d}" for k in range(module.num_layers) for d in directions]


def layer_names(name: str, module: nn.LSTM | nn.GRU, tag: str) -> tuple[str, ...]:
    """The layers of one (layer, direction) ``tag``: ``(<name>.<tag>,)`` for an LSTM, ``(<name>.ih_<tag>,
    <name>.hh_<tag>)`` for a GRU (module docstring)."""
    prefix = f"{name}." if name else ""
    return (prefix + tag,) if isinstance(module, nn.LSTM) else (f"{prefix}ih_{tag}", f"{prefix}hh_{tag}")


def recurrent_problem(label: str, module: nn.LSTM | nn.GRU) -> str | None:
    """Why the ``nn.LSTM`` / ``nn.GRU`` ``module`` has no factor form (whatever its call), or None."""
    if getattr(module, "proj_size", 0):
        return (f"{label} has proj_size={module.proj_size}: the factor form covers LSTMs without a projection "
                "(proj_size=0)")
    if module.training and module.dropout > 0 and module.num_layers > 1:
        return (f"{label} is in training mode with dropout={module.dropout} between its layers (random masks); "
                "measure in eval mode")
    own = {n for n, _ in module.named_parameters(recurse=False)}
    if not own <= set(module._flat_weights_names) or next(module.children(), None) is not None:
        return f"{label} has parameters {sorted(own)} or submodules (a reparametrisation?)"
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{label} has forward hooks, which may change its input or output"
    return None


def partial_problem(name: str, module: nn.Module, selected: set[str]) -> str | None:
    """Why the measured parameters of ``module`` do not fit its form (an LSTM's W_ih without W_hh, or b_ih without
    b_hh, of one layer and direction), or None."""
    if not isinstance(module, nn.LSTM):
        return None
    prefix = f"{name}." if name else ""
    for tag in _tags(module):
        for pair in ((f"weight_ih_{tag}", f"weight_hh_{tag}"), (f"bias_ih_{tag}", f"bias_hh_{tag}")):
            if sum(prefix + p in selected for p in pair) == 1:
                return f"module {name or '<root>'!r} (LSTM): measure both or neither of {pair}"
    return None


def _sample_dim(module: nn.LSTM | nn.GRU) -> int:
    return 0 if module.batch_first else 1


def recurrent_call_problem(label: str, module: nn.LSTM | nn.GRU, inp: Any, num_args: int, n: int) -> str | None:
    """Why one call, on ``inp`` with ``num_args`` arguments that are not None (an ``hx`` counts), has no factor form
    on a probe of ``n`` samples, or None."""
    where = "(N, T, I)" if module.batch_first else "(T, N, I)"
    if num_args != 1:
        return (f"{label} is called with {num_args} arguments (an initial state hx?): the factor form covers "
                f"module(x) on one {where} tensor, from a zero initial state")
    if not isinstance(inp, Tensor) or inp.dim() != 3 or inp.shape[_sample_dim(module)] != n:
        return (f"{label} is not called on one {where} tensor of {n} samples (batch_first={module.batch_first}; "
                "packed sequences and unbatched inputs have no factor form)")
    return None


def has_form(module: nn.LSTM | nn.GRU, inp: Any, num_args: int, n: int) -> bool:
    """The traced pass recomputes this call: no projection and :func:`recurrent_call_problem` accepts it (not
    :func:`recurrent_problem`, which the pass's own hooks would fail). Any other call keeps the fused kernel's
    output, and the structural check refuses it."""
    return not getattr(module, "proj_size", 0) and recurrent_call_problem("", module, inp, num_args, n) is None


def recurrent_layers(name: str, module: nn.LSTM | nn.GRU, inp: Tensor, selected: set[str]) -> list[GramLayer]:
    """The layers (module docstring) with a measured parameter, for a call on ``inp`` (batch first or not)."""
    prefix = f"{name}." if name else ""
    steps, hidden = inp.shape[1 - _sample_dim(module)], module.hidden_size
    directions = 1 + module.bidirectional
    layers = []
    for tag in _tags(module):
        width = module.input_size if tag.startswith("l0") else directions * hidden
        names = layer_names(name, module, tag)
        parts = [("ih", "hh")] if isinstance(module, nn.LSTM) else [("ih",), ("hh",)]
        for layer, kinds in zip(names, parts, strict=True):
            weights = tuple(p for p in (f"{prefix}weight_{k}_{tag}" for k in kinds) if p in selected)
            biases = tuple(p for p in (f"{prefix}bias_{k}_{tag}" for k in kinds) if p in selected)
            if not (weights or biases):
                continue
            features = width + hidden if isinstance(module, nn.LSTM) else width if kinds == ("ih",) else hidden
            units = 4 * hidden if isinstance(module, nn.LSTM) else 3 * hidden
            layers.append(GramLayer(layer, module, weights, biases, steps, features, units))
    return layers


def recurrent_numel(module: nn.LSTM | nn.GRU, x: Any) -> int:
    """Values one call holds that its output does not (u, the gates and their δ, the cells' intermediates, every
    layer's outputs): about N · T · Σ_{k,d} (I_k + H + c · H), c = 18 for an LSTM, 24 for a GRU, for the traced
    pass's memory estimate (0 when ``x`` is not a batched sequence)."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        return 0
    hidden, directions = module.hidden_size, 1 + module.bidirectional
    cell = (1 + _CELL_VALUES[type(module)]) * hidden
    per_step = sum(directions * ((module.input_size if k == 0 else directions * hidden) + cell)
                   for k in range(module.num_layers))
    return x.shape[0] * x.shape[1] * per_step


def _lstm_direction(module: nn.LSTM, x: Tensor, tag: str, delta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One LSTM recurrence over ``x`` (N, T, I) with ``delta`` (N, T, 4H) added to the gates: the outputs (N, T, H),
    the last h and c (N, H), and u = [x_t, h_{t−1}] (N, T, I + H)."""
    n, steps, _ = x.shape
    w_hh = getattr(module, f"weight_hh_{tag}")
    bias = getattr(module, f"bias_ih_{tag}") + getattr(module, f"bias_hh_{tag}") if module.bias else None
    projected = F.linear(x, getattr(module, f"weight_ih_{tag}"), bias)  # W_ih x_t + b for every step at once
    h = c = x.new_zeros(n, module.hidden_size)
    outs = []
    for t in range(steps):
        z = projected[:, t] + F.linear(h, w_hh) + delta[:, t]
        i, f, g, o = z.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    out = torch.stack(outs, dim=1)
    previous = torch.cat([out.new_zeros(n, 1, module.hidden_size), out[:, :-1]], dim=1)
    return out, h, c, torch.cat([x, previous], dim=2).detach()


def _gru_direction(module: nn.GRU, x: Tensor, tag: str, delta_ih: Tensor, delta_hh: Tensor) -> tuple[Tensor, Tensor]:
    """One GRU recurrence over ``x`` (N, T, I) with ``delta_ih``, ``delta_hh`` (N, T, 3H) added to a_t and c_t: the
    outputs (N, T, H) and u = h_{t−1} (N, T, H) of the hh form (the ih form's u is ``x``)."""
    n, steps, _ = x.shape
    w_hh = getattr(module, f"weight_hh_{tag}")
    b_ih, b_hh = (getattr(module, f"bias_ih_{tag}"), getattr(module, f"bias_hh_{tag}")) if module.bias else (None,) * 2
    a = F.linear(x, getattr(module, f"weight_ih_{tag}"), b_ih) + delta_ih  # (N, T, 3H)
    h = x.new_zeros(n, module.hidden_size)
    outs = []
    for t in range(steps):
        c = F.linear(h, w_hh, b_hh) + delta_hh[:, t]
        a_r, a_z, a_n = a[:, t].chunk(3, dim=1)
        c_r, c_z, c_n = c.chunk(3, dim=1)
        r, z = torch.sigmoid(a_r + c_r), torch.sigmoid(a_z + c_z)
        h = (1 - z) * torch.tanh(a_n + r * c_n) + z * h
        outs.append(h)
    out = torch.stack(outs, dim=1)
    return out, torch.cat([out.new_zeros(n, 1, module.hidden_size), out[:, :-1]], dim=1).detach()


def recurrent_with_deltas(
    name: str, module: nn.LSTM | nn.GRU, x: Tensor, inputs: dict[str, Tensor], deltas: dict[str, Tensor],
) -> Any:
    """``module(x)`` (a call :func:`recurrent_call_problem` accepts) recomputed step by step, the same values as the
    fused kernel, with a zero δ (requiring grad) added to every form's output: returns the output (``(out, (h_n,
    c_n))`` for an LSTM, ``(out, h_n)`` for a GRU, laid out as torch's) and records, by layer name (module
    docstring), u (N, T, D), detached, in ``inputs`` and δ (N, T, O) in ``deltas``."""
    seq = x if module.batch_first else x.transpose(0, 1)  # (N, T, I)
    n, steps, _ = seq.shape
    hidden, lstm = module.hidden_size, isinstance(module, nn.LSTM)
    finals: list[Tensor] = []
    cells: list[Tensor] = []
    for k in range(module.num_layers):
        if k and module.training and module.dropout > 0:  # between layers, as torch; refused for measures
            seq = F.dropout(seq, module.dropout)
        outs = []
        for tag in _tags(module)[k * (1 + module.bidirectional) : (k + 1) * (1 + module.bidirectional)]:
            names = layer_names(name, module, tag)
            reverse = tag.endswith("_reverse")
            run = seq.flip(1) if reverse else seq
            step_deltas = [seq.new_zeros((n, steps, (4 if lstm else 3) * hidden), requires_grad=True) for _ in names]
            if lstm:
                out, h, c, u = _lstm_direction(module, run, tag, step_deltas[0])  # type: ignore[arg-type]
                inputs[names[0]] = u
                cells.append(c)
            else:
                out, u_hh = _gru_direction(module, run, tag, *step_deltas)  # type: ignore[arg-type]
                inputs[names[0]] = run.detach().clone(memory_format=torch.contiguous_format)
                inputs[names[1]] = u_hh
                h = out[:, -1]
            deltas.update(zip(names, step_deltas, strict=True))
            finals.append(h)
            outs.append(out.flip(1) if reverse else out)
        seq = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    out = seq if module.batch_first else seq.transpose(0, 1)
    h_n = torch.stack(finals)  # (L · D, N, H), as torch's whatever batch_first is
    return (out, (h_n, torch.stack(cells))) if lstm else (out, h_n)
