"""Scale-out of the Gram engine: shares of the terms sum to the whole Gram; a real 2-process gloo all-reduce
gives every process the single-process result."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import gen, mlp, small_cnn, spawn_and_join

from lightning_geomdim import DimensionResult, GeometryError, batch_functional_dimension
from lightning_geomdim.core.errors import MeasurementInterrupted
from lightning_geomdim.core.functional_model import FunctionalModel, ProbeInputs, measurement_mode
from lightning_geomdim.core.gram import _balanced_share, gram_from_factors
from lightning_geomdim.core.interrupt import machine_flops
from lightning_geomdim.core.layer_factors import layer_factors
from lightning_geomdim.core.probe_trace import ProbeTrace
from lightning_geomdim.core.structure import gram_plan

CASES = {
    # name: (model factory, probe factory); J Jᵀ side (M < P) and Jᵀ J side (M > P), Linear and Conv2d
    "mlp_outputs_side": (lambda: mlp([6, 7, 5, 3], seed=1), lambda: torch.randn(9, 6, generator=gen(1))),
    "mlp_params_side": (lambda: mlp([3, 4, 2], seed=2), lambda: torch.randn(40, 3, generator=gen(2))),
    "cnn_outputs_side": (lambda: small_cnn(seed=3), lambda: torch.randn(5, 1, 6, 6, generator=gen(3))),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("count", [2, 3])
def test_shares_sum_to_the_whole_gram(case: str, count: int) -> None:
    make_model, make_x = CASES[case]
    model = make_model()
    with measurement_mode(model):
        fm = FunctionalModel.from_module(model)
        inputs = ProbeInputs.from_batch(make_x(), dtype=torch.float64, device=fm.device)
        trace = ProbeTrace.record(fm, inputs)
        plan = gram_plan(trace)
        factors = layer_factors(trace, plan)
        whole = gram_from_factors(factors, plan)
        parts = [gram_from_factors(factors, plan, share=(i, count)) for i in range(count)]
    assert plan.side == ("params" if case == "mlp_params_side" else "outputs")
    torch.testing.assert_close(sum(parts), whole, rtol=1e-12, atol=1e-12 * float(whole.abs().max()))
    assert sum(bool(p.abs().max() > 0) for p in parts) >= 2  # the work is really divided


def test_balanced_share_deals_every_item_once() -> None:
    costs = [5.0, 1.0, 3.0, 3.0, 2.0]
    shares = [_balanced_share(costs, i, 2) for i in range(2)]
    assert sorted(shares[0] + shares[1]) == list(range(5))
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(costs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name, (make_model, make_x) in CASES.items():
            res = batch_functional_dimension(make_model(), make_x(), engine="gram", distributed=True)
            results[name] = (res.rank, res.spectrum.singular_values)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_all_reduce_to_the_single_process_result(tmp_path: Path) -> None:
    spawn_and_join(_worker, (2, _free_port(), str(tmp_path)))
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, (make_model, make_x) in CASES.items():
        single = batch_functional_dimension(make_model(), make_x(), engine="gram")
        for results in per_rank:
            rank, sv = results[name]
            assert rank == single.rank, name
            # summation order differs: equal to the Gram's resolution (the rank tolerance), tighter above it
            torch.testing.assert_close(sv, single.spectrum.singular_values, rtol=1e-9, atol=single.spectrum.tolerance)
            torch.testing.assert_close(sv[:rank], single.spectrum.singular_values[:rank], rtol=1e-9, atol=0)
        torch.testing.assert_close(per_rank[0][name][1], per_rank[1][name][1], rtol=0, atol=0)  # same everywhere


def _worker_one_fails(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank 1 alone has a memory budget too small for the Gram: it refuses before the all-reduce."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        make_model, make_x = CASES["mlp_outputs_side"]
        budget = 1 if rank == 1 else None
        try:
            batch_functional_dimension(make_model(), make_x(), engine="gram", distributed=True,
                                       max_memory_bytes=budget)
            outcome = "measured"
        except GeometryError as err:
            outcome = f"{type(err).__name__}: {err}"
        # the group still works afterwards: both processes meet in the next collective
        after = torch.tensor([float(rank)])
        dist.all_reduce(after)
        (Path(out_dir) / f"rank{rank}.txt").write_text(f"{outcome}\n{after.item()}")
    finally:
        dist.destroy_process_group()


def test_a_process_that_fails_before_the_all_reduce_leaves_none_waiting(tmp_path: Path) -> None:
    """One process refuses (its memory budget) before the distributed Gram's all-reduce: every process learns it
    at one agreed point and raises, instead of waiting forever in the all-reduce (the spawn fails after 120 s)."""
    spawn_and_join(_worker_one_fails, (2, _free_port(), str(tmp_path)), timeout_s=120.0)
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text().split("\n") for r in range(2))
    assert rank1[0].startswith("MemoryBudgetError") and "memory budget" in rank1[0]
    assert rank0[0].startswith("GeometryError: another process of the group failed"), rank0[0]
    assert rank0[1] == rank1[1] == "1.0"


def _summary(res: DimensionResult) -> str:
    return f"measured {res.rank} {sorted((k, b.spectrum.numerical_rank) for k, b in res.blocks.items())}"


def _worker_failures_between_collectives(rank: int, world: int, port: int, out_dir: str) -> None:
    """Three probes in a row, as the monitor measures them, each with two blocks (four all-reduce'd Grams): on rank
    1 the first probe's whole-Gram eigendecomposition runs out of memory, the second's local work is stopped (a
    SIGTERM), the third runs; a plain all-reduce follows."""
    import lightning_geomdim.core.gram as gram_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        machine_flops()  # measured once with eigvalsh: the injected fault is for the Gram's eigendecomposition
        faults = {"eigvalsh": rank == 1, "local": False}
        eigvalsh, local_gram = torch.linalg.eigvalsh, gram_module.gram_from_factors

        def failing_eigvalsh(*args: object, **kwargs: object) -> torch.Tensor:
            if faults["eigvalsh"]:
                faults["eigvalsh"] = False
                raise torch.OutOfMemoryError("injected: out of memory in eigvalsh")
            return eigvalsh(*args, **kwargs)

        def stopped_local_gram(*args: object, **kwargs: object) -> torch.Tensor:
            if faults["local"]:
                faults["local"] = False
                raise MeasurementInterrupted("injected: the caller asked to stop")
            return local_gram(*args, **kwargs)

        torch.linalg.eigvalsh, gram_module.gram_from_factors = failing_eigvalsh, stopped_local_gram
        make_model, make_x = CASES["mlp_outputs_side"]
        outcomes = []
        for probe in range(3):
            faults["local"] = rank == 1 and probe == 1
            try:
                res = batch_functional_dimension(make_model(), make_x(), engine="gram", distributed=True,
                                                 blocks={"a": ["0"], "b": ["2", "4"]})
                outcomes.append(_summary(res))
            except (GeometryError, RuntimeError) as err:
                outcomes.append(f"{type(err).__name__}: {err}")
        after = torch.tensor([float(rank)])
        dist.all_reduce(after)
        torch.save({"outcomes": outcomes, "after": after.item()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_failure_between_two_collectives_keeps_the_processes_in_step(tmp_path: Path) -> None:
    """Every piece of local work between two collectives is agreed: a process that runs out of memory in an
    eigendecomposition, or is stopped, does not pair its next collective with another Gram's (which summed one
    probe's block with another probe's Gram and logged wrong ranks without an error)."""
    spawn_and_join(_worker_failures_between_collectives, (2, _free_port(), str(tmp_path)), timeout_s=120.0)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    single = batch_functional_dimension(*(f() for f in CASES["mlp_outputs_side"]), engine="gram",
                                        blocks={"a": ["0"], "b": ["2", "4"]})
    expected = _summary(single)
    assert rank1["outcomes"][0].startswith("OutOfMemoryError: injected")
    assert rank0["outcomes"][0].startswith("GeometryError: another process of the group failed")
    for outcome in (rank0["outcomes"][1], rank1["outcomes"][1]):  # a stop on one process stops all of them
        assert outcome.startswith("MeasurementInterrupted"), outcome
    assert rank0["outcomes"][2] == rank1["outcomes"][2] == expected
    assert rank0["after"] == rank1["after"] == 1.0
