"""The losses flatness differentiates: the user's, class cross-entropy over the last dimension, or mean squared
error, chosen from the targets' dtype by default."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]
LOSSES: tuple[str, ...] = ("cross_entropy", "mse")


def resolve_loss_fn(loss_fn: LossFn | str | None, y: Tensor) -> LossFn:
    """The loss used for flatness: the user's, ``"cross_entropy"``, ``"mse"``, or by default cross-entropy
    for integer targets and mean squared error (targets reshaped to the output's shape) otherwise."""
    if callable(loss_fn):
        return loss_fn
    if loss_fn is None:
        loss_fn = "mse" if y.is_floating_point() else "cross_entropy"
    if loss_fn == "cross_entropy":
        return class_cross_entropy
    if loss_fn == "mse":
        return _mse
    raise ValueError(f"loss_fn={loss_fn!r} is invalid: pass a callable (output, target) -> scalar, or one of {LOSSES}")


def class_cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy of class scores over the *last* dimension of ``output`` against integer ``target``.

    ``output`` (N, C) with ``target`` (N,), or a sequence model's (N, T, V) with token targets (N, T): token-level
    cross-entropy averaged over all N · T positions (``F.cross_entropy`` would read dimension 1 as the classes,
    silently when T = V). Otherwise, classes in dimension 1 as ``F.cross_entropy`` reads them (segmentation:
    (N, C, H, W) with (N, H, W)).

    Raises:
        ValueError: the shapes do not pair up (the message names them and the fix).
    """
    if output.ndim >= 2 and tuple(output.shape[:-1]) == tuple(target.shape):
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    if output.ndim == target.ndim + 1 and output.shape[:1] + output.shape[2:] == target.shape:
        return F.cross_entropy(output, target)
    raise ValueError(
        f"the default cross-entropy needs class scores (..., C) and integer targets (...) of the same leading "
        f"shape, got output {tuple(output.shape)} and targets {tuple(target.shape)}: pass loss_fn=... (e.g. "
        "lambda out, y: F.cross_entropy(out.flatten(0, -2), y.flatten())) or output_fn / target_fn that pair them"
    )


def _mse(output: Tensor, target: Tensor) -> Tensor:
    if target.numel() == output.numel():
        target = target.reshape(output.shape)
    return F.mse_loss(output, target.to(output.dtype))
