"""A model seen as a pure function θ ↦ f_θ(X), the shared mechanism of every measure.

:func:`measurement_mode` puts a module in the state measures need (eval mode, gradients enabled, no
autocast, no inference mode) and restores everything afterwards. :class:`FunctionalModel` holds detached
copies of the parameters in the computation dtype (float64 by default) so that ``torch.func`` transforms
run on them without ever touching the module's own tensors, flags, gradients or dtype.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from lightning_geomdim.core.errors import NonFiniteError, ProbeError

OutputFn = Callable[[Any], Tensor]
"""Maps a model's raw output (tensor, tuple, dict, ...) to the tensor whose Jacobian is measured."""


@contextlib.contextmanager
def measurement_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Evaluate ``module`` in eval mode with autograd on, restoring its state on exit.

    Restored on exit, even when the body raises: every submodule's ``training`` flag, the global (CPU
    and current CUDA device) RNG states. The module's parameters, ``requires_grad`` flags, ``.grad``
    fields, dtype and device are never modified by the measures, so nothing else needs restoring.
    Autocast is disabled and inference mode lifted inside, because Lightning calls hooks under both. Scaled
    dot-product attention uses its math kernel inside: the fused CPU/GPU kernels have no forward-mode or double
    derivative, which Hessian-vector products need (``nn.MultiheadAttention``, transformer layers). For the same
    reason a model with ``nn.Hardsigmoid`` modules (MobileNetV3's squeeze-excitation) gets
    :class:`TwiceDifferentiable` inside.
    """
    training = {m: m.training for m in module.modules()}
    devices = _cuda_devices(module)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices, enabled=True))
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            for device_type in {"cpu", *(["cuda"] if devices else [])}:
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            if any(isinstance(m, nn.Hardsigmoid) for m in module.modules()):
                stack.enter_context(TwiceDifferentiable())
            module.eval()
            yield module
    finally:
        for m, flag in training.items():
            m.training = flag


class TwiceDifferentiable(TorchFunctionMode):
    """``F.hardsigmoid`` computed as clamp(x + 3, 0, 6) / 6, the same values: torch's kernel has neither a double
    backward nor a forward-mode derivative of its backward, so Hessian-vector products through it fail (both
    formulations of :mod:`lightning_geomdim.core.hessian`); the composite has both."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.hardsigmoid:
            x = args[0]
            y = (x + 3).clamp(0, 6) / 6
            return x.copy_(y) if (args[1] if len(args) > 1 else kwargs.get("inplace", False)) else y
        return func(*args, **kwargs)


def _cuda_devices(module: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in module.parameters() if t.device.type == "cuda"})


@dataclass(frozen=True)
class ProbeInputs:
    """A probe batch as call arguments: ``args`` positional, ``kwargs`` keyword; N samples each.

    Floating tensors are copied to the computation dtype and the model's device; integer tensors (token
    ids) are only moved. The copies are fresh tensors, never inference tensors, so autograd can save them.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    num_samples: int

    @staticmethod
    def from_batch(x: Any, *, dtype: torch.dtype, device: torch.device) -> ProbeInputs:
        """Wrap ``x``: a Tensor (one positional input), a tuple/list (positional inputs) or a dict (kwargs)."""
        if isinstance(x, Tensor):
            args, kwargs = (x,), {}
        elif isinstance(x, (tuple, list)):
            args, kwargs = tuple(x), {}
        elif isinstance(x, Mapping):
            args, kwargs = (), dict(x)
        else:
            raise ProbeError(
                f"probe batch has type {type(x).__name__}: pass a Tensor of shape (N, ...), a tuple of "
                "tensors (positional inputs) or a dict of tensors (keyword inputs)"
            )
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
        if not tensors:
            raise ProbeError("probe batch contains no tensor: pass the model's input tensor(s)")
        lead = tensors[0]
        if lead.dim() == 0 or lead.shape[0] == 0:
            raise ProbeError(
                f"probe batch has 0 samples (input shape {tuple(lead.shape)}): pass a batch of shape "
                "(N, ...) with N >= 1, e.g. a larger probe_size"
            )

        def convert(t: Any) -> Any:
            if not isinstance(t, Tensor):
                return t
            target = dtype if t.is_floating_point() else t.dtype
            return t.detach().to(device=device, dtype=target, copy=True)

        return ProbeInputs(
            args=tuple(convert(a) for a in args),
            kwargs={k: convert(v) for k, v in kwargs.items()},
            num_samples=int(lead.shape[0]),
        )

    def select(self, index: Tensor | slice) -> ProbeInputs:
        """The sub-batch of samples ``index`` (tensors are indexed along dim 0)."""

        def take(t: Any) -> Any:
            return t[index] if isinstance(t, Tensor) and t.dim() > 0 else t

        args = tuple(take(a) for a in self.args)
        kwargs = {k: take(v) for k, v in self.kwargs.items()}
        lead = next(t for t in (*args, *kwargs.values()) if isinstance(t, Tensor))
        return ProbeInputs(args, kwargs, int(lead.shape[0]))


@dataclass
class FunctionalModel:
    """``module`` as a function of its selected trainable parameters, in the computation dtype.

    Attributes:
        module: the wrapped module (only read; call inside :func:`measurement_mode`).
        params: name → detached copy of each selected trainable parameter, ``dtype``, on the module's device.
        frozen: every other parameter and buffer (floating ones cast to ``dtype``), passed unchanged.
        dtype: computation dtype (float64 by default in every measure).
        output_fn: maps the raw output to a tensor; ``None`` means the output is already a tensor.
    """

    module: nn.Module
    params: dict[str, Tensor]
    frozen: dict[str, Tensor]
    dtype: torch.dtype
    output_fn: OutputFn | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: A softmax / log-softmax module whose output is the measured output (set by the dimension measure from
    #: :func:`~lightning_geomdim.core.symmetries.find_symmetries`): :meth:`measured_output` then returns the logit
    #: differences of its input instead (same row space of J, no floating-point saturation).
    logit_head: nn.Module | None = None

    @staticmethod
    def from_module(
        module: nn.Module,
        *,
        params: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float64,
        output_fn: OutputFn | None = None,
    ) -> FunctionalModel:
        """Select ``params`` (default: all parameters with ``requires_grad``) and copy them to ``dtype``.

        Raises:
            ValueError: no trainable parameters, or names in ``params`` that the module does not have.
            NonFiniteError: a selected parameter holds NaN or inf.
        """
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype such as torch.float64, got {dtype}")
        named = dict(module.named_parameters())
        if params is None:
            selected = [n for n, p in named.items() if p.requires_grad]
            if not selected:
                raise ValueError(
                    f"{type(module).__name__} has no trainable parameters (every requires_grad is False): "
                    "unfreeze some parameters or pass their names with params=[...]"
                )
        else:
            if isinstance(params, str):
                params = [params]
            selected = list(dict.fromkeys(params))
            unknown = [n for n in selected if n not in named]
            if unknown:
                hints = {n: difflib.get_close_matches(n, list(named), n=1) for n in unknown}
                hint = "; ".join(f"{n!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for n, h in hints.items())
                raise ValueError(
                    f"unknown parameter names in params: {hint}. Valid names are those of "
                    f"model.named_parameters(), e.g. {list(named)[:4]}"
                )
            if not selected:
                raise ValueError("params is empty: pass at least one parameter name, or params=None for all")
        device = next(iter(named.values())).device if named else torch.device("cpu")
        with torch.inference_mode(False), torch.no_grad():
            copies = {n: named[n].detach().to(dtype=dtype, copy=True) for n in selected}
            frozen = {
                n: (t.detach().to(dtype=dtype, copy=True) if t.is_floating_point() else t)
                for n, t in (*named.items(), *module.named_buffers())
                if n not in copies
            }
        bad = [n for n, t in copies.items() if not torch.isfinite(t).all()]
        if bad:
            raise NonFiniteError(
                f"parameters {bad} contain NaN or inf: the geometry of a diverged model is undefined; "
                "lower the learning rate or enable gradient clipping"
            )
        return FunctionalModel(module, copies, frozen, dtype, output_fn, device)

    @property
    def num_params(self) -> int:
        """P, the number of selected scalar parameters."""
        return sum(p.numel() for p in self.params.values())

    def __call__(self, params: Mapping[str, Tensor], inputs: ProbeInputs) -> Tensor:
        """The output tensor f_θ(X) (after ``output_fn``) for parameters ``params``."""
        out = functional_call(self.module, {**self.frozen, **params}, inputs.args, inputs.kwargs)
        if self.output_fn is not None:
            out = self.output_fn(out)
        if not isinstance(out, Tensor):
            raise ProbeError(
                f"model output has type {type(out).__name__}: pass output_fn=... mapping it to one tensor, "
                "e.g. output_fn=lambda out: out[0] or output_fn=lambda out: out['logits']"
            )
        return out

    def measured_output(self, params: Mapping[str, Tensor], inputs: ProbeInputs) -> Tensor:
        """The tensor whose Jacobian the dimension engines measure: f_θ(X), or, when :attr:`logit_head` is set,
        the logit differences z[..., :-1] − z[..., -1:] of the softmax's input z, shape (N, ..., K − 1).

        For one sample with probabilities p > 0, the softmax Jacobian is (diag(p) − p pᵀ) J_z and the log-softmax
        one (I − 1 pᵀ) J_z: both have the row space of the differences of the rows of J_z, in exact arithmetic.
        Their floating-point rank is not that: saturated probabilities (p_k ~ 1e-10 after training) scale rows
        down to below any tolerance.
        """
        if self.logit_head is None:
            return self(params, inputs)
        captured: list[Tensor] = []
        handle = self.logit_head.register_forward_hook(lambda m, args, out: captured.append(args[0]))
        try:
            self(params, inputs)
        finally:
            handle.remove()
        z = captured[-1]
        return z[..., :-1] - z[..., -1:]

    def flat_params(self) -> Tensor:
        """All selected parameters concatenated, shape (P,), ``dtype``."""
        return torch.cat([p.reshape(-1) for p in self.params.values()])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Inverse of :meth:`flat_params`: a (P,) vector as a name → tensor dict."""
        out, start = {}, 0
        for name, p in self.params.items():
            out[name] = flat[start : start + p.numel()].view_as(p)
            start += p.numel()
        return out
