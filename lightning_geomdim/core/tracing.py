"""Tools to watch a forward pass: forward hooks that are always removed, a recorder of which leaf call read
which tensor, unique keys for repeated calls. The traced pass itself is
:class:`~lightning_geomdim.core.probe_trace.ProbeTrace`.

Forward hooks see modules, not functional calls: ``torch.relu`` / ``F.relu`` inside a ``forward`` are
invisible here. Hooks are always removed, even when the forward raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves


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


@dataclass(eq=False)
class FunctionCall:
    """A torch function called outside every leaf module (functional code between modules, e.g. ``out += x``).

    Attributes:
        name: the function's name (``add_``, ``flatten``, ``relu``, ...).
        args, kwargs: its arguments (tensors by reference).
        versions: the version of each tensor in ``tensors()`` when the call started.
        output: what it returned; ``output_version`` its version when the call returned.
        position: the number of module calls that had started before it (its place among the module calls).
        pattern: for ``relu`` / ``relu_``, 1[input > 0] when the call started.
    """

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    versions: tuple[int, ...]
    position: int
    output: Any = None
    output_version: int = -1
    pattern: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        """Its tensor arguments, in order."""
        return [t for t in tree_leaves((self.args, self.kwargs)) if isinstance(t, Tensor)]


class UseRecorder(TorchFunctionMode):
    """Records, for every tensor read by a torch function, which leaf call was running (None: none was), and the
    torch functions called outside every leaf module (:class:`FunctionCall`, when ``position`` is given)."""

    def __init__(self, running: list[int], position: Callable[[], int] | None = None) -> None:
        super().__init__()
        self.running = running
        self.position = position
        self.uses: dict[int, list[int | None]] = {}
        self.functions: list[FunctionCall] = []
        self.alive: list[Tensor] = []  # keeps the tensors alive so that their ids stay unique

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _METADATA:
            return func(*args, **kwargs)
        where = self.running[-1] if self.running else None
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        for t in tensors:
            self.uses.setdefault(id(t), []).append(where)
            self.alive.append(t)
        if where is not None or self.position is None:
            return func(*args, **kwargs)
        call = FunctionCall(name, args, kwargs, tuple(t._version for t in tensors), self.position())
        if name in ("relu", "relu_") and tensors:
            call.pattern = tensors[0] > 0
        out = func(*args, **kwargs)
        call.output = out
        if isinstance(out, Tensor):
            call.output_version = out._version
            self.alive.append(out)
        self.functions.append(call)
        return out


def call_keys(calls: Sequence[Any]) -> list[str]:
    """Unique keys for calls (anything with a ``name``): the module name, or ``name#k`` for the k-th call of a
    module called repeatedly."""
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
