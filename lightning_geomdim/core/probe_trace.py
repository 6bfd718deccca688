"""One traced forward pass of a model over a probe batch, shared by every measure taken at one step.

:meth:`ProbeTrace.record` runs f_θ(X) once, in the computation dtype, with autograd on, on one flat float64 copy
θ of the measured parameters (shape (P,), a leaf that requires grad; ``fm.params`` become views of it), and keeps
what every measure reads:

* ``calls``: each call of a leaf module or of a module owning parameters, in call order, with its input and output
  and their tensor versions (the data-flow checks of :mod:`.structure`), and for ReLU-like modules the
  activation pattern 1[z > 0], (N, units) bool, taken when the call returns (:mod:`.activation_patterns`);
* ``input_readers``: for each leaf call, which leaf calls read its input tensor (None: code outside leaf modules),
  so that a rescaling symmetry can be recognised only where nothing else reads the tensor (:mod:`.symmetries`);
* ``layer_inputs`` and ``deltas``: for each measured layer with a factor form (``nn.Linear``, ``nn.Conv2d``,
  normalisations, ``nn.Embedding``: :mod:`.factor_forms`; the gates of an LSTM or GRU and the two projections of an
  ``nn.MultiheadAttention``, recomputed with the same values: :mod:`.recurrent_form`, :mod:`.attention_form`), a
  copy of its input and a zero δ added to its output, so that ∂f/∂δ = ∂f/∂z is the Gram factors' backprop signal
  (:mod:`.gram`) even when a later in-place activation overwrites z;
* ``output``: f_θ(X) after ``output_fn``, whose graph to θ gives the Jacobian rows (:mod:`.jacobian`) and the loss
  gradient whose derivatives are the Hessian-vector products (:mod:`.hessian`).

The dimension (every engine), the linear regions, the alignment and the flatness all read one trace, so a
measurement step costs one forward pass over the probe and one float64 copy of the parameters (counted by
``benchmarks/count_passes.py`` and a test). Memory: the forward's activations with their graph, plus the measured
layers' inputs and zero δ of their outputs, until :meth:`ProbeTrace.release`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_geomdim.core import backward
from lightning_geomdim.core.attention_form import attention_numel, attention_with_deltas, bind_arguments
from lightning_geomdim.core.errors import MeasurementInterrupted, NonFiniteError, ProbeError
from lightning_geomdim.core.functional_model import FunctionalModel, OutputFn, ProbeInputs, measurement_mode
from lightning_geomdim.core.interrupt import checkpoint
from lightning_geomdim.core.layer_kinds import FACTOR_FORMS, RECURRENT, RELU_LIKE
from lightning_geomdim.core.memory import is_out_of_memory
from lightning_geomdim.core.recurrent_form import has_form, recurrent_numel, recurrent_with_deltas
from lightning_geomdim.core.tracing import FunctionCall, UseRecorder, call_keys


@dataclass(eq=False)
class TracedCall:
    """One module call of the traced pass.

    Attributes:
        name: qualified module name ("" for the root).
        module: the module.
        input: its first positional argument (None without one); ``num_args`` says how many it got (an LSTM or GRU:
            how many positional and keyword arguments that are not None, an ``hx`` included).
        input_version / output_version: the tensors' versions when the call started / returned (an in-place
            change between modules shows as a version mismatch).
        output: what it returned (for a measured affine layer, z + δ).
        leaf: the module has no children.
        pattern: ReLU-like modules: 1[z > 0], shape (N, units) bool, units the flattened size per sample.
        arguments: ``nn.MultiheadAttention``: its forward's arguments by name (``input`` is the query).
    """

    name: str
    module: nn.Module
    input: Any
    num_args: int
    input_version: int
    leaf: bool
    output: Any = None
    output_version: int = -1
    pattern: Tensor | None = None
    arguments: dict[str, Any] | None = None


@dataclass(eq=False)
class ProbeTrace:
    """The traced pass (module docstring). Build with :meth:`record` or :meth:`of`, inside ``measurement_mode``.

    Attributes:
        fm: the model as a function of θ; ``fm.params`` are views of ``theta``.
        inputs: the probe in the computation dtype.
        theta: the measured parameters, flat, shape (P,), ``fm.dtype``, a leaf requiring grad.
        calls: see the module docstring.
        input_readers: leaf-call position → positions (among :meth:`leaf_calls`) of the leaf calls that read the
            call's input tensor, None for code outside leaf modules.
        layer_inputs: measured affine call name → copy of its input.
        deltas: measured affine call name → the zero δ added to its output (requires grad).
        output: f_θ(X), with its graph to ``theta``.
        probe_version: the version of the probe tensor before the pass.
        activation_numel: A, entries of the inputs, of every leaf call's tensor outputs and of attention's and
            recurrent modules' internals.
        trainable: False when the model has no trainable parameter and ``theta`` holds all of them (patterns and
            alignment only; the dimension and flatness then refuse as for any model without trainable parameters).
        grad: the pass was recorded with autograd (``theta`` requires grad): what the dimension and flatness need;
            without it (patterns, alignment) it keeps no graph.
        factors: ``layer_inputs`` and ``deltas`` were recorded (the Gram engine's factors; 2 A more values).
        functions: the torch functions called outside every leaf module, in call order (functional code between
            modules, e.g. ``out += identity``), for the exact engine's program.
        memo: results computed once per trace by the measures that share it (e.g. the factor forms' check).
    """

    fm: FunctionalModel
    inputs: ProbeInputs
    theta: Tensor
    calls: list[TracedCall]
    input_readers: dict[int, list[int | None]]
    layer_inputs: dict[str, Tensor]
    deltas: dict[str, Tensor]
    output: Tensor
    probe_version: int
    activation_numel: int
    trainable: bool = True
    grad: bool = True
    factors: bool = True
    released: bool = False
    functions: list[FunctionCall] = field(default_factory=list, repr=False)
    memo: dict[Any, Any] = field(default_factory=dict, repr=False)
    _leaves: list[TracedCall] | None = field(default=None, repr=False)

    @staticmethod
    def of(
        model: nn.Module, x: Any, *, params: Sequence[str] | None = None, dtype: torch.dtype = torch.float64,
        output_fn: OutputFn | None = None, grad: bool = True, factors: bool = True,
        before: Callable[[ProbeTrace, int], None] | None = None,
    ) -> ProbeTrace:
        """Copy the parameters of ``model`` (``params``, default the trainable ones) to ``dtype`` once and
        :meth:`record` the pass on the probe batch ``x`` (a Tensor, tuple or dict, see :class:`ProbeInputs`), in
        :func:`measurement_mode` (eval mode; the model's state is restored afterwards).

        ``before(one, n)``: called first with a trace of the probe's first sample (no autograd, the same parameter
        copy) and the probe's n samples, to estimate what the whole pass and the measures will need; it may raise
        to refuse before the pass over the whole probe (:mod:`lightning_geomdim.core.preflight`).

        Raises:
            ValueError: unknown names in ``params``, a non-floating dtype, or no parameters at all.
            ProbeError, NonFiniteError: as in :meth:`record`.
        """
        trainable = params is not None or any(p.requires_grad for p in model.parameters())
        if not trainable:  # patterns and alignment measure frozen models too
            params = [n for n, _ in model.named_parameters()]
            if not params:
                raise ValueError(f"{type(model).__name__} has no parameters: there is no network to measure")
        with measurement_mode(model):
            fm = FunctionalModel.from_module(model, params=params, dtype=dtype, output_fn=output_fn)
            inputs = ProbeInputs.from_batch(x, dtype=dtype, device=fm.device)
            if before is not None and inputs.num_samples > 1:
                try:  # a model that needs several samples (batch statistics) gets no estimate, not an error
                    one = ProbeTrace.record(fm, inputs.select(slice(0, 1)), grad=False, factors=False)
                except (ProbeError, NonFiniteError):
                    one = None
                if one is not None:
                    one.trainable = trainable
                    before(one, inputs.num_samples)
                    del one
            trace = ProbeTrace.record(fm, inputs, grad=grad, factors=factors and grad)
        trace.trainable = trainable
        return trace

    @staticmethod
    def record(fm: FunctionalModel, inputs: ProbeInputs, *, grad: bool = True, factors: bool = True) -> ProbeTrace:
        """Run ``fm`` once on ``inputs`` recording what the measures read (module docstring): with autograd when
        ``grad`` (the dimension, flatness), the measured layers' inputs and zero δ when ``factors`` (the Gram
        engine; needs ``grad``).

        ``fm.params`` are replaced by views of one flat leaf θ (the copies they were are freed).

        Raises:
            ProbeError: the model's forward fails on the probe (the original error chained), or returns no tensor.
            NonFiniteError: the outputs contain NaN or inf.
        """
        theta = torch.cat([p.detach().reshape(-1) for p in fm.params.values()]).requires_grad_(grad)
        fm.params = fm.unflatten(theta)
        measured = _measured_affine(fm) if factors and grad else set()
        calls: list[TracedCall] = []
        stack: list[TracedCall] = []
        running: list[int] = []  # indices in ``calls`` of the running leaf calls
        layer_inputs: dict[str, Tensor] = {}
        deltas: dict[str, Tensor] = {}
        numel = [sum(t.numel() for t in (*inputs.args, *inputs.kwargs.values()) if isinstance(t, Tensor))]

        def pre(name: str, m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> None:
            attention = isinstance(m, nn.MultiheadAttention) and kwargs is not None
            arguments = bind_arguments(args, kwargs) if attention else None  # type: ignore[arg-type]
            inp = arguments["query"] if arguments else args[0] if args else None
            leaf = next(m.children(), None) is None
            num_args = len(args)
            if isinstance(m, RECURRENT):  # an initial state, positional or hx=..., is an argument; None is not
                num_args = sum(a is not None for a in (*args, *(kwargs or {}).values()))
            call = TracedCall(name, m, inp, num_args, inp._version if isinstance(inp, Tensor) else -1, leaf,
                              arguments=arguments)
            if leaf:
                running.append(len(calls))
            calls.append(call)
            stack.append(call)

        def post(m: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            checkpoint()  # the pass stops between modules when the caller asks (a time limit, SIGTERM)
            call = stack.pop()
            replaced = None
            if call.name in measured and call.arguments is not None:  # attention: recomputed, the same values
                out = replaced = attention_with_deltas(call.name, m, call.arguments, out,  # type: ignore[arg-type]
                                                       layer_inputs, deltas)
            elif call.name in measured and isinstance(m, RECURRENT):  # the fused kernel exposes no gates
                if has_form(m, call.input, call.num_args, inputs.num_samples):  # type: ignore[arg-type]
                    out = replaced = recurrent_with_deltas(call.name, m, call.input, layer_inputs, deltas)
            elif call.name in measured and isinstance(out, Tensor) and isinstance(call.input, Tensor):
                layer_inputs[call.name] = call.input.detach().clone()  # a later in-place op must not change it
                delta = torch.zeros_like(out, requires_grad=True)
                deltas[call.name] = delta
                out = replaced = out + delta
            if isinstance(m, RELU_LIKE) and isinstance(call.input, Tensor) and call.input.dim() > 0:
                call.pattern = (call.input > 0).reshape(call.input.shape[0], -1)
            call.output = out
            call.output_version = out._version if isinstance(out, Tensor) else -1
            if call.arguments is not None:  # attention's q, k, v, scores and weights: outputs of no leaf module
                numel[0] += attention_numel(m, call.arguments)  # type: ignore[arg-type]
            elif isinstance(m, RECURRENT):  # the gates and cells of every step, recomputed or in the fused kernel
                numel[0] += recurrent_numel(m, call.input)
            if call.leaf:
                running.pop()
                outs = out if isinstance(out, (tuple, list)) else (out.values() if isinstance(out, dict) else (out,))
                numel[0] += sum(t.numel() for t in outs if isinstance(t, Tensor))
            return replaced

        recorder = UseRecorder(running, position=lambda: len(calls))
        handles = []
        probe = inputs.args[0] if inputs.args and isinstance(inputs.args[0], Tensor) else None
        probe_version = probe._version if probe is not None else -1
        try:
            for name, sub in fm.module.named_modules():
                if next(sub.children(), None) is None or any(True for _ in sub.parameters(recurse=False)):
                    kw = isinstance(sub, (nn.MultiheadAttention, *RECURRENT))  # keyword arguments: masks, hx
                    handles.append(sub.register_forward_pre_hook(lambda m, *a, _n=name: pre(_n, m, *a), with_kwargs=kw))
                    handles.append(sub.register_forward_hook(lambda m, a, *o: post(m, a, o[-1]), with_kwargs=kw))
            with torch.set_grad_enabled(grad), recorder:
                start = time.perf_counter()
                out = fm(fm.params, inputs)
                forward_s = time.perf_counter() - start
        except (ProbeError, MeasurementInterrupted):
            raise
        except Exception as err:
            if is_out_of_memory(err):  # out of memory is not a bad probe
                raise
            shapes = [tuple(t.shape) for t in (*inputs.args, *inputs.kwargs.values()) if isinstance(t, Tensor)]
            raise ProbeError(
                f"{type(fm.module).__name__} forward failed on the probe batch (input shapes {shapes}): "
                f"{type(err).__name__}: {err}. Pass inputs shaped as in training (N, ...), or an input_fn "
                "that extracts them from the batch"
            ) from err
        finally:
            for h in handles:
                h.remove()
        if not torch.isfinite(out).all():
            raise NonFiniteError(
                f"model outputs on the probe batch contain NaN or inf ({int((~torch.isfinite(out)).sum())} of "
                f"{out.numel()} values): check the inputs' scale and the model's weights"
            )
        # who read each leaf call's input, while the recorder still keeps every read tensor alive (unique ids)
        leaf_index = {i: pos for pos, i in enumerate(i for i, c in enumerate(calls) if c.leaf)}
        readers = {
            leaf_index[i]: [None if w is None else leaf_index[w] for w in recorder.uses.get(id(c.input), [])]
            for i, c in enumerate(calls) if c.leaf and isinstance(c.input, Tensor)
        }
        functions = recorder.functions
        del recorder
        trace = ProbeTrace(fm, inputs, theta, calls, readers, layer_inputs, deltas, out, probe_version, numel[0],
                           grad=grad, factors=factors and grad, functions=functions)
        trace.memo["forward_s"] = forward_s  # a backward's time is announced from it (:func:`.backward.vjp`)
        return trace

    def vjp(self, out: Tensor, inputs: Sequence[Tensor], cotangents: Tensor) -> list[Tensor]:
        """∂⟨c, out⟩/∂inputs for each cotangent c of ``cotangents`` (B, *out.shape): a list of (B, *input.shape)
        tensors (zeros for an input ``out`` does not reach), keeping the graph; batched or one backward at a time,
        whichever is faster for this trace (:func:`~lightning_geomdim.core.backward.vjp`); with respect to θ at its
        views (:meth:`theta_views`)."""
        model = type(self.fm.module).__name__
        views = self.theta_views() if any(x is self.theta for x in inputs) else None
        if views is None:
            return backward.vjp(out, inputs, cotangents, memo=self.memo, model=model)
        return backward.vjp_at_views(out, inputs, cotangents, self.theta, views, memo=self.memo, model=model)

    def theta_views(self) -> list[Tensor] | None:
        """``fm.params`` when gradients with respect to θ may be taken at them
        (:func:`~lightning_geomdim.core.backward.parameter_views`), else None."""
        return backward.parameter_views(self.theta, list(self.fm.params.values()))

    def leaf_calls(self) -> list[TracedCall]:
        """The calls of leaf modules, in call order (positions as in ``input_readers``)."""
        if self._leaves is None:
            self._leaves = [c for c in self.calls if c.leaf]
        return self._leaves

    def patterns(self) -> dict[str, Tensor]:
        """Activation pattern of every ReLU-like call: key (module name, ``name#k`` for the k-th call of a module
        called repeatedly) → (N, units) bool."""
        relus = [c for c in self.leaf_calls() if c.pattern is not None]
        return dict(zip(call_keys(relus), (c.pattern for c in relus), strict=True))

    def measured_output(self, head: nn.Module | None = None) -> Tensor:
        """The output, or with a softmax ``head`` (the last call) the logit differences z[..., :-1] − z[..., -1:]
        of its input z: the same row space of J in exact arithmetic, without the saturation of probabilities
        (see :meth:`FunctionalModel.measured_output`)."""
        if head is None:
            return self.output
        z = next(c.input for c in reversed(self.calls) if c.module is head)
        return z[..., :-1] - z[..., -1:]

    def require_trainable(self) -> None:
        """Raise the error of a model without trainable parameters (measures that differentiate in θ)."""
        if not self.trainable:
            raise ValueError(
                f"{type(self.fm.module).__name__} has no trainable parameters (every requires_grad is False): "
                "unfreeze some parameters or pass their names with params=[...]"
            )

    def check(
        self, model: nn.Module, dtype: torch.dtype, output_fn: OutputFn | None = None,
        params: Sequence[str] | None = None, *, differentiable: bool = False,
    ) -> None:
        """Raise ValueError unless this trace is usable for a measure of ``model`` in ``dtype`` with ``output_fn``,
        and, when the measure is ``differentiable`` (dimension, flatness), recorded with autograd on the
        parameters ``params`` selects (default the trainable ones)."""
        problem = None
        if self.released:
            problem = "it was released"
        elif self.fm.module is not model or self.fm.dtype != dtype:
            problem = f"it was recorded for {type(self.fm.module).__name__} in {self.fm.dtype}"
        elif self.fm.output_fn is not output_fn:
            problem = "it was recorded with another output_fn"
        elif differentiable and not self.grad:
            problem = "it was recorded without autograd (grad=False)"
        elif differentiable and self.trainable:
            names = [n for n, p in model.named_parameters() if p.requires_grad] if params is None else list(params)
            if set(names) != set(self.fm.params):
                problem = f"it differentiates {len(self.fm.params)} parameter tensors, not the {len(names)} asked for"
        if problem is not None:
            raise ValueError(
                f"this ProbeTrace cannot serve {type(model).__name__} in {dtype}: {problem}. Record one with "
                "ProbeTrace.of(model, x, params=..., dtype=..., output_fn=...) and pass the same arguments"
            )

    def release(self) -> None:
        """Free the graph, activations and copies (the trace is unusable afterwards)."""
        self.calls.clear()
        self.functions.clear()
        self.layer_inputs.clear()
        self.deltas.clear()
        self.input_readers.clear()
        self.memo.clear()
        self._leaves = None
        self.released = True
        self.fm.params = {}
        self.output = self.theta = torch.empty(0)


@contextlib.contextmanager
def traced(
    model: nn.Module, x: Any, trace: ProbeTrace | None, *, params: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float64, output_fn: OutputFn | None = None, differentiable: bool = False,
    factors: bool = False,
) -> Iterator[ProbeTrace]:
    """The measures' entry: ``model`` in :func:`measurement_mode` and its trace on ``x`` — ``trace`` when given
    (checked with :meth:`ProbeTrace.check`), else one recorded with :meth:`ProbeTrace.of` and released on exit.

    ``differentiable``: the measure differentiates in θ (dimension, flatness): the trace must have autograd and
    the measure's parameters, and a model without trainable parameters is refused. ``factors``: record the Gram
    engine's factors (when recording).
    """
    with measurement_mode(model):
        own = trace is None
        if trace is None:
            trace = ProbeTrace.of(model, x, params=params, dtype=dtype, output_fn=output_fn, grad=differentiable,
                                  factors=factors)
        try:
            trace.check(model, dtype, output_fn, params, differentiable=differentiable)
            if differentiable:
                trace.require_trainable()
            yield trace
        finally:
            if own:
                trace.release()


def _measured_affine(fm: FunctionalModel) -> set[str]:
    """Names of the layers with a factor form and a measured weight or bias (their signals feed the Gram
    factors, :mod:`lightning_geomdim.core.factor_forms`; an attention's out_proj parameters are its own)."""
    names = set()
    for name, m in fm.module.named_modules():
        if isinstance(m, FACTOR_FORMS):
            prefix = f"{name}." if name else ""
            own = m.named_parameters(recurse=isinstance(m, nn.MultiheadAttention))
            if any(prefix + p in fm.params for p, _ in own):
                names.add(name)
    return names
