"""The layer kinds the measures recognise, listed once (exact module types; the engines say what they do with them).

Every measure that reads a model's structure (the Gram and exact engines, the rescaling symmetries, alignment, the
activation patterns) takes its lists from here, so that a layer supported by one is supported by all that can.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import nn

#: Parameterised layers whose Jacobian the Gram and exact engines write from per-layer factors.
FACTORED_AFFINE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
#: Normalisations whose affine parameters act per channel / per entry on the normalised input x̂ (y = γ ⊙ x̂ + β):
#: the float Gram engine writes their Jacobian from x̂ and the signal (:mod:`lightning_geomdim.core.factor_forms`).
NORMALIZATION: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
)
#: Batch normalisation: in eval mode a per-channel affine map, which folds into the affine layer before it.
BATCH_NORM: tuple[type[nn.Module], ...] = NORMALIZATION[:3]
#: Parameterised layers the exact engine re-runs over GF(p): affine maps (BatchNorm in eval mode with constant
#: statistics).
EXACT_LAYERS: tuple[type[nn.Module], ...] = (*FACTORED_AFFINE, *BATCH_NORM)
#: Recurrent layers the float Gram engine recomputes step by step (:mod:`lightning_geomdim.core.recurrent_form`).
RECURRENT: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU)
#: Every parameterised layer with a factor form in the float Gram engine (embeddings: one-hot inputs; LSTM, GRU: per
#: layer and direction over the time steps; multi-head self-attention: its in- and out-projections).
FACTOR_FORMS: tuple[type[nn.Module], ...] = (
    *FACTORED_AFFINE, *NORMALIZATION, nn.Embedding, *RECURRENT, nn.MultiheadAttention,
)
#: Affine layers whose output units (channels) carry a positive-rescaling symmetry when a ReLU follows.
AFFINE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Activations whose pattern 1[z > 0] defines the linear pieces, and which commute with positive scaling.
RELU_LIKE: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU)
#: Piecewise-linear activations: with the pattern fixed, y = s ⊙ z + c.
PIECEWISE_LINEAR: tuple[type[nn.Module], ...] = (*RELU_LIKE, nn.ReLU6, nn.Hardtanh)
#: Elementwise activations (any nonlinearity that acts entry by entry).
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    *PIECEWISE_LINEAR, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.Softplus, nn.Softsign, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink, nn.Identity,
)

#: Dropout of every kind: the identity in eval mode, where the measures run.
DROPOUT: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
#: Modules that only reshape (or pass through) their input.
RESHAPE: tuple[type[nn.Module], ...] = (nn.Identity, nn.Flatten, nn.Unflatten)

#: Max pooling: the number of pooled dimensions and the functional form (argmax patterns for the exact engine).
MAX_POOL: dict[type[nn.Module], tuple[int, Callable[..., Any]]] = {
    nn.MaxPool1d: (1, F.max_pool1d), nn.MaxPool2d: (2, F.max_pool2d), nn.MaxPool3d: (3, F.max_pool3d),
    nn.AdaptiveMaxPool1d: (1, F.adaptive_max_pool1d), nn.AdaptiveMaxPool2d: (2, F.adaptive_max_pool2d),
    nn.AdaptiveMaxPool3d: (3, F.adaptive_max_pool3d),
}
#: Average pooling: the number of pooled dimensions (a fixed linear map per plane).
AVG_POOL: dict[type[nn.Module], int] = {
    nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
}
#: Every pooling. It acts on the trailing 1–3 dimensions and torch requires one more leading dimension, so it never
#: mixes entries along dim 0 (the samples).
POOLING: tuple[type[nn.Module], ...] = (*MAX_POOL, *AVG_POOL, nn.LPPool1d, nn.LPPool2d)

#: Modules applied along one dimension of each sample (softmax heads, flattening).
ALONG_DIM: tuple[type[nn.Module], ...] = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Flatten, nn.Unflatten)
#: Parameter-free modules known to act on each sample separately.
PER_SAMPLE: tuple[type[nn.Module], ...] = tuple(dict.fromkeys((*ELEMENTWISE, *DROPOUT, *POOLING, *ALONG_DIM)))

#: Modules that commute with a positive per-unit (per-channel) scaling of their input (rescaling symmetries).
HOMOGENEOUS: tuple[type[nn.Module], ...] = (*RELU_LIKE, *RESHAPE[:2], *DROPOUT, *MAX_POOL, *AVG_POOL)
#: Modules between an affine layer and its ReLU that leave the pre-activation unchanged (in eval mode).
PASS_THROUGH: tuple[type[nn.Module], ...] = (nn.Identity, *DROPOUT)
