"""The Hessian H = ∇²_θ L(θ) of a loss L(θ) = loss_fn(f_θ(X), y) as a linear operator on R^P.

**Products (reverse-over-reverse on a cached gradient graph).** The first product builds g = ∇L(θ) with
``torch.autograd.grad(L, θ, create_graph=True)`` and keeps its graph; every product H v is then one backward
pass through that graph, ``autograd.grad(g, θ, v, retain_graph=True)`` (H v = ∇(gᵀv), H symmetric), both taken at
θ's per-tensor views (through θ itself each view's slice backward fills a zero (P,) tensor: on 8 ResNet-18 images
a product took 2.7 s, at the views 0.8 s). It never
forms H and, unlike ``torch.func`` forward-over-reverse ``jvp(grad(L), θ, v)`` (the formulation used before),
does not redo the forward and first backward per product. Measured by ``benchmarks/bench_flatness.py`` (float64,
1 thread, median of 20 products, round-robin, two runs; see benchmarks/README.md), per product: the paper's MLP,
N = 600, 3.0–3.5 ms against 8.2–9.4 ms for a plain double backward that rebuilds the graph, 13–15 ms
forward-over-reverse and 15–21 ms for curvlinops' ``HessianLinearOperator``; a BatchNorm MLP 2.1–3.3 / 4.4–8.5 /
9.4–16 / 11–21 ms; a CNN (N = 128) 40–61 / 65–94 / 65–95 / 66–100 ms. A loss whose gradient does not depend on
θ has H = 0 (zeros are returned).

**Blocks.** :meth:`HessianOperator.matmat` computes a block of products ``chunk_size`` at a time, a chunk as one
batched backward (``is_grads_batched``, vmapped). The default :data:`DEFAULT_CHUNK_SIZE` = 1 computes them one
at a time. Batching 8 at a time, per product (same benchmark, blocks of 33 as in the trace): 32–38 % *slower*
on the CNN, within ±7 % on the paper's MLP and the BatchNorm MLP. An earlier ad-hoc measurement
at N = 256 (not in the benchmark) found 15–30 % slower on a CNN and an MSE MLP, 10–15 % faster on the paper's
MLP and a BatchNorm MLP, and 5× faster only on a tiny MLP whose products cost 0.3 ms each; chunks of 16 or 32
were no better than 8 except on the tiny MLP. A timing calibration could pick per model, but
timings are noisy and batched and looped products differ in the last bits, so the same generator would no
longer give the same numbers; one at a time is deterministic and never far behind. Pass ``chunk_size`` > 1
for tiny models or accelerators, where batching pays.

**Fallback.** A model using an op without a double-backward derivative falls back (with a warning) to
``torch.func`` forward-over-reverse, ``jvp(grad(L), (θ,), (v,))``, vmapped ``chunk_size`` at a time (a Python
loop for models ``vmap`` cannot batch). Floating targets enter ``jvp`` as primals with a materialised zero
tangent: left as constants, ``F.mse_loss`` (mean reduction) fails under forward-over-reverse with "ZeroTensors
are immutable" (pytorch/pytorch#123996).

A dense H (P × P, built from P HVPs) is only formed for small P: ``flatness(method="auto")`` builds it when it
costs no more HVPs than the matrix-free path may spend (P ≤ Lanczos iterations + trace samples, 399 by
default) and never above :data:`DENSE_HESSIAN_MAX_PARAMS` = 2048 parameters (a 32 MiB float64 matrix whose
O(P³) eigendecomposition takes seconds).

Memory of the HVPs (:func:`hvp_values`), measured as CPU peak RSS on float64 models (MLPs with P = 0.03M–0.3M
and A = 0.4M–12.6M, a BatchNorm MLP, a CNN with A = 17M; c = 1 and 8): the cached graph plus one product
holds 0.4–2.4 A + a few P values, each further batched product 0.24–2.0 A; forward-over-reverse 2.5–3.8 A
for one product and 1.0–2.4 A per further vmapped one. The bound used, valid for both formulations (it
over-estimates the default one 1.8–3.6×, 10× when the input dominates A, and forward-over-reverse 1.15–2.1×):
c products at once hold 14 P + 4 A + (c − 1)(10 P + 3 A) values
besides their outputs, where A is :attr:`ProbeTrace.activation_numel`; the gradient graph stays allocated while the
operator lives (:meth:`HessianOperator.release` frees it).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from lightning_geomdim.core import backward
from lightning_geomdim.core.errors import NonFiniteError, Remedy
from lightning_geomdim.core.functional_model import FunctionalModel
from lightning_geomdim.core.interrupt import checkpoint
from lightning_geomdim.core.memory import check_memory, is_out_of_memory
from lightning_geomdim.core.probe_trace import ProbeTrace

LossFn = Callable[[Tensor, Any], Tensor]
"""``loss_fn(outputs, targets) -> scalar``, e.g. ``torch.nn.functional.cross_entropy`` (mean reduction)."""

#: Default of ``chunk_size``: HVPs computed one at a time (see the module docstring).
DEFAULT_CHUNK_SIZE = 1

#: Largest P for which ``method="auto"`` may form the dense Hessian (see the module docstring).
DENSE_HESSIAN_MAX_PARAMS = 2048


def use_dense_hessian(num_params: int, matrix_free_hvps: int) -> bool:
    """The "auto" rule: dense iff P ≤ min(``matrix_free_hvps``, :data:`DENSE_HESSIAN_MAX_PARAMS`)."""
    return num_params <= min(matrix_free_hvps, DENSE_HESSIAN_MAX_PARAMS)


def hvp_values(num_params: int, activations: int, batch: int) -> int:
    """Values held by HVPs besides their outputs, ``batch`` at once: 14 P + 4 A + (batch − 1) · (10 P + 3 A).

    An upper bound for both formulations (see the module docstring), including the cached gradient graph.
    """
    return 14 * num_params + 4 * activations + (max(1, batch) - 1) * (10 * num_params + 3 * activations)


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
        trace: the traced pass of the model on the probe batch X (recorded inside :func:`measurement_mode`); the
            gradient graph is built on its output, so the products cost no further forward pass.
        loss_fn: ``(outputs, targets) -> scalar``.
        targets: y, passed to ``loss_fn`` unchanged (convert it with :func:`convert_targets`).
        chunk_size: HVPs computed at once in :meth:`matmat` as one batched backward (``None``: a whole block);
            default 1, one at a time (module docstring).
    """

    trace: ProbeTrace
    loss_fn: LossFn
    targets: Any
    chunk_size: int | None = DEFAULT_CHUNK_SIZE
    num_hvps: int = 0
    theta: Tensor = field(init=False)
    #: "reverse" (cached gradient graph, the default) or "forward" (forward-over-reverse, the fallback)
    mode: str = field(init=False, default="reverse")
    _graph: tuple[list[Tensor], Tensor | None] | None = field(init=False, default=None, repr=False)
    _vectorise: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        self.theta = self.trace.theta

    @property
    def fm(self) -> FunctionalModel:
        return self.trace.fm

    @property
    def num_params(self) -> int:
        return int(self.theta.numel())

    def loss(self, flat: Tensor, targets: Any = None) -> Tensor:
        """The scalar loss at the flat parameter vector ``flat`` (shape (P,)); ``targets`` default ``self.targets``."""
        targets = self.targets if targets is None else targets
        return self.loss_fn(self.fm(self.fm.unflatten(flat), self.trace.inputs), targets)

    def loss_value(self) -> float:
        """L(θ), checked to be a finite scalar.

        Raises:
            ValueError: ``loss_fn`` does not return a scalar.
            NonFiniteError: the loss is NaN or inf.
        """
        with torch.no_grad():
            value = self.loss_fn(self.trace.output.detach().clone(), self.targets)  # an in-place loss edits its input
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"loss_fn must return a scalar tensor, got {shape}: use a reduction such as reduction='mean'"
            )
        if not torch.isfinite(value):
            raise NonFiniteError(f"the loss is {float(value)} at the current parameters: the curvature is undefined")
        return float(value)

    def release(self) -> None:
        """Free the cached gradient graph (it is rebuilt by the next product)."""
        self._graph = None

    # --- reverse-over-reverse on a cached gradient graph ---------------------------------------------------

    def _gradient_graph(self) -> tuple[list[Tensor], Tensor | None]:
        """(θ as its views (:func:`.backward.parameter_views`), ∇L(θ) flat with its graph), built once on the trace's
        output; the gradient is None when it does not depend on θ (H = 0)."""
        if self._graph is None:
            leaves = self.trace.theta_views() or [self.theta]  # θ's views: no (P,) fill per view and product
            loss = self.loss_fn(self.trace.output.clone(), self.targets)  # the trace's output stays as recorded
            parts = torch.autograd.grad(loss, leaves, create_graph=True, retain_graph=True, materialize_grads=True)
            gradient = backward.flat_gradient(parts) if any(g.requires_grad for g in parts) else None
            self._graph = (leaves, gradient)
        return self._graph

    def _reverse(self, v: Tensor, *, batched: bool = False) -> Tensor:
        """H v (v: (P,)) or, ``batched``, H V for rows (V: (n, P) → (n, P)): one backward through ∇L's graph each."""
        leaves, gradient = self._gradient_graph()
        if gradient is None:
            return torch.zeros_like(v)
        parts = torch.autograd.grad(
            gradient, leaves, v, retain_graph=True, allow_unused=True, materialize_grads=True,
            is_grads_batched=batched,
        )
        return backward.flat_gradient(parts, len(v) if batched else None).detach()

    # --- forward-over-reverse (fallback) ----------------------------------------------------------------------

    def _forward(self, v: Tensor) -> Tensor:
        y = self.targets
        if isinstance(y, Tensor) and y.is_floating_point():
            return jvp(grad(self.loss), (self.theta.detach(), y), (v, torch.zeros_like(y)))[1]
        return jvp(grad(self.loss), (self.theta.detach(),), (v,))[1]

    def _fall_back(self, err: Exception) -> None:
        self.mode = "forward"
        self._graph = None
        warnings.warn(
            f"{type(self.fm.module).__name__} uses an op without a double-backward derivative ({str(err)[:200]}); "
            "computing Hessian-vector products forward-over-reverse instead",
            RuntimeWarning,
            stacklevel=4,
        )

    def _reverse_or_forward(self, reverse: Callable[[], Tensor], forward: Callable[[], Tensor]) -> Tensor:
        """``reverse()`` in reverse mode, falling back for good to ``forward()`` on a missing double derivative."""
        if self.mode == "reverse":
            try:
                return reverse()
            except (NotImplementedError, RuntimeError) as err:
                if not _missing_derivative(err):
                    raise
                self._fall_back(err)
        return forward()

    def _single(self, v: Tensor) -> Tensor:
        checkpoint()
        return self._reverse_or_forward(lambda: self._reverse(v), lambda: self._forward(v))

    def matvec(self, v: Tensor) -> Tensor:
        """H v for one vector, shape (P,) → (P,). Cost: 1 HVP."""
        self.num_hvps += 1
        return self._single(v)

    def matmat(self, v: Tensor) -> Tensor:
        """H V for a block of column vectors, shape (P, n) → (P, n). Cost: n HVPs, ``chunk_size`` at a time."""
        self.num_hvps += v.shape[1]
        return self._reverse_or_forward(lambda: self._matmat_reverse(v), lambda: self._matmat_forward(v))

    def _chunk(self, n: int) -> int:
        return n if self.chunk_size is None else max(1, min(int(self.chunk_size), n))

    def _matmat_reverse(self, v: Tensor) -> Tensor:
        n, step = v.shape[1], self._chunk(v.shape[1])
        out = torch.empty_like(v)
        j = 0
        if step > 1 and self._vectorise:
            try:
                for j in range(0, n, step):  # after a failure, the loop below resumes at j
                    checkpoint()
                    out[:, j : j + step] = self._reverse(v[:, j : j + step].T.contiguous(), batched=True).T
                return out
            except RuntimeError as err:  # e.g. an op of the double backward without a batching rule
                if is_out_of_memory(err) or (_missing_derivative(err) and "batching rule" not in str(err).lower()):
                    raise
                self._vectorise = False
                warnings.warn(
                    f"could not batch Hessian-vector products of {type(self.fm.module).__name__} "
                    f"({type(err).__name__}: {str(err)[:200]}); computing them one at a time",
                    RuntimeWarning,
                    stacklevel=3,
                )
        for i in range(j, n):
            out[:, i] = self._single(v[:, i])
            if self.mode != "reverse":  # fell back: the rest forward-over-reverse
                out[:, i + 1 :] = self._matmat_forward(v[:, i + 1 :])
                break
        return out

    def _matmat_forward(self, v: Tensor) -> Tensor:
        if self._vectorise:
            try:
                return vmap(self._forward, in_dims=1, out_dims=1, chunk_size=self.chunk_size)(v)
            except RuntimeError as err:  # e.g. data-dependent control flow or ops without a batching rule
                if is_out_of_memory(err):
                    raise
                self._vectorise = False
                warnings.warn(
                    f"vmap could not batch Hessian-vector products of {type(self.fm.module).__name__} "
                    f"({type(err).__name__}: {str(err)[:200]}); computing them one at a time (slower)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return torch.stack([self._forward(v[:, i]) for i in range(v.shape[1])], dim=1)

    def dense(self, *, budget: int) -> Tensor:
        """The explicit Hessian, shape (P, P), ``fm.dtype``, symmetrised. Cost: P HVPs.

        Raises:
            MemoryBudgetError: before allocating, when 3 · P² values exceed ``budget`` bytes (the identity,
                the chunks of H and their concatenation; the HVPs' own memory is checked by
                :func:`~lightning_geomdim.core.flatness.flatness`).
        """
        p = self.num_params
        itemsize = torch.empty((), dtype=self.fm.dtype).element_size()
        check_memory(
            3 * p * p * itemsize, budget, what=f"the dense {p} × {p} Hessian",
            remedies=(Remedy("use {arg}='lanczos' (matrix-free)", "method"),
                      Remedy("a subset of parameters via {arg}=[...]", "params")),
        )
        eye = torch.eye(p, dtype=self.fm.dtype, device=self.fm.device)
        h = self.matmat(eye)
        del eye
        return (h + h.T).div_(2)


def _missing_derivative(err: Exception) -> bool:
    """The error says an op lacks the derivative a formulation needs (double backward or forward AD)."""
    text = str(err).lower()
    return isinstance(err, NotImplementedError) or any(
        part in text for part in ("forward ad", "double backward", "differentiate twice", "not implemented")
    )
