"""One traced pass per probe and measurement step: every measure reads one ProbeTrace, so a step costs one forward
pass over the probe and one float64 copy of the parameters, and the values equal those of separate calls."""

from __future__ import annotations

import copy
import csv
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_geomdim import (
    activation_patterns,
    batch_functional_dimension,
    flatness,
    linear_regions,
    neuron_alignment,
)
from lightning_geomdim.core.functional_model import measurement_mode
from lightning_geomdim.core.probe_trace import ProbeTrace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks/ is not a package
from count_passes import CountingMLP, ParameterCopies, one_measurement_step


def probe(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g)


def test_every_core_measure_reads_one_trace_with_the_values_of_separate_calls() -> None:
    torch.manual_seed(0)
    net, (x, y) = CountingMLP(), probe()
    separate = (
        batch_functional_dimension(net, x, spectrum=True), linear_regions(net, x), neuron_alignment(net, x),
        flatness(net, F.cross_entropy, x, y),
    )
    net.float64_passes = 0
    copies = ParameterCopies(net[0].weight)
    with measurement_mode(net), copies:
        trace = ProbeTrace.of(net, x)
        dim = batch_functional_dimension(net, None, spectrum=True, trace=trace)
        regions = linear_regions(net, None, trace=trace)
        patterns = activation_patterns(net, None, trace=trace)
        align = neuron_alignment(net, None, trace=trace)
        flat = flatness(net, F.cross_entropy, None, y, dimension=dim, trace=trace)
        trace.release()
    assert net.float64_passes == 1 and copies.count == 1
    assert (dim.rank, dim.engine, dim.upper_bound) == (separate[0].rank, "exact", separate[0].upper_bound)
    torch.testing.assert_close(dim.spectrum.singular_values, separate[0].spectrum.singular_values)
    assert regions == separate[1] and sorted(patterns) == ["1", "3"]
    assert {k: v.num_clusters for k, v in align.items()} == {k: v.num_clusters for k, v in separate[2].items()}
    torch.testing.assert_close(align["0"].cosines, separate[2]["0"].cosines)
    assert align["0"].num_dead == separate[2]["0"].num_dead
    assert flat.max_eigenvalue == pytest.approx(separate[3].max_eigenvalue, rel=1e-10)
    assert flat.trace == pytest.approx(separate[3].trace, rel=1e-10)
    assert flat.loss == pytest.approx(separate[3].loss, rel=1e-12)
    assert flat.flat_dimension == net_params(net) - dim.rank


def net_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_a_trace_of_another_model_or_dtype_is_refused() -> None:
    net, (x, _) = CountingMLP(), probe()
    with measurement_mode(net):
        trace = ProbeTrace.of(net, x)
    with pytest.raises(ValueError, match="recorded for CountingMLP in torch.float64"):
        batch_functional_dimension(CountingMLP(), None, trace=trace)
    with pytest.raises(ValueError, match="ProbeTrace.of"):
        linear_regions(net, None, dtype=torch.float32, trace=trace)


@pytest.mark.parametrize("engine", ["auto", "gram", "jacrev"])
def test_one_measurement_step_is_one_forward_pass_and_one_parameter_copy_per_probe(
    tmp_path: object, engine: str
) -> None:
    """A real Trainer, every measure due at step 0 on one probe (dimension with its spectrum, regions, flatness
    with the flat dimension, alignment): the measured network runs once in float64 and its parameters are copied
    to float64 once (``benchmarks/count_passes.py`` prints the same counts for any commit)."""
    passes, all_passes, copies = one_measurement_step(engine, str(tmp_path))
    assert passes == 1 and copies == 1
    assert all_passes == 2  # and one pass over the probe's first sample: the memory estimates before the big pass
    with open(next(Path(str(tmp_path)).rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    logged = {k for row in rows for k, v in row.items() if v not in ("", None)}
    expected = {"geometry/train/numerical_rank", "geometry/train/linear_regions", "geometry/flatness/max_eigenvalue",
                "geometry/flatness/flat_dimension", "geometry/alignment/num_clusters"}
    if engine == "auto":
        expected.add("geometry/train/batch_functional_dimension")
    assert expected <= logged, expected - logged


def test_a_trace_with_other_parameters_another_output_fn_or_released_is_refused() -> None:
    net, (x, y) = CountingMLP(), probe()
    with measurement_mode(net):
        trace = ProbeTrace.of(net, x)
    with pytest.raises(ValueError, match="differentiates 6 parameter tensors, not the 1 asked for"):
        batch_functional_dimension(net, None, params=["4.weight"], trace=trace)
    with pytest.raises(ValueError, match="another output_fn"):
        linear_regions(net, None, output_fn=lambda out: out[:, :1], trace=trace)
    patterns = ProbeTrace.of(net, x, grad=False)  # patterns and alignment need no graph
    assert not patterns.theta.requires_grad and not patterns.output.requires_grad and not patterns.deltas
    assert activation_patterns(net, None, trace=patterns).keys() == {"1", "3"}
    with pytest.raises(ValueError, match="without autograd"):
        flatness(net, F.cross_entropy, None, y, trace=patterns)
    trace.release()
    with pytest.raises(ValueError, match="it was released"):
        linear_regions(net, None, trace=trace)


def test_an_in_place_loss_does_not_change_the_shared_output() -> None:
    net, (x, y) = CountingMLP(), probe()

    def halve_in_place(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.div_(2.0), target)

    reference = flatness(net, lambda out, target: F.cross_entropy(out / 2.0, target), x, y, top_k=2)
    with measurement_mode(net):
        trace = ProbeTrace.of(net, x)
        before = trace.output.detach().clone()
        res = flatness(net, halve_in_place, None, y, top_k=2, trace=trace)
        assert torch.equal(trace.output.detach(), before)
    torch.testing.assert_close(res.top_eigenvalues, reference.top_eigenvalues, rtol=1e-10, atol=0)
    assert res.trace == pytest.approx(reference.trace, rel=1e-10)


def test_recording_puts_the_model_in_eval_mode_and_leaves_its_buffers() -> None:
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    x = probe()[0]
    trace = ProbeTrace.of(net, x)  # outside measurement_mode
    assert net.training and int(net[1].num_batches_tracked) == 0  # no statistics update, mode restored
    with torch.no_grad():
        reference = copy.deepcopy(net).double().eval()(x.double())  # running statistics, no dropout
    torch.testing.assert_close(trace.output.detach(), reference, rtol=1e-12, atol=0)


def test_a_failed_measure_does_not_keep_its_tensors_alive_through_the_traceback() -> None:
    import gc
    import weakref

    from lightning_geomdim.callback.error_policy import ErrorPolicy

    refs = []

    def failing() -> dict[str, float]:
        graph = torch.ones(1000, requires_grad=True) * 2  # a stand-in for the probe's graph
        refs.append(weakref.ref(graph))
        raise RuntimeError("boom")

    policy = ErrorPolicy("warn")
    with pytest.warns(RuntimeWarning, match="boom"):
        policy.attempt("dimension", "train", failing)
    gc.collect()
    assert ("dimension", "train") in policy.failures and refs[0]() is None


def test_regions_and_alignment_of_a_model_that_reads_values_need_no_graph() -> None:
    class ReadsValues(nn.Module):  # e.g. a forward that converts to numpy: impossible on a tensor with a graph
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.fc(x))
            assert h.numpy() is not None
            return self.out(h)

    net, x = ReadsValues(), probe()[0]
    assert linear_regions(net, x) >= 1
    assert set(neuron_alignment(net, x)) == {"fc"}


def test_a_model_that_needs_several_samples_gets_no_estimate_but_is_measured() -> None:
    class BatchStandardised(nn.Module):  # mixes samples: one sample has no standard deviation (NaN)
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.out((h - h.mean(0)) / h.std(0))

    estimates = []
    net, x = BatchStandardised(), probe()[0]
    trace = ProbeTrace.of(net, x, before=lambda one, n: estimates.append(n))
    assert estimates == [] and trace.output.shape == (20, 3) and torch.isfinite(trace.output).all()
    seen = []
    ProbeTrace.of(CountingMLP(), x, before=lambda one, n: seen.append((one.inputs.num_samples, n)))
    assert seen == [(1, 20)]


def test_gradients_with_respect_to_theta_are_taken_at_its_views_with_the_values_through_theta() -> None:
    """Through θ itself each parameter view's slice backward fills a zero (P,) tensor (1.5 s of a 1.6 s backward on
    8 ResNet-18 images): the trace's vector-Jacobian products and the Hessian's products take the gradient at the
    views, never reaching θ, and give the values of a backward through θ and of the dense Jacobian and Hessian."""
    from conftest import dense_jacobian

    from lightning_geomdim.core import backward
    from lightning_geomdim.core.hessian import HessianOperator

    torch.manual_seed(0)
    net, (x, y) = CountingMLP(), probe()
    with measurement_mode(net):
        trace = ProbeTrace.of(net, x)
        views = trace.theta_views()
        assert views is not None and [v.shape for v in views] == [p.shape for p in net.parameters()]
        reached: list[int] = []
        trace.theta.register_hook(lambda g: reached.append(1))
        out = trace.output
        c = torch.randn(5, *out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        (at_views,) = trace.vjp(out, [trace.theta], c)
        assert not reached
        (through_theta,) = backward.vjp(out, [trace.theta], c, memo={}, model="mlp")
        assert reached  # the reference did go through θ
        torch.testing.assert_close(at_views, through_theta)
        torch.testing.assert_close(at_views, c.reshape(5, -1) @ dense_jacobian(net, x))
        reached.clear()
        v = torch.randn(3, trace.theta.numel(), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        batched = HessianOperator(trace, F.cross_entropy, y, chunk_size=None).matmat(v.T).T  # one batched backward
        single = HessianOperator(trace, F.cross_entropy, y).matvec(v[0])
        assert not reached
        theta = trace.theta.detach().clone().requires_grad_(True)
        names = [n for n, _ in net.named_parameters()]

        def loss(flat: torch.Tensor) -> torch.Tensor:
            pieces = dict(zip(names, trace.fm.unflatten(flat).values(), strict=True))
            return F.cross_entropy(torch.func.functional_call(net.double(), pieces, (x.double(),)), y)

        dense = torch.autograd.functional.hessian(loss, theta)
        torch.testing.assert_close(batched, v @ dense)
        torch.testing.assert_close(single, dense @ v[0])
        trace.release()


class ClampsInForward(nn.Module):
    """A forward that clamps a weight in place under no_grad after another parameter was used (no value changes):
    θ's version moves, and a gradient at the views read before would miss those uses (found by review)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        with torch.no_grad():
            self.b.weight.clamp_(-10, 10)
        return self.b(h)


def test_a_parameter_changed_in_place_by_the_forward_is_differentiated_through_theta() -> None:
    from conftest import dense_jacobian, numpy_rank

    torch.manual_seed(0)
    net, x = ClampsInForward(), torch.randn(30, 4, generator=torch.Generator().manual_seed(3))
    with measurement_mode(net):
        trace = ProbeTrace.of(net, x)
        assert trace.theta._version != 0 and trace.theta_views() is None
        trace.release()
    expected = numpy_rank(dense_jacobian(net, x))
    assert expected == 35  # P − hidden = 35 < M = 90
    for engine in ("auto", "gram", "jacrev"):
        result = batch_functional_dimension(net, x, engine=engine)
        assert (result.rank, result.engine) == (expected, "jacrev" if engine == "jacrev" else "gram"), engine
    y = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(4))
    ours = flatness(net, F.cross_entropy, x, y, top_k=2, method="dense", flat_dimension=False)
    reference = net.double()
    names = [n for n, _ in reference.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        pieces, start = {}, 0
        for name, p in zip(names, reference.parameters(), strict=True):
            pieces[name], start = flat[start : start + p.numel()].view_as(p), start + p.numel()
        return F.cross_entropy(torch.func.functional_call(nn.Sequential(reference.a, nn.Tanh(), reference.b),
                                                          {k.replace("a.", "0.").replace("b.", "2."): v
                                                           for k, v in pieces.items()}, (x.double(),)), y)

    top = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, theta)).flip(0)[:2]
    torch.testing.assert_close(ours.top_eigenvalues.to(top.dtype), top, rtol=1e-8, atol=1e-10)
