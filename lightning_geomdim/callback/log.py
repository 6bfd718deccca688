"""What the monitor logs: scalars through every logger of the trainer, at the count of training batches that
stepped the optimizers (the step Lightning logs ``self.log`` values at, so they line up with the loss; it is
``trainer.global_step`` with one optimizer), and with a ``TensorBoardLogger`` the extras of :mod:`.tensorboard`.

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
``geometry/<probe>/block/<block>/numerical_rank``             numerical rank of J's columns of one block of
                                                              parameters (``blocks``; the module tree's
                                                              blocks with at most as many parameters as rows)
``geometry/<probe>/block/<block>/bound``                       min(rows, the block's parameters)
``geometry/<probe>/block/<block>/batch_functional_dimension``  the rank of those columns, exact (exact
                                                              engine only; no tolerance)
``geometry/<probe>/linear_regions``                           distinct ReLU activation patterns on X
``geometry/flatness/max_eigenvalue``                          λ_max of the loss Hessian
``geometry/flatness/eigenvalue_<i>``                          i-th largest eigenvalue (``flatness_top_k``
                                                              > 1 only, i = 1 … top_k)
``geometry/flatness/trace``, ``.../trace_std_error``          tr H (Hutch++ or exact) and its error
``geometry/flatness/trace_samples``                           Hessian-vector products the trace used (fewer
                                                              than ``flatness_trace_samples`` when P is too
                                                              large for the memory budget; one warning; P
                                                              when H is formed, its trace exact)
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

The dimension keys are logged per probe; flatness on ``flatness_probe``, alignment on ``alignment_probe``. A
measure that fails logs NaN under its keys; a measure that does not apply to the model (regions and alignment
without ReLU modules) logs nothing (see :mod:`.error_policy`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

from lightning.pytorch import Trainer
from torch import nn

from lightning_geomdim.callback import tensorboard as tb
from lightning_geomdim.callback.measures import Measurement
from lightning_geomdim.core.layer_kinds import RELU_LIKE


def log_layout(trainer: Trainer, probes: list[str], measures: Iterable[str], module: nn.Module) -> None:
    """Write the custom-scalars layout to every TensorBoardLogger (rank 0 only); no regions chart without ReLUs."""
    if trainer.is_global_zero:
        has_relu = any(isinstance(m, RELU_LIKE) for m in module.modules())
        for logger in tb.tensorboard_loggers(trainer.loggers):
            tb.write_layout(logger, probes, measures, regions=has_relu)


def log_measurement(
    trainer: Trainer, measurement: Measurement, step: int, *, extras: bool,
    charge: Callable[[str | None], AbstractContextManager[None]] = lambda measure: contextlib.nullcontext(),
) -> None:
    """The scalars through every logger at ``step``; with ``extras``, the TensorBoard histograms and heatmaps.

    ``charge(measure)`` times each part as that measure's (the monitor's :meth:`.OverheadBudget.measuring`): the
    spectra are the dimension's, the heatmaps the alignment's, the scalars no measure's (``None``).
    """
    metrics = measurement.metrics()
    if metrics:
        with charge(None):
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
    if extras and trainer.is_global_zero:
        for logger in tb.tensorboard_loggers(trainer.loggers):
            if measurement.spectra:
                with charge("dimension"):
                    for name, sv in measurement.spectra.items():
                        tb.log_spectrum(logger, name, sv, step)
            if measurement.heatmaps:
                with charge("alignment"):
                    for layer, image in measurement.heatmaps.items():
                        tb.log_heatmap(logger, layer, image, step)
