"""Per-block ranks: the rank of J restricted to the columns of one block of parameters (a ResNet stage, a
transformer block, a layer), where the whole J's rank is only its row bound.

With P parameters and M rows, rank J ≤ min(M, P − hidden): on a probe with M < P the whole J's rank is M whatever the
weights, a flat line. A block b with P_b ≤ M parameters has rank J_b ≤ P_b, and its rank below P_b says which
directions of that block leave the outputs on the probe unchanged. The engines compute it from what they already
hold: the per-layer factors (the Gram of the block's layers, :mod:`lightning_geomdim.core.gram`) or the dense J's
columns (:mod:`lightning_geomdim.core.jacobian`); it is a numerical rank, with the engine's tolerance.

Blocks are module names; a parameter belongs to the block whose name prefixes its own. :func:`parameter_blocks`
chooses them from the module tree: the top-level children that hold measured parameters, looking through wrappers
(a module with one such child) and into ``nn.ModuleList`` s (a list of transformer blocks, also behind one wrapper
such as ``nn.TransformerEncoder``). A ResNet's blocks are its stem layers, its stages and its head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from lightning_geomdim.core.rank import NumericalSpectrum

#: What :func:`batch_functional_dimension`'s ``blocks`` accepts: "auto", or block name → module names.
Blocks = str | Mapping[str, Sequence[str]] | None


@dataclass(frozen=True)
class BlockSpectrum:
    """The numerical rank of J restricted to one block's columns.

    Attributes:
        num_params: P_b, the block's measured parameters (columns).
        bound: min(rows, P_b): the block's rank cannot exceed it.
        spectrum: σ of J_b, with its numerical rank, tolerance and statistics.
    """

    num_params: int
    bound: int
    spectrum: NumericalSpectrum

    @property
    def numerical_rank(self) -> int:
        return self.spectrum.numerical_rank


def block_size(params: Mapping[str, Tensor], names: Sequence[str]) -> int:
    """P_b: the number of parameters (columns of J) of the block ``names`` among the measured ``params``."""
    return sum(params[name].numel() for name in names)


def _holders(module: nn.Module, prefix: str, params: set[str]) -> list[tuple[str, nn.Module]]:
    """Children of ``module`` (qualified names) that hold measured parameters."""
    out = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if any(f"{full}.{p}" in params for p, _ in child.named_parameters()):
            out.append((full, child))
    return out


def parameter_blocks(module: nn.Module, params: Sequence[str]) -> dict[str, list[str]]:
    """Blocks chosen from the module tree (module docstring): block name → the measured parameters in it.

    Parameters owned by the root itself form the block ``"<root>"``.
    """
    selected = set(params)
    blocks: dict[str, list[str]] = {}
    own = [p for p, _ in module.named_parameters(recurse=False) if p in selected]
    if own:
        blocks["<root>"] = own
    pending = _holders(module, "", selected)
    while len(pending) == 1 and next(pending[0][1].children(), None) is not None:  # a wrapper: look inside
        name, child = pending[0]
        if any(f"{name}.{p}" in selected for p, _ in child.named_parameters(recurse=False)):
            break
        pending = _holders(child, f"{name}.", selected)
    for name, child in pending:
        for block in _list_items(name, child, selected):
            blocks[block] = [p for p in params if p.startswith(f"{block}.")]
    return blocks


def _list_items(name: str, child: nn.Module, selected: set[str]) -> list[str]:
    """The items of an ``nn.ModuleList`` (also behind one wrapper, as ``TransformerEncoder.layers``), else the
    child itself."""
    inner = _holders(child, f"{name}.", selected)
    if isinstance(child, nn.ModuleList):
        return [n for n, _ in inner]
    own = any(f"{name}.{p}" in selected for p, _ in child.named_parameters(recurse=False))
    if len(inner) == 1 and isinstance(inner[0][1], nn.ModuleList) and not own:
        return [n for n, _ in _holders(inner[0][1], f"{inner[0][0]}.", selected)]
    return [name]


def resolve_blocks(blocks: Blocks, module: nn.Module, params: Sequence[str], num_rows: int) -> dict[str, list[str]]:
    """Block name → measured parameter names, for ``blocks`` as :func:`batch_functional_dimension` takes it.

    ``"auto"``: :func:`parameter_blocks`, keeping the blocks with at most ``num_rows`` parameters (the others'
    rank is their row bound, like the whole J's) when there are two or more blocks. A mapping: block name →
    module names whose parameters form it. None: no blocks.

    Raises:
        ValueError: ``blocks`` is another string, or a mapping names a module that holds no measured parameter.
    """
    if blocks is None:
        return {}
    if isinstance(blocks, str):
        if blocks != "auto":
            raise ValueError(f"blocks={blocks!r}: pass 'auto', None, or a dict of block name -> module names")
        found = parameter_blocks(module, params)
        if len(found) < 2:
            return {}
        return {name: names for name, names in found.items() if len(names) and _size(module, names) <= num_rows}
    out = {}
    for name, modules in blocks.items():
        prefixes = [modules] if isinstance(modules, str) else list(modules)
        names = [p for p in params if any(p.startswith(f"{m}.") or not m for m in prefixes)]
        if not names:
            raise ValueError(f"block {name!r} ({prefixes}) holds no measured parameter: name modules as in "
                             f"named_modules(), e.g. {[n for n, _ in module.named_children()][:4]}")
        out[name] = names
    return out


def _size(module: nn.Module, names: Sequence[str]) -> int:
    named = dict(module.named_parameters())
    return sum(named[n].numel() for n in names)
