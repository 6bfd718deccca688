"""The exact engine's program: the network as a sequence of steps over GF(p) (affine layers, BatchNorm in eval mode,
diagonal activations with their patterns fixed, max-pooling gathers, average-pooling plane maps, reshapes, sums of
residual connections), read from one
:class:`~lightning_geomdim.core.probe_trace.ProbeTrace`. Float constants (slopes, clamps, pooling weights) stay
floats here; :mod:`lightning_geomdim.core.exact` maps them to residues of each draw's field."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_geomdim.core.errors import NotApplicableError
from lightning_geomdim.core.finite_field import PrimeField
from lightning_geomdim.core.gram_plan import GramPlan
from lightning_geomdim.core.layer_kinds import (
    AVG_POOL,
    BATCH_NORM,
    DROPOUT,
    FACTORED_AFFINE,
    MAX_POOL,
    PIECEWISE_LINEAR,
    RESHAPE,
)
from lightning_geomdim.core.probe_trace import ProbeTrace
from lightning_geomdim.core.structure import FUNCTIONS_RELU, FUNCTIONS_SUM, check_structure, conv_padding
from lightning_geomdim.core.tracing import FunctionCall

#: Largest per-plane linear map (entries) stored densely for an average pooling.
_MAX_PLANE_MAP = 1 << 24


def residue_of_constant(field: PrimeField, value: float) -> float:
    """The residue of a module constant (slope, clamp value, pooling weight): the simplest fraction with
    denominator ≤ 2^20 whose float64 is ``value`` (0.01 → 1/100, 1/9 → 1/9), else the exact dyadic value."""
    fraction = Fraction(value).limit_denominator(1 << 20)
    if float(fraction) != value:
        return float(field.from_float(torch.tensor([value], dtype=torch.float64))[0])
    return field.from_int(fraction.numerator * pow(fraction.denominator, -1, field.p))


class Step:
    """One module call of the network, in GF(p), with the float patterns fixed."""

    def forward(self, field: PrimeField, x: Tensor, theta: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def backward(self, field: PrimeField, g: Tensor, theta: dict[str, Tensor]) -> Tensor:
        """Cotangents (C, N, *out) → (C, N, *in)."""
        raise NotImplementedError


@dataclass
class Affine(Step):
    name: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def _weight(self, theta: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        prefix = f"{self.name}." if self.name else ""
        return theta[prefix + "weight"], theta.get(prefix + "bias")

    def factor_input(self, field: PrimeField, x: Tensor) -> Tensor:
        """The layer input u of its factors: x itself."""
        return x

    def forward(self, field: PrimeField, x: Tensor, theta: dict[str, Tensor]) -> Tensor:
        w, b = self._weight(theta)
        if isinstance(self.module, nn.Linear):
            y = field.matmul(x, w.T)
            return y if b is None else field.reduce_(y.add_(b))
        m = self.module
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=conv_padding(m), stride=m.stride)
        y = field.matmul(w.reshape(w.shape[0], -1), cols)  # (N, O, L)
        if b is not None:
            field.reduce_(y.add_(b[:, None]))
        return y.reshape(self.out_shape)

    def backward(self, field: PrimeField, g: Tensor, theta: dict[str, Tensor]) -> Tensor:
        w, _ = self._weight(theta)
        c = g.shape[0]
        if isinstance(self.module, nn.Linear):
            return field.matmul(g, w)
        m = self.module
        o = w.shape[0]
        cols = field.matmul(w.reshape(o, -1).T, g.reshape(-1, o, math.prod(self.out_shape[2:])))  # (C·N, D, L)
        x = F.fold(cols, self.in_shape[2:], m.kernel_size, dilation=m.dilation, padding=conv_padding(m),
                   stride=m.stride)
        return field.reduce_(x).reshape(c, *self.in_shape)


@dataclass
class Diagonal(Step):
    """y = s ⊙ z + c with the pattern's slopes s and clamp constants c (residues, shape of z)."""

    slope: Tensor
    offset: Tensor | None

    def forward(self, field: PrimeField, x: Tensor, theta: dict[str, Tensor]) -> Tensor:
        y = field.mul(x, self.slope)
        return y if self.offset is None else field.reduce_(y.add_(self.offset))

    def backward(self, field: PrimeField, g: Tensor, theta: dict[str, Tensor]) -> Tensor:
        return field.mul(g, self.slope)


@dataclass
class Gather(Step):
    """Max pooling with its argmax fixed: y = x[index] per plane (index over the last ``dims`` dims)."""

    index: Tensor  # (planes, out positions), int64
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    dims: int

    def forward(self, field: PrimeField, x: Tensor, theta: dict[str, Tensor]) -> Tensor:
        planes = x.reshape(self.index.shape[0], -1)
        return planes.gather(1, self.index).reshape(self.out_shape)

    def backward(self, field: PrimeField, g: Tensor, theta: dict[str, Tensor]) -> Tensor:
        c = g.shape[0]
        flat = g.reshape(c, self.index.shape[0], -1)
        size = math.prod(self.in_shape[len(self.in_shape) - self.dims :])
        out = flat.new_zeros(c, self.index.shape[0], size)
        out.scatter_add_(2, self.index.expand(c, *self.index.shape), flat)
        return field.reduce_(out).reshape(c, *self.in_shape)


@dataclass
class PlaneLinear(Step):
    """A linear map applied to every plane (last ``dims`` dims) alike, e.g. average pooling: (out, in) residues."""

    matrix: Tensor
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    dims: int

    def forward(self, field: PrimeField, x: Tensor, theta: dict[str, Tensor]) -> Tensor:
        lead = self.in_shape[: len(self.in_shape) - self.dims]
        return field.matmul(x.reshape(*lead, -1), self.matrix.T).reshape(self.out_shape)

    def backward(self, field: PrimeField, g: Tensor, theta: dict[str, Tensor]) -> Tensor:
        c = g.shape[0]
        lead = self.in_shape[: len(self.in_shape) - self.dims]
        return field.matmul(g.reshape(c, *lead, -1), self.matrix).reshape(c, *self.in_shape)


@dataclass
class Reshape(Step):
    """Identity, dropout in eval mode, Flatten, Unflatten, ``flatten`` / ``view`` / ``reshape``: values unchanged."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def forward(self, field: PrimeField, x: Tensor, theta: dict[str, Tensor]) -> Tensor:
        return x.reshape(self.out_shape)

    def backward(self, field: PrimeField, g: Tensor, theta: dict[str, Tensor]) -> Tensor:
        return g.reshape(g.shape[0], *self.in_shape)


@dataclass
class Sum(Step):
    """x₁ + x₂, a residual connection: two inputs, the cotangent goes to both."""

    def forward(self, field: PrimeField, x: Any, theta: dict[str, Tensor]) -> Tensor:
        return field.reduce(x[0] + x[1])

    def backward(self, field: PrimeField, g: Tensor, theta: dict[str, Tensor]) -> Any:
        return (g, g)


@dataclass
class ChannelAffine(Step):
    """BatchNorm in eval mode: y = γ ⊙ x̂ + β with x̂ = (x − μ) ⊙ s per channel (dim 1), the constants μ and
    s = 1 / √(var + ε) (floats here, residues of each draw's field in :mod:`.exact`) and γ, β from θ (the exact
    images of frozen ones; 1 and 0 without an affine map). A measured layer: its factor input is x̂."""

    name: str
    mean: Tensor
    scale: Tensor
    affine: bool

    def _params(self, theta: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        prefix = f"{self.name}." if self.name else ""
        return theta[prefix + "weight"], theta[prefix + "bias"]

    @staticmethod
    def _channels(t: Tensor, dims: int, lead: int = 1) -> Tensor:
        return t.view(*([1] * lead), -1, *([1] * (dims - lead - 1)))

    def factor_input(self, field: PrimeField, x: Tensor) -> Tensor:
        """x̂ residues, shape of x."""
        centred = field.reduce(x - self._channels(self.mean, x.dim()))
        return field.mul(centred, self._channels(self.scale, x.dim()))

    def forward(self, field: PrimeField, x: Tensor, theta: dict[str, Tensor]) -> Tensor:
        y = self.factor_input(field, x)
        if not self.affine:
            return y
        w, b = self._params(theta)
        return field.reduce_(field.mul(y, self._channels(w, x.dim())).add_(self._channels(b, x.dim())))

    def backward(self, field: PrimeField, g: Tensor, theta: dict[str, Tensor]) -> Tensor:
        coef = field.mul(self.scale, self._params(theta)[0]) if self.affine else self.scale
        return field.mul(g, self._channels(coef, g.dim(), lead=2))


@dataclass(frozen=True)
class ExactProgram:
    """The network as a program over GF(p) with its activation patterns fixed, read from one traced pass.

    Attributes:
        plan: the Gram plan (measured layers, N, rows per sample, P).
        steps: one step per module call or functional call (None for the softmax head, whose input is measured).
        sources: for each step, the steps whose outputs are its inputs (-1: the probe).
        measured: the call whose output is measured (-1: the probe itself).
        head: the measured tensor is a softmax head's input, measured as logit differences.
        probe: the probe input, float64.
        depth: L, the number of layers with parameters (bounds the degree of J's entries in θ by L − 1).
    """

    plan: GramPlan
    steps: tuple[Step | None, ...]
    sources: tuple[tuple[int, ...], ...]
    measured: int
    head: bool
    probe: Tensor
    depth: int


def exact_program(trace: ProbeTrace) -> ExactProgram:
    """Check on the traced pass that the exact engine applies and record the activation patterns.

    Raises:
        NotApplicableError: the structure is not supported (the message names the module and why).
    """
    problem, plan, graph = check_structure(trace)
    fm, inputs = trace.fm, trace.inputs
    if problem is not None:
        raise NotApplicableError(
            f"the exact engine does not apply: {problem}. engine='auto' falls back to a floating-point engine"
        )
    assert plan is not None and graph is not None
    steps: list[Step | None] = []
    depth = 0
    measured = graph.output
    for index, call in enumerate(graph.calls):
        if isinstance(call, FunctionCall):
            steps.append(_function_step(call))
            continue
        module = call.module
        z = call.input
        label = f"module {call.name or '<root>'!r} ({type(module).__name__})"
        if isinstance(module, FACTORED_AFFINE):
            steps.append(Affine(call.name, module, tuple(z.shape), tuple(call.output.shape)))
            depth += 1
        elif isinstance(module, BATCH_NORM):
            prefix = f"{call.name}." if call.name else ""
            var = fm.frozen[prefix + "running_var"].to(torch.float64)
            steps.append(ChannelAffine(call.name, fm.frozen[prefix + "running_mean"].to(torch.float64),
                                       1.0 / torch.sqrt(var + module.eps), module.affine))
            depth += int(module.affine)
        elif isinstance(module, (*PIECEWISE_LINEAR, *MAX_POOL)) and z._version != (
                call.output_version if call.output is z else call.input_version):
            raise NotApplicableError(
                f"the exact engine does not apply: the input of {label} was changed in place after the call, so its "
                "activation pattern cannot be read back; engine='auto' falls back to a floating-point engine"
            )
        elif isinstance(module, PIECEWISE_LINEAR):
            steps.append(_activation(module, z))
        elif type(module) in MAX_POOL:
            dims, pool = MAX_POOL[type(module)]
            steps.append(_max_pool(module, z, dims, pool))
        elif type(module) in AVG_POOL:
            steps.append(_average_pool(module, z, AVG_POOL[type(module)], label))
        elif type(module) in (*RESHAPE, *DROPOUT):
            steps.append(Reshape(tuple(z.shape), tuple(call.output.shape)))
        elif module is fm.logit_head and index == graph.output:
            steps.append(None)
            (measured,) = graph.sources[index]
        else:
            raise NotApplicableError(
                f"the exact engine does not apply: {label} is not piecewise linear, so the dimension is not "
                "determined by activation patterns; engine='auto' measures it with a floating-point engine "
                "(a numerical rank)"
            )
    probe = inputs.args[0].to(torch.float64)
    return ExactProgram(
        plan.with_cheaper_side(), tuple(steps), graph.sources, measured, measured != graph.output, probe, depth,
    )


def _function_step(f: FunctionCall) -> Step:
    """The step of a functional call :func:`~.structure.check_structure` accepted: a sum, a reshape or a ReLU."""
    if f.name in FUNCTIONS_SUM:
        return Sum()
    (x,) = f.tensors()
    if f.name in FUNCTIONS_RELU:
        assert f.pattern is not None
        return Diagonal(f.pattern.to(torch.float64), None)
    return Reshape(tuple(x.shape), tuple(f.output.shape))


def _activation(module: nn.Module, z: Tensor) -> Diagonal:
    # floats here; converted to residues per field in _field_constants
    if isinstance(module, nn.ReLU):
        return Diagonal((z > 0).to(torch.float64), None)
    if isinstance(module, nn.LeakyReLU):
        # an in-place LeakyReLU with a negative slope flips signs; the recorded z is its output then
        return Diagonal(torch.where(z > 0, 1.0, module.negative_slope).to(torch.float64), None)
    low, high = (0.0, 6.0) if isinstance(module, nn.ReLU6) else (module.min_val, module.max_val)
    inside = ((z > low) & (z < high)).to(torch.float64)
    offset = torch.where(z >= high, high, 0.0) + torch.where(z <= low, low, 0.0)
    return Diagonal(inside, offset.to(torch.float64))


def _max_pool(module: nn.Module, z: Tensor, dims: int, pool: Callable[..., Any]) -> Gather:
    if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        out, index = pool(z, module.output_size, return_indices=True)
    else:
        out, index = pool(z, module.kernel_size, module.stride, module.padding, module.dilation,
                          ceil_mode=module.ceil_mode, return_indices=True)
    planes = math.prod(z.shape[: z.dim() - dims])
    return Gather(index.reshape(planes, -1), tuple(z.shape), tuple(out.shape), dims)


def _average_pool(module: nn.Module, z: Tensor, dims: int, label: str) -> PlaneLinear:
    plane = z.shape[z.dim() - dims :]
    size = math.prod(plane)
    basis = torch.eye(size, dtype=torch.float64, device=z.device).reshape(size, *([1] * (z.dim() - dims - 1)), *plane)
    with torch.no_grad():
        images = module(basis)  # (size, 1…, *out plane): column j of the map
    out_size = images[0].numel()
    if size * out_size > _MAX_PLANE_MAP:
        raise NotApplicableError(
            f"the exact engine does not apply: {label} maps planes of {size} to {out_size} entries, a "
            f"{out_size} × {size} map too large to hold; engine='auto' falls back to a floating-point engine"
        )
    matrix = images.reshape(size, out_size).T.contiguous()
    with torch.no_grad():
        out = module(z)
    return PlaneLinear(matrix, tuple(z.shape), tuple(out.shape), dims)
