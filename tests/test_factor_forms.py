"""Each factor form of the float Gram engine against the dense float64 Jacobian on a small instance: BatchNorm in
eval mode, LayerNorm, GroupNorm, grouped and depthwise convolutions, Embedding, LSTM and GRU (stacked, bidirectional,
time first), nn.MultiheadAttention (alone and in nn.TransformerEncoderLayer), a residual block and an attention block
(functional code between the layers), and the check by one backward that refuses what the forms cannot give."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_matches_dense, dense_jacobian, gen, numpy_rank
from torch import nn

from lightning_geomdim import NotApplicableError, batch_functional_dimension
from lightning_geomdim.core.factor_check import factorization_problem, sample_sets
from lightning_geomdim.core.factor_forms import jacobian_rows
from lightning_geomdim.core.functional_model import measurement_mode
from lightning_geomdim.core.layer_factors import layer_factors
from lightning_geomdim.core.probe_trace import ProbeTrace
from lightning_geomdim.core.structure import gram_plan


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random affine parameters and running statistics, so that no normalisation is the identity."""
    g = gen(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the skip, then ReLU (the ResNet basic block), pooled into a Linear head."""

    def __init__(self, c: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1, bias=False)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu, self.pool, self.head = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.stem(x))
        h = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(h))))) + h)
        return self.head(self.pool(h).flatten(1))


class AttentionBlock(nn.Module):
    """A pre-LayerNorm transformer block written with Linear projections (token and position embeddings, causal
    self-attention, a GELU MLP, a final LayerNorm and a vocabulary head)."""

    def __init__(self, vocab: int = 7, seq: int = 4, dim: int = 4) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.act, self.down = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n, t = ids.shape
        h = self.tokens(ids) + self.positions(torch.arange(t).expand(n, t))
        a = self.ln1(h)
        scores = self.q(a) @ self.k(a).transpose(1, 2) / math.sqrt(a.shape[-1])
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        h = h + self.o(scores.softmax(-1) @ self.v(a))
        h = h + self.down(self.act(self.up(self.ln2(h))))
        return self.head(self.ln_f(h))


class LSTMClassifier(nn.Module):
    """The last hidden state of a one-layer LSTM through a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


class RecurrentClassifier(nn.Module):
    """An ``nn.LSTM`` or ``nn.GRU`` over (N, T, 3) sequences (fed time first when ``batch_first=False``): its last
    output step and its final states h_n (and c_n), samples first, through a Linear head."""

    def __init__(self, kind: type[nn.LSTM | nn.GRU], hidden: int = 3, **options: object) -> None:
        super().__init__()
        self.rnn = kind(3, hidden, **{"batch_first": True, **options})
        directions, layers = 1 + self.rnn.bidirectional, self.rnn.num_layers
        states = (2 if kind is nn.LSTM else 1) * layers * directions * hidden
        self.head = nn.Linear(directions * hidden + states, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.rnn.batch_first
        out, state = self.rnn(x if first else x.transpose(0, 1))
        last = out[:, -1] if first else out[-1]
        states = state if isinstance(state, tuple) else (state,)  # (L · D, N, H) whatever batch_first is
        return self.head(torch.cat([last, *(s.transpose(0, 1).flatten(1) for s in states)], dim=1))


class EncoderLayerModel(nn.Module):
    """Embedding, one ``nn.TransformerEncoderLayer`` (2 heads, batch first, no dropout) and a per-token Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(7, 4)
        self.encoder = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.tokens(ids)))


class MaskedSelfAttention(nn.Module):
    """A bare ``nn.MultiheadAttention`` (2 heads) over embedded tokens with a causal bool ``attn_mask`` and a
    ``key_padding_mask`` (token 0), its per-head weights of head 0 returned beside a per-token Linear head; or, with
    ``time_major``, sequence first with the float causal mask and ``is_causal=True`` (what nn.TransformerEncoder
    passes) and no weights."""

    def __init__(self, time_major: bool = False) -> None:
        super().__init__()
        self.time_major = time_major
        self.tokens = nn.Embedding(7, 4)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=not time_major)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, t = self.tokens(ids), ids.shape[1]
        if self.time_major:
            h = h.transpose(0, 1)
            mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=h.dtype)
            y, _ = self.attention(h, h, h, attn_mask=mask, need_weights=False, is_causal=True)
            return self.head(y.transpose(0, 1))
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        y, w = self.attention(h, h, h, key_padding_mask=ids == 0, attn_mask=causal, average_attn_weights=False)
        return torch.cat([self.head(y), w[:, 0]], dim=-1)


def _cases() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(30)
    x2 = torch.randn(5, 3, generator=gen(31))
    img = torch.randn(3, 2, 5, 5, generator=gen(32))
    seq = torch.randn(3, 4, 3, generator=gen(33))
    ids = torch.randint(0, 7, (4, 4), generator=gen(34))
    ids[0, 1] = 0  # the padding token
    padded = torch.randint(1, 7, (5, 4), generator=gen(40))
    padded[0, 3], padded[1, 2:] = 0, 0  # padding at the end: every query attends to a key
    return {
        "batchnorm1d_eval": (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)), x2),
        "batchnorm2d_eval": (nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                                           nn.Linear(27, 2)), img),
        "layernorm_sequence": (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.GELU(), nn.Linear(4, 2)), seq),
        "layernorm_2d_shape": (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm((4, 4)), nn.Flatten(),
                                             nn.Linear(16, 2)), seq),
        "groupnorm": (nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                                    nn.Linear(36, 2)), img),
        "grouped_and_depthwise_conv": (nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(),
                                                     nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.Hardswish(),
                                                     nn.Flatten(), nn.Linear(36, 2)), img),
        "embedding_with_padding": (nn.Sequential(nn.Embedding(7, 3, padding_idx=0), nn.Flatten(), nn.Linear(12, 2)),
                                   ids),
        "residual_block": (ResidualBlock(), img),
        "lstm": (LSTMClassifier(), torch.randn(30, 5, 3, generator=gen(38))),  # M = 60 < P = 154
        "lstm_more_rows_than_parameters": (LSTMClassifier(), torch.randn(100, 5, 3, generator=gen(39))),
        "gru": (RecurrentClassifier(nn.GRU, 4), torch.randn(20, 5, 3, generator=gen(43))),  # M = 40 < P = 126
        "gru_more_rows_than_parameters": (RecurrentClassifier(nn.GRU, 4), torch.randn(100, 5, 3, generator=gen(44))),
        "gru_time_major": (RecurrentClassifier(nn.GRU, batch_first=False), torch.randn(20, 5, 3, generator=gen(45))),
        "gru_bidirectional": (RecurrentClassifier(nn.GRU, bidirectional=True),
                              torch.randn(20, 5, 3, generator=gen(46))),
        "gru_two_layers_bidirectional_time_major": (
            RecurrentClassifier(nn.GRU, 2, num_layers=2, bidirectional=True, batch_first=False),
            torch.randn(30, 4, 3, generator=gen(47))),  # M = 60 < P = 206
        "lstm_two_layers": (RecurrentClassifier(nn.LSTM, num_layers=2), torch.randn(20, 5, 3, generator=gen(48))),
        "lstm_bidirectional_time_major": (RecurrentClassifier(nn.LSTM, bidirectional=True, batch_first=False),
                                          torch.randn(20, 5, 3, generator=gen(49))),
        "lstm_two_layers_bidirectional_more_rows_than_parameters": (
            RecurrentClassifier(nn.LSTM, 2, num_layers=2, bidirectional=True),
            torch.randn(150, 4, 3, generator=gen(50))),
        "attention_block": (AttentionBlock(), ids),
        "transformer_encoder_layer": (EncoderLayerModel(), torch.randint(0, 7, (5, 4), generator=gen(41))),
        "multihead_attention_masked": (MaskedSelfAttention(), padded),
        "multihead_attention_time_major_causal": (MaskedSelfAttention(time_major=True), padded),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_factor_form_matches_the_dense_jacobian(case: str) -> None:
    model, x = _cases()[case]
    _randomise(model, 35)
    # rank and every singular value; the attention block has σ ~1e-7 σ_max, below the Gram's resolution. "auto" is
    # the exact engine where the network is piecewise linear (BatchNorm in eval mode, residual sums)
    exact = case in ("batchnorm1d_eval", "batchnorm2d_eval", "residual_block")
    gap = case not in ("attention_block", "transformer_encoder_layer")
    jac = assert_matches_dense(model, x, auto_engine="exact" if exact else "gram", clear_gap=gap)
    assert 0 < numpy_rank(jac) <= min(jac.shape)


@pytest.mark.parametrize("case", ["batchnorm2d_eval", "groupnorm", "grouped_and_depthwise_conv",
                                  "embedding_with_padding", "attention_block", "lstm", "transformer_encoder_layer",
                                  "multihead_attention_masked", "multihead_attention_time_major_causal", "gru",
                                  "gru_two_layers_bidirectional_time_major", "lstm_two_layers",
                                  "lstm_bidirectional_time_major"])
def test_rows_from_the_factors_are_the_rows_of_the_dense_jacobian(case: str) -> None:
    """Not only the spectrum: the explicit rows of J built from each form equal the dense Jacobian's, entry by entry
    (columns mapped back to the parameters' layout)."""
    model, x = _cases()[case]
    _randomise(model, 36)
    with measurement_mode(model):
        trace = ProbeTrace.of(model, x)
        plan = gram_plan(trace)
        assert factorization_problem(trace, plan) is None
        factors = layer_factors(trace, plan)
        from lightning_geomdim.core.factor_forms import parameter_gradients

        rows = jacobian_rows(factors, slice(0, plan.num_samples), plan.outputs_per_sample)
        params = trace.fm.params
        ours = []
        for row in rows:
            grads = {name: torch.zeros_like(p) for name, p in params.items()}
            start = 0
            for f in factors:
                width = f.layer.num_params
                grads.update(parameter_gradients(f.layer, row[start : start + width], params))
                start += width
            ours.append(torch.cat([g.reshape(-1) for g in grads.values()]))
    expected = dense_jacobian(model, x)
    torch.testing.assert_close(torch.stack(ours), expected, rtol=1e-10, atol=1e-12)


def test_embedding_columns_are_the_probe_vocabulary() -> None:
    model, x = _cases()["embedding_with_padding"]
    with measurement_mode(model):
        plan = gram_plan(ProbeTrace.of(model, x))
    emb = plan.layers[0]
    assert emb.vocabulary is not None and 0 not in emb.vocabulary.tolist()
    assert emb.vocabulary.tolist() == sorted(set(x.flatten().tolist()) - {0})
    assert emb.num_params == 3 * emb.vocabulary.numel()


def test_frozen_backbone_of_any_kind_with_a_trainable_head_uses_the_gram_engine() -> None:
    """Only measured parameters need a factor form: a frozen LSTM backbone with a Linear head is the Gram engine's."""

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)
            self.lstm.requires_grad_(False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lstm(x)[0][:, -1])

    model, x = Frozen(), torch.randn(6, 5, 3, generator=gen(37))
    res = batch_functional_dimension(model, x)
    assert res.engine == "gram" and res.rank == numpy_rank(dense_jacobian(model, x)) == 10


class _WithState(nn.Module):
    """An LSTM called with an initial state ``hx=(h0, c0)`` (no factor form: it starts from zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)
        self.register_buffer("h0", torch.randn(1, 1, 4, generator=gen(51)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = self.h0.expand(1, x.shape[0], 4).contiguous()
        return self.head(self.lstm(x, hx=(h0, torch.tanh(h0)))[0][:, -1])


@pytest.mark.parametrize(
    ("model", "x", "reason"),
    [
        (nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 2, proj_size=1, batch_first=True)), torch.randn(3, 5, 3),
         r"'1' \(LSTM\) has proj_size=1"),
        # time first, the (3, 5, 4) input has 5 samples, not 3: the recurrence would run over the probe's samples
        (nn.Sequential(nn.Linear(3, 4), nn.GRU(4, 2)), torch.randn(3, 5, 3), r"\(T, N, I\) tensor of 3 samples"),
        (_WithState(), torch.randn(3, 5, 3), r"'lstm' \(LSTM\) is called with 2 arguments \(an initial state hx"),
        (nn.Sequential(nn.Embedding(5, 2, max_norm=1.0), nn.Flatten(), nn.Linear(6, 2)),
         torch.randint(0, 5, (3, 3)), "max_norm"),
    ],
    ids=["lstm_projection", "gru_time_major_on_samples", "lstm_initial_state", "embedding_max_norm"],
)
def test_layers_without_a_form_are_refused_by_name(model: nn.Module, x: torch.Tensor, reason: str) -> None:
    with pytest.raises(NotApplicableError, match=reason):
        batch_functional_dimension(model, x, engine="gram", output_fn=lambda out: out[0] if isinstance(out, tuple)
                                   else out)


def test_a_refused_recurrent_call_is_measured_as_called() -> None:
    """The traced pass recomputes only the calls with a factor form: an LSTM started from a state hx keeps
    the fused kernel's output, and engine='auto' (jacrev) matches the dense Jacobian (it measured the zero-state
    recurrence before)."""
    model, x = _WithState(), torch.randn(12, 5, 3, generator=gen(52))
    res = batch_functional_dimension(model, x, spectrum=True)
    sv = torch.linalg.svdvals(dense_jacobian(model, x))
    assert res.engine == "jacrev"
    torch.testing.assert_close(res.spectrum.singular_values, sv, rtol=0, atol=1e-9 * float(sv[0]))


def test_recurrent_dropout_in_training_mode_is_refused_by_name() -> None:
    """Dropout between the layers draws random masks in training mode (the measures run in eval mode, where the
    stacked GRU's form holds: the cases above)."""
    from lightning_geomdim.core.factor_forms import form_problem

    gru = nn.GRU(3, 2, num_layers=2, dropout=0.5)
    assert form_problem("gru", gru.eval()) is None
    assert "training mode with dropout=0.5" in str(form_problem("gru", gru.train()))


def test_each_recurrent_parameter_belongs_to_exactly_one_layer() -> None:
    """A two-layer bidirectional GRU is two layers per layer and direction (ih, hh), an LSTM one; the layers' weight
    and bias names cover every parameter once (their widths: the forms of recurrent_form)."""
    for kind, names in ((nn.GRU, ["ih_l0", "hh_l0", "ih_l0_reverse", "hh_l0_reverse", "ih_l1", "hh_l1",
                                  "ih_l1_reverse", "hh_l1_reverse"]),
                        (nn.LSTM, ["l0", "l0_reverse", "l1", "l1_reverse"])):
        model = RecurrentClassifier(kind, 2, num_layers=2, bidirectional=True)
        with measurement_mode(model):
            plan = gram_plan(ProbeTrace.of(model, torch.randn(3, 4, 3, generator=gen(53))))
        rnn = [lay for lay in plan.layers if lay.module is model.rnn]
        assert [lay.name for lay in rnn] == [f"rnn.{n}" for n in names]
        owned = [p for lay in rnn for p in (*lay.weight_names, *lay.bias_names)]
        assert sorted(owned) == sorted(f"rnn.{n}" for n, _ in model.rnn.named_parameters())
        assert sum(lay.num_params for lay in rnn) == sum(p.numel() for p in model.rnn.parameters())


@pytest.mark.parametrize("measured", [("rnn.weight_hh_l0", "rnn.bias_ih_l0", "head.weight"),
                                      ("rnn.bias_hh_l0",), ("rnn.weight_ih_l0_reverse", "rnn.bias_hh_l0")],
                         ids=["some_of_each_form", "one_bias", "across_directions"])
def test_any_subset_of_the_gru_parameters_is_measured(measured: tuple[str, ...]) -> None:
    """Each GRU parameter is in one form of its own: measuring some of them (the rest frozen) gives the dense
    Jacobian's σ."""
    model, x = _cases()["gru_bidirectional"]
    for name, p in model.named_parameters():
        p.requires_grad_(name in measured)
    jac = assert_matches_dense(model, x, auto_engine="gram")
    assert jac.shape[1] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lstm_biases_are_two_copies_of_the_same_columns() -> None:
    """b_ih and b_hh enter the gates as a sum: with more rows than parameters the rank is at most P − 4H, and the
    Gram counts both copies (its σ equal the dense SVD's); measuring one of a pair alone is refused."""
    model, x = _cases()["lstm_more_rows_than_parameters"]
    res = batch_functional_dimension(model, x, engine="gram")
    assert res.num_rows > res.num_params == 154 and res.rank <= 154 - 16
    with pytest.raises(NotApplicableError, match="measure both or neither"):
        batch_functional_dimension(model, x, engine="gram", params=["lstm.weight_ih_l0", "head.weight"])


def test_the_check_does_not_touch_the_global_rng_and_runs_once_per_trace() -> None:
    model, x = _cases()["residual_block"]
    rng = torch.get_rng_state()
    with measurement_mode(model):
        trace = ProbeTrace.of(model, x)
        plan = gram_plan(trace)
        assert factorization_problem(trace, plan) is None
        trace.memo[("factorization", id(None))] = "cached"
        assert factorization_problem(trace, plan) == "cached"
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("measured", [("attention.in_proj_bias", "attention.out_proj.weight", "head.weight"),
                                      ("attention.out_proj.weight", "attention.out_proj.bias")],
                         ids=["some_of_each_projection", "out_proj_only"])
def test_any_subset_of_the_attention_parameters_is_measured(measured: tuple[str, ...]) -> None:
    """Each projection is its own layer: measuring part of them (the rest frozen) gives the dense Jacobian's σ."""
    model, x = _cases()["multihead_attention_masked"]
    for name, p in model.named_parameters():
        p.requires_grad_(name in measured)
    jac = assert_matches_dense(model, x, auto_engine="gram")
    assert jac.shape[1] == sum(p.numel() for p in model.parameters() if p.requires_grad)


class _Attention(nn.Module):
    """``nn.MultiheadAttention`` on a Linear's output h, called as ``attention(h, key, key)``: ``cross`` uses
    key = 2 h (another tensor), else key = h (self-attention, when the module's dimensions allow it)."""

    def __init__(self, attention: nn.MultiheadAttention, cross: bool = False) -> None:
        super().__init__()
        self.cross, self.attention = cross, attention
        self.embed, self.kv = nn.Linear(3, 4), nn.Linear(3, attention.kdim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        key = self.kv(x) if self.attention.kdim != 4 else 2 * h if self.cross else h
        return self.attention(h, key, key, need_weights=False)[0]


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (_Attention(nn.MultiheadAttention(4, 2, batch_first=True), cross=True), r"'attention' .* \(cross-attention\)"),
        (_Attention(nn.MultiheadAttention(4, 2, kdim=3, vdim=3, batch_first=True)), "kdim=3, vdim=3, embed_dim=4"),
        (_Attention(nn.MultiheadAttention(4, 2, add_bias_kv=True, batch_first=True)), "add_bias_kv=True"),
        (_Attention(nn.MultiheadAttention(4, 2, add_zero_attn=True, batch_first=True)), "add_zero_attn=True"),
    ],
    ids=["cross_attention", "kdim", "add_bias_kv", "add_zero_attn"],
)
def test_attention_without_a_form_is_refused_by_name(model: nn.Module, reason: str) -> None:
    x = torch.randn(3, 5, 3, generator=gen(42))
    with pytest.raises(NotApplicableError, match=reason):
        batch_functional_dimension(model, x, engine="gram")
    assert batch_functional_dimension(model, x).engine == "jacrev"


def test_the_traced_pass_counts_attention_scores_and_weights() -> None:
    """An nn.MultiheadAttention's q, k, v, scores and weights are the outputs of no leaf module: the memory estimate
    (activation_numel, from one sample) counts them, 2 · H · L² for the scores and weights alone."""
    from lightning_geomdim.core.probe_trace import ProbeTrace

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.attn = nn.Embedding(20, 8), nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.embed(ids)
            return self.head(self.attn(h, h, h, need_weights=False)[0])

    ids = torch.randint(0, 20, (1, 64), generator=torch.Generator().manual_seed(0))
    one = ProbeTrace.of(Attend(), ids, grad=False)
    assert one.activation_numel >= 2 * 2 * 64 * 64 + 4 * 64 * 8


def test_the_traced_pass_counts_the_recurrent_cells() -> None:
    """The gates and cells of every step of an LSTM or GRU are the outputs of no leaf module (recomputed, or inside
    the fused kernel): the memory estimate (activation_numel, from one sample) counts them, ≥ 18 H per step, layer
    and direction, far above the input and output sequences (T · (I + 2 H))."""
    for kind in (nn.GRU, nn.LSTM):
        model = nn.Sequential(kind(8, 16, num_layers=2, bidirectional=True, batch_first=True))
        one = ProbeTrace.of(model, torch.randn(1, 50, 8, generator=gen(54)), grad=False, output_fn=lambda o: o[0])
        assert one.activation_numel >= 50 * 2 * 2 * 18 * 16


@pytest.mark.parametrize("case", ["batchnorm2d_eval", "groupnorm", "grouped_and_depthwise_conv",
                                  "embedding_with_padding", "lstm_bidirectional_time_major", "gru",
                                  "transformer_encoder_layer", "layernorm_sequence"])
def test_the_summed_row_of_each_form_is_jt_c_without_per_sample_rows(case: str) -> None:
    """The factor check's Jᵀ c from the forms, with the samples merged into the positions (no per-sample rows),
    equals the sum of the rows the forms give (whose equality to the dense Jacobian is tested above)."""
    from lightning_geomdim.core.factor_forms import LayerFactors, summed_row

    model, x = _cases()[case]
    _randomise(model, 37)
    with measurement_mode(model):
        trace = ProbeTrace.of(model, x)
        plan = gram_plan(trace)
        factors = layer_factors(trace, plan)
    n, k = plan.num_samples, plan.outputs_per_sample
    c = torch.randn(n, k, generator=gen(51), dtype=torch.float64)
    ours = []
    for f in factors:  # the signals of the cotangent c: Σ_k c[n, k] ∂f_k(x_n)/∂z
        signals = torch.einsum("tnko,nk->tno", f.signals.view(f.signals.shape[0], n, k, -1), c)
        one = LayerFactors(f.layer, f.inputs, signals.contiguous())
        ours.append(summed_row(one))
        torch.testing.assert_close(ours[-1], jacobian_rows([one], slice(0, n), 1).sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(ours), c.reshape(-1) @ jacobian_rows(factors, slice(0, n), k),
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="one output per sample"):
        summed_row(LayerFactors(f.layer, f.inputs, f.signals[:, :1]))  # one row for n > 1 samples


class EmptySlice(nn.Module):
    """A measured Linear applied to an empty slice of the sequence (zero positions): no signal, zero columns."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x[:, :0]).sum(1) + self.b(x.mean(1))


def test_a_layer_applied_at_no_position_is_measured_by_the_gram_engine() -> None:
    """Found by review: the factor check's interaction test took the max of an empty signal and raised."""
    torch.manual_seed(0)
    model, x = EmptySlice(), torch.randn(6, 5, 4, generator=gen(52))
    result = batch_functional_dimension(model, x, engine="gram")
    assert (result.engine, result.rank) == ("gram", numpy_rank(dense_jacobian(model, x))) == ("gram", 15)


@pytest.mark.parametrize("n", [*range(1, 72), 256, 600])
def test_the_checks_sample_sets_separate_every_ordered_pair_with_the_fewest_sets(n: int) -> None:
    sets = sample_sets(n)
    m = sets.shape[0]
    assert sets.shape == (m, n) and sets.dtype == torch.bool and bool(sets.any(dim=0).all())  # each sample checked
    separated = (sets[:, :, None] & ~sets[:, None, :]).any(dim=0)  # (i, j): a set holds i and not j
    assert bool((separated | torch.eye(n, dtype=torch.bool)).all())
    if n > 1:  # Sperner: m − 1 sets cannot separate n samples when C(m − 1, ⌊(m − 1)/2⌋) < n
        assert math.comb(m - 1, (m - 1) // 2) < n
    assert {64: 8, 256: 11, 600: 12}.get(n, m) == m
