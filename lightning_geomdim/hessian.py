"""The Hessian H = ∇²_θ L(θ) of a loss L(θ) = loss_fn(f_θ(X), y) as a linear operator on R^P.

Hessian-vector products use ``torch.func`` forward-over-reverse, ``jvp(grad(L), (θ,), (v,))``: one HVP costs
about one forward and one backward pass with forward-mode tangents (≈ 2–3 gradient evaluations) and never
forms H. Blocks of HVPs are vmapped (``chunk_size`` at a time) and fall back to a Python loop for models
``vmap`` cannot batch. A model using an op without a forward-mode derivative falls back (with a warning) to
reverse-over-reverse, ``vjp(grad(L), θ)(v)`` (equal to H v as H is symmetric).

Floating targets enter ``jvp`` as primals with a materialised zero tangent: left as constants, ``F.mse_loss``
(mean reduction) fails under forward-over-reverse with "ZeroTensors are immutable" (pytorch/pytorch#123996).

A dense H (P × P, built from P HVPs) is only formed for small P: ``flatness(method="auto")`` builds it when it
costs no more HVPs than the matrix-free path may spend (P ≤ Lanczos iterations + trace samples, 199 by
default) and never above :data:`DENSE_HESSIAN_MAX_PARAMS` = 2048 parameters (a 32 MiB float64 matrix whose
O(P³) eigendecomposition takes seconds). Vmapping the HVPs does not make them much cheaper per product on
realistic batches (measured: P = 583, N = 256, 583 vmapped HVPs took 5× longer than 110 sequential ones).

Memory of the HVPs (:func:`hvp_values`), fitted on float64 MLPs (P = 0.2M–1.1M, A = 0.08M–5.3M, c = 1–32,
CPU peak RSS; the formula over-estimates by 5–60 %): c products vmapped at once hold about
12 P + 3 A + c · (5 P + A) values besides their outputs, where A is :func:`activation_numel`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from lightning_geomdim.errors import NonFiniteError
from lightning_geomdim.functional_model import FunctionalModel, ProbeInputs
from lightning_geomdim.memory import check_memory
from lightning_geomdim.tracing import forward_hooks

LossFn = Callable[[Tensor, Any], Tensor]
"""``loss_fn(outputs, targets) -> scalar``, e.g. ``torch.nn.functional.cross_entropy`` (mean reduction)."""

#: Largest P for which ``method="auto"`` may form the dense Hessian (see the module docstring).
DENSE_HESSIAN_MAX_PARAMS = 2048


def use_dense_hessian(num_params: int, matrix_free_hvps: int) -> bool:
    """The "auto" rule: dense iff P ≤ min(``matrix_free_hvps``, :data:`DENSE_HESSIAN_MAX_PARAMS`)."""
    return num_params <= min(matrix_free_hvps, DENSE_HESSIAN_MAX_PARAMS)


def activation_numel(fm: FunctionalModel, inputs: ProbeInputs) -> int:
    """A, the values of one forward pass: input tensors plus every leaf module's tensor outputs.

    Runs :meth:`FunctionalModel.probe_outputs` once (so it also checks the probe). Functional ops inside a
    ``forward`` (``F.relu``, ``x + y``) are not seen: A is a lower bound for such models.
    """
    total = sum(t.numel() for t in (*inputs.args, *inputs.kwargs.values()) if isinstance(t, Tensor))

    def count(_name: str, _m: torch.nn.Module, _args: tuple[Any, ...], out: Any) -> None:
        nonlocal total
        outs = out if isinstance(out, (tuple, list)) else (out.values() if isinstance(out, dict) else (out,))
        total += sum(t.numel() for t in outs if isinstance(t, Tensor))

    with forward_hooks(fm.module, count):
        fm.probe_outputs(inputs)
    return int(total)


def hvp_values(num_params: int, activations: int, batch: int) -> int:
    """Values held by ``batch`` vmapped HVPs besides their outputs: 12 P + 3 A + batch · (5 P + A) (see above)."""
    return 12 * num_params + 3 * activations + batch * (5 * num_params + activations)


def convert_targets(y: Any, *, dtype: torch.dtype, device: torch.device) -> Any:
    """Copy tensor targets to ``device``; floating ones (regression targets) also to ``dtype``."""
    if not isinstance(y, torch.Tensor):
        return y
    target_dtype = dtype if y.is_floating_point() else y.dtype
    return y.detach().to(device=device, dtype=target_dtype, copy=True)


@dataclass
class HessianOperator:
    """H = ∇²_θ loss_fn(fm(θ, inputs), targets) at θ = ``fm.flat_params()``, as a symmetric P × P operator.

    Vectors are flat, shape (P,), in ``fm.dtype`` on ``fm.device``, ordered as :meth:`FunctionalModel.flat_params`.
    ``num_hvps`` counts the Hessian-vector products spent so far (the cost).

    Attributes:
        fm: the model as a function of its parameters (built inside :func:`measurement_mode`).
        loss_fn: ``(outputs, targets) -> scalar``.
        inputs: the probe batch X.
        targets: y, passed to ``loss_fn`` unchanged (convert it with :func:`convert_targets`).
        chunk_size: HVPs vmapped at once in :meth:`matmat` (bounds memory: chunk_size × one HVP's activations).
    """

    fm: FunctionalModel
    loss_fn: LossFn
    inputs: ProbeInputs
    targets: Any
    chunk_size: int | None = 32
    num_hvps: int = 0
    theta: Tensor = field(init=False)
    _vectorise: bool = field(init=False, default=True)
    _forward_mode: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        self.theta = self.fm.flat_params()

    @property
    def num_params(self) -> int:
        return int(self.theta.numel())

    def loss(self, flat: Tensor, targets: Any = None) -> Tensor:
        """The scalar loss at the flat parameter vector ``flat`` (shape (P,)); ``targets`` default ``self.targets``."""
        targets = self.targets if targets is None else targets
        return self.loss_fn(self.fm(self.fm.unflatten(flat), self.inputs), targets)

    def loss_value(self) -> float:
        """L(θ), checked to be a finite scalar.

        Raises:
            ValueError: ``loss_fn`` does not return a scalar.
            NonFiniteError: the loss is NaN or inf.
        """
        with torch.no_grad():
            value = self.loss(self.theta)
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"loss_fn must return a scalar tensor, got {shape}: use a reduction such as reduction='mean'"
            )
        if not torch.isfinite(value):
            raise NonFiniteError(f"the loss is {float(value)} at the current parameters: the curvature is undefined")
        return float(value)

    def _hvp(self, v: Tensor) -> Tensor:
        if self._forward_mode:
            try:
                return self._hvp_forward_over_reverse(v)
            except (NotImplementedError, RuntimeError) as err:
                if "forward ad" not in str(err).lower():
                    raise
                self._forward_mode = False
                warnings.warn(
                    f"{type(self.fm.module).__name__} uses an op without a forward-mode derivative ({str(err)[:200]}); "
                    "computing Hessian-vector products reverse-over-reverse instead",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _, pullback = vjp(grad(self.loss), self.theta)
        return pullback(v)[0]

    def _hvp_forward_over_reverse(self, v: Tensor) -> Tensor:
        y = self.targets
        if isinstance(y, Tensor) and y.is_floating_point():
            return jvp(grad(self.loss), (self.theta, y), (v, torch.zeros_like(y)))[1]
        return jvp(grad(self.loss), (self.theta,), (v,))[1]

    def matvec(self, v: Tensor) -> Tensor:
        """H v for one vector, shape (P,) → (P,). Cost: 1 HVP."""
        self.num_hvps += 1
        return self._hvp(v)

    def matmat(self, v: Tensor) -> Tensor:
        """H V for a block of column vectors, shape (P, n) → (P, n). Cost: n HVPs (vmapped in chunks)."""
        n = v.shape[1]
        self.num_hvps += n
        if self._vectorise:
            try:
                return vmap(self._hvp, in_dims=1, out_dims=1, chunk_size=self.chunk_size)(v)
            except RuntimeError as err:  # e.g. data-dependent control flow or ops without a batching rule
                self._vectorise = False
                warnings.warn(
                    f"vmap could not batch Hessian-vector products of {type(self.fm.module).__name__} "
                    f"({type(err).__name__}: {str(err)[:200]}); computing them one at a time (slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return torch.stack([self._hvp(v[:, i]) for i in range(n)], dim=1)

    def dense(self, *, budget: int) -> Tensor:
        """The explicit Hessian, shape (P, P), ``fm.dtype``, symmetrised. Cost: P HVPs.

        Raises:
            MemoryBudgetError: before allocating, when 3 · P² values exceed ``budget`` bytes (the identity,
                the vmapped chunks of H and their concatenation; the HVPs' own memory is checked by
                :func:`~lightning_geomdim.flatness.flatness`).
        """
        p = self.num_params
        itemsize = torch.empty((), dtype=self.fm.dtype).element_size()
        check_memory(
            3 * p * p * itemsize, budget, what=f"the dense {p} × {p} Hessian",
            remedies="use method='lanczos' (matrix-free) or a subset of parameters via params=[...]",
        )
        eye = torch.eye(p, dtype=self.fm.dtype, device=self.fm.device)
        h = self.matmat(eye)
        del eye
        return (h + h.T).div_(2)
