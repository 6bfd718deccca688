"""Models we never saw: other activations, token inputs, dict inputs, multiple outputs, odd layers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import gen, numpy_rank
from torch import nn

from lightning_geomdim import NotApplicableError, batch_functional_dimension, linear_regions


def dense_rank(model: nn.Module, call) -> int:
    """numpy-rule rank of an explicit float64 Jacobian of ``call(model)`` (any input form)."""
    ref = copy.deepcopy(model).double().eval()
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    values = tuple(p.detach().clone() for n, p in ref.named_parameters() if p.requires_grad)

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return call(lambda *a, **k: torch.func.functional_call(ref, dict(zip(names, ps, strict=True)), a, k))

    blocks = torch.autograd.functional.jacobian(f, values)
    m = blocks[0].shape[0]
    return numpy_rank(torch.cat([b.reshape(m, -1) for b in blocks], dim=1))


@pytest.mark.parametrize("activation", [nn.Tanh, nn.GELU, nn.Sigmoid], ids=["tanh", "gelu", "sigmoid"])
def test_smooth_activations_dimension_works_and_claims_no_relu_symmetry(activation: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), activation(), nn.Linear(5, 2))
    x = torch.randn(40, 3, generator=gen(0))
    res = batch_functional_dimension(model, x)
    assert res.num_hidden_neurons == 0 and res.upper_bound == min(80, 32)
    assert res.rank == dense_rank(model, lambda f: f(x.double()).reshape(-1))
    with pytest.raises(NotApplicableError, match="no nn.ReLU"):
        linear_regions(model, x)


def test_embedding_model_with_integer_tokens() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.act, self.head = nn.Embedding(7, 3), nn.ReLU(), nn.Linear(3, 2)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.act(self.emb(tokens).mean(dim=1)))

    torch.manual_seed(1)
    model = Tokens()
    tokens = torch.randint(0, 7, (12, 4), generator=gen(1))
    res = batch_functional_dimension(model, tokens)
    assert res.num_params == 7 * 3 + 3 * 2 + 2
    assert res.rank == dense_rank(model, lambda f: f(tokens).reshape(-1))
    assert tokens.dtype == torch.int64


def test_dict_inputs_are_keyword_arguments() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2)

        def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.a(image)) + self.b(extra)

    torch.manual_seed(2)
    model = TwoInputs()
    batch = {"image": torch.randn(6, 3, generator=gen(2)), "extra": torch.randn(6, 2, generator=gen(3))}
    res = batch_functional_dimension(model, batch)
    assert res.num_outputs == 12
    assert res.rank == dense_rank(model, lambda f: f(batch["image"].double(), batch["extra"].double()).reshape(-1))


def test_multiple_outputs_with_output_fn() -> None:
    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.act, self.h1, self.h2 = nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.act(self.body(x))
            return self.h1(h), self.h2(h)

    torch.manual_seed(3)
    model = Heads()
    x = torch.randn(10, 3, generator=gen(4))
    both = batch_functional_dimension(model, x, output_fn=lambda out: torch.cat(out, dim=1))
    first = batch_functional_dimension(model, x, output_fn=lambda out: out[0])
    assert both.num_outputs == 30 and first.num_outputs == 20
    assert both.rank == dense_rank(model, lambda f: torch.cat(f(x.double()), dim=1).reshape(-1))
    assert first.rank <= both.rank


def test_batchnorm_model_in_train_mode_is_measured_per_sample_in_eval_mode() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).train()
    model(torch.randn(32, 3))
    x = torch.randn(5, 3, generator=gen(5))
    stats = model[1].running_mean.clone()
    res = batch_functional_dimension(model, x)
    assert res.rank == dense_rank(model, lambda f: f(x.double()).reshape(-1))  # eval-mode reference
    assert model.training and torch.equal(model[1].running_mean, stats)
