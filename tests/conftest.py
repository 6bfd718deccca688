"""Shared fixtures: tiny networks and the explicit float64 dense references every measure is tested against."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from itertools import pairwise

import numpy as np
import pytest
import torch
from torch import nn

from lightning_geomdim.core.lanczos import one_thread as lanczos_one_thread

#: Engines of batch_functional_dimension that every core test runs against.
ENGINES = ["jacrev", "gram", "exact"]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a 2-core machine shared with busy processes, two OpenMP threads made small products
    and eigendecompositions up to 50× slower (waiting for each other)."""
    with lanczos_one_thread():
        yield


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp(
    widths: list[int], *, seed: int = 0, dtype: torch.dtype = torch.float32, softmax: bool = False
) -> nn.Sequential:
    """Linear/ReLU MLP with the given layer widths, deterministic initialisation."""
    torch.manual_seed(seed)  # only in test set-up, never inside library code
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    if softmax:
        layers.append(nn.Softmax(dim=-1))
    return nn.Sequential(*layers).to(dtype)


def small_cnn(seed: int = 0) -> nn.Sequential:
    """Conv/ReLU/MaxPool/Flatten/Linear network on 1×6×6 inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 4), nn.ReLU(),
        nn.Linear(4, 3),
    )


def dense_jacobian(model: nn.Module, x: torch.Tensor, *, logit_differences: bool = False) -> torch.Tensor:
    """Explicit float64 Jacobian (M, P) with torch.autograd.functional.jacobian over all trainable params.

    ``logit_differences``: ``model`` is an ``nn.Sequential`` ending with a softmax; measure instead the
    differences z[..., :-1] − z[..., -1:] of its input z (rows N·(K − 1)).
    """
    ref = copy.deepcopy(model).double().eval()
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    values = tuple(p.detach().clone() for n, p in ref.named_parameters() if p.requires_grad)
    x64 = x.double() if x.is_floating_point() else x  # token ids stay integers
    body = ref[:-1] if logit_differences else ref

    def f(*ps: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(body, dict(zip(names, ps, strict=True)), (x64,))
        if logit_differences:
            out = out[..., :-1] - out[..., -1:]
        return out.reshape(-1)

    blocks = torch.autograd.functional.jacobian(f, values)
    m = blocks[0].shape[0]
    return torch.cat([b.reshape(m, -1) for b in blocks], dim=1)


def numpy_rank(jac: torch.Tensor) -> int:
    """numpy's matrix_rank rule on float64: σ > σ_max · max(M, P) · eps."""
    return int(np.linalg.matrix_rank(jac.double().numpy()))


def assert_matches_dense(
    model: nn.Module, x: torch.Tensor, auto_engine: str = "exact", *, clear_gap: bool = True, **kwargs: object
) -> torch.Tensor:
    """gram, jacrev and auto agree with numpy's rank of the dense float64 Jacobian (of the logit differences for
    softmax heads); σ agree to 1e-7 σ_max. Returns the dense Jacobian.

    ``clear_gap=False``: J has singular values between the Gram's resolution (~√(M·eps)·σ_max) and the SVD's; the
    Gram engine's rank is then the number of dense σ above its own tolerance, and the dense engines agree."""
    from lightning_geomdim import batch_functional_dimension

    gram = batch_functional_dimension(model, x, engine="gram", **kwargs)
    dense = batch_functional_dimension(model, x, engine="jacrev", **kwargs)
    auto = batch_functional_dimension(model, x, **kwargs)
    jac = dense_jacobian(model, x, logit_differences=gram.num_rows != gram.num_outputs)
    expected = numpy_rank(jac)
    sv = torch.linalg.svdvals(jac)
    assert gram.engine == "gram" and auto.engine == auto_engine and dense.engine == "jacrev"
    if clear_gap:
        assert gram.rank == dense.rank == auto.rank == expected
    else:
        assert dense.rank == expected and auto.rank == gram.rank == int((sv > gram.spectrum.tolerance).sum())
    assert gram.spectrum.singular_values.shape == sv.shape and gram.spectrum.singular_values.dtype == torch.float64
    torch.testing.assert_close(gram.spectrum.singular_values, sv, rtol=0, atol=1e-7 * float(sv[0]))
    return jac


def spawn_and_join(fn: Callable[..., None], args: tuple, nprocs: int = 2, timeout_s: float = 240.0) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes and wait for them, failing (and killing them) after
    ``timeout_s``: a rank stuck in a collective must fail the test, not hang the suite."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=2):
            assert time.monotonic() < deadline, f"the {nprocs} processes did not finish in {timeout_s:.0f} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()

