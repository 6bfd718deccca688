"""Nested model inputs as one byte row per sample, so that a fixed set of torchmetrics list states holds them.

A probe batch is a Tensor (N, ...), or any ``torch.utils._pytree`` structure of tensors (tuple, list, dict,
namedtuple) whose leaves all have N samples along dim 0. :func:`pack` flattens it with ``tree_flatten`` and lays
the bytes of every leaf's sample side by side: an ``uint8`` tensor (N, bytes per sample). Stacking the rows of
several batches (``dim_zero_cat``, or torchmetrics' ``"cat"`` gather across processes) therefore needs one list
state whatever the structure, and keeps every dtype bit-exact (int64 token ids, bool masks, float16 images).

The structure is kept apart as a :data:`Layout`: the input with every tensor replaced by a :class:`Leaf` (its dtype
and per-sample shape). :func:`unpack` rebuilds the input from rows and layout with ``tree_unflatten``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten


@dataclass(frozen=True)
class Leaf:
    """One tensor of a probe batch, without its samples: dtype and per-sample shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of one sample."""
        return math.prod(self.shape) * self.dtype.itemsize


#: The input's structure with a :class:`Leaf` in place of every tensor. A plain object (not a ``TreeSpec``):
#: it deep-copies and pickles like the namedtuple / dict / tuple it mirrors.
Layout = Any


def _leaves(x: Any, what: str) -> tuple[list[Tensor], int]:
    leaves, _ = tree_flatten(x)
    if not leaves or not all(isinstance(t, Tensor) for t in leaves):
        kinds = sorted({type(t).__name__ for t in leaves if not isinstance(t, Tensor)}) or ["nothing"]
        raise TypeError(
            f"update() got {what} of type {type(x).__name__} holding {', '.join(kinds)}: pass a Tensor (N, ...), "
            "or a tuple / list / dict / namedtuple of tensors (positional or keyword model inputs)"
        )
    if any(t.dim() == 0 for t in leaves):
        raise ValueError(f"update() got a 0-d tensor in {what}: every tensor needs a sample dimension (N, ...)")
    sizes = {int(t.shape[0]) for t in leaves}
    if len(sizes) > 1:
        raise ValueError(f"update() got {what} whose tensors hold different numbers of samples {sorted(sizes)}")
    devices = {t.device for t in leaves}
    if len(devices) > 1:
        raise ValueError(f"update() got {what} on several devices {sorted(map(str, devices))}")
    return leaves, sizes.pop()


def num_samples(x: Any, what: str = "inputs") -> int:
    """N, the common size of dim 0 of the tensors of ``x`` (validates ``x`` as :func:`pack` does)."""
    return _leaves(x, what)[1]


def layout_of(x: Any) -> Layout:
    """``x`` with every tensor replaced by its :class:`Leaf`."""
    return tree_map(lambda t: Leaf(t.dtype, tuple(t.shape[1:])), x)


def same_layout(a: Layout, b: Layout) -> bool:
    """Same structure (container types, dict keys *in order*, namedtuple class) and same leaves."""
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    return spec_a == spec_b and leaves_a == leaves_b


def pack(x: Any, limit: int | None = None, what: str = "inputs") -> Tensor:
    """The first ``limit`` (default: all) samples of ``x`` as a fresh ``uint8`` tensor (n, bytes per sample),
    on the device of ``x``, detached from autograd."""
    leaves, n = _leaves(x, what)
    n = n if limit is None else min(n, limit)
    parts = [
        t.detach()[:n].resolve_conj().resolve_neg().contiguous().reshape(n, math.prod(t.shape[1:])).view(torch.uint8)
        for t in leaves
    ]
    return torch.cat(parts, dim=1)


def unpack(rows: Tensor, layout: Layout) -> Any:
    """Inverse of :func:`pack`: the input structured as ``layout`` from its rows (n, bytes per sample)."""
    leaves, spec = tree_flatten(layout)
    width = sum(leaf.nbytes for leaf in leaves)
    # torchmetrics' Metric.set_dtype converts every state, integer ones too: the bytes 0..255 survive any dtype
    # (exact in float16 / bfloat16, wrapped modulo 256 in int8), so cast them back.
    rows = rows.to(torch.uint8)
    if rows.dim() != 2 or rows.shape[1] != width:
        raise ValueError(
            f"stored rows {tuple(rows.shape)} do not match the inputs' layout ({width} bytes per sample): "
            "every process must pass inputs of the same structure, dtypes and per-sample shapes"
        )
    n, start, tensors = int(rows.shape[0]), 0, []
    for leaf in leaves:
        part = rows[:, start : start + leaf.nbytes].contiguous()
        tensors.append(part.view(leaf.dtype).reshape(n, *leaf.shape))
        start += leaf.nbytes
    return tree_unflatten(tensors, spec)
