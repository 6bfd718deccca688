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
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lightning_geomdim.core.functional_model import FunctionalModel, ProbeInputs


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


#: Torch functions that read a tensor's metadata, not its values: not counted as uses.
_METADATA = frozenset({"__get__", "size", "dim", "numel", "is_floating_point", "is_complex", "element_size"})


class _UseRecorder(TorchFunctionMode):
    """Records, for every tensor read by a torch function, which leaf call was running (None: none was)."""

    def __init__(self, running: list[int]) -> None:
        super().__init__()
        self.running = running
        self.uses: dict[int, list[int | None]] = {}
        self.alive: list[Tensor] = []  # keeps the tensors alive so that their ids stay unique

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in _METADATA:
            where = self.running[-1] if self.running else None
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, Tensor):
                    self.uses.setdefault(id(t), []).append(where)
                    self.alive.append(t)
        return func(*args, **kwargs)


def trace_leaf_calls(
    fm: FunctionalModel, inputs: ProbeInputs, *, uses: dict[int, list[int | None]] | None = None,
) -> tuple[list[LeafCall], Tensor]:
    """Run ``fm`` once without autograd and return the leaf calls in execution order and the output.

    ``uses``: when given, filled with id(tensor) → for every torch function that read the tensor's values, the
    index in the returned calls of the leaf call running at the time (None: code outside leaf modules, e.g.
    ``h + h[:, :2] ** 2`` in a container's ``forward``). Every tensor read stays alive during the trace, so ids
    are unique; query only tensors the returned calls hold (their ids stay valid while the calls live).
    """
    calls: list[LeafCall] = []
    pending: list[tuple[str, nn.Module, Any]] = []
    running: list[int] = []
    order: list[int] = []  # call index of each recorded call, in completion order

    def before(m: nn.Module, args: tuple[Any, ...], name: str) -> None:
        running.append(len(pending))
        pending.append((name, m, args[0] if args else None))

    def after(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        index = running.pop()
        name, module, inp = pending[index]
        calls.append(LeafCall(name, module, inp, out))
        order.append(index)

    handles = []
    recorder = _UseRecorder(running)
    try:
        for name, sub in fm.module.named_modules():
            if next(sub.children(), None) is None:
                handles.append(sub.register_forward_pre_hook(lambda m, a, _n=name: before(m, a, _n)))
                handles.append(sub.register_forward_hook(after))
        with torch.no_grad(), (recorder if uses is not None else contextlib.nullcontext()):
            out = fm(fm.params, inputs)
    finally:
        for h in handles:
            h.remove()
    # leaves never nest, so completion order is call order; map pending indices to positions in ``calls``
    position = {index: i for i, index in enumerate(order)}
    if uses is not None:
        for key, where in recorder.uses.items():
            uses[key] = [None if w is None else position.get(w) for w in where]
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
