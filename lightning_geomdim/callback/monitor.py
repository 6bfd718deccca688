"""GeometryMonitor: a Lightning callback that measures the geometry of the network on fixed probes while it trains."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_geomdim.callback import tensorboard as tb
from lightning_geomdim.callback.probes import (
    Probe,
    ProbeSpec,
    dataset_probe,
    default_input_fn,
    default_target_fn,
    first_dataloader,
    input_template,
    isolated_rng,
    parse_probes,
    random_probe,
    tensor_probe,
)
from lightning_geomdim.callback.schedule import Event, MeasurementClock, OverheadBudget, Schedule
from lightning_geomdim.core.dimension import ENGINES, DimensionResult
from lightning_geomdim.core.errors import GeometryError, NotApplicableError
from lightning_geomdim.core.layer_kinds import RELU_LIKE
from lightning_geomdim.core.losses import LOSSES
from lightning_geomdim.core.memory import format_bytes, memory_budget
from lightning_geomdim.metrics.probe_metrics import (
    BatchFunctionalDimension,
    Flatness,
    LinearRegions,
    NeuronAlignment,
)

MEASURES: tuple[str, ...] = ("dimension", "flatness", "alignment")
#: The time budget of the default schedule (see ``max_overhead``).
DEFAULT_MAX_OVERHEAD = 0.05
DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}
FLATNESS_KEYS: tuple[str, ...] = ("max_eigenvalue", "trace", "trace_std_error", "flat_dimension", "loss")
#: The monitor's metrics never gather across processes: every process measures the whole probe (see _on_device).
NO_SYNC: dict[str, Any] = {"sync_on_compute": False}


class GeometryMonitor(Callback):
    r"""Measure the local geometry of the network on fixed probe batches while it trains, and log it.

    Add it to any ``Trainer`` (the LightningModule needs no change); the values are logged through every
    logger of the trainer at ``trainer.global_step``, so they line up with the loss.

    **Logged keys** (``<probe>``: the probe's name, e.g. ``train``, ``val``, ``random``; ``<layer>``: the name,
    relative to the measured module, of a Linear/Conv module that feeds a ReLU, e.g. ``net.0``)

    ============================================================  ==========================================
    key                                                           value
    ============================================================  ==========================================
    ``geometry/<probe>/batch_functional_dimension``               the batch functional dimension, exact (exact
                                                                  engine; absent for models it does not apply to)
    ``geometry/<probe>/upper_bound``                              min(rows, P − hidden neurons), a proven bound
    ``geometry/<probe>/num_outputs``                              M = N · K, the model's outputs on the probe
    ``geometry/<probe>/num_rows``                                 rows of J: M, or N·(K − 1) for a softmax head
    ``geometry/<probe>/num_params``                               P, the measured parameters
    ``geometry/<probe>/num_hidden_neurons``                       hidden units with a rescaling symmetry
    ``geometry/<probe>/saturated``                                1 when the rank equals the probe's rows, fewer
                                                                  than P − hidden: the value is the bound (one
                                                                  warning gives the probe size that would not be)
    ``geometry/<probe>/numerical_rank``                           floating-point rank #{σ > tolerance}: not the
                                                                  dimension (``spectrum=True``)
    ``geometry/<probe>/numerical_rank_rtol``                      that tolerance / σ_max
    ``geometry/<probe>/resolution``                               the float engine's floor σ / σ_max
    ``geometry/<probe>/spectral_gap``                             σ_r / σ_{r+1} at the numerical rank (inf: full)
    ``geometry/<probe>/stable_rank``                              Σσ² / σ_max²
    ``geometry/<probe>/effective_rank``                           exp(entropy of σ / Σσ)
    ``geometry/<probe>/linear_regions``                           distinct ReLU activation patterns on X
    ``geometry/flatness/max_eigenvalue``                          λ_max of the loss Hessian
    ``geometry/flatness/eigenvalue_<i>``                          i-th largest eigenvalue (``flatness_top_k``
                                                                  > 1 only, i = 1 … top_k)
    ``geometry/flatness/trace``, ``.../trace_std_error``          tr H (Hutch++ or exact) and its error
    ``geometry/flatness/flat_dimension``                          P − batch functional dimension
    ``geometry/flatness/loss``                                    the loss on the flatness probe
    ``geometry/flatness/num_params``                              P
    ``geometry/alignment/<layer>/num_neurons``                    neurons (units / channels) of the layer
    ``geometry/alignment/<layer>/num_clusters``                   direction clusters (cos > threshold)
    ``geometry/alignment/<layer>/mean_max_cosine``                mean over neurons of the best match
    ``geometry/alignment/<layer>/stable_rank``                    ‖W‖_F² / ‖W‖_2² of the layer's weight
    ``geometry/alignment/<layer>/num_dead``                       neurons never active on the probe
    ``geometry/alignment/<layer>/num_always_active``              neurons active on every probe input
    ``geometry/alignment/<layer>/num_duplicate_patterns``         neurons whose activation column on the
                                                                  probe equals another neuron's
    ``geometry/alignment/num_clusters``                           sum of num_clusters over the layers
    ============================================================  ==========================================

    **Two numbers, one meaning each.** ``batch_functional_dimension`` is the dimension of the set of outputs
    {f_θ'(X)} near θ: for a piecewise-linear network it is fixed by the activation patterns on X, and the exact
    engine computes it by modular arithmetic, with no tolerance. ``numerical_rank`` counts the singular values of
    the floating-point J above a tolerance; it is not the dimension, and the two differ whenever σ falls below
    the engine's ``resolution`` (~2e-6 σ_max for a float64 Gram on the paper's MLP) or rows are scaled down by
    saturated softmax probabilities. On the MNIST example after 680 epochs (600 training images, median
    non-maximal probability 4e-10) the dimension is 5400 = 600 · 9, while the float Gram of the softmax output
    counted 1450 and a dense SVD 3482. Softmax heads are therefore measured on their logit differences (same row
    space, no saturation), by every engine.

    The dimension keys are logged per probe; flatness on ``flatness_probe``, alignment on
    ``alignment_probe``. With a ``TensorBoardLogger`` (and ``tensorboard_extras=True``) the monitor also writes
    a custom-scalars layout, singular-value histograms and cosine heatmaps (see
    :mod:`lightning_geomdim.callback.tensorboard`).

    **Cost**: on the default schedule (every epoch) the monitor spends about 5 % of the run's wall time measuring
    (``max_overhead="auto"`` → 0.05): each measure's first point is taken, later scheduled points only while their
    cost (the duration of their previous measurement) fits in the measure's equal share of the budget, so every
    curve is as dense as its cost allows and a warning says when points are skipped. The first points are always
    taken, so a run shorter than about 20 times their cost spends more (``benchmarks/bench_callback.py`` measures
    the MNIST example). **A schedule you write is the schedule that runs**: with any of ``every_n_steps``,
    ``every_n_epochs``, ``log_spaced``, ``at_epochs`` or ``schedules`` given, every scheduled point is taken,
    unless you also pass a ``max_overhead`` fraction. ``max_overhead=None`` takes every scheduled point.

    **Models and failures**: any differentiable model (tanh, GELU, ...: the dimension is measured, with no
    hidden-neuron bound claimed). ``linear_regions`` and the alignment keys exist only for models with
    ``nn.ReLU`` / ``nn.LeakyReLU`` modules; otherwise one warning per measure says they are not applicable
    and nothing is logged for them. ReLU called as a function (``torch.relu``, ``F.relu``) is invisible to
    module hooks: the dimension is still exact, but its ``upper_bound`` is min(M, P) and regions/alignment are
    not applicable (use ``nn.ReLU`` modules to have them). Measures run in eval mode, so a BatchNorm model is
    measured per sample with its running statistics. A measure that fails (NaN/inf parameters or outputs, a
    probe over the memory budget, a forward that raises, an output that is not a tensor without
    ``output_fn``) warns with the reason and the remedy and logs NaN under its keys, and training continues;
    the next measurement starts afresh (``on_error="raise"`` stops the run instead).

    **Probes** are fixed for the whole run and chosen once at fit start (see :mod:`lightning_geomdim.callback.probes`):
    ``"train"`` / ``"val"`` (``probe_size`` samples of the dataset, picked by index with a private generator:
    the dataloaders are never iterated and no global RNG is consumed), ``"random"`` (Gaussian inputs shaped
    like the data, for the computable full functional dimension; for integer inputs (token ids) uniform ids in
    [``low``, ``high``), which needs ``high``, the vocabulary size), or dicts ``{"name": ..., "source": ...,
    "size": ..., "mean": ..., "std": ..., "shape": ..., "low": ..., "high": ..., "dataloader_idx": ...,
    "logit_differences": ..., "spectrum": ...}`` (:class:`~lightning_geomdim.callback.probes.ProbeSpec`; e.g.
    ``"logit_differences": False`` measures a softmax head on its probabilities: a numerical rank only) and,
    from Python only, ``{"name": ..., "x": tensor, "y": tensor}`` (any input structure, e.g. a dict of keyword
    inputs). The default probes leave out ``"val"`` without validation data and ``"random"`` (with a warning)
    when the input is integer or a tuple/dict. Their indices/seeds are saved in checkpoints: a run resumed from
    a checkpoint measures the same probes at the same steps as an uninterrupted run. The state is found again
    when the resumed monitor has the same probe names, measures and ``module`` (its ``state_key``); a probe
    whose source changed is built afresh.

    **Observer guarantee**: measurements run in eval mode on float64 copies of the parameters; the mode of
    every submodule, ``requires_grad``, ``.grad``, the global RNGs (torch CPU/CUDA, ``random``, numpy) and
    BatchNorm statistics are restored or untouched, so a run with the monitor ends with bit-identical weights
    to a run without it. Nothing allocated by a measurement is kept after the hook returns.

    **Distributed**: single-device strategies and DDP (``strategy="ddp"`` and its spawn/fork variants). Under
    DDP every process measures the whole probe with its own copy of the (identical) weights and the loggers
    write from rank 0 only, so each value is logged once and equals a single-process run's bit for bit. The
    processes communicate only in hooks that all of them run: at setup they agree on the memory budget (the smallest
    of theirs; with ``accelerator="cpu"`` the default is split among the processes of a node), so they skip (or,
    with ``on_error="raise"``, all raise on) the same measures; at train start they take rank 0's probes (the same
    unless the dataset draws random augmentations); and before each scheduled measurement they take rank 0's choice
    of what fits in the time budget. Measuring itself involves no collective (unless ``distributed_gram``), so a
    measure that fails on one process cannot leave the others waiting. Sharded strategies (FSDP, DeepSpeed, model
    parallel), whose processes hold only shards of the parameters, are refused at setup with a
    ``MisconfigurationException`` that names the strategy and the alternatives (a single device or DDP).

    Args:
        every_n_steps: measure after every n-th optimizer step (``trainer.global_step``, which counts the steps of
            every optimizer); a multiple the counter jumps over (two optimizers step twice per batch) is measured
            at the next step, never skipped. ``None`` to disable.
        every_n_epochs: measure at the end of every n-th training epoch; default 1 when none of ``every_n_steps``,
            ``log_spaced``, ``at_epochs`` is given, else ``None`` (disabled).
        log_spaced: also measure at log-spaced global steps, this many per decade (1, 2, 3, …, 10, 13, 16, …
            for 10); ``None`` to disable.
        at_start: measure at global step 0, before training (not again when resuming).
        at_epochs: also measure at the end of these epochs, counted from 1 (e.g. the paper's [40, 80, 280, 680]).
        max_overhead: the most time the monitor may spend measuring, as a fraction of the rest of the run's wall
            time (0.05: about 5 % slower). A scheduled measure is skipped (one warning says so) when measuring it,
            at the cost of its previous measurement, would exceed its equal share of that; each measure's first
            point is always taken. Cheap measures keep dense curves, expensive ones get sparser. ``None``: take
            every scheduled point whatever it costs (a protocol's exact steps). ``"auto"`` (default): 0.05 on the
            default schedule, ``None`` when the schedule was written by the user (see **Cost**). Under DDP rank 0
            decides for all processes. See :class:`~lightning_geomdim.callback.schedule.OverheadBudget`.
        schedules: per-measure overrides of the five fields above, e.g. ``{"flatness": {"every_n_epochs": 5}}``.
        probes: probe specifications (see above); default ``["train", "val", "random"]``, where ``"val"`` is
            left out when there is no validation data.
        probe_size: samples per probe unless a probe sets ``size``. The default, 64, keeps a measurement cheap
            (for K outputs a 64 K × 64 K Gram matrix, whose O((64 K)³) eigendecomposition dominates the dimension's
            cost; on the MNIST example one measurement of everything takes about 0.5 s); raise it for a finer
            picture (the example configs use 200 to 2,000).
        measures: any of ``"dimension"`` (with linear regions), ``"flatness"``, ``"alignment"``; default all three,
            where flatness is dropped with one warning when no probe has targets (given explicitly, that is an
            error).
        module: name of the submodule to measure (as in ``named_modules()``, e.g. ``"net"``); default the
            LightningModule's own ``forward``.
        input_fn: batch → model input: a tensor, a tuple (positional inputs) or a dict (keyword inputs); default
            the batch if a tensor, its first item if a tuple/list, the dict key ``"x"``, ``"input"``, ``"inputs"``,
            ``"image"`` or ``"images"``, or else the dict without its target keys as keyword inputs (Hugging Face
            batches: ``input_ids`` / ``attention_mask``, ``pixel_values``).
        target_fn: batch → targets (or ``None``); default the second item of a tuple/list, or the dict key
            ``"y"``, ``"target"``, ``"targets"``, ``"label"`` or ``"labels"``.
        output_fn: model output → the tensor measured (e.g. ``lambda out: out["logits"]``).
        loss_fn: loss for flatness, ``(output, target) -> scalar``; or ``"cross_entropy"`` / ``"mse"``; default
            cross-entropy for integer targets and mean squared error otherwise.
        params: names of the measured parameters; default every parameter with ``requires_grad``.
        engine: engine of the batch functional dimension (passed to
            :func:`~lightning_geomdim.batch_functional_dimension`): "auto" (default) is the exact engine
            wherever it applies (piecewise-linear networks), else a floating-point one, whose rank is logged as
            ``numerical_rank`` only.
        spectrum: also log the floating-point spectrum beside the exact dimension (``numerical_rank`` with its
            tolerance and the engine's ``resolution``, gap, stable and effective rank, singular-value histogram).
            On by default so that the two numbers can be compared on the same chart; it costs a float Gram and
            its eigendecomposition per probe (about as much as the exact dimension again, more on large probes):
            ``spectrum=False`` halves the cost of the dimension measure.
        distributed_gram: under DDP, divide the Gram engine's accumulation among the processes and all-reduce
            it (``distributed=True`` of :func:`~lightning_geomdim.batch_functional_dimension`): each process
            then holds the whole Gram with 1/W of the work. Off by default, so that measuring makes no
            collective call. Safe because every process measures the same probe with the same weights and the
            same (agreed) memory budget, so all take the same path; values equal a single process to the Gram's
            resolution rather than bit for bit (the summation order differs).
        dtype: computation dtype, ``"float64"`` (default) or ``"float32"``.
        rtol: relative tolerance of the numerical rank; default the engine's resolution (see
            :mod:`lightning_geomdim.core.rank`). No effect on the exact dimension.
        max_memory_bytes: memory budget of a measure, in bytes; default half the available memory (see
            :mod:`lightning_geomdim.core.memory`). A measure that would exceed it is refused before allocating, with
            the numbers and the remedies in the warning, and logged as NaN.
        flatness_probe: probe used for flatness (needs targets); default ``"train"`` if it exists, else the
            first probe with targets.
        flatness_top_k: number of top Hessian eigenvalues.
        flatness_trace_samples: Hessian-vector products spent on the trace estimate.
        flatness_flat_dimension: log ``geometry/flatness/flat_dimension`` (P − the batch functional dimension of
            the flatness probe: reused when the dimension was measured at the same step, else computed with the
            same settings). ``False`` skips it, and with it the flatness measure's dependence on the dimension.
        alignment_probe: probe used for the activity statistics of alignment; default ``"train"`` if it
            exists, else the first probe.
        alignment_threshold: cosine above which two neurons are in the same direction cluster.
        tensorboard_extras: write the TensorBoard extras when a logger is a ``TensorBoardLogger``.
        seed: seed of the probes' private generators.
        on_error: ``"warn"`` (a failing measure emits a warning, logs NaN, training continues) or ``"raise"``.

    Raises:
        MisconfigurationException: invalid arguments (at construction); no logger, an unsupported strategy,
            an unknown ``module``, a LightningModule without ``forward`` and no ``module`` (at setup);
            a probe that cannot be built, ``measures`` naming flatness without any probe with targets (at train
            start).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_geomdim import GeometryMonitor
        >>> monitor = GeometryMonitor(every_n_epochs=1, probes=["train", "random"], probe_size=128)
        >>> trainer = Trainer(callbacks=[monitor], max_epochs=1)
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        log_spaced: int | None = None,
        at_start: bool = True,
        at_epochs: Sequence[int] | None = None,
        max_overhead: float | Literal["auto"] | None = "auto",
        schedules: Mapping[str, Mapping[str, Any]] | None = None,
        probes: Sequence[str | Mapping[str, Any]] | None = None,
        probe_size: int = 64,
        measures: Sequence[str] | None = None,
        module: str | None = None,
        input_fn: Callable[[Any], Any] | None = None,
        target_fn: Callable[[Any], Any] | None = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | str | None = None,
        params: Sequence[str] | None = None,
        engine: str = "auto",
        spectrum: bool = True,
        distributed_gram: bool = False,
        dtype: str | torch.dtype = "float64",
        rtol: float | None = None,
        max_memory_bytes: int | None = None,
        flatness_probe: str | None = None,
        flatness_top_k: int = 1,
        flatness_trace_samples: int = 99,
        flatness_flat_dimension: bool = True,
        alignment_probe: str | None = None,
        alignment_threshold: float = 0.99,
        tensorboard_extras: bool = True,
        seed: int = 0,
        on_error: Literal["warn", "raise"] = "warn",
    ) -> None:
        self._default_measures = measures is None
        if measures is None:
            measures = MEASURES
        if isinstance(measures, str):
            measures = [measures]
        unknown = sorted(set(measures) - set(MEASURES))
        if unknown or not measures:
            raise MisconfigurationException(f"measures={list(measures)} is invalid: choose among {MEASURES}")
        self.measures = tuple(dict.fromkeys(measures))
        rule_given = any(v is not None for v in (every_n_steps, every_n_epochs, log_spaced, at_epochs))
        if not rule_given:
            every_n_epochs = 1  # the default schedule: every epoch
        base = Schedule(every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, log_spaced=log_spaced,
                        at_start=at_start, at_epochs=at_epochs)
        schedules = dict(schedules or {})
        stray = sorted(set(schedules) - set(self.measures))
        if stray:
            raise MisconfigurationException(
                f"schedules has entries for {stray}, which are not measured: use keys among {list(self.measures)}"
            )
        self._clock = MeasurementClock({m: Schedule.from_config(schedules.get(m, {}), base) for m in self.measures})
        if max_overhead == "auto":  # the budget governs the default schedule; a schedule the user wrote runs as written
            max_overhead = None if rule_given or schedules else DEFAULT_MAX_OVERHEAD
        self._time = OverheadBudget(max_overhead, measures=self.measures)
        if isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size < 1:
            raise MisconfigurationException(f"probe_size={probe_size!r} must be a positive integer")
        self._default_probes = probes is None
        self._specs = parse_probes(["train", "val", "random"] if probes is None else probes, probe_size)
        names = [s.name for s in self._specs]
        for arg, value in (("flatness_probe", flatness_probe), ("alignment_probe", alignment_probe)):
            if value is not None and value not in names:
                raise MisconfigurationException(f"{arg}={value!r} is not one of the probes {names}")
        if engine not in ENGINES:
            raise MisconfigurationException(f"engine={engine!r} is invalid: choose one of {ENGINES}")
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise MisconfigurationException(f"dtype={dtype!r} is invalid: choose one of {list(DTYPES)}")
            dtype = DTYPES[dtype]
        if dtype not in DTYPES.values():
            raise MisconfigurationException(f"dtype={dtype} is invalid: use torch.float64 or torch.float32")
        if isinstance(loss_fn, str) and loss_fn not in LOSSES:
            raise MisconfigurationException(f"loss_fn={loss_fn!r} is invalid: pass a callable or one of {LOSSES}")
        if on_error not in ("warn", "raise"):
            raise MisconfigurationException(f"on_error={on_error!r} is invalid: choose 'warn' or 'raise'")
        for arg, value in (("flatness_top_k", flatness_top_k), ("flatness_trace_samples", flatness_trace_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MisconfigurationException(f"{arg}={value!r} must be a positive integer")
        if not -1.0 <= float(alignment_threshold) < 1.0:
            raise MisconfigurationException(
                f"alignment_threshold={alignment_threshold!r} must be in [-1, 1): the cosine above which two neurons "
                "share a direction cluster, e.g. 0.99"
            )

        self.module = module
        self.input_fn = input_fn or default_input_fn
        self.target_fn = target_fn or default_target_fn
        self.output_fn = output_fn
        self.loss_fn = loss_fn
        self.params = list(params) if params is not None else None
        self.engine = engine
        self.spectrum = bool(spectrum)
        self.distributed_gram = bool(distributed_gram)
        self.dtype = dtype
        self.rtol = rtol
        if max_memory_bytes is not None and (
            isinstance(max_memory_bytes, bool) or not isinstance(max_memory_bytes, int) or max_memory_bytes < 1
        ):
            raise MisconfigurationException(
                f"max_memory_bytes={max_memory_bytes!r} must be a positive integer (bytes), or None for half the "
                "available memory"
            )
        self.max_memory_bytes = max_memory_bytes
        self._budget = max_memory_bytes
        self.flatness_probe = flatness_probe
        self.flatness_top_k = flatness_top_k
        self.flatness_trace_samples = flatness_trace_samples
        self.flatness_flat_dimension = bool(flatness_flat_dimension)
        self.alignment_probe = alignment_probe
        self.alignment_threshold = float(alignment_threshold)
        self.tensorboard_extras = tensorboard_extras
        self.seed = int(seed)
        self.on_error = on_error

        self.probes: dict[str, Probe] = {}
        self._saved_probes: dict[str, dict[str, Any]] = {}
        self._known_keys: dict[tuple[str, str], set[str]] = {}
        self._failures: dict[tuple[str, str], Exception] = {}  # of the measurement in progress
        self._warned: set[Hashable] = set()  # causes already warned about (see _warn_once)
        # Lightning reads the state key several times per training step (profiler names): built once, from the
        # arguments (it stays the same when a measure is dropped at train start)
        self._state_key = self._generate_state_key(
            probes=[s.name for s in self._specs], measures=list(self.measures), module=self.module
        )

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._state_key

    def state_dict(self) -> dict[str, Any]:
        """Probe indices/seeds and the last measured step of each measure (saved in Lightning checkpoints)."""
        probes = {name: dict(p.state) for name, p in self.probes.items()} or dict(self._saved_probes)
        return {"version": 1, "seed": self.seed, "probes": probes, "clock": self._clock.state_dict(),
                "overhead": self._time.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_probes = {str(k): dict(v) for k, v in state_dict.get("probes", {}).items()}
        self.seed = int(state_dict.get("seed", self.seed))
        self._clock.load_state_dict(state_dict.get("clock", {}))
        self._time.load_state_dict(state_dict.get("overhead", {}))

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                "GeometryMonitor needs a logger, but the Trainer has none (logger=False): pass "
                "Trainer(logger=TensorBoardLogger(...)) or any other Lightning logger"
            )
        check_strategy(trainer.strategy)
        self._measured_module(pl_module)
        self._budget = self._agreed_budget(trainer) if trainer.world_size > 1 else self.max_memory_bytes

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._time.start()
        with self._time.measuring():
            self.probes = self._build_probes(trainer)
            if trainer.world_size > 1:
                # Every process built the same probes unless the dataset draws random augmentations from the
                # global RNG, which differs between processes: take rank 0's, so that all measure the same inputs.
                self.probes = trainer.strategy.broadcast(self.probes, src=0)
            self._check_measure_probes()
            if self.tensorboard_extras and trainer.is_global_zero:
                has_relu = any(isinstance(m, RELU_LIKE) for m in self._measured_module(pl_module).modules())
                for logger in tb.tensorboard_loggers(trainer.loggers):
                    tb.write_layout(logger, list(self.probes), self.measures, regions=has_relu)
        self._run(trainer, pl_module, "start")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._run(trainer, pl_module, "step")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._run(trainer, pl_module, "epoch")

    # ------------------------------------------------------------------ set-up helpers
    def _measured_module(self, pl_module: LightningModule) -> nn.Module:
        if self.module is None:
            if type(pl_module).forward is LightningModule.forward:
                raise MisconfigurationException(
                    f"{type(pl_module).__name__} does not define forward(), which GeometryMonitor measures by "
                    "default: pass GeometryMonitor(module='<name of the network submodule>'), e.g. module='net'"
                )
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError as err:
            names = [n for n, _ in pl_module.named_modules() if n][:8]
            raise MisconfigurationException(
                f"GeometryMonitor(module={self.module!r}): {type(pl_module).__name__} has no such submodule; "
                f"use a name from named_modules(), e.g. {names}"
            ) from err

    def _agreed_budget(self, trainer: Trainer) -> int:
        """The memory budget of every measure under several processes: the smallest over the processes.

        Each process measures the same thing, so with on_error="raise" they must refuse the same measures: a
        process that raised alone would leave the others waiting in their next collective (NCCL: until its
        timeout). The default, half the available memory, is split among the processes of a node that share the
        CPU memory (accelerator="cpu"). Called once, in ``setup``, where every process takes part.
        """
        device = trainer.strategy.root_device
        budget = memory_budget(device, self.max_memory_bytes)
        default = self.max_memory_bytes is None and not os.environ.get("GEOMDIM_MAX_MEMORY_BYTES")
        if default and device.type == "cpu":
            budget //= max(1, trainer.num_devices)
        agreed = trainer.strategy.reduce(torch.tensor(budget, dtype=torch.int64, device=device), reduce_op="min")
        return int(agreed)

    def _build_probes(self, trainer: Trainer) -> dict[str, Probe]:
        probes: dict[str, Probe] = {}
        template: Any = None
        specs = sorted(self._specs, key=lambda s: s.source == "random")  # random probes imitate data probes
        for spec in specs:
            saved = self._saved_probes.get(spec.name)
            if saved is not None and saved.get("source") != spec.source:
                saved = None
            if spec.source in ("train", "val"):
                loader = self._dataloader(trainer, spec)
                if loader is None:
                    continue
                probe = dataset_probe(spec, loader, self.input_fn, self.target_fn, self.seed, saved)
                template = probe.x if template is None else template
            elif spec.source == "random":
                if template is None and spec.shape is None and saved is None:
                    loader = first_dataloader(trainer.train_dataloader)
                    template = input_template(loader, self.input_fn) if loader is not None else None
                try:
                    probe = random_probe(spec, template, self.seed, saved)
                except MisconfigurationException as err:
                    if not self._default_probes:
                        raise
                    # token ids, tuple/dict inputs: the default probes include "random" only where it makes sense
                    rank_zero_warn(f"GeometryMonitor: the default random probe is left out: {err}")
                    continue
            else:
                probe = tensor_probe(spec)
                template = probe.x if template is None else template
            probes[spec.name] = probe
        return {s.name: probes[s.name] for s in self._specs if s.name in probes}

    def _dataloader(self, trainer: Trainer, spec: ProbeSpec) -> Any:
        if spec.source == "train":
            loaders = trainer.train_dataloader
        else:
            if trainer.val_dataloaders is None and trainer.enable_validation:
                # Lightning loads the val dataloaders lazily (at the sanity check or the first validation);
                # loading them now is what the sanity check does. Nothing is iterated.
                with isolated_rng():
                    trainer.fit_loop.epoch_loop.val_loop.setup_data()
            loaders = trainer.val_dataloaders
        loader = first_dataloader(loaders, spec.dataloader_idx)
        if loader is None:
            if spec.source == "val" and self._default_probes:
                return None  # the default probes include "val" only when there is validation data
            raise MisconfigurationException(
                f"probe {spec.name!r} needs a {spec.source} dataloader (index {spec.dataloader_idx}), but the "
                f"trainer has none (validation needs val data, a validation_step and limit_val_batches > 0): "
                f"provide {spec.source} data, or remove the probe"
            )
        return loader

    def _check_measure_probes(self) -> None:
        if "flatness" in self.measures:
            probe = self._flatness_probe()
            if probe is None and self._default_measures:  # only what the user asked for explicitly may be fatal
                rank_zero_warn(
                    "GeometryMonitor: flatness needs targets, but no probe has any (unlabelled data, or batches "
                    "that target_fn does not understand): measuring dimension and alignment only. Pass "
                    "target_fn=... (and loss_fn=...) to measure flatness"
                )
                self.measures = tuple(m for m in self.measures if m != "flatness")
                self._clock.schedules.pop("flatness", None)
                self._time.measures = self.measures
            elif probe is None:
                raise MisconfigurationException(
                    "flatness needs a probe with targets, but none has any: return targets from target_fn, add "
                    "a probe with targets, or remove 'flatness' from measures"
                )

    def _flatness_probe(self) -> Probe | None:
        if self.flatness_probe is not None:
            probe = self.probes.get(self.flatness_probe)
            if probe is not None and probe.y is None:
                raise MisconfigurationException(
                    f"flatness_probe={self.flatness_probe!r} has no targets: pick a probe with targets"
                )
            return probe
        if "train" in self.probes and self.probes["train"].y is not None:
            return self.probes["train"]
        return next((p for p in self.probes.values() if p.y is not None), None)

    def _alignment_probe(self) -> Probe | None:
        if self.alignment_probe is not None:
            return self.probes.get(self.alignment_probe)
        return self.probes.get("train") or next(iter(self.probes.values()), None)

    # ------------------------------------------------------------------ measuring
    def _run(self, trainer: Trainer, pl_module: LightningModule, event: Event) -> None:
        step = trainer.global_step
        due = self._clock.due(event, step, trainer.current_epoch)
        if not due or not self.probes:
            return
        due = self._within_overhead(trainer, due, step)
        if not due:
            return
        self._clock.mark(due, step)
        self._failures = {}
        module = self._measured_module(pl_module)
        metrics: dict[str, float] = {}
        extras: dict[str, Any] = {"spectra": {}, "cosines": {}}
        with observer_guard(pl_module):
            dimensions: dict[str, DimensionResult] = {}
            if "dimension" in due:
                with self._time.measuring("dimension"):
                    for name, probe in self.probes.items():
                        metrics.update(self._attempt(
                            "dimension", name, lambda p=probe: self._dimension(trainer, module, p, dimensions)
                        ))
                        if name in dimensions and dimensions[name].spectrum is not None:
                            extras["spectra"][name] = dimensions[name].spectrum.singular_values
                        metrics.update(self._attempt(
                            "linear_regions", name, lambda p=probe: self._regions(trainer, module, p)
                        ))
            if "flatness" in due:
                probe = self._flatness_probe()
                with self._time.measuring("flatness"):
                    metrics.update(self._attempt(
                        "flatness", "flatness", lambda: self._flatness(trainer, module, probe, dimensions)
                    ))
            if "alignment" in due:
                probe = self._alignment_probe()
                with self._time.measuring("alignment"):
                    metrics.update(self._attempt(
                        "alignment", "alignment", lambda: self._alignment(trainer, module, probe, extras)
                    ))
        with self._time.measuring():
            self._log(trainer, metrics, extras, step)
        self._failures = {}  # their tracebacks hold the measurement's tensors (Grams, factors) alive

    def _within_overhead(self, trainer: Trainer, due: list[str], step: int) -> list[str]:
        """The measures of ``due`` that fit in the time budget (rank 0's choice under DDP); warn once on a skip."""
        taken = self._time.select(due)
        if trainer.world_size > 1:
            # every process reaches this with the same ``due``, whatever its own max_overhead: no process can be
            # left alone in the collective
            taken = trainer.strategy.broadcast(taken, src=0)
        skipped = [m for m in due if m not in taken]
        if skipped and "overhead" not in self._warned:
            costs = ", ".join(f"{m} took {self._time.cost_s.get(m, math.nan):.2f} s" for m in skipped)
            self._warn_once(
                "overhead",
                f"GeometryMonitor: skipped {skipped} at step {step} to stay within max_overhead="
                f"{self._time.max_overhead} of the training's wall time (measuring so far: "
                f"{self._time.measuring_s:.1f} s against {self._time.other_s:.1f} s of the rest; last time {costs}). "
                "Points are taken as the budget allows from now on (no further warning); pass max_overhead=None "
                "to take every scheduled point, a larger fraction, or a sparser schedule / smaller probes"
            )
        return taken

    def _attempt(self, measure: str, probe: str, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
        """Run one measure; on failure warn and return NaN for its keys, or raise when on_error="raise"."""
        known = self._known_keys.setdefault((measure, probe), set())
        try:
            values = fn()
        except NotApplicableError as err:
            # a property of the model: one warning, whatever the probe
            self._warn_once(("not applicable", measure),
                            f"GeometryMonitor: {measure} is not applicable, so it is not logged: {err}")
            return {}
        except Exception as err:
            self._failures[(measure, probe)] = err
            where = measure if measure == probe else f"{measure} on probe {probe!r}"
            if self.on_error == "raise":
                raise GeometryError(f"GeometryMonitor: {where} failed: {type(err).__name__}: {err}") from err
            self._warn_once(
                ("failed", measure, probe, type(err).__name__),
                f"GeometryMonitor: {where} failed and is logged as NaN ({type(err).__name__}: {err}). Training "
                "continues (later failures of this kind are logged as NaN without a warning); pass "
                "on_error='raise' to stop on such errors",
                category=RuntimeWarning,
            )
            keys = known or {_primary_key(measure, probe)}
            return dict.fromkeys(sorted(keys), math.nan)
        known.update(values)
        return values

    def _warn_once(self, cause: Hashable, message: str, category: type[Warning] = UserWarning) -> None:
        """Warn about ``cause`` the first time only: one warning per cause, not one per measured point."""
        if cause not in self._warned:
            self._warned.add(cause)
            rank_zero_warn(message, category=category)

    def _on_device(self, module: nn.Module, probe: Probe) -> tuple[Any, Any]:
        """The whole probe (x, y) on the module's device.

        Every process holds the same probe and, under DDP, the same weights, so each measures the whole probe by
        itself: no collective call (nothing to deadlock on if the processes' measurements diverge), and the samples
        keep their order, so the values equal a single-process run's bit for bit.
        """
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        return _to(probe.x, device), _to(probe.y, device)

    def _dimension(
        self, trainer: Trainer, module: nn.Module, probe: Probe, out: dict[str, DimensionResult]
    ) -> dict[str, float]:
        spec = next(s for s in self._specs if s.name == probe.name)
        metric = BatchFunctionalDimension(
            module, output_fn=self.output_fn, params=self.params, dtype=self.dtype, max_memory_bytes=self._budget,
            **self._dimension_options(), spectrum=self.spectrum if spec.spectrum is None else spec.spectrum,
            logit_differences=spec.logit_differences, **NO_SYNC,
        )
        metric.update(self._on_device(module, probe)[0])
        metric.compute()
        res = metric.result
        metric.reset()
        out[probe.name] = res
        values = {
            "upper_bound": res.upper_bound, "num_outputs": res.num_outputs, "num_rows": res.num_rows,
            "num_params": res.num_params, "num_hidden_neurons": res.num_hidden_neurons,
        }
        if res.exact:  # only the exact engine's rank is the dimension; a float engine's is a numerical rank
            values["batch_functional_dimension"] = res.rank
        values["saturated"] = res.saturated
        if res.saturated and ("saturated", probe.name) not in self._warned:
            per_sample = res.num_rows / max(1, probe.num_samples)
            needed = math.ceil(res.parameter_bound / per_sample)
            rows = math.ceil(needed * per_sample)
            what = "the dimension" if res.exact else "the numerical rank"
            self._warn_once(
                ("saturated", probe.name),
                f"GeometryMonitor: on probe {probe.name!r} {what} equals its row bound {res.num_rows} "
                f"({probe.num_samples} samples × {per_sample:g} rows), below P − hidden neurons = "
                f"{res.parameter_bound}: the probe is too small for it to show anything else (logged as "
                f"geometry/{probe.name}/saturated = 1; the spectrum's stable / effective rank still vary). A probe of "
                f"at least {needed} samples lets the bound stop binding; its exact dimension needs a {rows:,} × "
                f"{rows:,} Gram matrix mod p ({format_bytes(8 * rows * rows)}) and about {rows:,}³/3 flops"
            )
        if res.spectrum is not None:
            sv = res.spectrum
            values.update({
                "numerical_rank": sv.numerical_rank, "numerical_rank_rtol": sv.rtol,
                "resolution": sv.resolution, "spectral_gap": sv.spectral_gap, "stable_rank": sv.stable_rank,
                "effective_rank": sv.effective_rank,
            })
        return {f"geometry/{probe.name}/{k}": float(v) for k, v in values.items()}

    def _dimension_options(self) -> dict[str, Any]:
        """The settings of the dimension, shared by the dimension measure and flatness' flat dimension."""
        return {"engine": self.engine, "rtol": self.rtol, "seed": self.seed, "distributed": self.distributed_gram}

    def _regions(self, trainer: Trainer, module: nn.Module, probe: Probe) -> dict[str, float]:
        metric = LinearRegions(module, output_fn=self.output_fn, dtype=self.dtype, **NO_SYNC)
        metric.update(self._on_device(module, probe)[0])
        value = float(metric.compute())
        metric.reset()
        return {f"geometry/{probe.name}/linear_regions": value}

    def _flatness(
        self, trainer: Trainer, module: nn.Module, probe: Probe, dimensions: Mapping[str, DimensionResult]
    ) -> dict[str, float]:
        failed = self._failures.get(("dimension", probe.name))
        if failed is not None and self.flatness_flat_dimension:
            # flatness would compute the same dimension again (for flat_dimension) and fail the same way
            raise GeometryError(
                f"skipped, because it needs the batch functional dimension of probe {probe.name!r}, which failed "
                f"at this step: {type(failed).__name__}: {failed}"
            ) from failed
        metric = Flatness(
            module, self.loss_fn, top_k=self.flatness_top_k, trace_samples=self.flatness_trace_samples,
            seed=self.seed, dtype=self.dtype, params=self.params, output_fn=self.output_fn,
            dimension=dimensions.get(probe.name) if self.flatness_flat_dimension else None,
            dimension_options=self._dimension_options(), flat_dimension=self.flatness_flat_dimension,
            max_memory_bytes=self._budget, **NO_SYNC,
        )
        metric.update(*self._on_device(module, probe))
        metric.compute()
        res = metric.result
        metric.reset()
        values = {k: float(getattr(res, k)) for k in FLATNESS_KEYS if getattr(res, k) is not None}
        values["num_params"] = float(res.num_params)
        if self.flatness_top_k > 1:
            values.update({f"eigenvalue_{i + 1}": float(v) for i, v in enumerate(res.top_eigenvalues.tolist())})
        return {f"geometry/flatness/{k}": v for k, v in values.items()}

    def _alignment(self, trainer: Trainer, module: nn.Module, probe: Probe | None, extras: dict) -> dict[str, float]:
        metric = NeuronAlignment(
            module, threshold=self.alignment_threshold, output_fn=self.output_fn, dtype=self.dtype,
            max_memory_bytes=self._budget, **NO_SYNC,
        )
        if probe is not None:
            metric.update(self._on_device(module, probe)[0])
        metric.compute()
        stats = metric.result
        metric.reset()
        values: dict[str, float] = {}
        for layer, s in stats.items():
            for key, value in s.scalars().items():
                values[f"geometry/alignment/{layer}/{key}"] = float(value)
            extras["cosines"][layer] = s.cosines
        values["geometry/alignment/num_clusters"] = float(sum(s.num_clusters for s in stats.values()))
        return values

    def _log(self, trainer: Trainer, metrics: dict[str, float], extras: dict[str, Any], step: int) -> None:
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        if self.tensorboard_extras and trainer.is_global_zero:
            for logger in tb.tensorboard_loggers(trainer.loggers):
                for name, sv in extras["spectra"].items():
                    tb.log_spectrum(logger, name, sv, step)
                for layer, cos in extras["cosines"].items():
                    tb.log_heatmap(logger, layer, cos, step)


def check_strategy(strategy: Strategy) -> None:
    """Refuse strategies whose processes do not each hold every parameter in full.

    Raises:
        MisconfigurationException: FSDP, DeepSpeed, model parallel, or any strategy that is neither a single
            device nor DDP; the message names the strategy and what to use instead.
    """
    sharded = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)  # DeepSpeedStrategy is a DDPStrategy
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(strategy, sharded):
        raise MisconfigurationException(
            f"GeometryMonitor does not support the {type(strategy).__name__} strategy yet: it measures full, "
            "unsharded parameters, which sharded strategies (FSDP, DeepSpeed, model parallel) do not hold. "
            "Use a single device or strategy='ddp', or remove the GeometryMonitor callback"
        )


def _primary_key(measure: str, probe: str) -> str:
    return {
        "dimension": f"geometry/{probe}/batch_functional_dimension",
        "linear_regions": f"geometry/{probe}/linear_regions",
        "flatness": "geometry/flatness/max_eigenvalue",
        "alignment": "geometry/alignment/num_clusters",
    }[measure]


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


@contextlib.contextmanager
def observer_guard(module: nn.Module) -> Iterator[None]:
    """Restore, whatever happens inside: every submodule's mode, every parameter's ``requires_grad`` and
    ``.grad`` (the same tensor objects), and the global RNGs (torch CPU/CUDA, ``random``, numpy)."""
    training = [(m, m.training) for m in module.modules()]
    params = [(p, p.requires_grad, p.grad) for p in module.parameters()]
    try:
        with isolated_rng():
            yield
    finally:
        for m, flag in training:
            m.training = flag
        for p, requires_grad, grad in params:
            p.requires_grad_(requires_grad)
            p.grad = grad
