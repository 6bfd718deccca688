"""What a factored dimension engine (float Gram, exact) will compute, read from one traced pass: the measured
layers (:class:`~lightning_geomdim.core.factor_forms.GramLayer`), the :class:`GramPlan` (which Gram, J Jᵀ or Jᵀ J,
of which size) and its peak
memory (:func:`gram_bytes`). The formulas are in :mod:`lightning_geomdim.core.gram`."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from lightning_geomdim.core.errors import Remedy
from lightning_geomdim.core.factor_forms import GramLayer

Side = Literal["outputs", "params"]


@dataclass(frozen=True)
class GramPlan:
    """What :func:`gram_matrix` will compute, read from one traced forward pass.

    Attributes:
        layers: the measured affine layers that ran, in execution order.
        num_samples: N.
        outputs_per_sample: K (the measured output has M = N · K entries).
        num_params: P, every measured parameter (those of modules that did not run have zero columns).
        activation_numel: entries of all module outputs of the forward pass (for the backward's memory).
        outputs_per_sample: K, rows of J per sample: the measured output's entries per sample, or for a softmax
            head (``fm.logit_head``) its logit differences, K_out − K_out / C for C classes.
        forced_side: the Gram's side when set (see :meth:`with_cheaper_side`), else the smaller one.
    """

    layers: tuple[GramLayer, ...]
    num_samples: int
    outputs_per_sample: int
    num_params: int
    activation_numel: int
    forced_side: Side | None = None

    @property
    def num_outputs(self) -> int:
        """M = N · K."""
        return self.num_samples * self.outputs_per_sample

    @property
    def used_params(self) -> int:
        """Measured parameters of the layers that ran (the others have zero Jacobian columns)."""
        return sum(layer.num_params for layer in self.layers)

    @property
    def side(self) -> Side:
        """"outputs" for J Jᵀ (M × M) or "params" for Jᵀ J (P_used × P_used): ``forced_side``, else the smaller."""
        if self.forced_side is not None:
            return self.forced_side
        return "outputs" if self.num_outputs <= self.used_params else "params"

    @property
    def size(self) -> int:
        """Side length d of the Gram matrix."""
        return self.num_outputs if self.side == "outputs" else self.used_params

    def on_samples(self, n: int) -> GramPlan:
        """The same network on n samples of the same kind (activations scaled), on the smaller side."""
        per_sample = -(-self.activation_numel // max(1, self.num_samples))
        return replace(self, num_samples=n, activation_numel=per_sample * n, forced_side=None)

    def with_cheaper_side(self) -> GramPlan:
        """This plan on the side whose assembly plus ~d³/3 elimination costs fewer flops (the exact engine's rule).

        J Jᵀ is assembled from the per-layer factors in about Σ_l min(kernel, explicit) flops (at most M² times
        the layers' widths), Jᵀ J from explicit rows of J in 2·M·P_used² flops. Past the balance point M = P the
        J Jᵀ side stays cheaper while M³/3 < 2·M·P² + P³/3 (e.g. the paper's MLP on 3,200 inputs: M = 28,800,
        P = 25,720: 8.1e12 against 4.4e13 flops).
        """
        m, n, p = self.num_outputs, self.num_samples, self.used_params
        outputs = sum(min(kernel_cost(lay, m, n), explicit_cost(lay, m)) for lay in self.layers) + m**3 / 3
        params = 2 * m * p**2 + p**3 / 3
        return replace(self, forced_side="outputs" if outputs <= params else "params")


#: How the factored engines (Gram, exact) can need less memory.
FACTOR_REMEDIES = (
    Remedy("use a smaller probe (fewer samples)"),
    Remedy("measure fewer layers via {arg}=[...]", "params"),
    Remedy("a smaller {arg} (output coordinates backpropagated at once)", "chunk_size"),
)


def gram_bytes(plan: GramPlan, itemsize: int = 8, *, chunk_size: int | None = None, copies: int = 2) -> int:
    """Peak memory estimate of :func:`~lightning_geomdim.core.gram.gram_spectra`, in bytes (formula in
    :mod:`lightning_geomdim.core.gram`).

    ``copies``: d × d float64 matrices alive at once: 2 for the eigensolver (the Gram and LAPACK's copy), 1 for
    the exact engine (the Gram mod p, eliminated in place).
    """
    n, m = plan.num_samples, plan.num_outputs
    factors = sum(n * lay.positions * lay.input_width + m * lay.positions * lay.units for lay in plan.layers)
    chunk = plan.outputs_per_sample if chunk_size is None else min(chunk_size, plan.outputs_per_sample)
    backward = chunk * plan.activation_numel * itemsize
    return 8 * copies * plan.size**2 + (8 + itemsize) * factors + backward


def kernel_cost(lay: GramLayer, m: int, n: int) -> float:
    """Flops of a layer's J_l J_lᵀ as the kernel Σ_{t,t'} ⟨g_t, g_t'⟩ ⟨u_t, u_t'⟩ (outer forms only)."""
    if lay.diagonal or lay.groups > 1:
        return math.inf
    t = lay.positions
    return t * t * (m * m * (lay.units + 1) + n * n * lay.features)


def explicit_cost(lay: GramLayer, m: int) -> float:
    """Flops of a layer's J_l J_lᵀ through its explicit rows (per-sample gradients)."""
    return m * lay.positions * lay.units * lay.features + m * m * lay.units * (lay.features + 1)
