"""lightning_geomdim: watch the local geometry of a network while it trains.

The measures are a pure-torch core: batch functional dimension, numerical rank, activation patterns,
linear regions, computable full functional dimension, flatness, neuron alignment. The Lightning layer (the
``GeometryMonitor`` callback, the torchmetrics metrics) is imported on first use, so ``import
lightning_geomdim`` alone does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_geomdim.core.activation_patterns import UnitActivity, activation_patterns, linear_regions, unit_activity
from lightning_geomdim.core.alignment import AlignmentStats, neuron_alignment
from lightning_geomdim.core.cffd import CFFDResult, computable_full_functional_dimension, gaussian_sampler
from lightning_geomdim.core.dimension import DimensionResult, batch_functional_dimension
from lightning_geomdim.core.errors import (
    GeometryError,
    MemoryBudgetError,
    NonFiniteError,
    NotApplicableError,
    ProbeError,
)
from lightning_geomdim.core.flatness import FlatnessResult, flatness
from lightning_geomdim.core.rank import NumericalSpectrum

if TYPE_CHECKING:
    from lightning_geomdim.callback.monitor import GeometryMonitor
    from lightning_geomdim.callback.schedule import Schedule
    from lightning_geomdim.metrics import BatchFunctionalDimension, Flatness, LinearRegions, NeuronAlignment

_LIGHTNING_LAYER = {
    "BatchFunctionalDimension": "lightning_geomdim.metrics",
    "Flatness": "lightning_geomdim.metrics",
    "LinearRegions": "lightning_geomdim.metrics",
    "NeuronAlignment": "lightning_geomdim.metrics",
    "GeometryMonitor": "lightning_geomdim.callback.monitor",
    "Schedule": "lightning_geomdim.callback.schedule",
}


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_LAYER:
        return getattr(importlib.import_module(_LIGHTNING_LAYER[name]), name)
    raise AttributeError(f"module 'lightning_geomdim' has no attribute {name!r}")

__all__ = [
    "AlignmentStats",
    "BatchFunctionalDimension",
    "CFFDResult",
    "DimensionResult",
    "Flatness",
    "FlatnessResult",
    "GeometryError",
    "GeometryMonitor",
    "LinearRegions",
    "MemoryBudgetError",
    "NeuronAlignment",
    "NonFiniteError",
    "NotApplicableError",
    "NumericalSpectrum",
    "ProbeError",
    "Schedule",
    "UnitActivity",
    "activation_patterns",
    "batch_functional_dimension",
    "computable_full_functional_dimension",
    "flatness",
    "gaussian_sampler",
    "linear_regions",
    "neuron_alignment",
    "unit_activity",
]
__version__ = "0.1.0"
