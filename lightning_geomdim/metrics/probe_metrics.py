"""torchmetrics wrappers: ``update`` accumulates probe inputs, ``compute`` measures the current weights on them.

Each metric holds a reference to the measured module (not registered as a submodule, so it can live inside
the LightningModule it measures, and ``.to()`` on the metric never moves the model). ``update(x)`` only
appends the inputs to list states with ``dist_reduce_fx="cat"``: under DDP ``compute()`` sees the inputs of
every process. ``compute()`` returns one scalar tensor (so ``self.log(name, metric)`` works) and keeps the
full result in ``metric.result`` until the next ``reset()``.

Example, logged from a LightningModule's own validation loop::

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
            self.val_bfd = BatchFunctionalDimension(self.net, max_samples=256)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.val_bfd.update(x)
            self.log("val_bfd", self.val_bfd, on_epoch=True)

Inputs may be a Tensor (N, ...) or a tuple/dict of tensors (positional/keyword model inputs); the structure
must be the same in every ``update`` and on every process, and ``update`` must be called on every process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_geomdim.core.activation_patterns import activation_patterns
from lightning_geomdim.core.alignment import AlignmentStats, neuron_alignment
from lightning_geomdim.core.dimension import DimensionResult, batch_functional_dimension
from lightning_geomdim.core.errors import NotApplicableError
from lightning_geomdim.core.flatness import FlatnessResult, flatness
from lightning_geomdim.core.functional_model import OutputFn
from lightning_geomdim.core.losses import LOSSES, LossFn, resolve_loss_fn


def _flatten(x: Any) -> tuple[list[Tensor], tuple[Any, ...]]:
    if isinstance(x, Tensor):
        return [x], ("tensor",)
    if isinstance(x, (tuple, list)) and all(isinstance(v, Tensor) for v in x):
        return list(x), ("tuple", len(x))
    if isinstance(x, Mapping) and all(isinstance(v, Tensor) for v in x.values()):
        return list(x.values()), ("dict", tuple(x))
    raise TypeError(
        f"update() got {type(x).__name__}: pass a Tensor (N, ...), or a tuple/dict of tensors (model inputs)"
    )


def _unflatten(structure: tuple[Any, ...], leaves: list[Tensor]) -> Any:
    if structure[0] == "tensor":
        return leaves[0]
    if structure[0] == "tuple":
        return tuple(leaves)
    return dict(zip(structure[1], leaves, strict=True))


class _ProbeMetric(Metric):
    """Stores probe inputs (and targets) as "cat" list states; subclasses implement ``_measure``."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, model: nn.Module, *, max_samples: int | None = None, **kwargs: Any) -> None:
        # compute() measures the model's current weights, which change without update(): never cache its result
        kwargs.setdefault("compute_with_cache", False)
        super().__init__(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
            raise ValueError(f"max_samples={max_samples!r} must be a positive integer or None")
        # Plain attribute, not a submodule: the metric may be an attribute of the module it measures.
        object.__setattr__(self, "_measured", model)
        self.max_samples = max_samples
        self._structures: dict[str, tuple[Any, ...]] = {}
        self.result: Any = None

    @property
    def model(self) -> nn.Module:
        """The measured module."""
        return self.__dict__["_measured"]

    def _append(self, prefix: str, value: Any) -> None:
        leaves, structure = _flatten(value)
        known = self._structures.get(prefix)
        if known is None:
            self._structures[prefix] = structure
            for i in range(len(leaves)):
                self.add_state(f"{prefix}_{i}", default=[], dist_reduce_fx="cat")
        elif known != structure:
            raise ValueError(f"update() got {prefix} structured as {structure}, earlier calls as {known}")
        for i, leaf in enumerate(leaves):
            getattr(self, f"{prefix}_{i}").append(leaf.detach())

    def _gathered(self, prefix: str) -> Any:
        structure = self._structures.get(prefix)
        if structure is None:
            raise ValueError(f"{type(self).__name__} has no {prefix}: call update(...) before compute()")
        n = 1 if structure[0] == "tensor" else len(structure[1]) if structure[0] == "dict" else structure[1]
        leaves = [dim_zero_cat(getattr(self, f"{prefix}_{i}")) for i in range(n)]
        if self.max_samples is not None:
            leaves = [t[: self.max_samples] for t in leaves]
        return _unflatten(structure, leaves)

    def update(self, x: Any) -> None:
        """Append the probe inputs ``x``: Tensor (N, ...), or tuple/dict of tensors."""
        self._append("inputs", x)

    def reset(self) -> None:
        super().reset()
        self.result = None


class BatchFunctionalDimension(_ProbeMetric):
    """Batch functional dimension of ``model`` on the accumulated inputs (see
    :func:`~lightning_geomdim.batch_functional_dimension` for every argument).

    ``compute()`` measures the model's weights *at the time of the call* (never a cached value) and returns
    ``result.rank`` as a float64 scalar tensor: the exact dimension when ``result.engine == "exact"``, else a
    numerical rank; ``result`` holds the :class:`~lightning_geomdim.DimensionResult` (bounds, optional spectrum).
    ``max_samples`` keeps only the first N accumulated inputs (after the cross-process gather).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        output_fn: OutputFn | None = None,
        params: Sequence[str] | None = None,
        engine: str = "auto",
        spectrum: bool = False,
        logit_differences: bool = True,
        rtol: float | None = None,
        seed: int = 0,
        draws: int = 2,
        dtype: torch.dtype = torch.float64,
        chunk_size: int | None = None,
        max_memory_bytes: int | None = None,
        max_samples: int | None = None,
        distributed: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, max_samples=max_samples, **kwargs)
        self.measure_kwargs = {
            "output_fn": output_fn, "params": params, "engine": engine, "spectrum": spectrum,
            "logit_differences": logit_differences, "rtol": rtol,
            "seed": seed, "draws": draws, "dtype": dtype, "chunk_size": chunk_size,
            "max_memory_bytes": max_memory_bytes, "distributed": distributed,
        }
        self.result: DimensionResult | None = None

    def compute(self) -> Tensor:
        self.result = batch_functional_dimension(self.model, self._gathered("inputs"), **self.measure_kwargs)
        return torch.tensor(float(self.result.rank), dtype=torch.float64)


class LinearRegions(_ProbeMetric):
    """Number of distinct joint ReLU activation patterns over the accumulated inputs (see
    :func:`~lightning_geomdim.linear_regions`); ``compute()`` raises ``NotApplicableError`` without ReLUs."""

    def __init__(
        self, model: nn.Module, *, output_fn: OutputFn | None = None, dtype: torch.dtype = torch.float64,
        max_samples: int | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(model, max_samples=max_samples, **kwargs)
        self.measure_kwargs = {"output_fn": output_fn, "dtype": dtype}
        self.result: int | None = None

    def compute(self) -> Tensor:
        # activation_patterns rather than linear_regions: the latter takes no output_fn.
        patterns = activation_patterns(self.model, self._gathered("inputs"), **self.measure_kwargs)
        if not patterns:
            raise NotApplicableError(
                f"{type(self.model).__name__} has no nn.ReLU / nn.LeakyReLU module, so linear regions are not "
                "defined (functional relu calls are not seen by hooks: use nn.ReLU modules to have them measured)"
            )
        self.result = int(torch.unique(torch.cat(list(patterns.values()), dim=1), dim=0).shape[0])
        return torch.tensor(float(self.result), dtype=torch.float64)


class Flatness(_ProbeMetric):
    """Hessian curvature of ``loss_fn(model(x), y)`` on the accumulated (x, y) (see
    :func:`~lightning_geomdim.core.flatness.flatness` for the measure's arguments).

    ``loss_fn``: a callable ``(output, target) -> scalar``, ``"cross_entropy"``, ``"mse"``, or ``None`` for
    cross-entropy on integer targets and MSE otherwise. ``seed`` seeds a private generator for the Lanczos
    start vector and the trace probes, fresh at every ``compute()``, so equal weights give equal values.
    ``dimension``: a ``DimensionResult`` of the same model and inputs to reuse for the flat dimension;
    ``dimension_options``: the dimension's settings when it is computed here (see ``flatness``);
    ``flat_dimension``: as in ``flatness`` (default: reported only from a given ``dimension``; ``True`` computes
    it); ``return_eigenvectors=True`` keeps the top eigenvectors.
    ``compute()`` returns λ_max as a float64 scalar tensor; ``result`` holds the ``FlatnessResult``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | str | None = None,
        *,
        top_k: int = 1,
        trace_samples: int = 99,
        method: str = "auto",
        seed: int = 0,
        output_fn: OutputFn | None = None,
        params: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float64,
        dimension: DimensionResult | None = None,
        dimension_options: Mapping[str, Any] | None = None,
        flat_dimension: bool | None = None,
        return_eigenvectors: bool = False,
        max_memory_bytes: int | None = None,
        max_samples: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, max_samples=max_samples, **kwargs)
        if isinstance(loss_fn, str) and loss_fn not in LOSSES:
            raise ValueError(f"loss_fn={loss_fn!r} is invalid: pass a callable or one of {LOSSES}")
        self.loss_fn = loss_fn
        self.seed = int(seed)
        self.measure_kwargs = {
            "top_k": top_k, "trace_samples": trace_samples, "method": method, "output_fn": output_fn,
            "params": params, "dtype": dtype, "dimension": dimension, "dimension_options": dimension_options,
            "flat_dimension": flat_dimension, "return_eigenvectors": return_eigenvectors,
            "max_memory_bytes": max_memory_bytes,
        }
        self.result: FlatnessResult | None = None

    def update(self, x: Any, y: Tensor) -> None:  # type: ignore[override]
        """Append inputs ``x`` (as in the other metrics) and targets ``y`` (N, ...)."""
        self._append("inputs", x)
        self._append("targets", y)

    def compute(self) -> Tensor:
        x, y = self._gathered("inputs"), self._gathered("targets")
        generator = torch.Generator().manual_seed(self.seed)
        self.result = flatness(
            self.model, resolve_loss_fn(self.loss_fn, y), x, y, generator=generator, **self.measure_kwargs
        )
        return torch.tensor(self.result.max_eigenvalue, dtype=torch.float64)


class NeuronAlignment(_ProbeMetric):
    """Alignment statistics of every Linear/Conv layer feeding a ReLU (see
    :func:`~lightning_geomdim.core.alignment.neuron_alignment`); the accumulated inputs, if any, trace the data flow
    and give the activity statistics (without ``update`` the weights alone are read).

    ``compute()`` returns the number of direction clusters summed over the layers (float64 scalar tensor);
    ``result`` holds the per-layer ``AlignmentStats``.
    """

    def __init__(
        self, model: nn.Module, *, threshold: float = 0.99, output_fn: OutputFn | None = None,
        dtype: torch.dtype = torch.float64, max_memory_bytes: int | None = None, max_samples: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, max_samples=max_samples, **kwargs)
        self.measure_kwargs = {"threshold": float(threshold), "output_fn": output_fn, "dtype": dtype,
                               "max_memory_bytes": max_memory_bytes}
        self.result: dict[str, AlignmentStats] | None = None

    def compute(self) -> Tensor:
        x = self._gathered("inputs") if "inputs" in self._structures else None
        self.result = neuron_alignment(self.model, x, **self.measure_kwargs)
        return torch.tensor(float(sum(s.num_clusters for s in self.result.values())), dtype=torch.float64)
