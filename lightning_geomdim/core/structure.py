"""The structural conditions under which the factored engines (float Gram, exact) measure a model exactly,
checked on one :class:`~lightning_geomdim.core.probe_trace.ProbeTrace` (the conditions are listed in
:mod:`lightning_geomdim.core.gram`): supported parameterised modules, per-sample parameter-free modules, and data
that flows only from module to module."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from lightning_geomdim.core.errors import NotApplicableError
from lightning_geomdim.core.gram_plan import GramLayer, GramPlan
from lightning_geomdim.core.layer_kinds import ALONG_DIM, DROPOUT, FACTORED_AFFINE, PER_SAMPLE, POOLING
from lightning_geomdim.core.probe_trace import ProbeTrace, TracedCall


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_mod

    return bool(module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)


def conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric zero padding of ``conv`` as two ints, or None when ``F.unfold`` cannot express it."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            return None
        return (total[0] // 2, total[1] // 2)
    return (int(conv.padding[0]), int(conv.padding[1]))


def _affine_problem(name: str, module: nn.Module) -> str | None:
    """Why ``module`` (which owns parameters) is not a supported affine layer, or None."""
    label = f"module {name or '<root>'!r} ({type(module).__name__})"
    if not isinstance(module, FACTORED_AFFINE):
        return (f"{label} has parameters; the Gram engine differentiates only nn.Linear and nn.Conv2d by "
                "formula")
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    if type(module).forward is not base.forward or (
        base is nn.Conv2d and type(module)._conv_forward is not nn.Conv2d._conv_forward
    ):
        return f"{label} overrides forward"
    own = {n for n, _ in module.named_parameters(recurse=False)}
    if "weight" not in own or not own <= {"weight", "bias"} or next(module.children(), None) is not None:
        return f"{label} has parameters {sorted(own)} or submodules (a reparametrisation?)"
    if _has_hooks(module):
        return f"{label} has forward hooks, which may change its input or output"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"{label} has groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return f"{label} has padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
        if conv_padding(module) is None:
            return f"{label} has asymmetric 'same' padding"
    return None


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
    """Why the Gram engine would not be exact for the traced model and probe (None when it is)."""
    try:
        gram_plan(trace)
    except NotApplicableError as err:
        return str(err)
    return None


def gram_plan(trace: ProbeTrace) -> GramPlan:
    """Check the exactness conditions (:mod:`lightning_geomdim.core.gram`) on the traced pass and plan the Gram.

    Raises:
        NotApplicableError: a condition fails; the message names the module and the alternative engine.
    """
    problem, plan, _ = check_structure(trace)
    if problem is not None:
        raise NotApplicableError(
            f"the Gram engine is not exact for this model: {problem}. Use engine='jacrev' (dense Jacobian, "
            "any differentiable model) or engine='auto', which falls back to it"
        )
    assert plan is not None
    return plan


@dataclass(frozen=True)
class TracedGraph:
    """The module calls of one traced forward pass and how data flows between them.

    Attributes:
        calls: every leaf (or parameterised) module call, in execution order, with its input and output.
        sources: for each call, the index of the call whose output is its input; -1 for the probe input.
        output: index of the call whose output is the measured output.
    """

    calls: tuple[TracedCall, ...]
    sources: tuple[int, ...]
    output: int


def check_structure(trace: ProbeTrace) -> tuple[str | None, GramPlan | None, TracedGraph | None]:
    """Check the structural conditions on the traced pass: (None, plan, graph) when they hold, else (the reason,
    None, None), for each engine to phrase its own refusal."""
    none = None, None
    fm, inputs = trace.fm, trace.inputs
    module = fm.module
    if inputs.kwargs or len(inputs.args) != 1 or not isinstance(inputs.args[0], Tensor):
        return "the probe is not a single positional tensor", *none
    probe = inputs.args[0]
    n = inputs.num_samples
    if _global_hooks():
        return "global module forward hooks are registered", *none
    named = list(module.named_parameters(remove_duplicate=False))
    if len(named) != len(dict(module.named_parameters())):
        return "some parameters are shared (tied) between modules", *none
    storages = [p.untyped_storage().data_ptr() for _, p in named if p.numel() > 0]
    if len(storages) != len(set(storages)):
        return "some parameters share storage (tied or views of one tensor)", *none
    for name, sub in module.named_modules():
        if any(True for _ in sub.parameters(recurse=False)):
            problem = _affine_problem(name, sub)
            if problem is not None:
                return problem, *none

    probe_version = trace.probe_version
    calls, out = trace.calls, trace.output
    produced: dict[int, int] = {}  # id(tensor) -> index of the latest call that output it (kept alive by calls)
    sources: list[int] = []
    seen_affine: set[str] = set()
    layers: list[GramLayer] = []
    selected = set(fm.params)
    activation_numel = 0
    for index, call in enumerate(calls):
        label = f"module {call.name or '<root>'!r} ({type(call.module).__name__})"
        inp = call.input
        if call.num_args != 1 or not isinstance(inp, Tensor) or inp.dim() == 0 or inp.shape[0] != n:
            return f"{label} is not called on one tensor of {n} samples", *none
        src = produced.get(id(inp))
        from_probe = inp is probe and call.input_version == probe_version
        if not from_probe and (src is None or calls[src].output_version != call.input_version):
            return (f"the input of {label} is computed outside modules (functional code, or an in-place "
                    "change, between modules)"), *none
        if not isinstance(call.output, Tensor) or call.output.dim() == 0 or call.output.shape[0] != n:
            return f"{label} does not return one tensor of {n} samples", *none
        activation_numel += call.output.numel()
        if isinstance(call.module, FACTORED_AFFINE):
            if call.name in seen_affine:
                return f"{label} is called more than once (shared weights)", *none
            seen_affine.add(call.name)
            if isinstance(call.module, nn.Conv2d) and inp.dim() != 4:
                return f"{label} is called on a {inp.dim()}-d input (only batched (N, C, H, W) inputs)", *none
            layer = _layer(call, selected)
            if layer is not None:
                layers.append(layer)
        else:
            problem = _per_sample_problem(label, call.module, inp)
            if problem is not None:
                return problem, *none
        sources.append(-1 if from_probe else src)
        produced[id(call.output)] = index
    last = produced.get(id(out))
    if last is None or calls[last].output_version != out._version:
        return ("the measured output is not a module's output (functional code after the last module, or an "
                "output_fn that computes rather than selects)"), *none
    if out.dim() == 0 or out.shape[0] != n:
        return f"the measured output has shape {tuple(out.shape)}, not ({n}, ...)", *none
    per_sample = out.numel() // n
    if fm.logit_head is not None:  # softmax head: the logit differences, C − 1 of every C classes
        per_sample -= per_sample // out.shape[-1]
    plan = GramPlan(
        layers=tuple(layers), num_samples=n, outputs_per_sample=per_sample, num_params=fm.num_params,
        activation_numel=activation_numel,
    )
    return None, plan, TracedGraph(tuple(calls), tuple(sources), last)


def _layer(call: TracedCall, selected: set[str]) -> GramLayer | None:
    m = call.module
    prefix = f"{call.name}." if call.name else ""
    weight = prefix + "weight" in selected
    bias = m.bias is not None and prefix + "bias" in selected
    if not (weight or bias):
        return None
    out = call.output
    if isinstance(m, nn.Linear):
        return GramLayer(call.name, m, weight, bias, positions=call.input[0].numel() // m.in_features,
                         features=m.in_features, units=m.out_features)
    return GramLayer(call.name, m, weight, bias, positions=out.shape[2] * out.shape[3],
                     features=m.in_channels * m.kernel_size[0] * m.kernel_size[1], units=m.out_channels)
