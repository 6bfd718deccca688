"""Vector-Jacobian products of a traced pass: many cotangents through one graph, batched or one at a time, and with
respect to the flat parameters θ at its per-tensor views (:func:`parameter_views`).

``torch.autograd.grad(..., is_grads_batched=True)`` vmaps the backward over B cotangents; for some models it was
much slower than B plain backward passes (convolutions on CPU: 4 batched cotangents took 4.2 s against 0.23 s for
one on MobileNetV3-small, 11.9 s against 1.6 s on ResNet-18, both with the gradient taken through the flat θ; at θ's
views, :func:`parameter_views`, 8 images: 0.048 against 0.08 s per cotangent on ResNet-18, 0.036 against
0.040 s on MobileNet), and it cannot be interrupted. :func:`vjp` times one
plain backward and a batch of :data:`TRIAL` on a trace's first call and keeps the faster for that trace; one at a
time, it reaches a :func:`~lightning_geomdim.core.interrupt.checkpoint` between cotangents, and a batched call is
announced to the time limit first. (The trial used to batch all the other cotangents: on 8 images of ResNet-18 that
ran 9.3 s past a 1 s allowance.)
"""

from __future__ import annotations

import time
import warnings
from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_geomdim.core.interrupt import checkpoint, machine_flops
from lightning_geomdim.core.memory import is_out_of_memory


def vjp(out: Tensor, inputs: Sequence[Tensor], cotangents: Tensor, *, memo: MutableMapping[str, Any],
        model: str) -> list[Tensor]:
    """∂⟨c, out⟩/∂inputs for each cotangent c of ``cotangents`` (B, *out.shape): a list of (B, *input.shape)
    tensors (zeros for an input ``out`` does not reach), keeping the graph.

    ``memo["vjp"]`` (the trace's): ``"batched"`` or ``"loop"`` once decided; undecided, a call with B > 1 runs
    one backward, then the next :data:`TRIAL` batched, keeps the faster per cotangent and takes the rest so. A
    batched call cannot be interrupted: it is announced to the time limit first (:func:`.checkpoint`), the trial at
    :data:`TRIAL_SLOWDOWN` times one backward per cotangent, later calls at the trial's pace; so is each plain
    backward, the first at :data:`BACKWARD_PER_FORWARD` times the traced pass's forward (``memo["forward_s"]``), the
    others at the first one's time (on 8 images of ResNet-18 one took 1.4–1.7 s through θ, 0.08 s at its views). A
    backward that cannot be batched (an op without a batching rule) warns once (``model`` names it) and goes one at
    a time. Out of memory is raised as it is.
    """
    mode = memo.get("vjp")
    if mode is None and len(cotangents) > 1:
        _announce(BACKWARD_PER_FORWARD * memo.get("forward_s", 0.0))  # the plain backward, before it is timed
        start = time.perf_counter()
        first = _one_at_a_time(out, inputs, cotangents[:1])
        one = time.perf_counter() - start
        memo["vjp_one"] = one
        _announce(TRIAL_SLOWDOWN * one * min(TRIAL, len(cotangents) - 1))
        start = time.perf_counter()
        trial = _batched(out, inputs, cotangents[1:1 + TRIAL], memo, model)
        if trial is None:  # no batching rule: one at a time from now on (memo["vjp"] == "loop")
            return _joined(first, _one_at_a_time(out, inputs, cotangents[1:], one))
        pace = (time.perf_counter() - start) / len(cotangents[1:1 + TRIAL])
        memo["vjp"], memo["vjp_pace"] = ("batched" if pace < one else "loop"), pace
        done = _joined(first, trial)
        if len(cotangents) <= 1 + TRIAL:
            return done
        return _joined(done, vjp(out, inputs, cotangents[1 + TRIAL:], memo=memo, model=model))
    if mode != "loop":
        _announce(memo.get("vjp_pace", 0.0) * len(cotangents))
        grads = _batched(out, inputs, cotangents, memo, model)
        if grads is not None:
            return grads
    one = memo.get("vjp_one", BACKWARD_PER_FORWARD * memo.get("forward_s", 0.0))
    return _one_at_a_time(out, inputs, cotangents, one)


def parameter_views(theta: Tensor, views: Sequence[Tensor]) -> list[Tensor] | None:
    """``views`` when they are the per-tensor views of the flat parameters ``theta`` that cover it in order (as
    :meth:`.ProbeTrace.record` leaves ``fm.params``), else None. Take gradients with respect to θ at these and join
    them with :func:`flat_gradient`: a backward through θ itself runs each view's slice backward, which fills a zero
    (P,) tensor and adds it (on ResNet-18, 62 views of 11 M values: 1.5 s of a 1.6 s backward on 8 images).

    None also when θ was changed in place since it was recorded (``_version``: an ``nn.Embedding(max_norm=...)``
    renormalising its rows, a forward that clamps a weight under ``no_grad``): θ and its views share one version
    counter, so every view read after the change got a new ``grad_fn`` and a gradient at the views would miss the
    uses recorded before it (zeros, silently); through θ it is right."""
    views = list(views)
    if (theta._version != 0 or any(v._base is not theta for v in views)
            or sum(v.numel() for v in views) != theta.numel()):
        return None
    return views


def flat_gradient(grads: Sequence[Tensor], batch: int | None = None) -> Tensor:
    """Gradients with respect to the views of :func:`parameter_views` (in order) as one flat tensor: shape (P,), or
    (batch, P) for gradients batched over a leading dimension of ``batch``."""
    lead = () if batch is None else (batch,)
    return torch.cat([g.reshape(*lead, -1) for g in grads], dim=-1)


def vjp_at_views(out: Tensor, inputs: Sequence[Tensor], cotangents: Tensor, theta: Tensor, views: Sequence[Tensor],
                 *, memo: MutableMapping[str, Any], model: str) -> list[Tensor]:
    """:func:`vjp` where the flat parameters ``theta`` among ``inputs`` are differentiated at their ``views``
    (:func:`parameter_views`) and their gradients joined, (B, P)."""
    expanded = [v for x in inputs for v in (views if x is theta else [x])]
    grads = iter(vjp(out, expanded, cotangents, memo=memo, model=model))
    return [flat_gradient([next(grads) for _ in views], len(cotangents)) if x is theta else next(grads)
            for x in inputs]


#: A plain backward's time in forward passes, to announce the first one of a trace (a backward costs about two
#: forwards; the traced pass's forward time is in ``memo["forward_s"]``).
BACKWARD_PER_FORWARD = 2.0
#: Cotangents batched in the trial of a trace's first call (then the faster way takes the rest).
TRIAL = 2
#: How much slower than one plain backward a batched cotangent may be, for the time limit's estimate of the trial
#: (convolutions on CPU, through the flat θ: about 2×, ResNet-18's 4 batched cotangents took 11.9 s against 1.6 s
#: for one).
TRIAL_SLOWDOWN = 2.0


def _announce(seconds: float) -> None:
    """Tell the time limit that an uninterruptible step of about ``seconds`` follows (:func:`.checkpoint`)."""
    checkpoint(flops=seconds * machine_flops() if seconds > 0 else 0.0)


def _joined(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    return [torch.cat(pair) for pair in zip(a, b, strict=True)]


def _batched(out: Tensor, inputs: Sequence[Tensor], cotangents: Tensor, memo: MutableMapping[str, Any],
             model: str) -> list[Tensor] | None:
    try:
        grads = torch.autograd.grad(out, inputs, cotangents, retain_graph=True, is_grads_batched=True,
                                    allow_unused=True)
    except RuntimeError as err:
        if is_out_of_memory(err):  # out of memory is out of memory: B backward passes would not help
            raise
        memo["vjp"] = "loop"
        warnings.warn(f"could not batch the backward of {model} ({str(err).splitlines()[0][:160]}); "
                      "backpropagating one output coordinate at a time instead (one torch.autograd.grad call per "
                      "output, slower)", RuntimeWarning, stacklevel=4)
        return None
    return [torch.zeros((len(cotangents), *x.shape), dtype=cotangents.dtype, device=cotangents.device)
            if g is None else g for g, x in zip(grads, inputs, strict=True)]


def _one_at_a_time(out: Tensor, inputs: Sequence[Tensor], cotangents: Tensor,
                   seconds: float = 0.0) -> list[Tensor]:
    """One backward per cotangent, each announced to the time limit at ``seconds``."""
    rows = []
    for c in cotangents:
        _announce(seconds)
        grads = torch.autograd.grad(out, inputs, c, retain_graph=True, allow_unused=True)
        rows.append([torch.zeros_like(x, dtype=c.dtype) if g is None else g
                     for g, x in zip(grads, inputs, strict=True)])
    return [torch.stack(column) for column in zip(*rows, strict=True)]
