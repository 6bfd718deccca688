"""Neuron alignment: how the hyperplanes of the hidden ReLU units of each layer cluster (docs/science.md).

A neuron j of a Linear layer feeding a ReLU is u_j = (w_j, b_j) / ‖(w_j, b_j)‖ (row j of the weight, its
bias); for a convolution it is one filter per output channel (``weight[c]`` flattened, ``bias[c]`` appended).
Two neurons with cos(u_i, u_j) = 1 cut the input space along the same hyperplane, on the same side
(positive multiples of each other); cos = −1 is the same hyperplane with the opposite side, not aligned.

Which layers: an ``nn.Linear`` / ``nn.Conv{1,2,3}d`` whose output reaches an ``nn.ReLU`` / ``nn.LeakyReLU``
directly or through ``nn.Identity`` / dropout modules (identity in eval mode) and batch normalisations with running
statistics (a per-channel affine map in eval mode, folded into the neurons: conv → BatchNorm → ReLU, the standard
block, is measured on the composed map, and ``AlignmentStats.folded`` names what was folded), so that the ReLU's
pattern is 1[u_j · (x, 1) > 0]. Anything else in between (LayerNorm, pooling, a residual addition, functional code)
breaks the link and the layer is not reported. With ``x`` the data flow is read from the traced pass tensor by tensor
(:mod:`lightning_geomdim.core.probe_trace`); without ``x`` from the children order of the model's ``nn.Sequential``
containers (exactly how a Sequential runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lightning_geomdim.core.activation_patterns import unit_activity
from lightning_geomdim.core.errors import NotApplicableError, Remedy
from lightning_geomdim.core.functional_model import OutputFn
from lightning_geomdim.core.layer_kinds import AFFINE, BATCH_NORM, PASS_THROUGH, RELU_LIKE
from lightning_geomdim.core.memory import check_memory, format_bytes, memory_budget
from lightning_geomdim.core.probe_trace import ProbeTrace, TracedCall, traced
from lightning_geomdim.core.rank import matrix_stable_rank
from lightning_geomdim.core.tracing import call_keys


@dataclass(frozen=True)
class AlignmentStats:
    """Alignment of the neurons of one layer (n = number of neurons: out_features, or out_channels).

    Attributes:
        num_neurons: n.
        num_clusters: connected components of the graph {cos(u_i, u_j) > threshold}.
        mean_max_cosine: mean over neurons of their best match max_{j≠i} cos(u_i, u_j); ``nan`` if n = 1.
        max_cosines: shape (n,), float64, each neuron's best match (for histograms); ``nan`` if n = 1.
        cosines: shape (n, n), float64, pairwise cosines (a neuron with zero weights and bias has cosine 0
            with every neuron, itself included).
        cluster_labels: shape (n,), int64, cluster index of each neuron, 0..num_clusters − 1 in order of first
            appearance.
        stable_rank: ‖W‖_F² / ‖W‖_2² of the weight matrix W, shape (n, fan_in) (bias excluded; with the batch
            normalisations of ``folded`` folded in).
        dead: shape (n,), bool, never active on x (conv: at no position of any input); ``None`` without x.
        always_active: shape (n,), bool, active on every input (and every position); ``None`` without x.
        duplicate_patterns: shape (n,), bool, the unit's activation column on x (conv: over inputs ×
            positions) equals another unit's; ``None`` without x. Two dead units duplicate each other.
        folded: the batch normalisations (eval mode) between the layer and its ReLU, folded into the neurons: the
            neurons are those of the composed affine map (conv → BatchNorm → ReLU, the standard block).
    """

    num_neurons: int
    num_clusters: int
    mean_max_cosine: float
    max_cosines: Tensor
    cosines: Tensor
    cluster_labels: Tensor
    stable_rank: float
    dead: Tensor | None = None
    always_active: Tensor | None = None
    duplicate_patterns: Tensor | None = None
    folded: tuple[str, ...] = ()

    @property
    def num_dead(self) -> int | None:
        return None if self.dead is None else int(self.dead.sum())

    @property
    def num_always_active(self) -> int | None:
        return None if self.always_active is None else int(self.always_active.sum())

    @property
    def num_duplicate_patterns(self) -> int | None:
        return None if self.duplicate_patterns is None else int(self.duplicate_patterns.sum())

    def scalars(self) -> dict[str, float]:
        """The scalar statistics, for logging: counts as floats; the x-dependent ones only when computed."""
        out = {
            "num_neurons": float(self.num_neurons),
            "num_clusters": float(self.num_clusters),
            "mean_max_cosine": self.mean_max_cosine,
            "stable_rank": self.stable_rank,
        }
        for key in ("num_dead", "num_always_active", "num_duplicate_patterns"):
            value = getattr(self, key)
            if value is not None:
                out[key] = float(value)
        return out


def neuron_alignment(
    model: nn.Module, x: Any = None, *, threshold: float = 0.99, dtype: torch.dtype = torch.float64,
    output_fn: OutputFn | None = None, max_memory_bytes: int | None = None, trace: ProbeTrace | None = None,
) -> dict[str, AlignmentStats]:
    """Alignment statistics of every Linear/Conv layer that feeds a ReLU, keyed by module name.

    Args:
        model: the network; only read (mode, flags, grads and the global RNG are left as they were).
        x: optional probe batch (Tensor (N, ...), tuple or dict, as in ``batch_functional_dimension``): traces
            the data flow and gives ``dead``, ``always_active`` and ``duplicate_patterns``.
        threshold: two neurons are linked when cos(u_i, u_j) > threshold, −1 ≤ threshold < 1.
        dtype: computation dtype of the cosines and of the forward pass on x (float64 by default).
        output_fn: only needed when the model returns a non-tensor.
        max_memory_bytes: memory budget in bytes; default half the available memory (see
            :mod:`lightning_geomdim.core.memory`).
        trace: a :class:`~lightning_geomdim.core.probe_trace.ProbeTrace` of ``model`` on ``x`` already recorded
            (shared with the other measures of a step); it replaces ``x``, and the neurons are read from its
            float64 parameters. Default: record one when ``x`` is given.

    Returns:
        Module name → :class:`AlignmentStats`, in execution (with x) or registration (without x) order.
        A layer called several times (shared weights) is reported once; its activity statistics pool the
        calls. Cost: one forward on one sample and one on x (none with ``trace``), plus O(n² · fan_in) per layer.
        Memory (:func:`alignment_bytes`, checked before any cosine): the n × n
        float64 cosines of every layer are kept (8 n² bytes each), and the largest layer's computation
        holds 19 n² + 16 n (fan_in + 1) bytes more (a float64 temporary, the int64 labels of the
        clustering, three boolean n × n masks, the normalised neurons): 2.1 GiB for n = 16,384.

    Raises:
        NotApplicableError: the model has no ``nn.ReLU`` / ``nn.LeakyReLU`` module, or no Linear/Conv layer
            feeds one as described in the module docstring.
        ValueError: threshold outside [−1, 1).
        MemoryBudgetError: the cosine matrices exceed the budget (raised before computing them).

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]))
        ...     _ = net[0].bias.zero_()
        >>> stats = neuron_alignment(net)  # rows 0 and 1 share a direction
        >>> list(stats), stats["0"].num_neurons, stats["0"].num_clusters
        (['0'], 3, 2)
    """
    if not -1.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [-1, 1), got {threshold}: e.g. 0.99 links neurons within ~8°")
    if not any(isinstance(m, RELU_LIKE) for m in model.modules()):
        raise NotApplicableError(
            f"{type(model).__name__} has no nn.ReLU / nn.LeakyReLU module, so neuron alignment is not defined "
            "(functional relu calls are not seen: use nn.ReLU modules to have them measured)"
        )
    folded: dict[str, list[str]] = {}  # layer → the batch normalisations folded into its neurons
    if trace is None and x is None:
        return _statistics(model, _feeding(model, None, max_memory_bytes, folded), None, threshold, dtype, folded)
    names = [n for n, _ in model.named_parameters()]
    if trace is None:  # the data flow and the memory check from one sample, before the pass of the whole batch
        with traced(model, _first_sample(x), None, params=names, dtype=dtype, output_fn=output_fn) as first:
            feeding = _feeding(model, first, max_memory_bytes, folded)
    with traced(model, x, trace, params=names, dtype=dtype, output_fn=output_fn) as recorded:
        if trace is not None:
            feeding = _feeding(model, recorded, max_memory_bytes, folded)
        return _statistics(model, feeding, recorded, threshold, dtype, folded)


def _first_sample(x: Any) -> Any:
    """The first sample of a probe batch (tensors sliced along dim 0 in a tensor, tuple or dict)."""
    return tree_map(lambda t: t[:1] if isinstance(t, Tensor) and t.dim() > 0 else t, x)


def _feeding(
    model: nn.Module, trace: ProbeTrace | None, max_memory_bytes: int | None, folded: dict[str, list[str]],
) -> dict[str, list[str]]:
    """The layers measured (name → keys of the ReLU calls they feed), after checking the cosines' memory;
    ``folded`` receives the batch normalisations folded into each."""
    feeding = ({name: [] for name in _sequential_feeding(model, folded)} if trace is None
               else _traced_feeding(trace, folded))
    if not feeding:
        how = "in the traced forward" if trace is not None else "in the children order of its nn.Sequential containers"
        raise NotApplicableError(
            f"no nn.Linear / nn.Conv layer of {type(model).__name__} feeds a ReLU directly (only through "
            f"Identity/Dropout/BatchNorm) {how}, so neuron alignment is not defined for it"
            + ("" if trace is not None else ": pass a probe batch x=... to trace the data flow of a custom forward")
        )
    modules = dict(model.named_modules())
    shapes = {name: _neuron_shape(modules[name]) for name in feeding}
    widest = max(shapes, key=lambda name: shapes[name][0])
    check_memory(
        alignment_bytes(list(shapes.values())), memory_budget(modules[widest].weight.device, max_memory_bytes),
        what=f"neuron alignment of {len(shapes)} layer(s) (n × n float64 cosines each; widest {widest!r} with "
        f"n = {shapes[widest][0]:,} neurons: {format_bytes(8 * shapes[widest][0] ** 2)} per matrix)",
        remedies=(Remedy("the pairwise cosines have no cheaper exact form: leave alignment out for this model"),
                  Remedy("e.g. GeometryMonitor({arg}=('dimension', 'flatness'))", "measures")),
    )
    return feeding


def _statistics(
    model: nn.Module, feeding: dict[str, list[str]], trace: ProbeTrace | None, threshold: float, dtype: torch.dtype,
    folded: dict[str, list[str]],
) -> dict[str, AlignmentStats]:
    modules = dict(model.named_modules())
    patterns: dict[str, Tensor] = {} if trace is None else trace.patterns()
    tensors = {} if trace is None else {**trace.fm.frozen, **trace.fm.params}
    return {
        name: _layer_stats(modules, name, tensors, [patterns[k] for k in keys], threshold, dtype, folded.get(name, []))
        for name, keys in feeding.items()
    }


def alignment_bytes(shapes: list[tuple[int, int]]) -> int:
    """Peak memory estimate of :func:`neuron_alignment` for layers of (n, fan_in + 1) neurons, in bytes.

    Every layer's (n, n) float64 cosines are kept (8 n²); the largest layer's computation adds
    19 n² + 16 n (fan_in + 1) (see :func:`neuron_alignment`).
    """
    kept = sum(8 * n * n for n, _ in shapes)
    work = max(19 * n * n + 16 * n * width for n, width in shapes)
    return kept + work


def _neuron_shape(module: nn.Module) -> tuple[int, int]:
    """(n, length of a neuron): out_features / out_channels and fan_in (+ 1 with a bias)."""
    weight = module.weight
    return int(weight.shape[0]), weight[0].numel() + (getattr(module, "bias", None) is not None)


def _sequential_feeding(model: nn.Module, folded: dict[str, list[str]]) -> list[str]:
    """Affine children of nn.Sequential containers followed by a ReLU (through pass-through modules and batch
    normalisations, whose names go to ``folded``)."""
    found = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        qualified = [f"{prefix}.{name}" if prefix else name for name, _ in children]
        for i, (_, child) in enumerate(children):
            if not isinstance(child, AFFINE):
                continue
            norms = []
            for j, (_, nxt) in enumerate(children[i + 1 :], start=i + 1):
                if isinstance(nxt, RELU_LIKE):
                    found.append(qualified[i])
                    folded.setdefault(qualified[i], norms)
                    break
                if isinstance(nxt, BATCH_NORM) and nxt.running_var is not None:
                    norms.append(qualified[j])
                elif not isinstance(nxt, PASS_THROUGH):
                    break
    return list(dict.fromkeys(found))


def _traced_feeding(trace: ProbeTrace, folded: dict[str, list[str]]) -> dict[str, list[str]]:
    """Affine module name → keys (as in :func:`activation_patterns`) of the ReLU calls it feeds, in the trace;
    ``folded`` receives, per affine module, the batch normalisations between it and its ReLU."""
    calls = trace.leaf_calls()
    relu_calls = [c for c in calls if isinstance(c.module, RELU_LIKE)]
    keys = dict(zip((id(c) for c in relu_calls), call_keys(relu_calls), strict=True))
    feeding: dict[str, list[str]] = {}
    for i, call in enumerate(calls):
        if isinstance(call.module, RELU_LIKE):
            found = _producer(calls, i, call)
            if found is not None:
                feeding.setdefault(found[0].name, []).append(keys[id(call)])
                folded.setdefault(found[0].name, [c.name for c in found[1]])
    return feeding


def _producer(calls: list[TracedCall], index: int, relu: TracedCall) -> tuple[TracedCall, list[TracedCall]] | None:
    """The affine call whose output is the ReLU's input, through pass-through calls and batch normalisations with
    running statistics (returned in data-flow order, to be folded into its neurons); else None."""
    tensor, norms = relu.input, []
    for j in range(index - 1, -1, -1):
        c = calls[j]
        if not (isinstance(tensor, Tensor) and c.output is tensor):
            continue
        if isinstance(c.module, AFFINE):
            return c, norms
        if isinstance(c.module, BATCH_NORM) and c.module.running_var is not None:
            norms.insert(0, c)
        elif not isinstance(c.module, PASS_THROUGH):
            return None
        tensor = c.input
    return None


def _neurons(
    modules: dict[str, nn.Module], name: str, tensors: dict[str, Tensor], dtype: torch.dtype, norms: list[str],
) -> tuple[Tensor, Tensor]:
    """(W, U): weight as (n, fan_in) and the neurons (w_j, b_j), shape (n, fan_in + 1) (or fan_in without bias),
    of the affine map from the layer's input to its ReLU's input: each batch normalisation of ``norms`` (eval mode,
    running statistics) folded in, w_j ← s_j w_j and b_j ← s_j b_j + β_j − s_j μ_j with s_j = γ_j / √(σ²_j + ε).

    ``tensors``: the trace's copies of the parameters and buffers in ``dtype`` by qualified name (read instead of
    copying the module's own when present)."""

    def read(owner: str, attr: str) -> Tensor | None:
        value = tensors.get(f"{owner}.{attr}" if owner else attr, getattr(modules[owner], attr, None))
        return None if value is None else value.detach().to(dtype=dtype)

    w = read(name, "weight")
    assert w is not None
    w = w.reshape(w.shape[0], -1)
    b = read(name, "bias")
    for norm in norms:
        bn = modules[norm]
        scale = (read(norm, "running_var") + bn.eps).rsqrt()  # type: ignore[operator]
        gamma, beta = read(norm, "weight"), read(norm, "bias")
        scale = scale if gamma is None else gamma * scale
        shift = -scale * read(norm, "running_mean") + (0.0 if beta is None else beta)  # type: ignore[operator]
        w, b = scale[:, None] * w, shift if b is None else scale * b + shift
    if b is None:
        return w, w
    return w, torch.cat([w, b.reshape(-1, 1)], dim=1)


def _clusters(adjacency: Tensor) -> Tensor:
    """Connected components of a symmetric boolean (n, n) graph: each node's smallest node index."""
    n = adjacency.shape[0]
    adjacency = adjacency | torch.eye(n, dtype=torch.bool, device=adjacency.device)
    labels = torch.arange(n, device=adjacency.device)
    while True:  # min-label propagation: at most (component diameter) rounds
        new = torch.where(adjacency, labels.unsqueeze(0), n).min(dim=1).values
        if torch.equal(new, labels):
            return labels
        labels = new


def _layer_stats(
    modules: dict[str, nn.Module], name: str, tensors: dict[str, Tensor], patterns: list[Tensor], threshold: float,
    dtype: torch.dtype, folded: list[str],
) -> AlignmentStats:
    module = modules[name]
    w, u = _neurons(modules, name, tensors, dtype, folded)
    n = u.shape[0]
    norms = torch.linalg.vector_norm(u, dim=1, keepdim=True)
    u = torch.where(norms > 0, u / norms.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(u))
    cosines = (u @ u.T).clamp(-1.0, 1.0).to(torch.float64)
    if n > 1:
        others = cosines.masked_fill(torch.eye(n, dtype=torch.bool, device=cosines.device), -math.inf)
        max_cosines = others.max(dim=1).values
        del others  # one n × n float64 temporary at a time (the memory estimate counts one)
    else:
        max_cosines = torch.full((1,), math.nan, dtype=torch.float64)
    labels = _clusters(cosines > threshold)
    _, cluster_labels = torch.unique(labels, return_inverse=True)
    stats: dict[str, Any] = {}
    if patterns:
        columns = torch.cat([_unit_columns(module, p) for p in patterns], dim=0)  # (rows, n)
        activity = unit_activity({"layer": columns})["layer"]
        _, inverse, counts = torch.unique(columns.T, dim=0, return_inverse=True, return_counts=True)
        stats = {
            "dead": activity.dead.cpu(),
            "always_active": activity.always_active.cpu(),
            "duplicate_patterns": (counts[inverse] > 1).cpu(),
        }
    return AlignmentStats(
        num_neurons=n,
        num_clusters=int(cluster_labels.max()) + 1,
        mean_max_cosine=float(max_cosines.mean()),
        max_cosines=max_cosines.cpu(),
        cosines=cosines.cpu(),
        cluster_labels=cluster_labels.cpu(),
        stable_rank=matrix_stable_rank(w),
        folded=tuple(folded),
        **stats,
    )


def _unit_columns(module: nn.Module, pattern: Tensor) -> Tensor:
    """A ReLU pattern (N, units) as (rows, n): one column per neuron (Linear: last dim; conv: channel dim)."""
    num = pattern.shape[0]
    if isinstance(module, nn.Linear):
        return pattern.reshape(-1, module.out_features)
    channels = module.out_channels
    return pattern.reshape(num, channels, -1).transpose(1, 2).reshape(-1, channels)
