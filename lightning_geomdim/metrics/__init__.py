"""torchmetrics metrics over the core measures: accumulate a probe batch with ``update``, measure the model's
current weights with ``compute``."""

from lightning_geomdim.metrics.probe_metrics import BatchFunctionalDimension, Flatness, LinearRegions, NeuronAlignment

__all__ = ["BatchFunctionalDimension", "Flatness", "LinearRegions", "NeuronAlignment"]
