"""The observer guarantee: a run with the monitor ends with bit-identical weights to a run without it.

Measurements run in eval mode on float64 copies of the parameters; the mode of every submodule,
``requires_grad``, ``.grad``, the global RNGs (torch CPU/CUDA, ``random``, numpy) and BatchNorm statistics are
restored or untouched. Nothing allocated by a measurement is kept after the hook returns.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
from torch import nn

from lightning_geomdim.core.functional_model import measurement_mode


@contextlib.contextmanager
def observing(module: nn.Module) -> Iterator[None]:
    """:func:`~lightning_geomdim.core.functional_model.measurement_mode` (eval mode, every submodule's mode and the
    torch RNGs restored), and, restored too whatever happens inside: every parameter's ``requires_grad`` and
    ``.grad`` (the same tensor objects), and the ``random`` and numpy RNGs, which the core does not touch but a
    user's ``output_fn`` or ``loss_fn`` might."""
    params = [(p, p.requires_grad, p.grad) for p in module.parameters()]
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with measurement_mode(module):
            yield
    finally:
        for p, requires_grad, grad in params:
            p.requires_grad_(requires_grad)
            p.grad = grad
        random.setstate(py_state)
        np.random.set_state(np_state)
