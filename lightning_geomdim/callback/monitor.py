"""GeometryMonitor: a Lightning callback that measures the geometry of the network on fixed probes while it trains.

This module holds the hooks; each concern lives beside it: argument checks (:mod:`.validation`), probes
(:mod:`.probes`, :mod:`.probe_set`), when to measure and the time budget (:mod:`.schedule`), one measurement
step per probe (:mod:`.measures`), the observer guarantee (:mod:`.observer`), failures (:mod:`.error_policy`),
what is logged (:mod:`.log`, :mod:`.tensorboard`) and several processes (:mod:`.distributed`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks.callback import Callback
from torch import Tensor
from typing_extensions import override

from lightning_geomdim.callback.distributed import agreed_memory_budget, check_strategy, from_rank_zero
from lightning_geomdim.callback.error_policy import ErrorPolicy
from lightning_geomdim.callback.log import log_layout, log_measurement
from lightning_geomdim.callback.measures import DefaultOutput, Measurement, MeasureSettings, measure_probes, plan
from lightning_geomdim.callback.observer import observing
from lightning_geomdim.callback.probe_set import alignment_probe, build_probes, can_measure_flatness, flatness_probe
from lightning_geomdim.callback.probes import Probe, default_input_fn, default_target_fn
from lightning_geomdim.callback.progress import training_progress
from lightning_geomdim.callback.schedule import Event
from lightning_geomdim.callback.tensorboard import tensorboard_loggers
from lightning_geomdim.callback.validation import (
    check_measures,
    check_probes,
    check_settings,
    check_trainer,
    measured_module,
    schedules_and_budget,
)
from lightning_geomdim.core.blocks import Blocks
from lightning_geomdim.core.flatness import DEFAULT_TRACE_SAMPLES

# Hooks Lightning calls at every batch that the monitor does not use. Lightning skips a callback's hook that is not
# callable (``_call_callback_hooks`` checks ``callable``, in every release this package supports), so the monitor
# sets these to ``None`` on itself: each dispatch costs a profiler context and a name per batch (≈ 0.6 % of a small
# model's training for the five of automatic optimisation). A subclass that overrides one keeps it.
UNUSED_BATCH_HOOKS = (
    "on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
    "on_before_zero_grad", "on_validation_batch_start", "on_validation_batch_end", "on_test_batch_start",
    "on_test_batch_end", "on_predict_batch_start", "on_predict_batch_end",
)


class GeometryMonitor(Callback):
    r"""Measure the local geometry of the network on fixed probe batches while it trains, and log it.

    Add it to any ``Trainer`` (the LightningModule needs no change): the values are logged through every logger at
    Lightning's logging step (the training batches that stepped the optimizers: ``trainer.global_step`` with one
    optimizer; :class:`~.schedule.MeasurementSchedule`), under the keys listed in
    :mod:`lightning_geomdim.callback.log` (the batch functional dimension and its bounds and spectrum per probe,
    flatness, alignment per layer); a ``TensorBoardLogger`` also gets a custom-scalars layout, singular-value
    histograms and cosine heatmaps. Probes are fixed for the run and saved in checkpoints with the schedule
    (:mod:`.probes`), so a resumed run measures the same probes at the same steps. The default schedule costs about
    5 % of the run's wall time; a schedule you write runs as written (:mod:`.schedule`). Any differentiable model is
    measured (linear regions and alignment need ``nn.ReLU`` / ``nn.LeakyReLU`` modules), in eval mode, as an
    observer: the trained weights are bit-identical with or without the monitor (:mod:`.observer`). A failing
    measure warns and logs NaN (:mod:`.error_policy`). Single device and DDP; sharded strategies are refused
    (:mod:`.distributed`). The per-batch hooks it does not use (:data:`UNUSED_BATCH_HOOKS`) are ``None`` on the
    instance, so that Lightning, which skips a hook that is not callable, does not dispatch them at every batch; code
    that calls a callback's hooks itself should skip them likewise.

    Args:
        every_n_steps: measure after every n-th optimizer step (``trainer.global_step``; a multiple the counter
            jumps over is measured at the next step). ``None`` to disable.
        every_n_epochs: at the end of every n-th training epoch; default 1 when none of ``every_n_steps``,
            ``log_spaced``, ``at_epochs`` is given, else ``None`` (disabled).
        log_spaced: also at log-spaced global steps, this many per decade (1, 2, 3, …, 10, 13, 16, … for 10).
        at_start: measure at global step 0, before training (not again when resuming); default ``True`` unless a
            time budget applies (the default schedule's, or a ``max_overhead`` you give), which cannot pay for a
            point before the run's length is known. Giving it writes a schedule: ``at_start=True`` alone measures at
            step 0 and every epoch without a budget; with ``max_overhead`` too, step 0 is skipped with a warning.
        at_epochs: also at the end of these epochs, counted from 1 (e.g. the paper's [40, 80, 280, 680]).
        max_overhead: the most time spent measuring, as a fraction of the rest of the run's wall time: a scheduled
            point is skipped (one warning) when its last cost would exceed the measure's equal share, and stopped
            past its allowance; a first point waits for the run's length and may take the measure's share of the
            whole run, at most 2 s more than the run has earned (:class:`~.overhead_budget.OverheadBudget`). ``None``:
            every point, any cost. ``"auto"`` (default): 0.05 on the default schedule (no point at step 0), ``None``
            on one you wrote.
        schedules: per-measure overrides of the five fields above, e.g. ``{"flatness": {"every_n_epochs": 5}}``.
        probes: ``"train"``, ``"val"``, ``"random"``, dicts (:class:`~.probe_spec.ProbeSpec`) or, from Python,
            ``{"name": ..., "x": tensor, "y": tensor}``; default ``["train", "val", "random"]`` ("val" left out
            without validation data, "random" for integer or tuple/dict inputs).
        probe_size: samples per probe unless a probe sets ``size``. Default 64, which keeps a measurement cheap (a
            64 K × 64 K Gram for K outputs; about 0.5 s for everything on the MNIST example), and fewer where the
            traced pass or a measure on 64 would not fit ``max_memory_bytes`` (per-token outputs of a transformer:
            one warning names the size kept); a size you give is kept, and a measure that does not fit is refused.
        measures: any of ``"dimension"`` (with linear regions), ``"flatness"``, ``"alignment"``; default all,
            flatness dropped with one warning when no probe has targets (an error when asked for).
        module: name of the submodule to measure (as in ``named_modules()``); default the LightningModule itself.
        input_fn: batch → model input (tensor, tuple of positional or dict of keyword inputs); default the batch
            if a tensor, its first item if a tuple/list, the dict key (or namedtuple field) ``x``/``input``/
            ``inputs``/``image``/``images``, else the dict without its target keys as keyword inputs.
        target_fn: batch → targets or ``None``; default the second item of a tuple/list, or the dict key (or
            namedtuple field) ``y``/``target``/``targets``/``label``/``labels``.
        output_fn: model output → the tensor measured (e.g. ``lambda out: out["logits"]``); default the output, or
            a dict's ``"logits"`` / only tensor, or a tuple's first item (one warning says which).
        loss_fn: loss of flatness, ``(output, target) -> scalar``, or ``"cross_entropy"`` / ``"mse"``; default
            cross-entropy for integer targets, else mean squared error.
        params: names of the measured parameters; default every parameter with ``requires_grad``.
        engine: of the batch functional dimension (:func:`~lightning_geomdim.batch_functional_dimension`): "auto"
            is exact wherever it applies, else a float engine (logged as ``numerical_rank`` only).
        spectrum: also log the float spectrum (``numerical_rank``, tolerance, ``resolution``, gap, stable and
            effective rank, histogram); ``False`` halves the cost of the dimension.
        blocks: with the spectrum, J's numerical rank per block of parameters (:mod:`~lightning_geomdim.core.blocks`),
            and with the exact engine each block's exact dimension (from the same draws).
        distributed_gram: under DDP, share the Gram engine's accumulation among the processes (one all-reduce);
            values then equal a single process to the Gram's resolution rather than bit for bit. A process that
            fails in the exact or the Gram engine (its memory budget, out of memory) tells the others at the next
            agreed point (:mod:`~lightning_geomdim.core.agreement`), and none measures that point (a warning on
            each); a stop (SIGTERM) there stops all. One that fails or is stopped earlier (the traced pass, the
            structure checks) or is killed leaves the others waiting until the process group's timeout (the
            default, ``False``, has no collective). A
            measure that uses it is not stopped at its time allowance (each process's clock would stop it at a
            different place): the budget still decides which points are taken.
        dtype: computation dtype, ``"float64"`` (default) or ``"float32"``.
        rtol: relative tolerance of the numerical rank; default the engine's resolution.
        max_memory_bytes: memory budget of a measure, in bytes; default half the available memory. A measure over
            it is refused before allocating (a warning with the numbers) and logged as NaN.
        flatness_probe: probe of flatness (with targets); default ``"train"``, else the first probe with targets.
        flatness_top_k: number of top Hessian eigenvalues.
        flatness_trace_samples: Hessian-vector products spent on the trace estimate.
        flatness_flat_dimension: log ``geometry/flatness/flat_dimension`` (P − the dimension of the flatness probe,
            reused from the same step or computed with the same settings); ``False`` skips it.
        alignment_probe: probe of alignment's activity statistics; default ``"train"``, else the first probe.
        alignment_threshold: cosine above which two neurons are in the same direction cluster.
        tensorboard_extras: write the TensorBoard extras when a logger is a ``TensorBoardLogger``.
        seed: seed of the probes' private generators.
        on_error: ``"warn"`` (warn, log NaN, train on) or ``"raise"``.

    Raises:
        MisconfigurationException: invalid arguments (at construction); no logger, an unsupported strategy, an
            unknown ``module``, no ``forward`` and no ``module`` (at setup); a probe that cannot be built,
            ``measures`` naming flatness without a probe with targets (at train start).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_geomdim import GeometryMonitor
        >>> monitor = GeometryMonitor(every_n_epochs=1, probes=["train", "random"], probe_size=128)
        >>> trainer = Trainer(callbacks=[monitor], max_epochs=1)
    """

    def __init__(
        self, every_n_steps: int | None = None, every_n_epochs: int | None = None, log_spaced: int | None = None,
        at_start: bool | None = None, at_epochs: Sequence[int] | None = None,
        max_overhead: float | Literal["auto"] | None = "auto",
        schedules: Mapping[str, Mapping[str, Any]] | None = None,
        probes: Sequence[str | Mapping[str, Any]] | None = None, probe_size: int | None = None,
        measures: Sequence[str] | None = None, module: str | None = None,
        input_fn: Callable[[Any], Any] | None = None, target_fn: Callable[[Any], Any] | None = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | str | None = None,
        params: Sequence[str] | None = None, engine: str = "auto", spectrum: bool = True, blocks: Blocks = "auto",
        distributed_gram: bool = False, dtype: str | torch.dtype = "float64", rtol: float | None = None,
        max_memory_bytes: int | None = None, flatness_probe: str | None = None, flatness_top_k: int = 1,
        flatness_trace_samples: int = DEFAULT_TRACE_SAMPLES, flatness_flat_dimension: bool = True,
        alignment_probe: str | None = None, alignment_threshold: float = 0.99, tensorboard_extras: bool = True,
        seed: int = 0, on_error: Literal["warn", "raise"] = "warn",
    ) -> None:
        self._default_measures, self._default_probes = measures is None, probes is None
        self.measures = check_measures(measures)
        self._schedule, self._time = schedules_and_budget(
            self.measures, schedules, max_overhead, every_n_steps=every_n_steps, every_n_epochs=every_n_epochs,
            log_spaced=log_spaced, at_start=at_start, at_epochs=at_epochs,
        )
        self._specs = check_probes(probes, probe_size, flatness_probe=flatness_probe, alignment_probe=alignment_probe)
        self.dtype = check_settings(
            engine=engine, dtype=dtype, loss_fn=loss_fn, on_error=on_error, flatness_top_k=flatness_top_k,
            flatness_trace_samples=flatness_trace_samples, alignment_threshold=alignment_threshold,
            max_memory_bytes=max_memory_bytes, blocks=blocks,
        )
        self.module, self.loss_fn, self.engine, self.rtol, self.blocks = module, loss_fn, engine, rtol, blocks
        self.output_fn = output_fn if output_fn is not None else DefaultOutput()
        self.input_fn, self.target_fn = input_fn or default_input_fn, target_fn or default_target_fn
        self.params, self.max_memory_bytes = (list(params) if params is not None else None), max_memory_bytes
        self.spectrum, self.distributed_gram = bool(spectrum), bool(distributed_gram)
        self.flatness_probe, self.flatness_top_k, self.flatness_trace_samples = (flatness_probe, flatness_top_k,
                                                                                flatness_trace_samples)
        self.flatness_flat_dimension = bool(flatness_flat_dimension)
        self.alignment_probe, self.alignment_threshold = alignment_probe, float(alignment_threshold)
        self.tensorboard_extras, self.seed, self.on_error = tensorboard_extras, int(seed), on_error
        self.probes: dict[str, Probe] = {}
        self._timer_base = 0.0  # measuring seconds at this fit's train start (see on_train_start)
        self._saved_probes: dict[str, dict[str, Any]] = {}
        self._errors = ErrorPolicy(on_error)
        for hook in UNUSED_BATCH_HOOKS:
            if getattr(type(self), hook) is getattr(Callback, hook):
                setattr(self, hook, None)
        # built once (Lightning reads it several times per step); unchanged when a measure is dropped at train start
        self._state_key = self._generate_state_key(
            probes=[s.name for s in self._specs], measures=list(self.measures), module=self.module
        )

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    @override
    def state_dict(self) -> dict[str, Any]:
        """Probe indices/seeds, the last measured step of each measure and the time account (in checkpoints)."""
        probes = {name: dict(p.state) for name, p in self.probes.items()} or dict(self._saved_probes)
        # "clock": the key of the measure schedule's state in checkpoints written before it was renamed
        return {"version": 1, "seed": self.seed, "probes": probes, "clock": self._schedule.state_dict(),
                "overhead": self._time.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_probes = {str(k): dict(v) for k, v in state_dict.get("probes", {}).items()}
        self.seed = int(state_dict.get("seed", self.seed))
        self._schedule.load_state_dict(state_dict.get("clock", {}))
        self._time.load_state_dict(state_dict.get("overhead", {}))

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            check_trainer(trainer)
            check_strategy(trainer.strategy)
            measured_module(pl_module, self.module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._time.start()
        with self._time.measuring():
            probes = build_probes(trainer, self._specs, input_fn=self.input_fn, target_fn=self.target_fn,
                                  seed=self.seed, saved=self._saved_probes, default_probes=self._default_probes)
            # every process built the same probes unless the dataset draws random augmentations from the global
            # RNG, which differs between processes: take rank 0's, so that all measure the same inputs
            self.probes = from_rank_zero(trainer, probes)
            if "flatness" in self.measures and not can_measure_flatness(
                self.probes, self.flatness_probe, self._default_measures
            ):
                self._drop("flatness")
            for probe, planned in plan(self.probes, self.measures, flatness_probe(self.probes, self.flatness_probe),
                                       alignment_probe(self.probes, self.alignment_probe)):
                if probe is not None:
                    probe.planned = tuple(planned)
            if self.tensorboard_extras:
                log_layout(trainer, list(self.probes), self.measures, measured_module(pl_module, self.module))
        # Lightning adds its Timer (max_time) after the user's callbacks: its time holds what is measured from here on
        self._timer_base = self._time.measuring_s
        self._measure(trainer, pl_module, "start")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._measure(trainer, pl_module, "step", batch_idx)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._measure(trainer, pl_module, "epoch")

    def _drop(self, measure: str) -> None:
        """Stop scheduling ``measure`` for this run (it cannot be measured on this model) and share its budget."""
        self.measures = tuple(m for m in self.measures if m != measure)
        self._schedule.schedules.pop(measure, None)
        self._time.share_among(self.measures)

    def _due(self, trainer: Trainer, pl_module: LightningModule, event: Event, batch: int | None) -> list[str]:
        """The measures the schedules ask for now and the time budget allows (rank 0's choice); warns of skips."""
        step = trainer.global_step
        scheduled = self._schedule.due(event, step, trainer.current_epoch, not pl_module.automatic_optimization)
        if scheduled and trainer.world_size == 1 and self._time.quiet():  # (each process would decide by its clock)
            return []
        if scheduled or not self._time.anchored:  # the pace of the run, from the first batch on
            self._time.observe(training_progress(trainer, event, batch, max_overhead=self._time.max_overhead,
                                                 measuring_s=self._time.measuring_s - self._timer_base))
        if event == "start":  # step 0 is scheduled by the budget's presence, which may differ between processes
            scheduled = from_rank_zero(trainer, scheduled)
        if not scheduled or not self.probes:
            return []
        # every process reaches this with the same schedule, whatever its own max_overhead: none is left alone
        due = from_rank_zero(trainer, self._time.select(scheduled))
        # a point waiting for the run's length comes later, except one at step 0, which never comes back
        waiting = [] if event == "start" else self._time.waiting(scheduled)
        skipped = [m for m in scheduled if m not in due and m not in waiting]
        if skipped:
            logged = self._schedule.stepped or 0  # the step of the charts (global_step counts every optimizer)
            self._errors.warn_once("overhead", lambda: self._time.skip_warning(skipped, logged))
        return due

    def _measure(self, trainer: Trainer, pl_module: LightningModule, event: Event, batch: int | None = None) -> None:
        """Take the measures the schedules and the time budget allow now, probe by probe, and log them."""
        step = trainer.global_step
        with self._time.measuring():  # the hook's own time, at every batch, is the monitor's too
            due = self._due(trainer, pl_module, event, batch)
        if not due:
            return
        self._schedule.mark(due, step)
        module, out = measured_module(pl_module, self.module), Measurement()
        # agreed at each measurement, when the model, optimizer and batches are on the device (not at setup)
        heatmaps = self.tensorboard_extras and trainer.is_global_zero and bool(tensorboard_loggers(trainer.loggers))
        settings = MeasureSettings(
            max_memory_bytes=agreed_memory_budget(trainer, self.max_memory_bytes), heatmaps=heatmaps,
            **{f.name: getattr(self, f.name) for f in fields(MeasureSettings)
               if f.name not in ("max_memory_bytes", "heatmaps")})
        steps = plan(self.probes, due, flatness_probe(self.probes, self.flatness_probe),
                     alignment_probe(self.probes, self.alignment_probe))
        try:
            with observing(pl_module):  # stops at the next chunk of work on SIGTERM, keeping what was measured
                measure_probes(module, steps, settings, self._errors, self._time, out, lambda: trainer.received_sigterm)
            if "alignment" in self._errors.not_applicable and "alignment" in self.measures:
                # no ReLU modules: its share of the budget goes to the others
                self._drop("alignment")
            log_measurement(trainer, out, self._schedule.stepped or 0, extras=self.tensorboard_extras,
                            charge=self._time.measuring)
        finally:
            self._errors.clear()  # their tracebacks hold the measurement's tensors (Grams, factors) alive
