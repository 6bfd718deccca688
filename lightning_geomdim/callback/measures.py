"""One measurement step: the measures due on each probe, computed by the core and turned into logged scalars.

:func:`measure_probe` runs everything due on one probe in one call: the dimension (with its linear regions) on
every probe, flatness on the flatness probe, alignment on the alignment probe. Each measure calls its core function
directly (:func:`~lightning_geomdim.core.dimension.batch_functional_dimension`,
:func:`~lightning_geomdim.core.activation_patterns.linear_regions`, :func:`~lightning_geomdim.core.flatness.flatness`,
:func:`~lightning_geomdim.core.alignment.neuron_alignment`), under the :class:`~.error_policy.ErrorPolicy` and the
time account of the :class:`~.overhead_budget.OverheadBudget`, all on the probe's one
:class:`~lightning_geomdim.core.probe_trace.ProbeTrace` (:class:`ProbeData`). Every process measures the whole
probe by itself (see :mod:`.distributed`): the monitor makes no collective call while measuring, unless
``distributed_gram``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor, nn

from lightning_geomdim.callback.calibration import calibrate_first_points
from lightning_geomdim.callback.error_policy import ErrorPolicy
from lightning_geomdim.callback.overhead_budget import OverheadBudget
from lightning_geomdim.callback.probe_data import ProbeData
from lightning_geomdim.callback.probes import Probe
from lightning_geomdim.callback.tensorboard import encode_heatmap
from lightning_geomdim.core.activation_patterns import linear_regions
from lightning_geomdim.core.alignment import neuron_alignment
from lightning_geomdim.core.blocks import Blocks
from lightning_geomdim.core.dimension import DimensionResult, batch_functional_dimension
from lightning_geomdim.core.errors import (
    GeometryError,
    MeasurementInterrupted,
    MeasurementOverTime,
    ProbeError,
)
from lightning_geomdim.core.flatness import flatness
from lightning_geomdim.core.functional_model import OutputFn
from lightning_geomdim.core.interrupt import checkpoint, interruptible, time_limit
from lightning_geomdim.core.losses import LossFn, resolve_loss_fn
from lightning_geomdim.core.memory import format_bytes

MEASURES: tuple[str, ...] = ("dimension", "flatness", "alignment")
FLATNESS_KEYS: tuple[str, ...] = (
    "max_eigenvalue", "trace", "trace_std_error", "trace_samples", "flat_dimension", "loss",
)


class DefaultOutput:
    """The monitor's ``output_fn`` when none is given: a tensor output itself; from a dict (a Hugging Face
    ``ModelOutput`` too) its ``"logits"``, or its only tensor; from a tuple or list its first item when that is a
    tensor. ``picked`` says what was taken from a container (for one warning), None for a plain tensor.

    Raises:
        ProbeError: no such tensor (the message asks for an ``output_fn``).
    """

    def __init__(self) -> None:
        self.picked: str | None = None

    def __call__(self, out: Any) -> Tensor:
        if isinstance(out, Tensor):
            return out
        picked: tuple[str, Any] | None = None
        if isinstance(out, Mapping):
            tensors = [k for k, v in out.items() if isinstance(v, Tensor)]
            key = "logits" if isinstance(out.get("logits"), Tensor) else (tensors[0] if len(tensors) == 1 else None)
            picked = None if key is None else (f"its {key!r} entry", out[key])
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            picked = ("its first item", out[0])
        if picked is None:
            raise ProbeError(
                f"model output has type {type(out).__name__} with no 'logits' entry, single tensor or leading tensor: "
                "pass GeometryMonitor(output_fn=...) mapping it to the tensor to measure"
            )
        self.picked = f"the model returns a {type(out).__name__}: measuring {picked[0]}"
        return picked[1]


@dataclass(frozen=True)
class MeasureSettings:
    """The monitor's arguments that the measures read (see :class:`~.monitor.GeometryMonitor`);
    ``max_memory_bytes`` is the budget the processes agreed on at setup; ``heatmaps``, whether the alignment encodes
    its cosine heatmaps (``tensorboard_extras`` with a ``TensorBoardLogger``, on rank 0), within its allowance."""

    output_fn: OutputFn | None
    params: Sequence[str] | None
    engine: str
    spectrum: bool
    blocks: Blocks
    distributed_gram: bool
    dtype: torch.dtype
    rtol: float | None
    loss_fn: LossFn | str | None
    flatness_top_k: int
    flatness_trace_samples: int
    flatness_flat_dimension: bool
    alignment_threshold: float
    seed: int
    max_memory_bytes: int | None
    heatmaps: bool = False

    def dimension_options(self) -> dict[str, Any]:
        """The settings of the dimension, shared by the dimension measure and flatness' flat dimension."""
        return {"engine": self.engine, "rtol": self.rtol, "seed": self.seed, "distributed": self.distributed_gram}


@dataclass
class Measurement:
    """What one measurement step logs: the scalars of each measure, and the TensorBoard extras."""

    scalars: dict[str, dict[str, float]] = field(default_factory=lambda: {m: {} for m in MEASURES})
    spectra: dict[str, Tensor] = field(default_factory=dict)  # probe → singular values
    heatmaps: dict[str, Summary.Image] = field(default_factory=dict)  # layer → its neurons' cosines as a PNG

    def metrics(self) -> dict[str, float]:
        """Every scalar, measure by measure (dimension and linear regions of each probe, flatness, alignment)."""
        return {k: v for m in MEASURES for k, v in self.scalars[m].items()}


def plan(
    probes: dict[str, Probe], due: Sequence[str], flatness_probe: Probe | None, alignment_probe: Probe | None
) -> list[tuple[Probe | None, list[str]]]:
    """The measures due on each probe, in the order of the probes; alignment whose probe is absent runs last, on
    the weights alone (``None``)."""
    on_probe = {"flatness": flatness_probe, "alignment": alignment_probe}  # the dimension is taken on every probe
    steps: list[tuple[Probe | None, list[str]]] = []
    for probe in probes.values():
        measures = [m for m in MEASURES if m in due and (m == "dimension" or on_probe[m] is probe)]
        if measures:
            steps.append((probe, measures))
    if "alignment" in due and alignment_probe is None:
        steps.append((None, ["alignment"]))
    return steps


def measure_probes(
    module: nn.Module, steps: Sequence[tuple[Probe | None, Sequence[str]]], settings: MeasureSettings,
    policy: ErrorPolicy, budget: OverheadBudget, out: Measurement, should_stop: Callable[[], bool],
) -> None:
    """:func:`measure_probe` for each (probe, measures) of ``steps``; once ``should_stop()`` (the trainer received
    SIGTERM) the measure in progress stops at its next chunk of work and the rest is left out, so that Lightning can
    end the run at once. What was measured before is kept in ``out``."""
    try:
        with interruptible(should_stop):
            if not _collective(settings):  # (every process would decide by its own clock)
                calibrate_first_points(steps, budget, policy, lambda probe, measure, quiet: measure_probe(
                    module, probe, [measure], settings, quiet, budget, Measurement()))
            for probe, measures in steps:
                measure_probe(module, probe, measures, settings, policy, budget, out)
    except MeasurementInterrupted:
        rank_zero_info("GeometryMonitor: the measurement stopped early because the trainer received SIGTERM")
    picked = getattr(settings.output_fn, "picked", None)
    if picked is not None:
        policy.warn_once(("output", picked), f"GeometryMonitor: {picked} (pass output_fn=... to choose another)")


def _collective(settings: MeasureSettings) -> bool:
    """Whether the dimension is a collective of several processes (``distributed_gram`` under DDP)."""
    dist = torch.distributed
    return settings.distributed_gram and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def measure_probe(
    module: nn.Module, probe: Probe | None, measures: Sequence[str], settings: MeasureSettings, policy: ErrorPolicy,
    budget: OverheadBudget, out: Measurement,
) -> None:
    """Take ``measures`` on ``probe`` (``None``: alignment on the weights alone) and add their scalars to ``out``.

    Each measure's time is counted as its cost, summed over the probes of the measurement (dimension and linear
    regions as ``"dimension"``), and each fails on its own under ``policy``. Flatness reuses the dimension just
    measured on its probe (its ``flat_dimension``), and logs that as NaN when the dimension failed.
    """
    inputs = ProbeData(module, probe, settings, measures)
    try:
        _measure(module, probe, measures, settings, policy, budget, out, inputs)
    finally:
        inputs.release()  # the trace's graph, activations and parameter copy


def _measure(
    module: nn.Module, probe: Probe | None, measures: Sequence[str], settings: MeasureSettings, policy: ErrorPolicy,
    budget: OverheadBudget, out: Measurement, inputs: ProbeData,
) -> None:
    dimension: dict[str, DimensionResult] = {}  # this probe's, once measured

    def timed(measure: str, body: Callable[[], None]) -> None:
        """``body`` as ``measure``'s measuring time, stopped at its time allowance (:class:`OverheadBudget`)."""
        if measure in budget.stopped:
            return
        kept, spectra, heatmaps = dict(out.scalars[measure]), dict(out.spectra), dict(out.heatmaps)
        try:
            # the processes of a distributed Gram meet in its all-reduce: one stopped by its own clock would leave
            # the others waiting there, so such a measurement runs to its end (the budget still decides what is taken)
            limit = math.inf if _collective(settings) else budget.remaining(measure)
            with budget.measuring(measure), time_limit(limit, allowance=budget.allowed(measure)):
                checkpoint()  # an allowance spent on earlier probes stops before this probe's traced pass
                body()
        except MeasurementOverTime as err:
            out.scalars[measure], out.spectra, out.heatmaps = kept, spectra, heatmaps  # nothing of a stopped measure
            budget.overran(measure, err.needed)
            stopped = str(err)
            policy.warn_once(("over time", measure), lambda: budget.over_time_warning(measure, stopped))

    def dimension_and_regions() -> None:
        out.scalars["dimension"].update(policy.attempt(
            "dimension", probe.name, lambda: _dimension(module, probe, inputs, settings, policy, dimension)))
        if probe.name in dimension and dimension[probe.name].spectrum is not None:
            out.spectra[probe.name] = dimension[probe.name].spectrum.singular_values
        out.scalars["dimension"].update(policy.attempt(
            "linear_regions", probe.name, lambda: _regions(module, probe, inputs, settings)))

    if "dimension" in measures:
        timed("dimension", dimension_and_regions)
    if "flatness" in measures:
        timed("flatness", lambda: out.scalars["flatness"].update(policy.attempt("flatness", "flatness", lambda: (
            _flatness(module, probe, inputs, settings, policy, dimension.get(probe.name))))))
    if "alignment" in measures:
        timed("alignment", lambda: out.scalars["alignment"].update(policy.attempt(
            "alignment", "alignment", lambda: _alignment(module, inputs, settings, out))))


def _dimension(
    module: nn.Module, probe: Probe, inputs: ProbeData, settings: MeasureSettings, policy: ErrorPolicy,
    out: dict[str, DimensionResult],
) -> dict[str, float]:
    res = batch_functional_dimension(
        module, None, trace=inputs.trace_for("dimension"), output_fn=settings.output_fn, params=settings.params,
        dtype=settings.dtype,
        max_memory_bytes=settings.max_memory_bytes, **settings.dimension_options(),
        spectrum=settings.spectrum if probe.spectrum is None else probe.spectrum,
        logit_differences=probe.logit_differences, blocks=settings.blocks,
    )
    out[probe.name] = res
    values = {
        "upper_bound": res.upper_bound, "num_outputs": res.num_outputs, "num_rows": res.num_rows,
        "num_params": res.num_params, "num_hidden_neurons": res.num_hidden_neurons,
    }
    if res.exact:  # only the exact engine's rank is the dimension; a float engine's is a numerical rank
        values["batch_functional_dimension"] = res.rank
    values["saturated"] = res.saturated
    if res.saturated:
        policy.warn_once(("saturated", probe.name), lambda: _saturation_message(probe, res))
    if res.spectrum is not None:
        sv = res.spectrum
        values.update({
            "numerical_rank": sv.numerical_rank, "numerical_rank_rtol": sv.rtol,
            "resolution": sv.resolution, "spectral_gap": sv.spectral_gap, "stable_rank": sv.stable_rank,
            "effective_rank": sv.effective_rank,
        })
    for name, block in res.blocks.items():
        values.update({f"block/{name}/numerical_rank": block.numerical_rank, f"block/{name}/bound": block.bound})
    for name, rank in res.block_dimensions.items():  # exact engine: the block's dimension, no tolerance
        values[f"block/{name}/batch_functional_dimension"] = rank
    return {f"geometry/{probe.name}/{k}": float(v) for k, v in values.items()}


def _regions(module: nn.Module, probe: Probe, inputs: ProbeData, settings: MeasureSettings) -> dict[str, float]:
    count = linear_regions(module, None, output_fn=settings.output_fn, dtype=settings.dtype, trace=inputs.trace())
    return {f"geometry/{probe.name}/linear_regions": float(count)}


def _saturation_message(probe: Probe, res: DimensionResult) -> str:
    per_sample = res.num_rows / max(1, probe.num_samples)
    needed = math.ceil(res.parameter_bound / per_sample)
    rows = math.ceil(needed * per_sample)
    what = "the dimension" if res.exact else "the numerical rank"
    return (
        f"GeometryMonitor: on probe {probe.name!r} {what} equals its row bound {res.num_rows} "
        f"({probe.num_samples} samples × {per_sample:g} rows), below P − hidden neurons = "
        f"{res.parameter_bound}: the probe is too small for it to show anything else (logged as "
        f"geometry/{probe.name}/saturated = 1; the spectrum's stable / effective rank and the per-block ranks "
        f"geometry/{probe.name}/block/... still vary). A probe of at least {needed} samples lets the bound stop "
        f"binding; its exact dimension needs a {rows:,} × "
        f"{rows:,} Gram matrix mod p ({format_bytes(8 * rows * rows)}) and about {rows:,}³/3 flops"
    )


def _flatness(
    module: nn.Module, probe: Probe, inputs: ProbeData, settings: MeasureSettings, policy: ErrorPolicy,
    dimension: DimensionResult | None,
) -> dict[str, float]:
    """The curvature always; ``flat_dimension`` from this step's dimension of the probe, computed here when it was
    not due, logged as NaN (one warning) when that dimension fails: the Hessian does not need it."""
    failed: BaseException | None = policy.failures.get(("dimension", probe.name))
    trace = inputs.trace_for("flatness")
    if settings.flatness_flat_dimension and dimension is None and failed is None:
        try:
            dimension = batch_functional_dimension(
                module, None, trace=trace, output_fn=settings.output_fn, params=settings.params, dtype=settings.dtype,
                max_memory_bytes=settings.max_memory_bytes, **settings.dimension_options())
        except MeasurementInterrupted:
            raise
        except GeometryError as err:
            failed = err
    y = inputs.xy()[1]
    res = flatness(
        module, resolve_loss_fn(settings.loss_fn, y), None, y, trace=trace, top_k=settings.flatness_top_k,
        trace_samples=settings.flatness_trace_samples, generator=torch.Generator().manual_seed(settings.seed),
        dtype=settings.dtype, params=settings.params, output_fn=settings.output_fn,
        dimension=dimension if settings.flatness_flat_dimension else None,
        flat_dimension=settings.flatness_flat_dimension and dimension is not None,
        max_memory_bytes=settings.max_memory_bytes, fit_memory=True,
    )
    if res.method == "lanczos" and res.trace_samples < settings.flatness_trace_samples:
        policy.warn_once("flatness_fit", lambda: (
            f"GeometryMonitor: flatness uses {res.trace_samples} trace samples instead of "
            f"{settings.flatness_trace_samples} and a Lanczos basis of {res.lanczos_basis} vectors to fit the memory "
            f"budget (P = {res.num_params:,}: each vector of P takes {format_bytes(8 * res.num_params)}); the trace's "
            "standard error (geometry/flatness/trace_std_error) is larger. Raise max_memory_bytes for more"))
    values = {k: float(getattr(res, k)) for k in FLATNESS_KEYS if getattr(res, k) is not None}
    values["num_params"] = float(res.num_params)
    if settings.flatness_flat_dimension and failed is not None:
        values["flat_dimension"] = math.nan
        policy.warn_once(("flat_dimension", type(failed)), lambda: (
            f"GeometryMonitor: geometry/flatness/flat_dimension is logged as NaN because the batch functional "
            f"dimension of probe {probe.name!r} failed ({type(failed).__name__}: {str(failed)[:300]}); the curvature "
            "is measured without it"))
    if settings.flatness_top_k > 1:
        values.update({f"eigenvalue_{i + 1}": float(v) for i, v in enumerate(res.top_eigenvalues.tolist())})
    return {f"geometry/flatness/{k}": v for k, v in values.items()}


def _alignment(module: nn.Module, inputs: ProbeData, settings: MeasureSettings, out: Measurement) -> dict[str, float]:
    stats = neuron_alignment(
        module, None, threshold=settings.alignment_threshold, output_fn=settings.output_fn,
        dtype=settings.dtype, max_memory_bytes=settings.max_memory_bytes, trace=inputs.trace(),
    )
    values: dict[str, float] = {}
    for layer, s in stats.items():
        for key, value in s.scalars().items():
            values[f"geometry/alignment/{layer}/{key}"] = float(value)
    values["geometry/alignment/num_clusters"] = float(sum(s.num_clusters for s in stats.values()))
    if settings.heatmaps:
        heatmaps = {}  # all or none: a stop (time limit, SIGTERM) or an error while encoding leaves out every image
        for layer, s in stats.items():
            checkpoint()  # the PNGs are the alignment's time: its allowance covers them (0.13 s for ResNet-18's 17)
            heatmaps[layer] = encode_heatmap(s.cosines)
        out.heatmaps.update(heatmaps)
    return values
