"""torchmetrics wrappers: ``update`` accumulates a probe batch, ``compute`` measures the model's current weights on it.

Each metric holds a reference to the measured module (not registered as a submodule, so it can live inside the
LightningModule it measures, and ``.to()`` on the metric never moves the model). ``compute()`` returns one float64
scalar tensor (so ``self.log(name, metric)`` works) and keeps the full core result in ``metric.result`` until the
next ``compute()`` or ``reset()``.

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

How the torchmetrics contract is met:

* **States.** The measures are functions of the model on the whole probe batch (a rank, a count of distinct
  patterns, a Hessian spectrum): no per-batch statistic can be reduced, so the raw inputs themselves are the state.
  ``__init__`` declares them with ``add_state``: ``inputs`` (and ``targets`` for :class:`Flatness`), list states with
  ``dist_reduce_fx="cat"``, not persistent (never written to a checkpoint). Under DDP ``compute()`` gathers the
  inputs of every process, in rank order.
* **Bounded.** ``max_samples=N`` makes ``update`` keep only the first N samples a process sees (later samples are
  dropped at once, not stored); after the cross-process gather the first N are measured. Without it every
  accumulated sample is stored and measured: set it for anything larger than a probe batch.
* **Nested inputs.** ``x`` is a Tensor (N, ...) (one positional model input, the common case), or a tuple / list /
  dict / namedtuple of tensors (positional / keyword inputs), flattened with ``torch.utils._pytree``. Each update
  is stored as one ``uint8`` row of bytes per sample (see :mod:`lightning_geomdim.metrics.packing`), so one list
  state holds any structure, bit-exact in every dtype, and the states are the same whatever the input. The
  structure (container types, keys, dtypes, per-sample shapes) is taken from the first ``update`` after
  construction or ``reset()``; a later ``update`` with another structure raises ``ValueError``. The structure is
  not a state: under DDP every process must pass the same structure, and call ``update`` at least once.
* **No cached value.** ``compute()`` measures the model's weights *at the time of the call* on the accumulated
  probe. The weights change without any ``update`` (optimizer steps, ``load_state_dict``, ``torch.nn.init``), so
  torchmetrics' cache of ``compute()`` results is switched off (``compute_with_cache=False``; passing ``True``
  raises): every call measures again, and costs a full measurement.
* **forward.** ``metric(x)`` is torchmetrics' ``forward``: it accumulates ``x`` and returns the measure of ``x``
  alone, a full measurement per call; its merge of the batch into the accumulated state bypasses the
  ``max_samples`` bound of ``update`` (``compute`` still measures the first N only). To measure once per epoch,
  use ``update`` and log the metric object.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn
from torchmetrics.utilities.data import dim_zero_cat

from lightning_geomdim.core.activation_patterns import linear_regions
from lightning_geomdim.core.alignment import AlignmentStats, neuron_alignment
from lightning_geomdim.core.dimension import DimensionResult, batch_functional_dimension
from lightning_geomdim.core.flatness import FlatnessResult, flatness
from lightning_geomdim.core.functional_model import OutputFn
from lightning_geomdim.core.losses import LOSSES, LossFn, resolve_loss_fn
from lightning_geomdim.metrics.packing import Layout, layout_of, num_samples, pack, same_layout, unpack


class _ProbeMetric(Metric):
    """Stores the probe inputs (and targets) as "cat" list states of byte rows; subclasses implement ``_measure``
    (the core result on the model's current weights) and ``_value`` (its scalar)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    #: The list states, one per argument of ``update``, declared in ``__init__``.
    _stored: tuple[str, ...] = ("inputs",)

    def __init__(self, model: nn.Module, *, max_samples: int | None = None, **kwargs: Any) -> None:
        if kwargs.pop("compute_with_cache", False):
            raise ValueError(
                f"compute_with_cache=True is refused: {type(self).__name__}.compute() measures the model's current "
                "weights, which change without update(), so a cached value would be stale"
            )
        super().__init__(compute_with_cache=False, **kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                        or max_samples < 1):
            raise ValueError(f"max_samples={max_samples!r} must be a positive integer or None")
        # Plain attribute, not a submodule: the metric may be an attribute of the module it measures.
        object.__setattr__(self, "_measured", model)
        self.max_samples = max_samples
        for name in self._stored:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        # The structure of each stored argument, from the first update since construction / reset (not a state).
        self._layouts: dict[str, Layout] = {}
        self.result: Any = None

    @property
    def model(self) -> nn.Module:
        """The measured module."""
        return self.__dict__["_measured"]

    def _store(self, **values: Any) -> None:
        """Validate every argument, then append at most the room left under ``max_samples`` of each."""
        sizes = {name: num_samples(value, name) for name, value in values.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"update() got {sizes} samples: each input needs its target")
        layouts = {name: layout_of(value) for name, value in values.items()}
        for name, layout in layouts.items():
            known = self._layouts.get(name)
            if known is not None and not same_layout(layout, known):
                raise ValueError(f"update() got {name} structured as {layout}, earlier calls as {known}")
        room = None
        if self.max_samples is not None:
            room = max(0, self.max_samples - sum(int(rows.shape[0]) for rows in getattr(self, self._stored[0])))
        for name, value in values.items():
            self._layouts.setdefault(name, layouts[name])
            getattr(self, name).append(pack(value, room, name))

    def _gathered(self, name: str) -> Any:
        """The accumulated (and, under DDP, gathered) ``name``, structured as given to ``update``."""
        layout = self._layouts.get(name)
        if layout is None:
            raise ValueError(f"{type(self).__name__} has no {name}: call update(...) before compute()")
        rows = dim_zero_cat(getattr(self, name))
        if self.max_samples is not None:
            rows = rows[: self.max_samples]
        return unpack(rows, layout)

    def update(self, x: Any) -> None:
        """Append the probe inputs ``x``: a Tensor (N, ...), or a tuple / list / dict / namedtuple of tensors."""
        self._store(inputs=x)

    def compute(self) -> Tensor:
        """Measure the model's current weights on the accumulated probe (never a cached value)."""
        self.result = None  # a failed measure leaves no stale result behind
        self.result = self._measure()
        return torch.tensor(float(self._value(self.result)), dtype=torch.float64)

    def _measure(self) -> Any:
        raise NotImplementedError

    def _value(self, result: Any) -> float:
        raise NotImplementedError

    def reset(self) -> None:
        """Drop the accumulated inputs, their structure and the last result."""
        super().reset()
        self._layouts = {}
        self.result = None


class BatchFunctionalDimension(_ProbeMetric):
    """Batch functional dimension of ``model`` on the accumulated inputs (see
    :func:`~lightning_geomdim.batch_functional_dimension` for every argument).

    ``compute()`` measures the model's weights *at the time of the call* (never a cached value) and returns
    ``result.rank`` as a float64 scalar tensor: the exact dimension when ``result.engine == "exact"``, else a
    numerical rank; ``result`` holds the :class:`~lightning_geomdim.DimensionResult` (bounds, optional spectrum).
    ``max_samples`` keeps only the first N inputs (per process in ``update``, and after the cross-process gather).
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

    def _measure(self) -> DimensionResult:
        return batch_functional_dimension(self.model, self._gathered("inputs"), **self.measure_kwargs)

    def _value(self, result: DimensionResult) -> float:
        return float(result.rank)


class LinearRegions(_ProbeMetric):
    """Number of distinct joint ReLU activation patterns over the accumulated inputs: the core
    :func:`~lightning_geomdim.linear_regions` (``count_regions`` of ``activation_patterns``) on the model's current
    weights; ``result`` is that int. ``compute()`` raises ``NotApplicableError`` without ReLU modules."""

    def __init__(
        self, model: nn.Module, *, output_fn: OutputFn | None = None, dtype: torch.dtype = torch.float64,
        max_samples: int | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(model, max_samples=max_samples, **kwargs)
        self.measure_kwargs = {"output_fn": output_fn, "dtype": dtype}
        self.result: int | None = None

    def _measure(self) -> int:
        return linear_regions(self.model, self._gathered("inputs"), **self.measure_kwargs)

    def _value(self, result: int) -> float:
        return float(result)


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
    States: ``inputs`` and ``targets``, both "cat" list states; ``update(x, y)`` needs as many targets as inputs
    (``y`` may be a Tensor or a structure of tensors, like ``x``).
    """

    _stored = ("inputs", "targets")

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

    def update(self, x: Any, y: Any) -> None:  # type: ignore[override]
        """Append inputs ``x`` (as in the other metrics) and their targets ``y`` (N, ...)."""
        self._store(inputs=x, targets=y)

    def _measure(self) -> FlatnessResult:
        x, y = self._gathered("inputs"), self._gathered("targets")
        generator = torch.Generator().manual_seed(self.seed)
        return flatness(self.model, resolve_loss_fn(self.loss_fn, y), x, y, generator=generator, **self.measure_kwargs)

    def _value(self, result: FlatnessResult) -> float:
        return float(result.max_eigenvalue)


class NeuronAlignment(_ProbeMetric):
    """Alignment statistics of every Linear/Conv layer feeding a ReLU (see
    :func:`~lightning_geomdim.core.alignment.neuron_alignment`); the accumulated inputs, if any, trace the data flow
    and give the activity statistics.

    Without any ``update`` the weights alone are read (activity statistics such as ``dead`` are ``None``): a
    supported use, so torchmetrics' "compute before update" warning is replaced by one warning per metric instance,
    on its first such ``compute()``.
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
        self._warned_without_inputs = False

    def _wrap_compute(self, compute: Callable) -> Callable:
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def warn_once(*args: Any, **kwargs: Any) -> Any:
            if self.update_called:
                return wrapped(*args, **kwargs)
            if not self._warned_without_inputs:
                self._warned_without_inputs = True
                rank_zero_warn(
                    f"{type(self).__name__}.compute() was called before the ``update`` method: without probe inputs "
                    "only the weights are read, the activity statistics (dead / always-active units) are None. "
                    "Warned once per metric.",
                    UserWarning,
                )
            with warnings.catch_warnings():  # torchmetrics' own warning, emitted on every call
                warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric", category=UserWarning)
                return wrapped(*args, **kwargs)

        return warn_once

    def _measure(self) -> dict[str, AlignmentStats]:
        x = self._gathered("inputs") if "inputs" in self._layouts else None
        return neuron_alignment(self.model, x, **self.measure_kwargs)

    def _value(self, result: dict[str, AlignmentStats]) -> float:
        return float(sum(s.num_clusters for s in result.values()))
