"""The structural conditions under which the factored engines measure a model exactly, checked on one
:class:`~lightning_geomdim.core.probe_trace.ProbeTrace`.

* The float Gram engine (:func:`factored_plan`): every measured parameter belongs to a layer with a factor form
  (:mod:`lightning_geomdim.core.factor_forms`), called once; anything may sit between the layers, because one
  backward checks that samples do not interact and that the forms give the whole gradient
  (:mod:`lightning_geomdim.core.factor_check`).
* The exact engine (:func:`check_structure`): the network is re-run over GF(p) module by module, so

  - the probe is one positional tensor; no parameter is shared or tied;
  - every module that owns parameters (frozen or not) is a plain ``nn.Linear`` or ``nn.Conv2d`` (groups = 1, zero
    padding, no hooks), called at most once;
  - every other module that runs is a parameter-free module known to act on each sample separately (ReLU-like and
    other elementwise activations, dropout in eval mode, pooling, flatten, softmax over a non-batch dimension);
  - data flows only from module to module: each module's input is the probe or, unmodified, the output of an
    earlier module, and the measured output is a module's output (``output_fn`` may only pick it out of a tuple or
    dict). Functional code between modules (``x + y``, ``torch.relu``, ``x.view``, in-place edits) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from lightning_geomdim.core.attention_form import OUT_PROJ, attention_call_problem, attention_layers
from lightning_geomdim.core.errors import NotApplicableError
from lightning_geomdim.core.factor_forms import GramLayer, conv_padding, form_problem, layer_of
from lightning_geomdim.core.gram_plan import GramPlan
from lightning_geomdim.core.layer_kinds import (
    ALONG_DIM,
    BATCH_NORM,
    DROPOUT,
    EXACT_LAYERS,
    PER_SAMPLE,
    POOLING,
    RECURRENT,
)
from lightning_geomdim.core.probe_trace import ProbeTrace, TracedCall
from lightning_geomdim.core.recurrent_form import partial_problem, recurrent_call_problem, recurrent_layers
from lightning_geomdim.core.tracing import FunctionCall

__all__ = ["TracedGraph", "check_structure", "conv_padding", "factored_plan", "gram_plan", "gram_unsupported_reason"]


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_mod

    return bool(module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)


def _per_sample_problem(label: str, module: nn.Module, inp: Tensor) -> str | None:
    """Why the parameter-free ``module`` may mix samples on ``inp``, or None."""
    if type(module) not in PER_SAMPLE:
        return (f"{label} is not known to act on each sample separately (supported: Linear, Conv2d and "
                "elementwise activations, dropout, pooling, flatten, softmax)")
    if _has_hooks(module):
        return f"{label} has forward hooks"
    if isinstance(module, DROPOUT) and module.training:
        return f"{label} is in training mode (random masks); measure in eval mode"
    if isinstance(module, POOLING) and getattr(module, "return_indices", False):
        return f"{label} returns indices"
    if isinstance(module, ALONG_DIM):
        dim = module.start_dim if isinstance(module, nn.Flatten) else module.dim
        if dim is None or (inp.dim() > 0 and dim % inp.dim() == 0):
            return f"{label} acts along dim {dim}, which may be the sample dimension"
    return None


def gram_unsupported_reason(trace: ProbeTrace) -> str | None:
    """Why the float Gram engine would not be exact for the traced model and probe (None when it is): the
    structural conditions of :func:`factored_plan` and, on a trace with autograd and factors, the check of
    :func:`~lightning_geomdim.core.factor_check.factorization_problem` (one backward)."""
    from lightning_geomdim.core.factor_check import factorization_problem

    problem, plan = factored_plan(trace)
    if problem is None and trace.grad and trace.factors:
        assert plan is not None
        problem = factorization_problem(trace, plan)
    return None if problem is None else _gram_refusal(problem)


def gram_plan(trace: ProbeTrace) -> GramPlan:
    """The float Gram engine's plan: the structural conditions of :func:`factored_plan` (not the check by one
    backward, :func:`~lightning_geomdim.core.factor_check.factorization_problem`, which needs autograd).

    Raises:
        NotApplicableError: a condition fails; the message names the module and the alternative engine.
    """
    problem, plan = factored_plan(trace)
    if problem is not None:
        raise NotApplicableError(_gram_refusal(problem))
    assert plan is not None
    return plan


def _gram_refusal(problem: str) -> str:
    return (f"the Gram engine is not exact for this model: {problem}. Use engine='jacrev' (dense Jacobian, any "
            "differentiable model) or engine='auto', which falls back to it")


def _sharing_problem(module: nn.Module) -> str | None:
    if _global_hooks():
        return "global module forward hooks are registered"
    named = list(module.named_parameters(remove_duplicate=False))
    if len(named) != len(dict(module.named_parameters())):
        return "some parameters are shared (tied) between modules"
    storages = [p.untyped_storage().data_ptr() for _, p in named if p.numel() > 0]
    if len(storages) != len(set(storages)):
        return "some parameters share storage (tied or views of one tensor)"
    return None


def factored_plan(trace: ProbeTrace) -> tuple[str | None, GramPlan | None]:
    """The float Gram engine's structural conditions, on the traced pass: (None, plan) when they hold, else (the
    reason, None).

    Every module owning a measured parameter has a factor form (:mod:`~lightning_geomdim.core.factor_forms`), is
    called once, on one tensor of N samples, and returns one; no parameter is shared; the measured output has N
    samples. What sits between the layers (residual sums, attention, GELU, functional code) is free: that samples
    do not interact and that the forms account for the whole gradient is checked by one backward
    (:func:`~lightning_geomdim.core.factor_check.factorization_problem`). An ``nn.MultiheadAttention`` owns its
    ``out_proj`` parameters (:mod:`~lightning_geomdim.core.attention_form`) and is called as self-attention; an
    ``nn.LSTM`` / ``nn.GRU`` is called on one sequence of N samples without an initial state, and each of its layers
    and directions is one or two layers of the plan (:mod:`~lightning_geomdim.core.recurrent_form`).
    """
    fm, n = trace.fm, trace.inputs.num_samples
    problem = _sharing_problem(fm.module)
    if problem is not None:
        return problem, None
    selected = set(fm.params)
    measured = {}
    modules = dict(fm.module.named_modules())
    projections = {f"{name}.{OUT_PROJ}" if name else OUT_PROJ for name, sub in modules.items()
                   if isinstance(sub, nn.MultiheadAttention)}  # read by their attention, never called
    for name, sub in modules.items():
        prefix = f"{name}." if name else ""
        if name in projections:
            continue
        recurse = isinstance(sub, nn.MultiheadAttention)
        if any(prefix + p in selected for p, _ in sub.named_parameters(recurse=recurse)):
            problem = form_problem(name, sub) or partial_problem(name, sub, selected)
            if problem is not None:
                return problem, None
            measured[name] = sub
    layers: list[GramLayer] = []
    seen: set[str] = set()
    for call in trace.calls:
        if call.name not in measured or call.module is not measured[call.name]:
            continue
        label = f"module {call.name or '<root>'!r} ({type(call.module).__name__})"
        if call.name in seen:
            return f"{label} is called more than once (shared weights)", None
        seen.add(call.name)
        inp, out = call.input, call.output
        if isinstance(call.module, nn.MultiheadAttention):
            assert call.arguments is not None  # recorded for every attention call
            problem = attention_call_problem(label, call.module, call.arguments, n)
            if problem is not None:
                return problem, None
            layers.extend(attention_layers(call.name, call.module, inp, selected))
            continue
        if isinstance(call.module, RECURRENT):  # recomputed by the traced pass exactly when this accepts the call
            problem = recurrent_call_problem(label, call.module, inp, call.num_args, n)
            if problem is not None:
                return problem, None
            layers.extend(recurrent_layers(call.name, call.module, inp, selected))
            continue
        least = 1 if isinstance(call.module, nn.Embedding) else 2  # token ids (N,) or (N, T, ...)
        if call.num_args != 1 or not isinstance(inp, Tensor) or inp.dim() < least or inp.shape[0] != n:
            return f"{label} is not called on one tensor of {n} samples", None
        if not isinstance(out, Tensor) or out.dim() < 2 or out.shape[0] != n:
            return f"{label} does not return one tensor of {n} samples", None
        if isinstance(call.module, nn.Conv2d) and inp.dim() != 4:
            return f"{label} is called on a {inp.dim()}-d input (only batched (N, C, H, W) inputs)", None
        layer = layer_of(call.name, call.module, inp, out, selected)
        if layer is not None:
            layers.append(layer)
    out = trace.output
    if out.dim() == 0 or out.shape[0] != n:
        return f"the measured output has shape {tuple(out.shape)}, not ({n}, ...)", None
    return None, _plan(trace, tuple(layers), trace.activation_numel)


def _plan(trace: ProbeTrace, layers: tuple[GramLayer, ...], activation_numel: int) -> GramPlan:
    fm, out, n = trace.fm, trace.output, trace.inputs.num_samples
    per_sample = out.numel() // n
    if fm.logit_head is not None:  # softmax head: the logit differences, C − 1 of every C classes
        per_sample -= per_sample // out.shape[-1]
    return GramPlan(layers=layers, num_samples=n, outputs_per_sample=per_sample, num_params=fm.num_params,
                    activation_numel=activation_numel)


#: Torch functions the exact engine re-runs over GF(p) when they are called between modules: sums of two tensors
#: of the same shape (residual connections), reshapes that keep the samples apart, ReLU.
FUNCTIONS_SUM = frozenset({"add", "add_", "__add__", "__iadd__", "__radd__"})
FUNCTIONS_RESHAPE = frozenset({"flatten", "view", "reshape"})
FUNCTIONS_RELU = frozenset({"relu", "relu_"})


@dataclass(frozen=True)
class TracedGraph:
    """The module calls and functional calls of one traced forward pass and how data flows between them.

    Attributes:
        calls: every leaf (or parameterised) module call and every functional call outside modules that the output
            depends on (:class:`~lightning_geomdim.core.tracing.FunctionCall`), in execution order.
        sources: for each call, the indices of the calls whose outputs are its tensor inputs; -1 for the probe.
        output: index of the call whose output is the measured output.
    """

    calls: tuple[TracedCall | FunctionCall, ...]
    sources: tuple[tuple[int, ...], ...]
    output: int


def _function_problem(f: FunctionCall, n: int) -> str | None:
    """Why the exact engine cannot re-run the functional call ``f`` over GF(p), or None."""
    tensors, out = f.tensors(), f.output
    label = f"the function {f.name!r} called between modules"
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != n:
        return f"{label} does not return one tensor of {n} samples"
    if f.name in FUNCTIONS_SUM:
        if len(tensors) != 2 or len(f.args) != 2 or f.kwargs or tensors[0].shape != tensors[1].shape:
            return f"{label} is not a sum of two tensors of the same shape"
    elif f.name in FUNCTIONS_RESHAPE or f.name in FUNCTIONS_RELU:
        if len(tensors) != 1 or tensors[0].dim() == 0 or tensors[0].shape[0] != n:
            return f"{label} does not act on one tensor of {n} samples"
    else:
        return (f"{label} is not one the exact engine re-runs (sums of two tensors, flatten / view / reshape, "
                "relu)")
    return None


def check_structure(trace: ProbeTrace) -> tuple[str | None, GramPlan | None, TracedGraph | None]:
    """Check the exact engine's conditions (module docstring) on the traced pass: (None, plan, graph) when they
    hold, else (the reason, None, None), for each engine to phrase its own refusal."""
    none = None, None
    fm, inputs = trace.fm, trace.inputs
    module = fm.module
    if inputs.kwargs or len(inputs.args) != 1 or not isinstance(inputs.args[0], Tensor):
        return "the probe is not a single positional tensor", *none
    probe = inputs.args[0]
    n = inputs.num_samples
    problem = _sharing_problem(module)
    if problem is not None:
        return problem, *none
    for name, sub in module.named_modules():
        if any(True for _ in sub.parameters(recurse=False)):
            problem = form_problem(name, sub, kinds=EXACT_LAYERS, grouped=False)
            if problem is not None:
                return problem, *none

    # module calls and functional calls in execution order: function f ran after the first f.position module calls
    order: list[TracedCall | FunctionCall] = []
    functions = iter(trace.functions)
    pending = next(functions, None)
    for index, call in enumerate(trace.calls):
        while pending is not None and pending.position <= index:
            order.append(pending)
            pending = next(functions, None)
        order.append(call)
    while pending is not None:
        order.append(pending)
        pending = next(functions, None)

    produced: dict[tuple[int, int], int] = {(id(probe), trace.probe_version): -1}  # (id, version) -> node
    sources: list[tuple[int, ...]] = []
    problems: dict[int, str] = {}  # functional calls the engine cannot re-run, refused if the output needs them
    seen_layers: set[str] = set()
    layers: dict[int, GramLayer] = {}
    selected = set(fm.params)
    activation_numel = 0
    for index, node in enumerate(order):
        if isinstance(node, FunctionCall):
            tensors = node.tensors()
            found = [produced.get((id(t), v)) for t, v in zip(tensors, node.versions, strict=True)]
            problem = _function_problem(node, n)
            if problem is None and any(f is None for f in found):
                problem = f"an input of the function {node.name!r} is computed outside the traced calls"
            if problem is not None:
                problems[index] = problem
            sources.append(tuple(-2 if f is None else f for f in found))
            if isinstance(node.output, Tensor):
                produced[(id(node.output), node.output_version)] = index
            continue
        call = node
        label = f"module {call.name or '<root>'!r} ({type(call.module).__name__})"
        inp = call.input
        if call.num_args != 1 or not isinstance(inp, Tensor) or inp.dim() == 0 or inp.shape[0] != n:
            return f"{label} is not called on one tensor of {n} samples", *none
        src = produced.get((id(inp), call.input_version))
        if src is None:
            return (f"the input of {label} is computed outside modules by code the exact engine does not follow "
                    "(an in-place change, or a function it does not re-run)"), *none
        if not isinstance(call.output, Tensor) or call.output.dim() == 0 or call.output.shape[0] != n:
            return f"{label} does not return one tensor of {n} samples", *none
        activation_numel += call.output.numel()
        if isinstance(call.module, BATCH_NORM) and call.module.running_var is None:
            return f"{label} has no running statistics: it normalises with batch statistics, which mix samples", *none
        if isinstance(call.module, EXACT_LAYERS):
            if call.name in seen_layers:
                return f"{label} is called more than once (shared weights)", *none
            seen_layers.add(call.name)
            if isinstance(call.module, nn.Conv2d) and inp.dim() != 4:
                return f"{label} is called on a {inp.dim()}-d input (only batched (N, C, H, W) inputs)", *none
            layer = layer_of(call.name, call.module, inp, call.output, selected)
            if layer is not None:
                layers[index] = layer
        else:
            problem = _per_sample_problem(label, call.module, inp)
            if problem is not None:
                return problem, *none
        sources.append((src,))
        produced[(id(call.output), call.output_version)] = index
    out = trace.output
    last = produced.get((id(out), out._version))
    if last is None or last < 0:
        return ("the measured output is not a module's output (functional code after the last module, or an "
                "output_fn that computes rather than selects)"), *none
    if out.dim() == 0 or out.shape[0] != n:
        return f"the measured output has shape {tuple(out.shape)}, not ({n}, ...)", *none
    needed, stack = set(), [last]  # the calls the output depends on
    while stack:
        index = stack.pop()
        if index >= 0 and index not in needed:
            needed.add(index)
            if index in problems:
                return problems[index], *none
            stack.extend(sources[index])
    keep = sorted(needed)
    renumber = {old: new for new, old in enumerate(keep)}
    graph = TracedGraph(tuple(order[i] for i in keep),
                        tuple(tuple(renumber.get(s, -1) for s in sources[i]) for i in keep), renumber[last])
    # layers the output does not depend on have zero columns, like modules that did not run
    return None, _plan(trace, tuple(layers[i] for i in keep if i in layers), activation_numel), graph
