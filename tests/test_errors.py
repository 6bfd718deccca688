"""Every refusal names the problem and the fix."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gen, mlp
from torch import nn

from lightning_geomdim import MemoryBudgetError, NonFiniteError, ProbeError, batch_functional_dimension


def test_no_trainable_parameters() -> None:
    model = mlp([3, 2]).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters.*unfreeze"):
        batch_functional_dimension(model, torch.randn(4, 3))


def test_empty_probe() -> None:
    with pytest.raises(ProbeError, match="0 samples.*N >= 1"):
        batch_functional_dimension(mlp([3, 2]), torch.randn(0, 3))


def test_wrong_probe_type() -> None:
    with pytest.raises(ProbeError, match="type str"):
        batch_functional_dimension(mlp([3, 2]), "images")


def test_wrongly_shaped_probe_wraps_the_model_error() -> None:
    with pytest.raises(ProbeError, match=r"forward failed on the probe batch \(input shapes \[\(4, 5\)\]\)") as info:
        batch_functional_dimension(mlp([3, 2]), torch.randn(4, 5))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_non_finite_parameters() -> None:
    model = mlp([3, 2])
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match=r"\['0.weight'\] contain NaN or inf"):
        batch_functional_dimension(model, torch.randn(4, 3))


def test_non_finite_outputs() -> None:
    with pytest.raises(NonFiniteError, match="outputs on the probe batch contain NaN or inf"):
        batch_functional_dimension(mlp([3, 2]), torch.full((4, 3), math.inf))


def test_unknown_param_names_suggest_close_matches() -> None:
    with pytest.raises(ValueError, match=r"'0.weigth' \(did you mean '0.weight'\?\)"):
        batch_functional_dimension(mlp([3, 2]), torch.randn(4, 3), params=["0.weigth"])


def test_unknown_engine() -> None:
    with pytest.raises(ValueError, match="unknown engine 'svd'"):
        batch_functional_dimension(mlp([3, 2]), torch.randn(4, 3), engine="svd")


def test_output_that_is_not_a_tensor_asks_for_output_fn() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.lin(x), x

    with pytest.raises(ProbeError, match="output_fn"):
        batch_functional_dimension(Pair(), torch.randn(4, 3))


def test_memory_budget_refuses_before_allocating() -> None:
    model = mlp([784, 30, 10])
    x = torch.rand(200, 784, generator=gen(0))
    # J would be 2000 x 23,860 float64 = 0.36 GiB, ~1.07 GiB at peak
    with pytest.raises(MemoryBudgetError, match=r"2000 × 23860 Jacobian.*needs about 1\.07 GiB.*budget is 100\.00 MiB"):
        batch_functional_dimension(model, x, engine="jacrev", max_memory_bytes=100 * 1024**2)


def test_memory_budget_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOMDIM_MAX_MEMORY_BYTES", "1000")
    with pytest.raises(MemoryBudgetError, match="GEOMDIM_MAX_MEMORY_BYTES"):
        batch_functional_dimension(mlp([3, 4, 2]), torch.randn(10, 3), engine="jacrev")


def test_format_bytes_units() -> None:
    from lightning_geomdim.core.memory import format_bytes

    assert [format_bytes(n) for n in (512, 1536, 5 * 1024**2, 3 * 1024**3, 2 * 1024**4)] == [
        "512 B", "1.50 KiB", "5.00 MiB", "3.00 GiB", "2.00 TiB"]


def test_out_of_memory_is_not_mistaken_for_an_unsupported_transform(monkeypatch: pytest.MonkeyPatch) -> None:
    """The jacrev and batched-HVP fallbacks catch RuntimeError; an allocation failure must propagate instead of
    switching to a slower path with a misleading warning."""
    import importlib
    import warnings

    import torch.nn.functional as F

    from lightning_geomdim import flatness
    from lightning_geomdim.core.memory import is_out_of_memory

    def out_of_memory(*args: object, **kwargs: object) -> object:
        def fail(*a: object, **k: object) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 160.00 GiB")
        return fail

    class OutOfMemoryInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, z: torch.Tensor) -> torch.Tensor:
            return z.clone()

        @staticmethod
        def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 160.00 GiB")

    class Net(torch.nn.Module):  # the dense Jacobian's batched backward runs out of memory
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp([3, 5, 2], seed=1)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return OutOfMemoryInBackward.apply(self.net(z))

    model, x = mlp([3, 5, 2], seed=1), torch.randn(6, 3, generator=gen(1))
    hessian = importlib.import_module("lightning_geomdim.core.hessian")
    monkeypatch.setattr(hessian, "vmap", out_of_memory)  # the forward-over-reverse products
    reverse = hessian.HessianOperator._reverse

    def batched_out_of_memory(self: object, v: torch.Tensor, batched: bool = False) -> torch.Tensor:
        if batched:  # the batched reverse-over-reverse products
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return reverse(self, v, batched=batched)

    monkeypatch.setattr(hessian.HessianOperator, "_reverse", batched_out_of_memory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "falling back" warning either
        with pytest.raises(torch.OutOfMemoryError):
            batch_functional_dimension(Net(), x, engine="jacrev")
        with pytest.raises(torch.OutOfMemoryError):
            flatness(model, F.cross_entropy, x, torch.zeros(6, dtype=torch.long), method="dense", chunk_size=4)
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 171798691840 bytes"))
    assert not is_out_of_memory(RuntimeError("vmap: It looks like you're calling .item() on a Tensor"))
