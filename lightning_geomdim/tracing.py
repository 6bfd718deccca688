"""One traced forward pass: which leaf modules ran, in which order, on which tensors.

Forward hooks see modules, not functional calls: ``torch.relu`` / ``F.relu`` inside a ``forward`` are
invisible here. Hooks are always removed, even when the forward raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_geomdim.functional_model import FunctionalModel, ProbeInputs

#: Activations whose pattern 1[z > 0] defines the linear pieces, and which commute with positive scaling.
RELU_LIKE: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU)


@dataclass(frozen=True)
class LeafCall:
    """One call of a leaf module: its qualified name, the module, its first input and its output."""

    name: str
    module: nn.Module
    input: Any
    output: Any


@contextlib.contextmanager
def forward_hooks(
    module: nn.Module, hook: Callable[[str, nn.Module, tuple[Any, ...], Any], None],
    select: Callable[[nn.Module], bool] = lambda m: next(m.children(), None) is None,
) -> Iterator[None]:
    """Register ``hook(name, module, args, output)`` on every submodule ``select`` accepts (default: leaves)."""
    handles = []
    try:
        for name, sub in module.named_modules():
            if select(sub):
                handles.append(sub.register_forward_hook(
                    lambda m, args, out, _name=name: hook(_name, m, args, out)))
        yield
    finally:
        for h in handles:
            h.remove()


def trace_leaf_calls(fm: FunctionalModel, inputs: ProbeInputs) -> tuple[list[LeafCall], Tensor]:
    """Run ``fm`` once without autograd and return the leaf calls in execution order and the output."""
    calls: list[LeafCall] = []

    def record(name: str, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        calls.append(LeafCall(name, m, args[0] if args else None, out))

    with forward_hooks(fm.module, record), torch.no_grad():
        out = fm(fm.params, inputs)
    return calls, out


def call_keys(calls: list[LeafCall]) -> list[str]:
    """Unique keys for calls: the module name, or ``name#k`` for the k-th call of a module called repeatedly."""
    counts: dict[str, int] = {}
    for c in calls:
        counts[c.name] = counts.get(c.name, 0) + 1
    seen: dict[str, int] = {}
    keys = []
    for c in calls:
        k = seen.get(c.name, 0)
        seen[c.name] = k + 1
        keys.append(c.name if counts[c.name] == 1 else f"{c.name}#{k}")
    return keys
