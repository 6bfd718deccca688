"""Parameter symmetries that bound the batch functional dimension from above.

Positive rescaling: for a hidden unit j of an affine layer A (Linear or Conv) whose output reaches the
next affine layer B only through positively homogeneous modules (ReLU, LeakyReLU, max/avg pooling,
flatten, dropout in eval mode), scaling A's row j (weights and bias) by c > 0 and B's input column(s) j
by 1/c leaves f unchanged. Each such unit (conv: each output channel) removes one dimension:
rank J ≤ P − (number of hidden units).

Softmax heads: when the output is ``nn.Softmax``/``nn.LogSoftmax`` over the last dimension, each sample's
K output differentials satisfy one linear relation, so rank J ≤ N·(K − 1).

Recognition is conservative: the structure is read from one traced forward pass, a unit counts only when
the data flow A → activation → ... → B is seen tensor by tensor (so residual additions or functional code
in between break the chain), no tensor of the chain is read by anything but the next module of the chain
(``b(h) + h[:, :2] ** 2`` is not rescaling-invariant), every parameter of A and the weight of B are among the
measured parameters, and no parameterised module runs twice (shared weights). Anything unrecognised yields no
symmetry, i.e. a looser bound, never a wrong one.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from lightning_geomdim.core.layer_kinds import AFFINE, HOMOGENEOUS, RELU_LIKE
from lightning_geomdim.core.probe_trace import ProbeTrace, TracedCall


@dataclass(frozen=True)
class NetworkSymmetries:
    """Symmetries recognised in a network.

    Attributes:
        hidden_units: affine module name → number of hidden units with a positive-rescaling symmetry.
        softmax_head: the ``nn.Softmax`` / ``nn.LogSoftmax`` module whose output over its last dimension is the
            model's output, or None.
    """

    hidden_units: dict[str, int]
    softmax_head: nn.Module | None = None

    @property
    def softmax_output(self) -> bool:
        """The output is a softmax / log-softmax over its last dimension."""
        return self.softmax_head is not None

    @property
    def num_hidden_neurons(self) -> int:
        return sum(self.hidden_units.values())

    def upper_bound(self, num_samples: int, output_shape: tuple[int, ...], num_params: int) -> int:
        """min(rows, P − hidden) with rows = M, or N·(K − 1) for a softmax head."""
        rows = 1
        for s in output_shape:
            rows *= s
        if self.softmax_output:
            rows -= rows // output_shape[-1]
        return max(0, min(rows, num_params - self.num_hidden_neurons))


def _units(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _same(a: object, b: object) -> bool:
    return isinstance(a, Tensor) and a is b


def find_symmetries(trace: ProbeTrace) -> NetworkSymmetries:
    """Recognise the symmetries of the traced model (rules in the module docstring)."""
    fm, calls, out = trace.fm, trace.leaf_calls(), trace.output
    selected = set(fm.params)
    names_of = {id(m): n for n, m in fm.module.named_modules()}

    def measured(call: TracedCall, *, bias: bool) -> bool:
        prefix = f"{names_of[id(call.module)]}."
        own = [n for n, _ in call.module.named_parameters()]
        needed = own if bias else [n for n in own if n == "weight"]
        return bool(needed) and all(prefix + n in selected for n in needed)

    param_calls = [c.name for c in calls if any(True for _ in c.module.parameters(recurse=False))]
    hidden: dict[str, int] = {}
    if len(param_calls) == len(set(param_calls)):  # shared weights: recognise nothing
        for i, a in enumerate(calls):
            if not isinstance(a.module, AFFINE) or not measured(a, bias=True):
                continue
            prev, saw_relu, chain = a, False, {i}
            for j, b in enumerate(calls[i + 1 :], start=i + 1):
                # the tensor between prev and b must be read by b alone (and, when in place, by prev)
                if not _same(b.input, prev.output) or not set(trace.input_readers.get(j, [])) <= chain | {j}:
                    break
                chain.add(j)
                if isinstance(b.module, AFFINE):
                    if saw_relu and measured(b, bias=False):
                        hidden[a.name] = _units(a.module)
                    break
                if not isinstance(b.module, HOMOGENEOUS) or any(True for _ in b.module.parameters()):
                    break
                saw_relu = saw_relu or isinstance(b.module, RELU_LIKE)
                prev = b
    last = calls[-1] if calls else None
    softmax = (  # the measured tensor is the softmax's own output (an output_fn may only pick it out of a container)
        last is not None
        and isinstance(last.module, (nn.Softmax, nn.LogSoftmax))
        and _same(last.output, out)
        and last.module.dim in (-1, out.dim() - 1)
    )
    return NetworkSymmetries(hidden, last.module if softmax and last is not None else None)
