"""lightning_geomdim: watch the local geometry of a network while it trains.

Pure-torch core (no Lightning import): batch functional dimension, numerical rank, activation patterns,
linear regions, computable full functional dimension.
"""

from lightning_geomdim.activation_patterns import UnitActivity, activation_patterns, linear_regions, unit_activity
from lightning_geomdim.alignment import AlignmentStats, neuron_alignment
from lightning_geomdim.cffd import CFFDResult, computable_full_functional_dimension, gaussian_sampler
from lightning_geomdim.dimension import DimensionResult, batch_functional_dimension
from lightning_geomdim.errors import (
    GeometryError,
    MemoryBudgetError,
    NonFiniteError,
    NotApplicableError,
    ProbeError,
)
from lightning_geomdim.flatness import FlatnessResult, flatness
from lightning_geomdim.metrics import BatchFunctionalDimension, Flatness, LinearRegions, NeuronAlignment
from lightning_geomdim.monitor import GeometryMonitor
from lightning_geomdim.schedule import Schedule

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
