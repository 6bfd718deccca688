"""ReLU activation patterns Δ_l(x) = 1[z_l(x) > 0] on a probe batch, linear regions, dead units.

Patterns are recorded by the traced pass (:class:`~lightning_geomdim.core.probe_trace.ProbeTrace`) when each
``nn.ReLU`` / ``nn.LeakyReLU`` module call returns (1[z > 0] of its input z). Functional calls (``torch.relu``,
``F.relu`` inside ``forward``) are invisible to hooks and are not reported: replace them with ``nn.ReLU`` modules
to have them measured. A module called several times
in one forward yields one entry per call, keyed ``name#0``, ``name#1``, ...

The forward runs in the computation dtype (float64 by default), like the dimension, so the patterns are
those of the Jacobian that is measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_geomdim.core.errors import NotApplicableError
from lightning_geomdim.core.functional_model import OutputFn
from lightning_geomdim.core.probe_trace import ProbeTrace, traced


@dataclass(frozen=True)
class UnitActivity:
    """Per-unit activity of one ReLU layer on a probe batch.

    Attributes:
        dead: shape (units,), bool: never active (z ≤ 0 on every input).
        always_active: shape (units,), bool: active (z > 0) on every input.
    """

    dead: Tensor
    always_active: Tensor

    @property
    def num_units(self) -> int:
        return int(self.dead.numel())

    @property
    def num_dead(self) -> int:
        return int(self.dead.sum())

    @property
    def num_always_active(self) -> int:
        return int(self.always_active.sum())


def activation_patterns(
    model: nn.Module, x: Any, *, dtype: torch.dtype = torch.float64, output_fn: OutputFn | None = None,
    trace: ProbeTrace | None = None,
) -> dict[str, Tensor]:
    """Activation pattern of every ReLU module on ``x``.

    Args:
        model: the network (evaluated in eval mode; its state is restored afterwards).
        x: probe batch, as in :func:`~lightning_geomdim.batch_functional_dimension`.
        dtype: computation dtype of the forward pass.
        output_fn: only needed when the model returns a non-tensor.
        trace: a :class:`~lightning_geomdim.core.probe_trace.ProbeTrace` of ``model`` on ``x`` already recorded
            (shared with the other measures of a step); default: record one.

    Returns:
        ReLU module name (``name#k`` for repeated calls) → bool tensor of shape (N, units), where units is
        the flattened size of the ReLU's input per sample (conv: channels × positions). Empty when the
        model has no ReLU module.
    """
    # patterns do not depend on which parameters are trainable: measure frozen models too
    names = [n for n, _ in model.named_parameters()]
    if trace is None and not names:
        raise ValueError(f"{type(model).__name__} has no parameters: there is no network to measure")
    with traced(model, x, trace, params=names, dtype=dtype, output_fn=output_fn) as trace:
        return trace.patterns()


def _require_relus(patterns: dict[str, Tensor], model: nn.Module) -> None:
    if not patterns:
        raise NotApplicableError(
            f"{type(model).__name__} has no nn.ReLU / nn.LeakyReLU module, so activation patterns and "
            "linear regions are not defined (functional relu calls are not seen by hooks: use nn.ReLU "
            "modules to have them measured)"
        )


def linear_regions(
    model: nn.Module, x: Any, *, dtype: torch.dtype = torch.float64, output_fn: OutputFn | None = None,
    trace: ProbeTrace | None = None,
) -> int:
    """Number of distinct joint activation patterns (all ReLU layers together) over the N inputs of ``x``.

    Raises:
        NotApplicableError: the model has no ReLU module.
    """
    return count_regions(activation_patterns(model, x, dtype=dtype, output_fn=output_fn, trace=trace), model)


def count_regions(patterns: dict[str, Tensor], model: nn.Module) -> int:
    """Distinct rows of the concatenated patterns of :func:`activation_patterns` (N × Σ units).

    Raises:
        NotApplicableError: ``patterns`` is empty (no ReLU module in ``model``).
    """
    _require_relus(patterns, model)
    joint = torch.cat(list(patterns.values()), dim=1)
    return int(torch.unique(joint, dim=0).shape[0])


def unit_activity(patterns: dict[str, Tensor]) -> dict[str, UnitActivity]:
    """Dead and always-active units of each layer, from :func:`activation_patterns`' output."""
    return {
        name: UnitActivity(dead=~p.any(dim=0), always_active=p.all(dim=0)) for name, p in patterns.items()
    }
